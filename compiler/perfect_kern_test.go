package compiler_test

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// shapeOrder is a rough shape of a rule (which matches it has): sorting by
// it puts rules of one template in one run.
func shapeOrder(r *grammar.Rule) string {
	return fmt.Sprint(r.Family, r.Proto, r.Saddr != nil, r.Daddr != nil, r.Sport != nil, r.Dport != nil, r.TCPFlags != nil, r.MetaMark != nil, r.CtMark != nil)
}

// Table segments whose shapes come in runs (rule positions grouped by
// shape), so that a packet one shape's rule matches meets later shapes
// whose lowest priority can't beat it (their tables are skipped), and
// segments of more one-port shapes than port arrays (the rest are
// port-indexed tables in the perfect-hash value): compiled vs the
// reference model.
func TestPerfectTablesDifferential(t *testing.T) {
	g := diffSeed(t)
	d := newTally()
	portTables := 0
	for rs := 0; rs < 60 && d.failures < 5; rs++ {
		sets := g.sets()
		var rules []*grammar.Rule
		if rs%2 == 0 {
			rules = g.mixedRules(20+g.pick(60), 2+g.pick(4), sets)
			slices.SortStableFunc(rules, func(a, b *grammar.Rule) int { return strings.Compare(shapeOrder(a), shapeOrder(b)) })
		} else {
			// Six one-port shapes (protocol × port field × family), in
			// turn.
			for i := 0; i < 6*(3+g.pick(5)); i++ {
				r := &grammar.Rule{Proto: []grammar.Proto{grammar.ProtoUDP, grammar.ProtoTCP}[i%2], Family: grammar.Family(i % 3),
					Actions: []*grammar.Action{act([]grammar.ActionKind{grammar.ActAccept, grammar.ActDrop}[g.pick(2)], 0)}}
				if i%6 < 3 {
					r.Dport = ports(g.port())
				} else {
					r.Sport = ports(g.port())
				}
				rules = append(rules, r)
			}
		}
		for i, r := range rules {
			r.Handle = uint64(i + 1)
		}
		opts := compiler.Options{Hook: grammar.Hook(g.pick(2)), ChecksumHelper: g.chance(0.3)}
		if p, err := compiler.Compile(rules, sets, opts); err == nil && rs%2 == 1 {
			if strings.Contains(compiler.Listing(p.Spec.Programs[compiler.ProgramName].Instructions), "key(dport) ") &&
				p.Spec.Maps[abi.PerfectGen(0)] != nil && len(p.Tables) < 7 { // (the perfect-hash tables are two maps)
				portTables++
			}
		}
		diffRuleset(t, g, d, rs, rules, sets, opts, 256)
	}
	t.Logf("%v; %d rulesets with port-indexed tables", d, portTables)
	if portTables == 0 {
		t.Error("no ruleset had more one-port shapes than port arrays")
	}
}

