package compiler_test

import (
	"fmt"
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
				p.Spec.Maps[abi.PerfectTables] != nil && len(p.Tables) < 6 {
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
