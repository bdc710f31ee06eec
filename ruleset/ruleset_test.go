package ruleset

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
)

// run parses text and runs it as one batch against b.
func run(t *testing.T, b Backend, text string, s *Session) (string, error) {
	t.Helper()
	live, err := b.Load()
	if err != nil {
		t.Fatal(err)
	}
	cmds, srcs, err := grammar.Parse("<cmdline>", text, &grammar.Options{LookupSet: live.SetType})
	if err != nil {
		t.Fatalf("%s", grammar.FormatError(err, srcs))
	}
	var out bytes.Buffer
	if s == nil {
		s = &Session{}
	}
	s.Backend, s.Out = b, &out
	err = s.Run(cmds)
	return out.String(), err
}

func TestHandlesAndPositions(t *testing.T) {
	b := &FileBackend{Path: filepath.Join(t.TempDir(), "state")}
	mustRun := func(text string) string {
		out, err := run(t, b, text, &Session{Handles: true})
		if err != nil {
			t.Fatalf("%s: %v", text, err)
		}
		return out
	}
	mustRun("add rule lo egress udp dport 1 actions drop")                      // 1
	mustRun("add rule lo egress udp dport 2 actions drop")                      // 2
	mustRun("insert rule lo egress udp dport 3 actions drop")                   // 3, first
	mustRun("add rule lo egress position 1 udp dport 4 actions drop")           // 4, after 1
	mustRun("insert rule lo egress position 2 udp dport 5 actions drop")        // 5, before 2
	mustRun("replace rule lo egress handle 1 udp dport 11 actions accept")      // keeps handle 1
	mustRun("add rule lo ingress tcp dport 179 sport 540 actions unfunnel udp") // 6
	mustRun("delete rule lo egress handle 2")
	got := mustRun("list ruleset")
	want := `interface lo {
	ingress {
		tcp dport 179 sport 540 actions unfunnel udp # handle 6
	}
	egress {
		udp dport 3 actions drop # handle 3
		udp dport 11 actions accept # handle 1
		udp dport 4 actions drop # handle 4
		udp dport 5 actions drop # handle 5
	}
}
`
	if got != want {
		t.Errorf("got:\n%s\nwant:\n%s", got, want)
	}
	// Handles are not reused after deletion.
	rs, _ := b.Load()
	if rs.NextHandle != 7 {
		t.Errorf("next handle %d, want 7", rs.NextHandle)
	}
	if _, err := run(t, b, "delete rule lo egress handle 2", nil); err == nil || !strings.Contains(err.Error(), "no rule with handle 2") {
		t.Errorf("deleting a deleted handle: %v", err)
	}
	// A handle of another hook is not found in this one.
	if _, err := run(t, b, "delete rule lo egress handle 6", nil); err == nil {
		t.Errorf("handle 6 is in ingress, not egress")
	}
}

// failingBackend refuses every commit, like a verifier rejection.
type failingBackend struct{ FileBackend }

func (f *failingBackend) Commit(*Ruleset) error { return errors.New("verifier says no") }

func TestFailedCommitChangesNothing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state")
	good := &FileBackend{Path: path}
	if _, err := run(t, good, "add rule lo egress udp dport 1 actions drop", nil); err != nil {
		t.Fatal(err)
	}
	bad := &failingBackend{FileBackend{Path: path}}
	_, err := run(t, bad, "flush ruleset; add rule lo ingress udp dport 2 actions drop", nil)
	if err == nil {
		t.Fatal("commit error not reported")
	}
	out, _ := run(t, good, "list ruleset", nil)
	if !strings.Contains(out, "udp dport 1 actions drop") || strings.Contains(out, "dport 2") {
		t.Errorf("state changed by a failed transaction:\n%s", out)
	}
	// An error in the middle of a batch keeps the earlier commands out too.
	_, err = run(t, good, "add rule lo egress udp dport 3 actions drop; delete rule lo egress handle 99", nil)
	if err == nil {
		t.Fatal("bad handle not reported")
	}
	out, _ = run(t, good, "list ruleset", nil)
	if strings.Contains(out, "dport 3") {
		t.Errorf("half a batch was applied:\n%s", out)
	}
}

