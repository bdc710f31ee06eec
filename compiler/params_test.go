package compiler_test

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/refmodel"
)

// Hooks of many distinct action lists: bodies shared by action kind, the
// values read from the parameter map (compiler/params.go).

// ownActions gives every rule an action list of its own: a random one, a
// third of them dnat and funnel stacked. terminal: never the empty list.
func (g gen) ownActions(rules []*grammar.Rule, sets map[string]*grammar.Set, terminal bool) {
	for _, r := range rules {
		var acts []*grammar.Action
		for {
			acts = g.rule(sets).Actions
			if len(acts) > 0 || !terminal && g.chance(0.1) {
				break
			}
		}
		if g.chance(0.3) {
			v6 := r.Family == grammar.FamilyIPv6 || r.Family == grammar.FamilyAny && g.chance(0.5)
			d := &grammar.Action{Kind: grammar.ActDNAT, DNATAddr: g.addr(v6)}
			if g.chance(0.5) {
				d.DNATPort = g.port()
			}
			acts = []*grammar.Action{d, g.funnel()}
		}
		r.Actions = acts
		if r.Proto == grammar.ProtoAny && slices.ContainsFunc(acts, func(a *grammar.Action) bool { return a.Kind == grammar.ActFunnel }) {
			r.Proto = grammar.Proto(1 + g.pick(2))
		}
		fixActions(r)
		if r.TCPFlags != nil && r.Proto != grammar.ProtoTCP {
			r.TCPFlags = nil
		}
	}
}

// hasParamsMap reports whether a compiled hook has parametric bodies.
func hasParamsMap(p *compiler.Program) bool { return slices.Contains(p.Tables, abi.ActionParams) }

// Rulesets where every rule has an action list of its own (stacked dnat
// and funnel among them), as records, tables and members, against the
// reference model: bytes, verdicts, marks, counters and stats.
func TestDifferentialActionParams(t *testing.T) {
	g := diffSeed(t)
	d := newTally()
	sizes := []int{24, 40, 120, 300, 1200}
	if testing.Short() {
		sizes = sizes[:3]
	}
	for rs, n := range sizes {
		sets := g.sets()
		var rules []*grammar.Rule
		if rs%2 == 0 {
			rules = g.uniqueRules(n, 0, sets)
			g.ownActions(rules, sets, false)
		} else {
			// Rules sharing shapes (tables), each its own actions.
			rules = g.mixedRules(n, 2+n/20, sets)
			g.ownActions(rules, sets, true)
		}
		for i, r := range rules {
			r.Handle = uint64(i + 1)
			r.Trace = r.Trace && n <= 200
		}
		opts := compiler.Options{Hook: grammar.Hook(g.pick(2)), ChecksumHelper: g.chance(0.3)}
		p, err := compiler.Compile(rules, sets, opts)
		if err != nil {
			t.Fatalf("%d rules: %v", n, err)
		}
		if !hasParamsMap(p) {
			t.Fatalf("%d rules, each its own actions: no parametric bodies", n)
		}
		diffRuleset(t, g, d, rs, rules, sets, opts, 500)
		if d.failures > 0 {
			break
		}
	}
	t.Logf("%v", d)
	for _, k := range []grammar.ActionKind{grammar.ActFunnel, grammar.ActDNAT, grammar.ActUnfunnel} {
		if d.changed[k] == 0 {
			t.Errorf("no packet was changed by %s: the parametric bodies were not exercised", k)
		}
	}
}

// paramsRules is a hook of 40 rules sharing one shape, each with its own
// funnel header, dnat target, mark set and counter: one body per kind.
func paramsRules(change func(i int, r *grammar.Rule)) []*grammar.Rule {
	var rules []*grammar.Rule
	for i := 0; i < 40; i++ {
		r := &grammar.Rule{Handle: uint64(i + 1), Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP, Dport: ports(uint16(1000 + i)), Counter: i%2 == 0}
		if i%3 == 0 {
			r.SetMetaMark = &grammar.MarkSet{Value: uint32(i) << 8, Mask: 0xffffffff}
		}
		v4 := func(a, b byte) netip.Addr { return netip.AddrFrom4([4]byte{192, 0, a, b}) }
		switch i % 4 {
		case 0:
			r.Actions = []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, uint16(2000+i))}
		case 1:
			r.Actions = []*grammar.Action{funnelTo(grammar.ProtoUDP, 0, uint16(3000+i))}
		case 2:
			r.Actions = []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: v4(2, byte(i)), DNATPort: uint16(4000 + i)}}
		default:
			r.Actions = []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: v4(2, byte(100+i))}, funnelTo(grammar.ProtoTCP, 179, 0)}
		}
		if change != nil {
			change(i, r)
		}
		rules = append(rules, r)
	}
	return rules
}

