package datapath

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
)

// Rule changes work from placeholders (LoadOutline) on every path: an
// egress hook (traffic from b checked), a replaced rule, every rule of a
// hook replaced, the ct mark table judged from stored
// text, and a change that compiles the hook after all; a fresh process
// reads back exactly the rules the changes made, and packets follow them.
func TestRuleChangesFromOutline(t *testing.T) {
	testenv.RequireCommand(t, "nft")
	e := newEnv(t, Options{})
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	for i := 0; i < 40; i++ {
		verdict := "drop"
		if i%2 == 1 {
			verdict = "accept"
		}
		fmt.Fprintf(&b, "\t\tudp dport %d counter actions %s\n", 7000+i, verdict)
	}
	b.WriteString("\t\tudp dport 4739 ct mark set 0x10000 counter\n\t}\n\tegress {\n")
	for i := 0; i < 20; i++ {
		fmt.Fprintf(&b, "\t\tudp dport %d counter actions drop\n", 8000+i)
	}
	b.WriteString("\t}\n}\n")
	e.run(t, b.String())

	// want: the texts of each hook's rules, as the test expects them.
	canon := func(s string) string {
		r, err := grammar.ParseRule("<test>", s, nil)
		if err != nil {
			t.Fatal(err)
		}
		return grammar.FormatRule(r, nil)
	}
	rs, _ := e.fresh(t)
	texts := func(rules []*grammar.Rule) []string {
		var out []string
		for _, r := range rules {
			out = append(out, grammar.FormatRule(r, nil))
		}
		return out
	}
	ingress, egress := rs.Interface("vb").Ingress, rs.Interface("vb").Egress
	wantIn, wantEg := texts(ingress), texts(egress)
	check := func(step string) {
		t.Helper()
		rs, _ := e.fresh(t)
		if got := texts(rs.Interface("vb").Ingress); !slices.Equal(got, wantIn) {
			t.Fatalf("%s: ingress reads back as\n%s\nwant\n%s", step, strings.Join(got, "\n"), strings.Join(wantIn, "\n"))
		}
		if got := texts(rs.Interface("vb").Egress); !slices.Equal(got, wantEg) {
			t.Fatalf("%s: egress reads back as\n%s\nwant\n%s", step, strings.Join(got, "\n"), strings.Join(wantEg, "\n"))
		}
	}
	ctTable := func() bool {
		var ok bool
		e.do(t, func() (err error) { ok, err = e.be.table(0x00ff0000).Exists(); return err })
		return ok
	}
	if !ctTable() {
		t.Fatal("no nftables table for the ct mark rule")
	}

	// An egress rule deleted: its entries go (datagrams from b pass).
	if got := e.leave(t, 8005, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams to port 8005 passed its egress drop rule", got)
	}
	patched := e.be.patched
	e.run(t, fmt.Sprintf("delete rule vb egress handle %d", egress[5].Handle))
	if e.be.patched != patched+1 {
		t.Error("deleting an egress rule compiled the hook")
	}
	wantEg = slices.Delete(wantEg, 5, 6)
	check("delete on egress")
	if got := e.leave(t, 8005, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to port 8005 passed after its egress rule was deleted", got)
	}
	if got := e.leave(t, 8006, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams to port 8006 passed its egress drop rule after another was deleted", got)
	}

	// A drop rule replaced by an accept rule.
	if got := e.arrive(t, 7002, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams to port 7002 passed its drop rule", got)
	}
	e.run(t, fmt.Sprintf("replace rule vb ingress handle %d udp dport 7002 counter actions accept", ingress[2].Handle))
	wantIn[2] = canon("udp dport 7002 counter actions accept")
	check("replace")
	if got := e.arrive(t, 7002, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to port 7002 passed the replaced rule", got)
	}

	// Another rule deleted: the ct mark rule, a placeholder, still needs
	// the table; deleting it removes the table.
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", ingress[3].Handle))
	wantIn = slices.Delete(wantIn, 3, 4)
	check("delete on ingress")
	if !ctTable() {
		t.Fatal("the nftables table went while the ct mark rule stays")
	}
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", ingress[40].Handle))
	wantIn = wantIn[:len(wantIn)-1]
	check("delete the ct mark rule")
	if ctTable() {
		t.Fatal("the nftables table stayed after the last ct mark rule went")
	}

	// A rule of a shape the hook does not have: the hook is compiled
	// from the stored rules.
	e.run(t, "insert rule vb ingress ip saddr 192.0.2.1 tcp dport 9000 counter actions drop")
	wantIn = append([]string{canon("ip saddr 192.0.2.1 tcp dport 9000 counter actions drop")}, wantIn...)
	check("insert of a new shape")
	if got := e.arrive(t, 7000, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams to port 7000 passed its drop rule after the compilation", got)
	}
	if got := e.arrive(t, 7001, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to port 7001 passed its accept rule after the compilation", got)
	}
	if got := e.arrive(t, 7002, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to port 7002 passed the replaced rule after the compilation", got)
	}

	// Every rule of a hook replaced in one batch (the same ports, in the
	// other order): no placeholder is left in it; the rules it replaces
	// are parsed all the same (the hook is compiled here: the new keys
	// are the old ones of other rules), and packets follow the new rules.
	b.Reset()
	b.WriteString("flush ruleset\ninterface vb {\n\tegress {\n")
	for i := 0; i < 10; i++ {
		fmt.Fprintf(&b, "\t\tudp dport %d counter actions drop\n", 8100+2*i)
	}
	b.WriteString("\t}\n}\n")
	e.run(t, b.String())
	rs, _ = e.fresh(t)
	b.Reset()
	for i, r := range rs.Interface("vb").Egress {
		fmt.Fprintf(&b, "replace rule vb egress handle %d udp dport %d counter actions drop\n", r.Handle, 8118-2*i)
	}
	e.run(t, b.String())
	for _, port := range []int{8100, 8106, 8118} {
		if got := e.leave(t, port, 1); got != 0 {
			t.Fatalf("a datagram to port %d passed after the rules were replaced", port)
		}
	}
	if got := e.leave(t, 8107, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to port 8107 (no rule) passed", got)
	}
}

// A placeholder is known by its place and its identity: a rule that only
// carries a placeholder's position (a copy of it) is not one, nor is a
// position out of range.
func TestPlaceholderIdentity(t *testing.T) {
	st := bigState(3)
	o := &outlineRules{st: st, hooks: st.hooks(), rules: [][]grammar.Rule{make([]grammar.Rule, 3)}}
	for i := range o.rules[0] {
		o.rules[0][i].Pos = grammar.Pos{Filename: placeholderFile, Line: 0, Offset: i}
	}
	if rec, ok := o.record(&o.rules[0][1]); !ok || rec.Handle != 2 {
		t.Errorf("placeholder 1: %+v %v", rec, ok)
	}
	copied := o.rules[0][1]
	for _, r := range []*grammar.Rule{&copied, {Span: grammar.Span{Pos: grammar.Pos{Filename: placeholderFile, Line: 1}}},
		{Span: grammar.Span{Pos: grammar.Pos{Filename: placeholderFile, Offset: 3}}}, {}} {
		if rec, ok := o.record(r); ok {
			t.Errorf("%+v taken for a placeholder (%+v)", r.Pos, rec)
		}
	}
	var none *outlineRules
	if _, ok := none.record(&o.rules[0][0]); ok {
		t.Error("a nil outline has placeholders")
	}
}
