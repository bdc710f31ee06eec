package compiler_test

import (
	"testing"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// A change that only changes table contents keeps the digest, and applying
// it to the live maps (the other generation's entries, then one write of
// the control map) switches what the loaded program matches, without
// loading anything.
func TestTableUpdateWithoutReload(t *testing.T) {
	opts := compiler.Options{Hook: grammar.HookEgress}
	old := append(mixedShapes(69), matchingIPFIX(70))
	moved := *matchingIPFIX(70)
	moved.Dport = ports(2055)
	next := append(mixedShapes(69), &moved)
	a, err := compiler.Compile(old, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	b, err := compiler.Compile(next, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	if a.Digest != b.Digest {
		t.Fatal("a port changed in a table entry: the digest changed")
	}
	if len(a.Tables) == 0 {
		t.Fatal("no tables")
	}
	// Another action body is another program.
	dropped := *matchingIPFIX(70)
	dropped.Actions = []*grammar.Action{act(grammar.ActDrop, 0)}
	if c, err := compiler.Compile(append(mixedShapes(69), &dropped), nil, opts); err != nil || c.Digest == a.Digest {
		t.Fatalf("a new action body kept the digest (err %v)", err)
	}

	l := compileLoad(t, old, nil, opts)
	to4739, to2055 := udpPkt(t, false, 40000, 4739, nil), udpPkt(t, false, 40000, 2055, nil)
	if r := l.run(t, to4739, 0); r.ret != compiler.VerdictPass {
		t.Fatalf("before: port 4739 verdict %d", r.ret)
	}
	// The commit: generation 1 gets the new entries, then the switch.
	for name, kvs := range b.TableContents(1) {
		m := l.coll.Maps[name]
		for _, kv := range kvs {
			if err := m.Put(kv.Key, kv.Value); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
	}
	if r := l.run(t, to4739, 0); r.ret != compiler.VerdictPass {
		t.Fatalf("new entries written, not switched: port 4739 verdict %d", r.ret)
	}
	switchToNewTables(t, l, to4739, to2055)
}

// switchToNewTables flips the control word to generation 1 and checks the
// rewritten tables took over: port 4739's rule is gone, port 2055 still
// passes, and rule 69's counter holds the two packets before the switch
// and the one after.
func switchToNewTables(t *testing.T, l *loaded, to4739, to2055 []byte) {
	t.Helper()
	if err := l.coll.Maps[abi.ControlMap].Put(uint32(0), abi.Control{Generation: 1, NoRule: abi.NoRule}); err != nil {
		t.Fatal(err)
	}
	if r := l.run(t, to4739, 0); r.ret != compiler.VerdictNext {
		t.Fatalf("after: port 4739 verdict %d, want no match", r.ret)
	}
	if r := l.run(t, to2055, 0); r.ret != compiler.VerdictPass {
		t.Fatalf("after: port 2055 verdict %d", r.ret)
	}
	if c := l.counter(t, 69); c.Packets != 3 {
		t.Fatalf("rule 69 counted %d packets, want 3 (twice before the switch, once after)", c.Packets)
	}
}