// Rules of a parametric hook that differ only in their values change by
// table update: same digest, and writing the spare generation then
// switching changes what the packets become, as the reference model says.
// Layout.PlaceParams gives the entry of one rule without compiling.
func TestActionParamsTableUpdate(t *testing.T) {
	opts := compiler.Options{Hook: grammar.HookEgress}
	old := paramsRules(nil)
	changed := paramsRules(func(i int, r *grammar.Rule) {
		switch i {
		case 4: // other funnel header fields
			f := *r.Actions[0].Funnel
			f.Dport, f.Seq, f.Window, f.Flags = 9999, 0x11223344, 77, grammar.TCPSyn|grammar.TCPAck
			r.Actions = []*grammar.Action{{Kind: grammar.ActFunnel, Proto: grammar.ProtoTCP, Funnel: &f}}
		case 5: // another funnel port given
			r.Actions = []*grammar.Action{funnelTo(grammar.ProtoUDP, 6000, 0)}
		case 6: // dnat keeping the port, and a mark set
			r.Actions = []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: netip.MustParseAddr("203.0.113.7")}}
			r.SetMetaMark = &grammar.MarkSet{Value: 0x00aa0000, Mask: 0x00ff0000}
		case 7: // counts now, stacked dnat to another address
			r.Counter = true
			r.Actions[0] = &grammar.Action{Kind: grammar.ActDNAT, DNATAddr: netip.MustParseAddr("198.51.100.9"), DNATPort: 53}
		case 8: // no mark set, no counter any more
			r.SetMetaMark, r.Counter = nil, false
		}
	})
	a, err := compiler.Compile(old, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	b, err := compiler.Compile(changed, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !hasParamsMap(a) {
		t.Fatal("40 action lists: no parametric bodies")
	}
	if a.Digest != b.Digest {
		t.Fatal("rules that differ only in action values changed the program")
	}

	// One rule's entry without compiling, as the table update writes it.
	layout, place := b.Layout()
	if !layout.Params || place[4].Segment < 0 {
		t.Fatalf("layout %+v, rule 4 at %+v", layout.Params, place[4])
	}
	if _, err := layout.Place(changed[4], place[4].Segment, 5, 4, 1); !errors.Is(err, compiler.ErrNotPlaceable) {
		t.Fatalf("Place without parameters: %v, want ErrNotPlaceable", err)
	}
	ents, pe, err := layout.PlaceParams(changed[4], place[4].Segment, 5, 4, 1)
	if err != nil || len(ents) == 0 || pe == nil {
		t.Fatalf("PlaceParams: %v %v %v", ents, pe, err)
	}
	var want []byte
	for _, kv := range b.TableContents(1)[abi.ActionParams] {
		if bytes.Equal(kv.Key.([]byte), pe.Key) {
			want = kv.Value.([]byte)
		}
	}
	if pe.Table != abi.ActionParams || !bytes.Equal(pe.Key, compiler.ParamsKey(4, 1)) || want == nil || !bytes.Equal(pe.Value, want) {
		t.Fatalf("PlaceParams entry %s %x %x, TableContents has %x", pe.Table, pe.Key, pe.Value, want)
	}

	l := compileLoad(t, old, nil, opts)
	check := func(rules []*grammar.Rule, when string) {
		t.Helper()
		m, err := refmodel.New(rules, nil, modelOptions(opts))
		if err != nil {
			t.Fatal(err)
		}
		for i := 4; i <= 8; i++ {
			pkt := udpPkt(t, false, 40000, uint16(1000+i), []byte("parameters"))
			got := l.run(t, pkt, 0x10)
			w := m.Run(refmodel.Input{Packet: pkt, Mark: 0x10})
			if got.ret != w.Verdict || !bytes.Equal(got.out, w.Packet) || got.mark != w.Mark || w.Rule != i {
				t.Errorf("%s, rule %d: got verdict %d mark %#x %s\nwant verdict %d mark %#x %s (rule %d)", when, i,
					got.ret, got.mark, hex.EncodeToString(got.out), w.Verdict, w.Mark, hex.EncodeToString(w.Packet), w.Rule)
			}
		}
	}
	check(old, "before")
	for name, kvs := range b.TableContents(1) {
		for _, kv := range kvs {
			if err := l.coll.Maps[name].Put(kv.Key, kv.Value); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
	}
	check(old, "written, not switched")
	if err := l.coll.Maps[abi.ControlMap].Put(uint32(0), abi.Control{Generation: 1, NoRule: abi.NoRule}); err != nil {
		t.Fatal(err)
	}
	check(changed, "switched")
	for i, wantPackets := range map[int]uint64{4: 3, 6: 3, 7: 1, 8: 2, 5: 0} {
		if c := l.counter(t, i); c.Packets != wantPackets {
			t.Errorf("rule %d counted %d packets, want %d", i, c.Packets, wantPackets)
		}
	}
}

// A hook of few action lists keeps constant-folded bodies (no parameter
// map); one past maxConstBodies gets parametric ones.
func TestParametricThreshold(t *testing.T) {
	few := paramsRules(func(i int, r *grammar.Rule) {
		r.Counter, r.SetMetaMark, r.Actions = true, nil, []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, uint16(2000+i%16))}
	})
	many := paramsRules(func(i int, r *grammar.Rule) {
		r.Counter, r.SetMetaMark, r.Actions = true, nil, []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, uint16(2000+i%17))}
	})
	for _, c := range []struct {
		rules []*grammar.Rule
		want  bool
	}{{few, false}, {many, true}} {
		p, err := compiler.Compile(c.rules, nil, compiler.Options{Hook: grammar.HookEgress})
		if err != nil {
			t.Fatal(err)
		}
		listing := fmt.Sprint(p.Spec.Programs[compiler.ProgramName].Instructions)
		if hasParamsMap(p) != c.want || strings.Contains(listing, "the rule's parameters") != c.want {
			t.Errorf("parametric: %v, want %v", hasParamsMap(p), c.want)
		}
	}
}

