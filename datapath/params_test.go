package datapath

import (
	"fmt"
	"slices"
	"testing"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
)

// dnatRule rewrites UDP to port to 192.0.2.2:to.
func dnatRule(t *testing.T, handle uint64, port, to int) *grammar.Rule {
	t.Helper()
	return handleRule(t, handle, fmt.Sprintf("ip daddr 192.0.2.2 udp dport %d counter actions dnat to 192.0.2.2:%d", port, to))
}

// A hook of many dnat targets has parametric bodies (compiler/params.go):
// a rule whose target changes is a table update — the program stays, the
// datagrams arrive at the new port (the checksum follows: the socket
// accepts them), and the rule's counter keeps counting.
func TestActionParamsLive(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	var rules []*grammar.Rule
	for i := 0; i < 40; i++ {
		rules = append(rules, dnatRule(t, uint64(i+1), 7000+i, 8000+i))
	}
	rs := vbIngress
	e.commit(t, rs(rules))
	prog := liveProgID(t, e, id)
	if got := e.sendTo(t, 7005, 8005, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to 7005 arrived at 8005", got)
	}
	changed := slices.Clone(rules)
	changed[5] = dnatRule(t, 6, 7005, 9005)
	e.commit(t, rs(changed))
	if after := liveProgID(t, e, id); after != prog {
		t.Fatalf("a new dnat target reloaded the program (%d → %d)", prog, after)
	}
	if got := e.sendTo(t, 7005, 9005, 3); got != 3 {
		t.Errorf("%d of 3 datagrams to 7005 arrived at the new target 9005", got)
	}
	if got := e.sendTo(t, 7006, 8006, 1); got != 1 {
		t.Errorf("the rule next to it stopped rewriting")
	}
	_, counters := e.fresh(t)
	if c := counters[6]; c.Packets != 5 {
		t.Errorf("counter of the changed rule %+v, want 5 packets", c)
	}
}
