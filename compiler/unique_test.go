package compiler_test

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
)

// Adversarial rulesets: (nearly) every rule has a shape of its own, so no
// shape table helps and every rule is matched on its own.

// uniqueRule makes a random rule (every match kind, negations, ranges,
// sets, marks, both families) and then gives it something only its shape
// has: a negated port or address, a range too wide to expand, a mark mask
// or TCP flags — all of which the classifier keeps in the shape.
// actions, when not nil, is the pool its action list is drawn from (large
// rulesets: every distinct action list is code of its own).
func (g gen) uniqueRule(k int, sets map[string]*grammar.Set, actions [][]*grammar.Action) *grammar.Rule {
	r := g.rule(sets)
	switch g.pick(6) {
	case 0, 1: // a port != k or a range wider than 1024 ports, unique in the hook
		if r.Proto == grammar.ProtoAny {
			r.Proto = grammar.Proto(1 + g.pick(2))
		}
		lo := uint16(k % 60000)
		m := &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: lo, Hi: lo}}}
		if g.chance(0.5) {
			m = &grammar.PortMatch{Neg: g.chance(0.3), Ranges: []grammar.PortRange{{Lo: lo, Hi: lo + 1025 + uint16(g.pick(4000))}}}
		}
		if g.chance(0.5) {
			r.Dport = m
		} else {
			r.Sport = m
		}
	case 2: // an address != a prefix of its own
		v6 := r.Family == grammar.FamilyIPv6 || (r.Family == grammar.FamilyAny && g.chance(0.5))
		var a netip.Addr
		if v6 {
			a = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 9, byte(k >> 16), byte(k >> 8), byte(k), 15: 1})
		} else {
			a = netip.AddrFrom4([4]byte{10, byte(k >> 16), byte(k >> 8), byte(k)})
		}
		m := &grammar.AddrMatch{Neg: true, Prefixes: []netip.Prefix{netip.PrefixFrom(a, a.BitLen()-g.pick(8)).Masked()}}
		fam := map[bool]grammar.Family{false: grammar.FamilyIPv4, true: grammar.FamilyIPv6}[v6]
		if r.Family != fam {
			r.Saddr, r.Daddr = nil, nil
		}
		r.Family = fam
		if g.chance(0.5) || r.Daddr != nil {
			r.Saddr = m
		} else {
			r.Daddr = m
		}
	case 3: // a meta mark under a mask of its own
		r.MetaMark = &grammar.MarkMatch{Neg: g.chance(0.5), Value: poolMark[g.pick(len(poolMark))], Mask: uint32(k)<<8 | 0xff, HasMask: true}
		r.MetaMark.Value &= r.MetaMark.Mask
	case 4: // a meta mark != k
		r.MetaMark = &grammar.MarkMatch{Neg: true, Value: uint32(k), Mask: 0xffffffff}
	default: // TCP flags and a port != k
		r.Proto = grammar.ProtoTCP
		r.TCPFlags = &grammar.FlagsMatch{Form: grammar.FlagsForm(g.pick(4)), Flags: uint8(g.pick(256)), Mask: uint8(g.pick(256))}
		if r.TCPFlags.Form == grammar.FlagsMasked {
			r.TCPFlags.Flags &= r.TCPFlags.Mask
		}
		r.Sport = &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: uint16(k % 60000), Hi: uint16(k % 60000)}}}
	}
	if actions != nil {
		r.Actions = actions[g.pick(len(actions))]
	}
	fixActions(r)
	if r.TCPFlags != nil && r.Proto != grammar.ProtoTCP {
		r.TCPFlags = nil
	}
	return r
}

