package datapath

import (
	"fmt"
	"slices"
	"testing"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// hostRule matches UDP from 192.0.2.<host> to port and drops it: many of
// them share one shape, so the hook classifies through rule tables.
func hostRule(t *testing.T, handle uint64, host int, port int) *grammar.Rule {
	t.Helper()
	return handleRule(t, handle, fmt.Sprintf("ip saddr 192.0.2.%d udp dport %d counter actions drop", host, port))
}

// handleRule parses a rule and gives it a handle.
func handleRule(t *testing.T, handle uint64, text string) *grammar.Rule {
	t.Helper()
	r, err := grammar.ParseRule("<test>", text, nil)
	if err != nil {
		t.Fatal(err)
	}
	r.Handle = handle
	return r
}

// vbIngress is a ruleset of rules (a copy) on vb's ingress hook.
func vbIngress(rules []*grammar.Rule) *ruleset.Ruleset {
	return &ruleset.Ruleset{NextHandle: 100, Interfaces: []*ruleset.Interface{{Name: "vb", Ingress: slices.Clone(rules)}}}
}

// Adding a rule of an existing shape at the end, deleting the last one or
// replacing one in place rewrites the rule tables of the running program
// (no reload); the change takes effect and counters keep counting for the
// right rules. Inserting at the front takes a priority below the others'
// and a slot of its own: no reload either.
func TestTableOnlyChanges(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	var rules []*grammar.Rule
	for i := 0; i < 40; i++ {
		rules = append(rules, hostRule(t, uint64(i+1), 100+i, 7000+i))
	}
	rs := vbIngress
	// 192.0.2.1 (a) sends; rules 41 and 42 will match it. (Their ports are
	// in the range of the existing rules: the compiler's port prefilter is
	// part of the program.)
	e.commit(t, rs(rules))
	prog := liveProgID(t, e, id)
	if got := e.send(t, 7005, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams arrived before the rule was added", got)
	}

	added := append(slices.Clone(rules), hostRule(t, 41, 1, 7005))
	e.commit(t, rs(added))
	if after := liveProgID(t, e, id); after != prog {
		t.Fatalf("adding a rule of an existing shape reloaded the program (%d → %d)", prog, after)
	}
	if got := e.send(t, 7005, 3); got != 0 {
		t.Errorf("%d of 3 datagrams passed the added drop rule", got)
	}
	_, counters := e.fresh(t)
	if c := counters[41]; c.Packets != 3 {
		t.Errorf("counter of the added rule %+v, want 3 packets", c)
	}

	// Delete it again (the last rule): tables only; then add another one
	// in its slot, whose counter must not inherit the deleted rule's 3.
	e.commit(t, rs(rules))
	if after := liveProgID(t, e, id); after != prog {
		t.Errorf("deleting the last rule reloaded the program")
	}
	if got := e.send(t, 7005, 2); got != 2 {
		t.Errorf("%d of 2 datagrams arrived after the drop rule was deleted", got)
	}
	again := append(slices.Clone(rules), hostRule(t, 42, 1, 7006))
	e.commit(t, rs(again))
	if got := e.send(t, 7006, 2); got != 0 {
		t.Errorf("%d of 2 datagrams passed the re-added drop rule", got)
	}
	if after := liveProgID(t, e, id); after != prog {
		t.Errorf("re-adding a rule reloaded the program")
	}
	_, counters = e.fresh(t)
	if c := counters[42]; c.Packets != 2 {
		t.Errorf("counter of a rule in a reused slot %+v, want 2 packets", c)
	}

	// Insert at the front: a priority below the first rule's, a slot of
	// its own: no reload, counters stay with their rules.
	front := append([]*grammar.Rule{hostRule(t, 43, 250, 7009)}, again...)
	e.commit(t, rs(front))
	if after := liveProgID(t, e, id); after != prog {
		t.Errorf("inserting at the front reloaded the program")
	}
	if got := e.send(t, 7006, 1); got != 0 {
		t.Errorf("rule 42 stopped dropping after the insert")
	}
	_, counters = e.fresh(t)
	if c := counters[42]; c.Packets != 3 {
		t.Errorf("counter of rule 42 after the insert %+v, want 3 packets", c)
	}
}

// One-port shapes are arrays indexed by generation and port: a rule of
// that shape is added without a reload too.
func TestTableOnlyPortArray(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	var rules []*grammar.Rule
	for i := 0; i < 40; i++ {
		rules = append(rules, udpRule(uint64(i+1), uint16(7000+2*i), grammar.ActDrop))
	}
	rs := vbIngress
	e.commit(t, rs(rules))
	prog := liveProgID(t, e, id)
	if got := e.send(t, 7005, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to an odd port arrived before the rule was added", got)
	}
	e.commit(t, rs(append(slices.Clone(rules), udpRule(41, 7005, grammar.ActDrop))))
	if after := liveProgID(t, e, id); after != prog {
		t.Errorf("adding a one-port rule reloaded the program (%d → %d)", prog, after)
	}
	if got := e.send(t, 7005, 2); got != 0 {
		t.Errorf("%d of 2 datagrams passed the added drop rule", got)
	}
	if got := e.send(t, 7001, 2); got != 2 {
		t.Errorf("%d of 2 datagrams to a port without a rule arrived", got)
	}
	_, counters := e.fresh(t)
	if c := counters[41]; c.Packets != 2 {
		t.Errorf("counter of the added rule %+v, want 2 packets", c)
	}
}