// A perfect-hash table rebuilt without compiling (RebuildPerfect, what the
// datapath does for one changed rule) is read by the loaded program: the
// matching rule's key moved from port 4739 to 2055 in the spare
// generation, then the switch.
func TestRebuildPerfectLoaded(t *testing.T) {
	opts := compiler.Options{Hook: grammar.HookEgress}
	rules := append(mixedShapes(69), matchingIPFIX(70))
	p, err := compiler.Compile(rules, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	layout, _ := p.Layout()
	var pl *compiler.PerfectLayout
	for _, seg := range layout.Segments {
		for _, sh := range seg.Shapes {
			if strings.HasPrefix(sh.Key, "key(saddr,dport) ip saddr 0.0.0.0 udp") {
				pl = sh.PerfectLayout
			}
		}
	}
	if pl == nil {
		t.Fatal("no perfect-hash table for the saddr+dport shape")
	}
	live := p.TableContents(0)[abi.PerfectGen(0)][0].Value.([]byte)
	key := func(port uint32) []byte {
		return binary.NativeEndian.AppendUint32(netip.MustParseAddr("192.0.2.1").AsSlice(), port)
	}
	v, ok := compiler.LookupPerfect(live, pl, key(4739))
	if !ok || v.Prio != 70 {
		t.Fatalf("LookupPerfect of rule 69's key: %+v %v", v, ok)
	}
	blob, ok := compiler.RebuildPerfect(live, pl, []compiler.PerfectEntry{{Key: key(2055), Value: v}}, [][]byte{key(4739)})
	if !ok {
		t.Fatal("not rebuilt")
	}

	l := compileLoad(t, rules, nil, opts)
	to4739, to2055 := udpPkt(t, false, 40000, 4739, nil), udpPkt(t, false, 40000, 2055, nil)
	if r := l.run(t, to4739, 0); r.ret != compiler.VerdictPass {
		t.Fatalf("before: port 4739 verdict %d", r.ret)
	}
	if err := l.coll.Maps[abi.PerfectGen(1)].Put(uint32(0), blob); err != nil {
		t.Fatal(err)
	}
	if r := l.run(t, to4739, 0); r.ret != compiler.VerdictPass {
		t.Fatalf("spare generation written, not switched: port 4739 verdict %d", r.ret)
	}
	// The other tables' generation 1 (the port array) as generation 0.
	for name, kvs := range p.TableContents(1) {
		if abi.IsPerfectGen(name) {
			continue
		}
		for _, kv := range kvs {
			if err := l.coll.Maps[name].Put(kv.Key, kv.Value); err != nil {
				t.Fatal(err)
			}
		}
	}
	switchToNewTables(t, l, to4739, to2055)
	// And back: generation 0's map gets the 2055 table too, generation 1's
	// the original; each switch reads the map of its generation.
	if err := l.coll.Maps[abi.PerfectGen(0)].Put(uint32(0), blob); err != nil {
		t.Fatal(err)
	}
	if err := l.coll.Maps[abi.PerfectGen(1)].Put(uint32(0), live); err != nil {
		t.Fatal(err)
	}
	for _, gen := range []uint32{0, 1, 0} {
		if err := l.coll.Maps[abi.ControlMap].Put(uint32(0), abi.Control{Generation: gen, NoRule: abi.NoRule}); err != nil {
			t.Fatal(err)
		}
		want4739, want2055 := compiler.VerdictNext, compiler.VerdictPass // the rebuilt table
		if gen == 1 {
			want4739, want2055 = compiler.VerdictPass, compiler.VerdictNext
		}
		if r := l.run(t, to4739, 0); r.ret != want4739 {
			t.Fatalf("generation %d: port 4739 verdict %d, want %d", gen, r.ret, want4739)
		}
		if r := l.run(t, to2055, 0); r.ret != want2055 {
			t.Fatalf("generation %d: port 2055 verdict %d, want %d", gen, r.ret, want2055)
		}
	}
}

// A hook of many shapes gives perfect-hash tables to the first eight
// (the verifier walks their longer probes once per state) and hash
// tables to the rest of those that are code (ten here: a hook of 30
// rules has no code budget, shapescan.go).
func TestPerfectShapesBounded(t *testing.T) {
	rules := sharedShapes(10, 3, 2055)
	p, err := compiler.Compile(rules, nil, compiler.Options{Hook: grammar.HookEgress})
	if err != nil {
		t.Fatal(err)
	}
	layout, _ := p.Layout()
	perfect, hashed := 0, 0
	for _, seg := range layout.Segments {
		for _, sh := range seg.Shapes {
			switch {
			case sh.Perfect && !sh.PerfectLayout.Port:
				perfect++
			case !sh.Perfect && !sh.Array:
				hashed++
			}
		}
	}
	t.Logf("%d perfect-hash tables, %d hash tables", perfect, hashed)
	if perfect != 8 || hashed == 0 {
		t.Fatalf("%d perfect-hash and %d hash tables, want 8 and some", perfect, hashed)
	}
}

// A port-indexed table in the perfect-hash value, the segment's first
// probe, read by packets without ports: an absent port (0x10000) reads
// the table's extra value, which is empty, so the next shape's rule (a
// meta mark) still wins; an empty port's value is empty too. The first
// probe takes whatever it reads as the best so far (an empty value's
// priority is abi.NoRule), the later ones only a lower priority.
func TestPortTableAbsentPort(t *testing.T) {
	var rules []*grammar.Rule
	for i := range 20 {
		rules = append(rules, &grammar.Rule{Handle: uint64(i + 1), Proto: grammar.ProtoUDP, Dport: ports(uint16(7000 + i)), Actions: []*grammar.Action{act(grammar.ActAccept, 0)}})
	}
	for i := range 20 {
		rules = append(rules, &grammar.Rule{Handle: uint64(i + 21), MetaMark: &grammar.MarkMatch{Value: uint32(i + 1), Mask: 0xffffffff}, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}})
	}
	opts := compiler.Options{Hook: grammar.HookEgress}
	p, err := compiler.Compile(rules, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	layout, _ := p.Layout()
	var probes []string
	for _, seg := range layout.Segments {
		for _, sh := range seg.Shapes {
			probes = append(probes, sh.Key)
			if !sh.Perfect {
				t.Fatalf("shape %s is not in the perfect-hash value", sh.Key)
			}
		}
	}
	if len(probes) != 2 || !strings.HasPrefix(probes[0], "key(dport)") {
		t.Fatalf("shapes %v, want the port table first", probes)
	}
	l := compileLoad(t, rules, nil, opts)
	fragment := func(pkt []byte) []byte {
		pkt = slices.Clone(pkt)
		binary.BigEndian.PutUint16(pkt[14+6:], 1) // fragment offset 8: no transport header
		return pkt
	}
	for _, c := range []struct {
		what string
		pkt  []byte
		mark uint32
		want int32
	}{
		{"port 7001", udpPkt(t, false, 40000, 7001, nil), 0, compiler.VerdictPass},
		{"port 7001, mark 2", udpPkt(t, false, 40000, 7001, nil), 2, compiler.VerdictPass},
		{"port of no rule, mark 2", udpPkt(t, false, 40000, 9999, nil), 2, compiler.VerdictDrop},
		{"fragment, mark 2", fragment(udpPkt(t, false, 40000, 7001, nil)), 2, compiler.VerdictDrop},
		{"fragment, mark 0", fragment(udpPkt(t, false, 40000, 7001, nil)), 0, compiler.VerdictNext},
		{"port of no rule, mark 0", udpPkt(t, false, 40000, 9999, nil), 0, compiler.VerdictNext},
	} {
		if r := l.run(t, c.pkt, c.mark); r.ret != c.want {
			t.Errorf("%s: verdict %d, want %d", c.what, r.ret, c.want)
		}
	}
}