// Rules of shapes of their own, each with an action list of its own
// (every match kind, stacked actions), load far from the verifier's limit
// of 1 000 000 processed instructions: 100 and 3 000 in CI, 100 000 with
// SFUNNEL_LONG=1 (the processed count stays flat past a few hundred rules:
// BENCHMARKS.md). They trace nothing: in a hook that traces, every rule
// without a terminal action ends a scan, and what that costs the verifier
// is the segments', not the actions' (TestUniqueShapeSweep loads such
// hooks).
func TestManyActionListsLoad(t *testing.T) {
	testenv.RequireRoot(t)
	type size struct{ n, bound int }
	sizes := []size{{100, 400000}, {3000, 400000}}
	if os.Getenv("SFUNNEL_LONG") == "1" {
		sizes = append(sizes, size{100000, 400000})
	}
	for _, c := range sizes {
		g := gen{r: newRand(uint64(c.n))}
		sets := g.sets()
		rules := g.uniqueRules(c.n, 0, sets)
		for _, r := range rules {
			r.Trace = false
		}
		p, err := compiler.Compile(rules, sets, compiler.Options{Hook: grammar.HookEgress})
		if err != nil {
			t.Fatal(err)
		}
		processed, took, err := verifierStats(t, p)
		if err != nil {
			t.Fatalf("%d rules, each its own actions: %.300v", c.n, err)
		}
		t.Logf("%d rules, each its own action list: %d instructions, %d processed, loaded in %v", c.n, len(p.Spec.Programs[compiler.ProgramName].Instructions), processed, took)
		if processed <= 0 || processed > c.bound {
			t.Errorf("%d rules: verifier processed %d instructions, want at most %d", c.n, processed, c.bound)
		}
	}
}

