package compiler_test

import (
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/refmodel"
)

// codeUnits counts what a program tests as code: shape lookups and rules
// tested one by one (classify's budget, shapescan.go).
var codeUnit = regexp.MustCompile(`(?m)^\s*; (shape \d+:|rule \d+ handle \d+:)`)

// However many shapes the rules have, a large hook tests at most
// compiler.MaxCodeShapes of them (and rules tested one by one) as code;
// the others are shape records of the record scan.
func TestCodeShapesBounded(t *testing.T) {
	for _, c := range []struct {
		n, templates int
		nonTerminal  float64
	}{{100, 40, 0}, {1000, 100, 0}, {1000, 100, 0.3}, {3000, 300, 0.5}, {10000, 1000, 0.1}} {
		g := gen{r: newRand(uint64(c.n + c.templates))}
		sets := g.sets()
		rules := g.shapedRules(c.n, c.templates, c.nonTerminal, sets)
		p, err := compiler.Compile(rules, sets, compiler.Options{Hook: grammar.HookEgress})
		if err != nil {
			t.Fatal(err)
		}
		listing := fmt.Sprint(p.Spec.Programs[compiler.ProgramName].Instructions)
		units := len(codeUnit.FindAllString(listing, -1))
		inRecords := len(compiler.ShapeRecordRules(p))
		t.Logf("%d rules of %d templates (%.0f%% without a terminal action): %d shapes and rules as code, %d rules in shape records",
			c.n, c.templates, 100*c.nonTerminal, units, inRecords)
		if units > compiler.MaxCodeShapes {
			t.Errorf("%d rules of %d templates: %d shapes and rules tested as code, want at most %d", c.n, c.templates, units, compiler.MaxCodeShapes)
		}
		if inRecords == 0 {
			t.Errorf("%d rules of %d templates: no rule in a shape record", c.n, c.templates)
		}
	}
}

// twentyShapes makes 20 shapes of three rules each, a hook of 60 rules:
// some shapes are shape records.
func twentyShapes(last uint16) []*grammar.Rule { return sharedShapes(20, 3, last) }

// sharedShapes makes n shapes of per rules each (UDP to a /(8+k) and a
// port); the last rule's port is last.
func sharedShapes(n, per int, last uint16) []*grammar.Rule {
	var rules []*grammar.Rule
	for k := 0; k < n; k++ {
		for j := 0; j < per; j++ {
			port := uint16(1000 + 10*k + j)
			if k == n-1 && j == per-1 {
				port = last
			}
			rules = append(rules, &grammar.Rule{Handle: uint64(len(rules) + 1), Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP,
				Daddr: &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(netip.MustParseAddr("198.51.100.7"), 8+k).Masked()}},
				Dport: ports(port), Counter: true, Actions: []*grammar.Action{act(grammar.ActAccept, 0)}})
		}
	}
	return rules
}