// fixActions keeps a rule's actions valid for its (possibly changed)
// family and protocol.
func fixActions(r *grammar.Rule) {
	var fixed []*grammar.Action
	for _, a := range r.Actions {
		a2 := *a
		switch a.Kind {
		case grammar.ActUnfunnel:
			if r.Proto == grammar.ProtoAny {
				r.Proto = grammar.ProtoUDP
			}
		case grammar.ActRewrite:
			if r.Proto == grammar.ProtoAny {
				r.Proto = grammar.ProtoUDP
			}
			a2.Proto = grammar.ProtoUDP
			if r.Proto == grammar.ProtoUDP {
				a2.Proto = grammar.ProtoTCP
			}
		case grammar.ActDNAT:
			if r.Family != grammar.FamilyAny && a.DNATAddr.Is6() != (r.Family == grammar.FamilyIPv6) {
				a2 = *act(grammar.ActAccept, 0)
			}
		}
		fixed = append(fixed, &a2)
	}
	r.Actions = fixed
}

// actionPool draws n random action lists (stacked actions included) and
// the empty one (counter / mark set only).
func (g gen) actionPool(n int, sets map[string]*grammar.Set) [][]*grammar.Action {
	pool := [][]*grammar.Action{nil}
	for len(pool) < n {
		r := g.rule(sets)
		if len(r.Actions) > 0 {
			pool = append(pool, r.Actions)
		}
	}
	return pool
}

// uniqueRules makes n rules of (nearly) n shapes; pool bounds the distinct
// action lists (0: every rule draws its own).
func (g gen) uniqueRules(n, pool int, sets map[string]*grammar.Set) []*grammar.Rule {
	var actions [][]*grammar.Action
	if pool > 0 {
		actions = g.actionPool(pool, sets)
	}
	rules := make([]*grammar.Rule, n)
	for i := range rules {
		rules[i] = g.uniqueRule(i, sets, actions)
		rules[i].Handle = uint64(i + 1)
		// In a hook that traces, every rule without a terminal action ends
		// a scan (sfunnel(8) BUGS): large rulesets trace nothing.
		rules[i].Trace = rules[i].Trace && n <= 200
	}
	return rules
}

// verifierStats loads a compiled hook and returns the verifier's processed
// instruction count (from its log) and the load time.
func verifierStats(t testing.TB, p *compiler.Program) (processed int, took time.Duration, err error) {
	start := time.Now()
	coll, err := ebpf.NewCollectionWithOptions(p.Spec, ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats, LogSizeStart: 1 << 16}})
	took = time.Since(start)
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return processedInsns(strings.Join(ve.Log, "\n")), took, err
		}
		return 0, took, err
	}
	defer coll.Close()
	return processedInsns(coll.Programs[compiler.ProgramName].VerifierLog), took, nil
}

// compileLoadStats compiles and loads a hook, with the verifier's processed
// instruction count and the time each step took.
func compileLoadStats(t *testing.T, rules []*grammar.Rule, sets map[string]*grammar.Set, opts compiler.Options) (p *compiler.Program, coll *ebpf.Collection, processed int, compiled, loaded time.Duration) {
	t.Helper()
	start := time.Now()
	p, err := compiler.Compile(rules, sets, opts)
	if err != nil {
		t.Fatal(err)
	}
	compiled = time.Since(start)
	start = time.Now()
	coll, err = ebpf.NewCollectionWithOptions(p.Spec, ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelStats, LogSizeStart: 1 << 16}})
	if err != nil {
		t.Fatalf("load: %.2000v", err)
	}
	return p, coll, processedInsns(coll.Programs[compiler.ProgramName].VerifierLog), compiled, time.Since(start)
}

// processedInsns reads "processed N insns" from a verifier log.
func processedInsns(log string) int {
	i := strings.Index(log, "processed ")
	if i < 0 {
		return -1
	}
	f := strings.Fields(log[i+len("processed "):])
	if len(f) == 0 {
		return -1
	}
	n, _ := strconv.Atoi(f[0])
	return n
}

