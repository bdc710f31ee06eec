package compiler_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

// wideDport is a UDP rule of a shape of its own (a destination port range
// too wide for a table) that the test packets (dport 4739) miss.
func wideDport(k int, a *grammar.Action) *grammar.Rule {
	lo := uint16(10000 + 10*k)
	return &grammar.Rule{Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP,
		Dport:   &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: lo, Hi: lo + 1100}}},
		Counter: true, Actions: []*grammar.Action{a}}
}

// A segment that both looks rules up in tables and scans records: when a
// table rule wins and no record beats it, the table rule's body and
// counter run (the scan must hand back what the lookups found, not its
// own empty result).
func TestScanKeepsTableWinner(t *testing.T) {
	var rules []*grammar.Rule
	for k, d := range []uint16{4000, 4001, 4739} { // a table shape: IPv4 UDP dport
		a := act(grammar.ActAccept, 0)
		if d == 4739 {
			a = act(grammar.ActDrop, 0) // another body than the table's first rule
		}
		rules = append(rules, &grammar.Rule{Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP, Saddr: prefixes(fmt.Sprintf("192.0.2.%d", 1+k%2)),
			Dport: ports(d), Counter: true, Actions: []*grammar.Action{a}})
	}
	for k := 0; k < 40; k++ {
		rules = append(rules, wideDport(k, act(grammar.ActAccept, 0)))
	}
	for i, r := range rules {
		r.Handle = uint64(i + 1)
	}
	l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookEgress})
	listing := fmt.Sprint(l.prog.Spec.Programs[compiler.ProgramName].Instructions)
	if !strings.Contains(listing, "looked up in tables") || !strings.Contains(listing, "scanned in order") {
		t.Fatalf("want a segment with tables and a record scan:\n%s", listing)
	}
	pkt := udpPkt(t, false, 40000, 4739, nil) // from 192.0.2.1
	if r := l.run(t, pkt, 0); r.ret != compiler.VerdictDrop {
		t.Errorf("verdict %d, want rule 2's drop", r.ret)
	}
	for i := range rules {
		want := uint64(0)
		if i == 2 {
			want = 1
		}
		if c := l.counter(t, i); c.Packets != want {
			t.Errorf("rule %d counted %d packets, want %d", i, c.Packets, want)
		}
	}
}

// Records of rules that end the scan are read in lists by family and
// protocol (linscan.go), and the first matching rule must still win
// across the lists: rulesets of unique-shape rules of every family and
// protocol interleaved (any, IPv4, IPv6 × any, TCP, UDP), compiled vs the
// reference model. Some rulesets have counter-only rules among them (in
// the list read last: they must count only when they come before the
// winner), one has counter-only rules that set marks (one list in rule
// order). The packets' winners must come from every kind of list, else
// the test would not show that the lists are merged in rule order.
func TestDifferentialScanLists(t *testing.T) {
	g := diffSeed(t)
	d := newTally()
	won := map[string]int{}
	for rs, n := range []int{30, 60, 120, 250, 500, 200} {
		sets := g.sets()
		actions := g.actionPool(9, sets)
		if rs%2 == 0 {
			actions = actions[1:] // terminal action lists only
		}
		rules := g.scanRules(n, sets, actions, rs != 5, func(*grammar.Rule) {})
		opts := compiler.Options{Hook: grammar.Hook(g.pick(2))}
		l := compileLoad(t, rules, sets, opts)
		listing := fmt.Sprint(l.prog.Spec.Programs[compiler.ProgramName].Instructions)
		if rs < 5 && !strings.Contains(listing, "lists by family and protocol") {
			t.Fatalf("%d rules: no segment reads its records in lists by family and protocol", n)
		}
		model, err := refmodel.New(rules, sets, modelOptions(opts))
		if err != nil {
			t.Fatal(err)
		}
		for k := 0; k < 300; k++ {
			p := g.packet(t)
			if w := model.Run(refmodel.Input{Packet: p, Mark: poolMark[g.pick(len(poolMark))]}).Rule; w >= 0 {
				won[fmt.Sprintf("%v/%v", rules[w].Family, rules[w].Proto)]++
			}
		}
		diffLoaded(t, g, d, rs, l, rules, sets, opts, 400)
		if d.failures > 0 {
			break
		}
	}
	t.Logf("%v; winners by family/protocol %v", d, won)
	for _, f := range []grammar.Family{grammar.FamilyAny, grammar.FamilyIPv4, grammar.FamilyIPv6} {
		for _, p := range []grammar.Proto{grammar.ProtoAny, grammar.ProtoTCP, grammar.ProtoUDP} {
			if won[fmt.Sprintf("%v/%v", f, p)] == 0 {
				t.Errorf("no packet was won by a rule of family %v protocol %v: the lists are not all exercised", f, p)
			}
		}
	}
}