// BenchmarkParametricBody: the cost of reading action values from the
// parameter map. A round trip (funnel, then unfunnel of the result, the
// skb reused) through a hook of 40 funnel rules sharing a table and the
// unfunnel rule, with 15 funnel headers among them (16 bodies:
// constant-folded) against 16 (17 bodies: parametric), medians of
// interleaved runs. Reports the ratio parametric / constant.
func BenchmarkParametricBody(b *testing.B) {
	testenv.RequireRoot(b)
	hook := func(headers int) []*grammar.Rule {
		var rules []*grammar.Rule
		for i := 0; i < 40; i++ {
			rules = append(rules, &grammar.Rule{Handle: uint64(i + 1), Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP, Dport: ports(uint16(4739 + i)), Counter: true,
				Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, uint16(179+i%headers))}})
		}
		return append(rules, &grammar.Rule{Handle: 100, Family: grammar.FamilyIPv4, Proto: grammar.ProtoTCP, Dport: ports(179), Sport: ports(540), Counter: true,
			Actions: []*grammar.Action{act(grammar.ActUnfunnel, grammar.ProtoUDP)}})
	}
	pkt := udpPkt(b, false, 40000, 4739, make([]byte, 100))
	progs := map[string]*ebpf.Program{}
	for name, n := range map[string]int{"constant": 15, "parametric": 16} {
		l := compileLoad(b, hook(n), nil, compiler.Options{Hook: grammar.HookEgress})
		if hasParamsMap(l.prog) != (name == "parametric") {
			b.Fatalf("%s: parametric %v", name, hasParamsMap(l.prog))
		}
		progs[name] = l.coll.Programs[compiler.ProgramName]
	}
	ns := map[string][]float64{}
	for n := 0; n < b.N; n++ {
		for round := 0; round < 9; round++ {
			for _, name := range []string{"constant", "parametric"} {
				_, d, err := progs[name].Benchmark(pkt, 1000000, nil)
				if err != nil {
					b.Fatal(err)
				}
				ns[name] = append(ns[name], float64(d.Nanoseconds()))
			}
		}
	}
	med := func(s []float64) float64 { s = slices.Clone(s); slices.Sort(s); return s[len(s)/2] }
	c, p := med(ns["constant"]), med(ns["parametric"])
	b.ReportMetric(c, "ns/constant")
	b.ReportMetric(p, "ns/parametric")
	b.ReportMetric(p/c, "parametric/constant")
}

// A traced rule of a parametric hook: its shared body gives the packet a
// trace id and records the rule's own slot, then the verdict; an untraced
// rule of the same action kind records nothing.
func TestActionParamsTrace(t *testing.T) {
	rules := paramsRules(func(i int, r *grammar.Rule) { r.Trace = i == 4 })
	l := compileLoad(t, rules, nil, compiler.Options{})
	if !hasParamsMap(l.prog) {
		t.Fatal("no parametric bodies")
	}
	rd, err := ringbuf.NewReader(l.coll.Maps[abi.TraceMap])
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	read := func() []abi.TraceRecord { return readTraces(t, rd) }
	l.run(t, udpPkt(t, false, 40000, 1008, nil), 0) // rule 8: same kind, untraced
	if got := read(); len(got) != 0 {
		t.Errorf("untraced rule gave records: %+v", got)
	}
	l.run(t, udpPkt(t, false, 40000, 1004, nil), 0)
	got := read()
	if len(got) != 2 || got[0].Kind != abi.TraceRule || got[0].Rule != 4 || got[1].Kind != abi.TraceVerdict || got[1].Verdict != abi.TracePass || got[0].ID == 0 || got[1].ID != got[0].ID {
		t.Errorf("records %+v, want rule 4's then the verdict pass, one id", got)
	}
}

// `mss N` of a parametric hook comes from the rule's parameters: each
// rule's SYN is clamped to its own value (the reference model says how),
// and the rules without one to the device MTU.
func TestActionParamsMSS(t *testing.T) {
	var rules []*grammar.Rule
	for i := 0; i < 24; i++ {
		r, err := grammar.ParseRule("<test>", fmt.Sprintf("tcp dport %d actions funnel udp dport %d mss %d", 80+i, 4739+i, 1000+10*i), nil)
		if i%3 == 2 {
			r, err = grammar.ParseRule("<test>", fmt.Sprintf("tcp dport %d actions funnel tcp dport %d", 80+i, 179+i), nil)
		}
		if err != nil {
			t.Fatal(err)
		}
		r.Handle = uint64(i + 1)
		rules = append(rules, r)
	}
	opts := compiler.Options{Hook: grammar.HookEgress}
	l := compileLoad(t, rules, nil, opts)
	if !hasParamsMap(l.prog) {
		t.Fatal("no parametric bodies")
	}
	m, err := refmodel.New(rules, nil, modelOptions(opts))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 24; i++ {
		for _, v6 := range []bool{false, true} {
			mss := layers.TCPOption{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{0xff, 0xff}}
			in := craft(t, pktSpec{v6: v6, l4: &layers.TCP{SrcPort: 33000, DstPort: layers.TCPPort(80 + i), Seq: 1, SYN: true, Window: 64240, Options: []layers.TCPOption{mss}}})
			got := l.run(t, in, 0)
			want := m.Run(refmodel.Input{Packet: append([]byte(nil), in...)})
			if !bytes.Equal(got.out, want.Packet) || len(got.out) == len(in) {
				t.Errorf("rule %d (v6 %v): got %x\nwant %x", i, v6, got.out, want.Packet)
			}
		}
	}
}