// TestUniqueShapeSweep reports, per ruleset size, the compile time,
// instruction count, verifier time and processed instructions of
// adversarial unique-shape rulesets. In CI it checks two sizes with eight
// action lists, which must load; SFUNNEL_SWEEP=1 runs the whole sweep as a
// report (SFUNNEL_POOLS=8,32 picks the action lists), where a refusal ends
// that pool's sizes instead of failing.
func TestUniqueShapeSweep(t *testing.T) {
	testenv.RequireRoot(t)
	sweep := os.Getenv("SFUNNEL_SWEEP") == "1"
	sizes, pools := []int{100, 1000}, []int{8}
	if sweep {
		sizes, pools = []int{50, 100, 200, 400, 800, 1600, 3200, 10000, 30000, 100000}, poolSizes()
	}
	for _, pool := range pools {
		for _, n := range sizes {
			g := gen{r: newRand(uint64(n))}
			sets := g.sets()
			rules := g.uniqueRules(n, pool, sets)
			start := time.Now()
			p, err := compiler.Compile(rules, sets, compiler.Options{Hook: grammar.HookEgress})
			compiled := time.Since(start)
			if err != nil && !sweep {
				t.Fatalf("pool %d, %d rules: compile: %v", pool, n, err)
			}
			if err != nil {
				t.Logf("pool %d, %d rules: compile: %v", pool, n, err)
				break
			}
			insns := len(p.Spec.Programs[compiler.ProgramName].Instructions)
			processed, took, err := verifierStats(t, p)
			msg := "ok"
			if err != nil {
				msg = fmt.Sprintf("REFUSED: %.200v", err)
			}
			t.Logf("action pool %d, %6d rules: compile %8v, %7d insns, load %8v, processed %8d: %s", pool, n, compiled.Round(time.Millisecond), insns, took.Round(time.Millisecond), processed, msg)
			if err != nil && !sweep {
				t.Fatalf("%d unique-shape rules with %d action lists were refused", n, pool)
			}
			if err != nil {
				break
			}
		}
	}
}

func poolSizes() []int {
	if s := os.Getenv("SFUNNEL_POOLS"); s != "" {
		var out []int
		for _, f := range strings.Split(s, ",") {
			n, _ := strconv.Atoi(f)
			out = append(out, n)
		}
		return out
	}
	return []int{8, 32}
}

// Adversarial rulesets where (nearly) every rule has a shape of its own,
// now and then with runs of rules that share shapes mixed in, compiled vs
// the reference model. CI: a fixed seed, sizes up to a few thousand rules
// with few packets; SFUNNEL_LONG=1: fresh seeds, 10 000-rule rulesets and
// more packets.
func TestDifferentialUniqueShapes(t *testing.T) {
	sizes, perSet := []int{17, 20, 24, 30, 40, 60, 100, 150, 300, 1000, 3000}, 400
	if os.Getenv("SFUNNEL_LONG") == "1" {
		sizes, perSet = []int{17, 20, 30, 40, 60, 100, 200, 300, 1000, 3000, 10000, 10000, 20000}, 3000
	}
	if testing.Short() {
		sizes = sizes[:4]
	}
	g := diffSeed(t)
	d := newTally()
	scanned := 0
	for rs, n := range sizes {
		sets := g.sets()
		pool := 0 // every rule its own actions: each action list is code
		if n > 24 {
			pool = 8
		}
		rules := g.uniqueRules(n, pool, sets)
		if rs%3 == 1 {
			// Rules that share shapes (tables) among them.
			at := g.pick(len(rules) + 1)
			rules = append(rules[:at], append(g.mixedRules(20+g.pick(30), 1+g.pick(3), sets), rules[at:]...)...)
			for i, r := range rules {
				r.Handle = uint64(i + 1)
			}
		}
		if len(rules) > 200 {
			// A large hook that traces ends a segment at every rule without
			// a terminal action (sfunnel(8) BUGS): these trace nothing.
			for _, r := range rules {
				r.Trace = false
			}
		}
		opts := compiler.Options{Hook: grammar.Hook(g.pick(2)), ChecksumHelper: g.chance(0.3)}
		start := time.Now()
		p, err := compiler.Compile(rules, sets, opts)
		if err != nil {
			t.Fatalf("%d rules: %v", len(rules), err)
		}
		if strings.Contains(fmt.Sprint(p.Spec.Programs[compiler.ProgramName].Instructions), "scanned in order") {
			scanned++
		}
		if os.Getenv("SFUNNEL_DUMP") == strconv.Itoa(rs) {
			dumpVerifier(t, p)
		}
		diffRuleset(t, g, d, rs, rules, sets, opts, perSet)
		t.Logf("%d rules: compiled, loaded and compared in %v", len(rules), time.Since(start))
		if d.failures > 0 {
			break
		}
	}
	t.Logf("%v; %d rulesets used the record scan", d, scanned)
	if scanned < len(sizes)/2 {
		t.Errorf("only %d of %d rulesets used the record scan", scanned, len(sizes))
	}
}

