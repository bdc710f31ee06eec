package compiler_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// fastRule turns a random rule into one the fast matcher takes: TCP or UDP,
// positive inline port lists, statements and actions kept, at least one
// action.
func (g gen) fastRule(sets map[string]*grammar.Set) *grammar.Rule {
	r := g.rule(sets)
	r.Saddr, r.Daddr, r.TCPFlags, r.MetaMark, r.CtMark, r.Trace = nil, nil, nil, nil, nil, false
	if r.Proto == grammar.ProtoAny {
		r.Proto = grammar.Proto(1 + g.pick(2))
	}
	for _, m := range []**grammar.PortMatch{&r.Sport, &r.Dport} {
		if *m == nil {
			continue
		}
		if (*m).Neg || (*m).Set != "" || len((*m).Ranges) > 6 {
			*m = &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: g.port(), Hi: 0}}}
			(*m).Ranges[0].Hi = (*m).Ranges[0].Lo
		}
	}
	if r.Dport == nil && g.chance(0.7) {
		p := g.port()
		r.Dport = &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: p, Hi: p}}}
	}
	if r.Dport != nil && r.Dport.Ranges[0].Lo < 0xfff0 && g.chance(0.15) {
		// A short range: the fast matcher's port bitmap holds each of its
		// ports, and the rule's test compares the range.
		lo := r.Dport.Ranges[0].Lo
		r.Dport = &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: lo, Hi: lo + 1 + uint16(g.pick(3))}}}
	}
	if len(r.Actions) == 0 {
		r.Actions = []*grammar.Action{g.funnel()}
	}
	for _, a := range r.Actions {
		// A rule's proto decides what unfunnel and rewrite see.
		if a.Kind == grammar.ActRewrite {
			a.Proto = map[grammar.Proto]grammar.Proto{grammar.ProtoTCP: grammar.ProtoUDP, grammar.ProtoUDP: grammar.ProtoTCP}[r.Proto]
		}
	}
	return r
}

// TestDifferentialFast holds the fast matcher (small rulesets on protocol
// and ports, IPv4 without options) to the reference model, with the packet
// mix of TestDifferential: other families, options, fragments, truncated
// headers, bad checksums, funnel-shaped payloads.
func TestDifferentialFast(t *testing.T) {
	rulesets, perSet := 120, 256
	if testing.Short() {
		rulesets = 20
	}
	g := diffSeed(t)
	d := newTally()
	fast, bitmap := 0, 0
	for rs := 0; rs < rulesets && d.failures < 5; rs++ {
		sets := g.sets()
		var rules []*grammar.Rule
		if g.chance(0.15) {
			rules = defaultRulesetRules()
		} else {
			for i := 0; i < 1+g.pick(8); i++ {
				rules = append(rules, g.fastRule(sets))
			}
		}
		opts := compiler.Options{Hook: grammar.Hook(g.pick(2)), ChecksumHelper: g.chance(0.3)}
		p, err := compiler.Compile(rules, sets, opts)
		if err != nil {
			t.Fatalf("compile: %v\n%s", err, describeRules(rules))
		}
		listing := compiler.Listing(p.Spec.Programs[compiler.ProgramName].Instructions)
		if strings.Contains(listing, "rules on protocol and ports") {
			fast++
		}
		if strings.Contains(listing, "bitmap") {
			bitmap++
		}
		diffRuleset(t, g, d, rs, rules, sets, opts, perSet)
	}
	t.Logf("%v; %d of %d rulesets on the fast matcher, %d of them with the port bitmap", d, fast, rulesets, bitmap)
	if fast < rulesets/2 {
		t.Errorf("only %d of %d rulesets used the fast matcher", fast, rulesets)
	}
	if bitmap < rulesets/10 || fast-bitmap < rulesets/10 {
		t.Errorf("the fast matcher ran %d rulesets with the port bitmap and %d without: both need exercising", bitmap, fast-bitmap)
	}
}

// defaultRulesetRules is sfunnel's default ruleset with fresh rule values
// (the generators change rules in place).
func defaultRulesetRules() []*grammar.Rule { return defaultRuleset() }