func TestSets(t *testing.T) {
	b := &FileBackend{Path: filepath.Join(t.TempDir(), "state")}
	if _, err := run(t, b, "set ports { type inet_service; elements = { 2055, 4739 } }\nadd rule lo egress udp dport @ports actions funnel tcp dport 179 sport 540", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, b, "add element ports { 6343, 9995-9996 }", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, b, "delete element ports { 4739 }", nil); err != nil {
		t.Fatal(err)
	}
	out, err := run(t, b, "list set ports", nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := "set ports {\n\ttype inet_service\n\telements = { 2055, 6343, 9995-9996 }\n}\n"; out != want {
		t.Errorf("got %q want %q", out, want)
	}
	for _, bad := range []string{"add element ports { 2055 }", "delete element ports { 1 }", "add element nosuch { 1 }", "add element ports { 192.0.2.1 }"} {
		if _, err := run(t, b, bad, nil); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
	// nft's forms: add set, delete set (refused while a rule uses the set).
	if _, err := run(t, b, "add set spare { type ipv6_addr; elements = { 2001:db8::/32 } }", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := run(t, b, "delete set ports", nil); err == nil || !strings.Contains(err.Error(), "used by rule handle 1") {
		t.Errorf("deleting a set in use: %v", err)
	}
	if _, err := run(t, b, "delete set spare", nil); err != nil {
		t.Errorf("delete set: %v", err)
	}
	if rs, _ := b.Load(); rs.Set("spare") != nil || rs.Set("ports") == nil {
		t.Errorf("sets after delete set: %+v", rs.Sets)
	}
	// Removing the set under a rule that uses it is refused.
	if _, err := run(t, b, "flush ruleset; add rule lo egress udp dport @ports actions drop", nil); err == nil {
		t.Errorf("rule using a flushed set accepted")
	}
}

func TestBareRules(t *testing.T) {
	b := &FileBackend{Path: filepath.Join(t.TempDir(), "state")}
	text := "ip udp dport 4739 actions funnel encap tcp dport 179 sport 540 #IPFIX\nip tcp dport 179 sport 540 actions unfunnel decap udp\n"
	if _, err := run(t, b, text, nil); err == nil || !strings.Contains(err.Error(), "outside an interface block") {
		t.Fatalf("bare rules without --interface: %v", err)
	}
	s := &Session{Bare: &BareTarget{Interfaces: []string{"lo", "eth9"}, Hooks: []grammar.Hook{grammar.HookIngress, grammar.HookEgress}}}
	if _, err := run(t, b, text, s); err != nil {
		t.Fatal(err)
	}
	rs, _ := b.Load()
	if len(rs.Interfaces) != 2 || len(rs.Interfaces[1].Egress) != 2 || len(rs.Interfaces[1].Ingress) != 2 {
		t.Errorf("bare rules not added to every interface and hook: %+v", rs.Interfaces)
	}
}

func TestJSON(t *testing.T) {
	b := &FileBackend{Path: filepath.Join(t.TempDir(), "state")}
	out, err := run(t, b, `set s { type ipv4_addr; elements = { 192.0.2.0/24 } }
add rule lo egress ip saddr @s udp dport 1 counter actions drop comment "c"
list ruleset`, &Session{JSON: true})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"nftables":[{"metainfo":{"version":"","release_name":"sfunnel","json_schema_version":1}},{"set":{"elem":[{"prefix":{"addr":"192.0.2.0","len":24}}],"name":"s","type":"ipv4_addr"}},{"chain":{"hook":"egress","interface":"lo"}},{"rule":{"comment":"c","expr":[{"match":{"left":{"payload":{"field":"saddr","protocol":"ip"}},"op":"==","right":"@s"}},{"match":{"left":{"payload":{"field":"dport","protocol":"udp"}},"op":"==","right":1}},{"counter":{"packets":0,"bytes":0}},{"drop":null}],"handle":1,"hook":"egress","interface":"lo"}}]}` + "\n"
	if out != want {
		t.Errorf("got  %s\nwant %s", out, want)
	}
}

// A listing prints rules exactly as the canonical printer does, with
// counter values and handles wherever the rule has them.
func TestListingMatchesPrinter(t *testing.T) {
	text := `set ports {
	type inet_service
	elements = { 80, 443 }
}
interface eth0 {
	ingress {
		tcp dport 179 sport 540 counter actions unfunnel udp
		udp dport @ports counter meta mark set 0x10 actions accept comment "with counter"
		ip saddr 192.0.2.0/24 counter
		udp dport 5 actions drop
	}
	egress {
		ip daddr 198.51.100.1 udp dport { 2055, 4739 } counter actions funnel tcp dport 179 sport 540
		counter comment "counter packets 1"
		meta mark 0x1 counter ct mark set 0x2
	}
}
`
	cmds, _, err := grammar.Parse("<test>", text, nil)
	if err != nil {
		t.Fatal(err)
	}
	rs := &Ruleset{NextHandle: 1}
	for _, c := range cmds {
		if _, err := rs.apply(c); err != nil {
			t.Fatal(err)
		}
	}
	counters := map[uint64]Counter{1: {7, 700}, 2: {8, 800}, 3: {9, 900}, 5: {1, 2}, 6: {3, 4}, 7: {0, 0}}
	for _, o := range []*ListOptions{{}, {Handles: true}, {Counters: counters}, {Handles: true, Counters: counters}} {
		var want strings.Builder
		for _, s := range rs.Sets {
			want.WriteString(grammar.FormatSet(s, "") + "\n")
		}
		po := o.print()
		for _, i := range rs.Interfaces {
			want.WriteString("interface " + i.Name + " {\n")
			for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
				want.WriteString("\t" + h.String() + " {\n")
				for _, r := range i.Rules(h) {
					want.WriteString("\t\t" + grammar.FormatRule(r, po) + "\n")
				}
				want.WriteString("\t}\n")
			}
			want.WriteString("}\n")
		}
		var got bytes.Buffer
		if err := WriteListing(&got, ListingOf(rs), nil, o); err != nil {
			t.Fatal(err)
		}
		if got.String() != want.String() {
			t.Errorf("options %+v:\n got %s\nwant %s", o, got.String(), want.String())
		}
	}
}