// dumpVerifier writes a program's listing and its verifier log (every
// instruction processed) to /tmp, to see where the verifier's work goes.
func dumpVerifier(t *testing.T, p *compiler.Program) {
	os.WriteFile("/tmp/anymix-listing.txt", []byte(fmt.Sprint(p.Spec.Programs[compiler.ProgramName].Instructions)), 0o644)
	coll, err := ebpf.NewCollectionWithOptions(p.Spec, ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogLevel: ebpf.LogLevelInstruction, LogSizeStart: 1 << 30}})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			os.WriteFile("/tmp/anymix-vlog.txt", []byte(strings.Join(ve.Log, "\n")), 0o644)
		}
		t.Fatalf("dumped: %.300v", err)
	}
	os.WriteFile("/tmp/anymix-vlog.txt", []byte(coll.Programs[compiler.ProgramName].VerifierLog), 0o644)
	coll.Close()
}

// BenchmarkCompileUnique100k compiles 100 000 rules of (nearly) as many
// shapes, eight action lists among them.
func BenchmarkCompileUnique100k(b *testing.B) {
	g := gen{r: newRand(100000)}
	sets := g.sets()
	rules := g.uniqueRules(100000, 8, sets)
	b.ResetTimer()
	for n := 0; n < b.N; n++ {
		if _, err := compiler.Compile(rules, sets, compiler.Options{Hook: grammar.HookEgress}); err != nil {
			b.Fatal(err)
		}
	}
}

// 100 000 rules of (nearly) as many shapes — every match kind, negations,
// named sets, lists, wide ranges, marks, both families, eight action lists
// — compile and load, far from the verifier's limit, and agree with the
// reference model on a few dozen packets.
func TestHundredThousandUniqueShapes(t *testing.T) {
	testenv.RequireRoot(t)
	g := diffSeed(t)
	sets := g.sets()
	rules := g.uniqueRules(100000, 8, sets)
	opts := compiler.Options{Hook: grammar.HookEgress}
	p, coll, processed, compiled, loadTime := compileLoadStats(t, rules, sets, opts)
	defer coll.Close()
	insns := len(p.Spec.Programs[compiler.ProgramName].Instructions)
	t.Logf("100 000 unique-shape rules: %d instructions, verifier processed %d; compiled in %v, loaded in %v", insns, processed, compiled, loadTime)
	if processed <= 0 || processed > 600000 {
		t.Errorf("verifier processed %d instructions (limit 1 000 000)", processed)
	}
	if !strings.Contains(fmt.Sprint(p.Spec.Programs[compiler.ProgramName].Instructions), "scanned in order") {
		t.Error("no record scan")
	}
	d := newTally()
	diffLoaded(t, g, d, 0, &loaded{prog: p, coll: coll}, rules, sets, opts, 60)
	t.Logf("%v", d)
}