// TestFastMatcherAllPorts runs UDP and TCP packets (source port 540) to
// every destination port through the default ruleset's program, whose
// port bitmap and rule tests must let exactly the rules' ports match, and
// through the same ruleset with the unfunnel rule on its source port only,
// which leaves the fast matcher without a bitmap (a rule wants any
// destination port).
func TestFastMatcherAllPorts(t *testing.T) {
	sportOnly := defaultRuleset()
	sportOnly[3].Dport = nil
	funnelPorts := map[uint16]bool{2055: true, 4739: true, 6343: true}
	for _, tc := range []struct {
		name   string
		rules  []*grammar.Rule
		bitmap bool
		want   func(udp bool, port uint16) bool
	}{
		{"default", defaultRuleset(), true, func(udp bool, port uint16) bool { return udp && funnelPorts[port] || !udp && port == 179 }},
		{"sport only", sportOnly, false, func(udp bool, port uint16) bool { return udp && funnelPorts[port] || !udp }},
	} {
		l := compileLoad(t, tc.rules, nil, compiler.Options{Hook: grammar.HookEgress})
		listing := compiler.Listing(l.prog.Spec.Programs[compiler.ProgramName].Instructions)
		if !strings.Contains(listing, "rules on protocol and ports") || strings.Contains(listing, "bitmap") != tc.bitmap {
			t.Fatalf("%s: want the fast matcher, with a port bitmap %v:\n%s", tc.name, tc.bitmap, listing)
		}
		udp := udpPkt(t, false, 40000, 1, make([]byte, 32))
		tcp := tcpPkt(t, false, 540, 1, false, true, make([]byte, 32))
		for _, isUDP := range []bool{true, false} {
			base := map[bool][]byte{true: udp, false: tcp}[isUDP]
			for port := 0; port < 1<<16; port++ {
				pkt := append([]byte(nil), base...)
				pkt[36], pkt[37] = byte(port>>8), byte(port)
				got := l.run(t, pkt, 0)
				if m := got.ret == compiler.VerdictPass; m != tc.want(isUDP, uint16(port)) {
					t.Fatalf("%s: udp %v dport %d: verdict %d", tc.name, isUDP, port, got.ret)
				}
			}
		}
	}
}

// TestFastPathStraight checks the layout of the default ruleset's fast
// path for the packets it transforms: each rule's body follows its last
// test (reached without a jump), and from there the code runs in order to
// the verdict, r0 = pass; exit, with no unconditional jump: the cases a
// common packet does not take (other ip_summed values, an MTU overrun, a
// zero checksum) are out of line after it.
func TestFastPathStraight(t *testing.T) {
	for _, hook := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
		p, err := compiler.Compile(defaultRuleset(), nil, compiler.Options{Hook: hook})
		if err != nil {
			t.Fatal(err)
		}
		insns := p.Spec.Programs[compiler.ProgramName].Instructions
		for _, rule := range []int{1, 3} { // a funnel, the unfunnel
			at := -1
			for i, ins := range insns {
				if ins.Symbol() == fmt.Sprintf("fast_rule%d", rule) {
					at = i
				}
			}
			if at < 1 {
				t.Fatalf("%s: no fast_rule%d in\n%s", hook, rule, compiler.Listing(insns))
			}
			if op := insns[at-1].OpCode; !op.Class().IsJump() || op.JumpOp() == asm.Ja || op.JumpOp() == asm.Exit {
				t.Errorf("%s rule %d: the body follows %v, not its last test", hook, rule, insns[at-1])
			}
			i := at
			for ; i < len(insns) && insns[i].OpCode.JumpOp() != asm.Exit; i++ {
				if insns[i].OpCode.Class().IsJump() && insns[i].OpCode.JumpOp() == asm.Ja {
					t.Errorf("%s rule %d: jump %v on the way to the verdict", hook, rule, insns[i])
				}
			}
			if i == len(insns) || insns[i-1].OpCode != asm.Mov.Op(asm.ImmSource) || insns[i-1].Dst != asm.R0 || insns[i-1].Constant != int64(compiler.VerdictPass) {
				t.Errorf("%s rule %d: the body does not end with its own r0 = pass; exit", hook, rule)
			}
		}
	}
}