// Records that a positive port match of one bucket, or a positive host,
// pins to a bucket are kept in that bucket's list (linear.go): rulesets of
// unique-shape rules where many have a destination or source port, or a
// source or destination host, from the packets' small pools (so they share
// buckets, and buckets hold rules of every family and protocol),
// interleaved with rules of no port or address, negated and wide ones
// (their family/protocol lists), compiled vs the reference model. The
// merge by priority must show both ways: packets whose first matching rule
// is in a group list while a later bucketed rule matches too, and the
// converse; and bucketed rules must win packets by each indexed field.
func TestDifferentialBuckets(t *testing.T) {
	g := diffSeed(t)
	d := newTally()
	var wildBeforeBucket, bucketBeforeWild int
	byField := map[string]int{}
	for rs, n := range []int{40, 90, 200, 400, 700} {
		sets := g.sets()
		actions := g.actionPool(9, sets)
		if rs%2 == 0 {
			actions = actions[1:] // terminal action lists only
		}
		rules := g.scanRules(n, sets, actions, true, func(r *grammar.Rule) {
			if g.chance(0.6) {
				// One or two ports of the pool, positive: a bucket's list
				// (when they share a bucket), unless the port match is
				// what makes the shape its own (then leave it).
				if r.Proto == grammar.ProtoAny {
					r.Proto = grammar.Proto(1 + g.pick(2))
				}
				m := &grammar.PortMatch{}
				for range 1 + g.pick(2) {
					p := poolPort[g.pick(len(poolPort))]
					m.Ranges = append(m.Ranges, grammar.PortRange{Lo: p, Hi: p})
				}
				switch {
				case r.Dport != nil && (r.Dport.Neg || r.Dport.Ranges != nil && r.Dport.Ranges[0].Hi-r.Dport.Ranges[0].Lo > 1024):
					if r.Sport == nil || !r.Sport.Neg {
						r.Sport = m
					}
				case g.chance(0.7):
					r.Dport = m
				case r.Sport == nil || !r.Sport.Neg:
					r.Sport = m
				}
				if r.TCPFlags != nil && r.Proto != grammar.ProtoTCP {
					r.TCPFlags = nil
				}
				fixActions(r)
			}
			if g.chance(0.4) {
				// A host of the pool, positive: an address bucket's list
				// (unless a port puts it in a port's bucket first).
				v6 := r.Family == grammar.FamilyIPv6 || r.Family == grammar.FamilyAny && g.chance(0.5)
				a := g.addr(v6)
				m := &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a, a.BitLen())}}
				fam := map[bool]grammar.Family{false: grammar.FamilyIPv4, true: grammar.FamilyIPv6}[v6]
				if r.Family != fam {
					r.Saddr, r.Daddr = nil, nil
				}
				r.Family = fam
				switch {
				case r.Saddr == nil || !r.Saddr.Neg && g.chance(0.5):
					r.Saddr = m
				case r.Daddr == nil || !r.Daddr.Neg:
					r.Daddr = m
				}
				fixActions(r)
			}
		})
		opts := compiler.Options{Hook: grammar.Hook(g.pick(2))}
		l := compileLoad(t, rules, sets, opts)
		listing := fmt.Sprint(l.prog.Spec.Programs[compiler.ProgramName].Instructions)
		if rs > 0 && !strings.Contains(listing, "buckets") {
			t.Fatalf("%d rules: no segment keeps its records in buckets", n)
		}
		bucketed := compiler.BucketedRules(l.prog)
		var wild, inBucket []*grammar.Rule
		for i, r := range rules {
			if bucketed[i] != "" {
				inBucket = append(inBucket, r)
			} else {
				wild = append(wild, r)
			}
		}
		model := func(rules []*grammar.Rule) *refmodel.Model {
			m, err := refmodel.New(rules, sets, modelOptions(opts))
			if err != nil {
				t.Fatal(err)
			}
			return m
		}
		all, onlyWild, onlyBucket := model(rules), model(wild), model(inBucket)
		for k := 0; k < 600; k++ {
			p := g.packet(t)
			in := refmodel.Input{Packet: p, Mark: poolMark[g.pick(len(poolMark))]}
			w := all.Run(in).Rule
			if w < 0 || !compiler.Terminal(rules[w]) {
				continue
			}
			if bucketed[w] != "" {
				byField[bucketed[w]]++
				if onlyWild.Run(in).Rule >= 0 {
					bucketBeforeWild++
				}
			} else if onlyBucket.Run(in).Rule >= 0 {
				wildBeforeBucket++
			}
		}
		diffLoaded(t, g, d, rs, l, rules, sets, opts, 600)
		l.coll.Close()
		if d.failures > 0 {
			break
		}
	}
	t.Logf("%v; won by a bucketed rule, by the field that put it there: %v; a group list's rule before a matching bucketed one %d, the converse %d",
		d, byField, wildBeforeBucket, bucketBeforeWild)
	if len(byField) < 4 || wildBeforeBucket == 0 || bucketBeforeWild == 0 {
		t.Error("the packets did not exercise every indexed field and the merge of bucket and group lists both ways")
	}
}

// scanRules makes n untraced unique-shape rules (handles 1..n) for the
// record scan's lists, each changed by more; counterOnly turns the rules
// without a terminal action into counters (no mark set: their segment's
// records stay in lists by family and protocol).
func (g gen) scanRules(n int, sets map[string]*grammar.Set, actions [][]*grammar.Action, counterOnly bool, more func(r *grammar.Rule)) []*grammar.Rule {
	var rules []*grammar.Rule
	for k := 0; k < n; k++ {
		r := g.uniqueRule(k, sets, actions)
		r.Trace, r.Handle = false, uint64(k+1)
		if !compiler.Terminal(r) && counterOnly {
			r.SetMetaMark, r.SetCtMark, r.Counter = nil, nil, true
		}
		more(r)
		rules = append(rules, r)
	}
	return rules
}