// Rules in the record scan change by table update: a rule replaced by one
// that differs in values, and a rule added at the end, keep the program
// (same digest), and writing the other generation of the records then
// switching changes what matches.
func TestRecordUpdateWithoutReload(t *testing.T) {
	opts := compiler.Options{Hook: grammar.HookEgress}
	base := func(last ...*grammar.Rule) []*grammar.Rule {
		var rules []*grammar.Rule
		for k := 0; k < 30; k++ {
			rules = append(rules, &grammar.Rule{Handle: uint64(k + 1), Family: grammar.FamilyIPv4, Proto: grammar.ProtoTCP,
				Sport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: uint16(k), Hi: uint16(k)}}}, Counter: true,
				Actions: []*grammar.Action{act(grammar.ActDrop, 0)}})
		}
		return append(rules, last...)
	}
	notTo := func(handle uint64, port uint16) *grammar.Rule {
		return &grammar.Rule{Handle: handle, Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP,
			Sport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: 7, Hi: 7}}},
			Dport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: port, Hi: port}}}, Counter: true,
			Actions: []*grammar.Action{act(grammar.ActAccept, 0)}}
	}
	old := base(notTo(31, 4739))
	replaced := base(notTo(31, 2055))
	appended := base(notTo(31, 4739), &grammar.Rule{Handle: 32, Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP,
		Sport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: 8, Hi: 8}}}, Dport: ports(4739), Counter: true,
		Actions: []*grammar.Action{act(grammar.ActAccept, 0)}})
	a, err := compiler.Compile(old, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(fmt.Sprint(a.Spec.Programs[compiler.ProgramName].Instructions), "scanned in order") {
		t.Fatal("no record scan")
	}
	to4739 := udpPkt(t, false, 40000, 4739, nil)
	for _, c := range []struct {
		name  string
		rules []*grammar.Rule
		rule  int // the rule the packet matches after the switch
	}{{"replaced", replaced, 30}, {"appended", appended, 31}} {
		b, err := compiler.Compile(c.rules, nil, opts)
		if err != nil {
			t.Fatal(err)
		}
		if a.Digest != b.Digest {
			t.Fatalf("%s: the digest changed", c.name)
		}
		l := compileLoad(t, old, nil, opts)
		if r := l.run(t, to4739, 0); r.ret != compiler.VerdictNext {
			t.Fatalf("%s: before: verdict %d, want no match", c.name, r.ret)
		}
		for name, kvs := range b.TableContents(1) {
			for _, kv := range kvs {
				if err := l.coll.Maps[name].Put(kv.Key, kv.Value); err != nil {
					t.Fatalf("%s: %s: %v", c.name, name, err)
				}
			}
		}
		if r := l.run(t, to4739, 0); r.ret != compiler.VerdictNext {
			t.Fatalf("%s: written, not switched: verdict %d", c.name, r.ret)
		}
		if err := l.coll.Maps[abi.ControlMap].Put(uint32(0), abi.Control{Generation: 1, NoRule: abi.NoRule}); err != nil {
			t.Fatal(err)
		}
		if r := l.run(t, to4739, 0); r.ret != compiler.VerdictPass {
			t.Fatalf("%s: after: verdict %d, want pass", c.name, r.ret)
		}
		if n := l.counter(t, c.rule); n.Packets != 1 {
			t.Fatalf("%s: rule %d counted %d packets, want 1", c.name, c.rule, n.Packets)
		}
		l.coll.Close()
	}
}

// A rule that keys on nothing after rules without a terminal action that
// share a table: when one of those matches (and counts), the later rule is
// still tested (classify keeps it out of their segment).
func TestRuleAfterNonTerminalTable(t *testing.T) {
	var rules []*grammar.Rule
	for k := 0; k < 20; k++ {
		rules = append(rules, &grammar.Rule{Handle: uint64(k + 1), Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP, Dport: ports(uint16(4730 + k)), Counter: true})
	}
	rules = append(rules, &grammar.Rule{Handle: 21, Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP,
		Sport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: 7, Hi: 7}}}, Counter: true,
		Actions: []*grammar.Action{act(grammar.ActAccept, 0)}})
	l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookEgress})
	if r := l.run(t, udpPkt(t, false, 40000, 4739, nil), 0); r.ret != compiler.VerdictPass {
		t.Fatalf("verdict %d, want the last rule's accept", r.ret)
	}
	if c := l.counter(t, 9); c.Packets != 1 {
		t.Fatalf("rule 9 (dport 4739) counted %d packets, want 1", c.Packets)
	}
	if c := l.counter(t, 20); c.Packets != 1 {
		t.Fatalf("the last rule counted %d packets, want 1", c.Packets)
	}
}
