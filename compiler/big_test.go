package compiler_test

import (
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// A long list of rules that can't be grouped still compiles, passes the
// verifier (exit stubs keep jumps in range) and matches its last rule.
func TestLongRuleList(t *testing.T) {
	var rules []*grammar.Rule
	for i := 0; i < 2000; i++ {
		rules = append(rules, &grammar.Rule{Handle: uint64(i + 1), Proto: grammar.ProtoUDP, Dport: ports(uint16(10000 + i)), Counter: i%2 == 0,
			Actions: []*grammar.Action{act(grammar.ActDrop, 0)}})
	}
	start := time.Now()
	l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookIngress})
	t.Logf("%d instructions, compiled and verified in %v", len(l.prog.Spec.Programs[compiler.ProgramName].Instructions), time.Since(start))
	if r := l.run(t, udpPkt(t, true, 1, 11998, nil), 0); r.ret != compiler.VerdictDrop {
		t.Fatalf("verdict %d", r.ret)
	}
	if r := l.run(t, udpPkt(t, false, 1, 9999, nil), 0); r.ret != compiler.VerdictNext {
		t.Fatalf("verdict %d", r.ret)
	}
	if c := l.counter(t, 1998); c.Packets != 1 {
		t.Fatalf("counter %+v", c)
	}
}

// The largest anonymous host lists still get a host table (a value of
// about 1.25 MiB) that the kernel and the verifier accept, and match.
func TestLargeHostTable(t *testing.T) {
	hosts := manyPrefixes(100000)
	start := time.Now()
	in := compileLoad(t, []*grammar.Rule{saddrRule(&grammar.AddrMatch{Prefixes: hosts})}, nil, compiler.Options{Hook: grammar.HookEgress})
	out := compileLoad(t, []*grammar.Rule{saddrRule(&grammar.AddrMatch{Prefixes: hosts[1:]})}, nil, compiler.Options{Hook: grammar.HookEgress})
	t.Logf("two programs with 100 000-host tables compiled and loaded in %v", time.Since(start))
	table := false
	for _, m := range in.prog.Spec.Maps {
		table = table || m.ValueSize >= 1<<20 // not an LPM trie (value size 1)
	}
	if !table {
		t.Fatal("no host table in the program's maps")
	}
	pkt := udpPkt(t, false, 40000, 4739, nil) // from 192.0.2.1, the first host
	if r := in.run(t, pkt, 0); r.ret != compiler.VerdictPass {
		t.Fatalf("listed source: verdict %d", r.ret)
	}
	if r := out.run(t, pkt, 0); r.ret != compiler.VerdictNext {
		t.Fatalf("unlisted source: verdict %d", r.ret)
	}
}