// A rule of a shape record changes by table update: the program stays
// (same digest), and the other generation's entries, once switched to,
// decide what matches (the scan takes the generation from where its
// records are).
func TestShapeRecordUpdateWithoutReload(t *testing.T) {
	opts := compiler.Options{Hook: grammar.HookEgress}
	old, replaced := twentyShapes(2055), twentyShapes(4739)
	a, err := compiler.Compile(old, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !compiler.ShapeRecordRules(a)[59] {
		t.Fatal("the last rule is not in a shape record")
	}
	b, err := compiler.Compile(replaced, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	if a.Digest != b.Digest {
		t.Fatal("the digest changed")
	}
	to := func(port uint16) []byte { return udpPkt(t, false, 40000, port, nil) }
	l := compileLoad(t, old, nil, opts)
	defer l.coll.Close()
	if r := l.run(t, to(2055), 0); r.ret != compiler.VerdictPass {
		t.Fatalf("before: to 2055: verdict %d, want pass", r.ret)
	}
	if r := l.run(t, to(4739), 0); r.ret != compiler.VerdictNext {
		t.Fatalf("before: to 4739: verdict %d, want no match", r.ret)
	}
	for name, kvs := range b.TableContents(1) {
		for _, kv := range kvs {
			if err := l.coll.Maps[name].Put(kv.Key, kv.Value); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
		}
	}
	if r := l.run(t, to(4739), 0); r.ret != compiler.VerdictNext {
		t.Fatalf("written, not switched: verdict %d", r.ret)
	}
	if err := l.coll.Maps[abi.ControlMap].Put(uint32(0), abi.Control{Generation: 1, NoRule: abi.NoRule}); err != nil {
		t.Fatal(err)
	}
	if r := l.run(t, to(4739), 0); r.ret != compiler.VerdictPass {
		t.Fatalf("after: to 4739: verdict %d, want pass", r.ret)
	}
	if r := l.run(t, to(2055), 0); r.ret != compiler.VerdictNext {
		t.Fatalf("after: to 2055: verdict %d, want no match", r.ret)
	}
	if n := l.counter(t, 59); n.Packets != 2 {
		t.Fatalf("rule 59 counted %d packets, want 2", n.Packets)
	}
}

// 100 000 rules of 10 000 templates (every match kind, negations, ranges,
// sets, marks, both families; one in twenty without a terminal action)
// load far from the verifier's limit, and agree with the reference model
// on a few dozen packets.
func TestHundredThousandSharedShapes(t *testing.T) {
	testenv.RequireRoot(t)
	g := diffSeed(t)
	sets := g.sets()
	rules := g.shapedRules(100000, 10000, 0.05, sets)
	opts := compiler.Options{Hook: grammar.HookEgress}
	p, coll, processed, compiled, loadTime := compileLoadStats(t, rules, sets, opts)
	defer coll.Close()
	insns := len(p.Spec.Programs[compiler.ProgramName].Instructions)
	inRecords := len(compiler.ShapeRecordRules(p))
	t.Logf("100 000 rules of 10 000 templates: %d instructions, verifier processed %d; %d rules in shape records; compiled in %v, loaded in %v",
		insns, processed, inRecords, compiled, loadTime)
	if processed <= 0 || processed > 500000 {
		t.Errorf("verifier processed %d instructions, want at most 500 000 (limit 1 000 000)", processed)
	}
	if inRecords < 50000 {
		t.Errorf("%d rules in shape records, want most", inRecords)
	}
	d := newTally()
	diffLoaded(t, g, d, 0, &loaded{prog: p, coll: coll}, rules, sets, opts, 60)
	t.Logf("%v", d)
}

// TestSharedShapeSweep reports the verifier's work on rulesets of many
// shapes that rules share (shapedRules: every match kind; 16 tails of
// statements and actions). In CI it checks one size and seed, which must
// stay far from the limit; SFUNNEL_SWEEP=1 runs the whole sweep as a report
// (BENCHMARKS.md).
func TestSharedShapeSweep(t *testing.T) {
	testenv.RequireRoot(t)
	type size struct {
		n, templates int
		nonTerminal  float64
	}
	sizes, seeds := []size{{3000, 300, 0.1}}, uint64(1)
	if os.Getenv("SFUNNEL_SWEEP") == "1" {
		seeds = 3
		sizes = []size{{100, 10, 0}, {1000, 100, 0}, {1000, 100, 0.2}, {3000, 300, 0}, {10000, 100, 0}, {10000, 1000, 0},
			{10000, 1000, 0.2}, {30000, 3000, 0}, {100000, 1000, 0}, {100000, 10000, 0}, {100000, 10000, 0.1}}
	}
	for _, sz := range sizes {
		for seed := uint64(1); seed <= seeds; seed++ {
			g := gen{r: newRand(seed<<32 | uint64(sz.n+sz.templates))}
			sets := g.sets()
			rules := g.shapedRules(sz.n, sz.templates, sz.nonTerminal, sets)
			start := time.Now()
			p, err := compiler.Compile(rules, sets, compiler.Options{Hook: grammar.Hook(seed % 2)})
			if err != nil {
				t.Fatalf("%d rules of %d templates: %v", sz.n, sz.templates, err)
			}
			compiled := time.Since(start)
			processed, took, err := verifierStats(t, p)
			insns := len(p.Spec.Programs[compiler.ProgramName].Instructions)
			t.Logf("%6d rules of %5d templates, %3.0f%% not terminal, seed %d: compile %8v, %6d insns, load %8v, processed %7d",
				sz.n, sz.templates, 100*sz.nonTerminal, seed, compiled.Round(time.Millisecond), insns, took.Round(time.Millisecond), processed)
			if err != nil {
				t.Errorf("%d rules of %d templates, seed %d: %.300v", sz.n, sz.templates, seed, err)
			} else if processed > 450000 {
				t.Errorf("%d rules of %d templates, seed %d: processed %d, want at most 450 000", sz.n, sz.templates, seed, processed)
			}
		}
	}
}

// What a packet reads in the record scan grows with the shapes, not with
// their rules: ten times the rules of the same templates make about as many
// records (one per shape), and many of their rules are in shape records.
func TestShapeRecordsPerShape(t *testing.T) {
	records := map[int]int{}
	for _, n := range []int{1000, 10000} {
		g := gen{r: newRand(7)} // the same templates
		sets := g.sets()
		rules := g.shapedRules(n, 100, 0, sets)
		p, err := compiler.Compile(rules, sets, compiler.Options{Hook: grammar.HookEgress})
		if err != nil {
			t.Fatal(err)
		}
		records[n] = compiler.ScanRecords(p)
		t.Logf("%d rules of 100 templates: %d records, %d rules in shape records", n, records[n], len(compiler.ShapeRecordRules(p)))
		if in := len(compiler.ShapeRecordRules(p)); in < n/5 {
			t.Errorf("%d rules: %d in shape records, want a fifth at least", n, in)
		}
	}
	if records[10000] > records[1000]+records[1000]/4 || records[1000] == 0 {
		t.Errorf("records: %d for 1 000 rules, %d for 10 000 of the same templates", records[1000], records[10000])
	}
}

// BenchmarkSharedShapes measures what a packet that matches no rule pays
// against rules of many shared shapes (shapedRules: shapes past the code
// budget are shape records): with the templates fixed, ten times the rules
// should cost about the same; ten times the templates about ten times.
// Medians of interleaved runs, against the empty program; rules that the
// packet matches are left out.
func BenchmarkSharedShapes(b *testing.B) {
	testenv.RequireRoot(b)
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	other := tcpPkt(b, false, 40000, 80, false, true, nil)
	type prog struct {
		name   string
		prog   *ebpf.Program
		repeat int
		ns     []float64
	}
	progs := []*prog{{name: "empty", prog: loadRef(b, "empty", emptyProgram()), repeat: 1000000}}
	for _, sz := range []struct{ n, templates int }{{1000, 100}, {10000, 100}, {10000, 1000}, {100000, 1000}} {
		g := gen{r: newRand(uint64(sz.templates))} // the same templates for both sizes
		sets := g.sets()
		var rules []*grammar.Rule
		for _, r := range g.shapedRules(sz.n, sz.templates, 0, sets) {
			m, err := refmodel.New([]*grammar.Rule{r}, sets, refmodel.Options{Hook: grammar.HookEgress})
			if err != nil {
				b.Fatal(err)
			}
			if m.Run(refmodel.Input{Packet: other}).Rule < 0 {
				r.Handle = uint64(len(rules) + 1)
				rules = append(rules, r)
			}
		}
		p := compiledProg(b, rules, sets, grammar.HookEgress)
		progs = append(progs, &prog{name: fmt.Sprintf("%d rules of %d templates", len(rules), sz.templates), prog: p, repeat: 20000})
	}
	for n := 0; n < b.N; n++ {
		for round := 0; round < 5; round++ {
			for _, p := range progs {
				start := time.Now()
				if _, _, err := p.prog.Benchmark(other, p.repeat, nil); err != nil {
					b.Fatal(err)
				}
				p.ns = append(p.ns, float64(time.Since(start).Nanoseconds())/float64(p.repeat))
			}
		}
	}
	med := func(p *prog) float64 {
		s := slices.Clone(p.ns)
		slices.Sort(s)
		return s[len(s)/2]
	}
	empty := med(progs[0])
	for _, p := range progs[1:] {
		b.Logf("TCP packet matching none of %s: %.0f ns/run, %.1f× the empty program (%.1f ns)", p.name, med(p), med(p)/empty, empty)
	}
}
