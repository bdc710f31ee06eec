package compiler_test

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

var update = flag.Bool("update", false, "rewrite the golden listings in testdata/")

// goldenRulesets are compiled to testdata/NAME.golden: the labelled
// instruction listing with rule comments, then the maps.
func goldenRulesets() map[string]struct {
	rules []*grammar.Rule
	sets  map[string]*grammar.Set
	opts  compiler.Options
} {
	type g = struct {
		rules []*grammar.Rule
		sets  map[string]*grammar.Set
		opts  compiler.Options
	}
	v6rules := []*grammar.Rule{
		{Handle: 1, Family: grammar.FamilyIPv6, Saddr: &grammar.AddrMatch{Set: "routers"}, Proto: grammar.ProtoUDP, Dport: &grammar.PortMatch{Set: "flow_ports"}, Counter: true,
			Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}},
		{Handle: 2, Family: grammar.FamilyIPv6, Proto: grammar.ProtoTCP, Dport: ports(179), Sport: ports(540), Counter: true,
			Actions: []*grammar.Action{act(grammar.ActUnfunnel, grammar.ProtoUDP)}},
	}
	sets := map[string]*grammar.Set{
		"routers":    {Name: "routers", Type: grammar.SetIPv6Addr, Prefixes: []netip.Prefix{netip.MustParsePrefix("2001:db8::/48")}},
		"flow_ports": {Name: "flow_ports", Type: grammar.SetInetService, Ports: []grammar.PortRange{{Lo: 2055, Hi: 2055}, {Lo: 4739, Hi: 4739}, {Lo: 6343, Hi: 6343}}},
	}
	mixed := []*grammar.Rule{
		{Handle: 10, Proto: grammar.ProtoTCP, TCPFlags: &grammar.FlagsMatch{Form: grammar.FlagsMasked, Flags: grammar.TCPSyn, Mask: grammar.TCPSyn | grammar.TCPAck},
			Dport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: 1, Hi: 1023}}}, SetCtMark: &grammar.MarkSet{Value: 0x10000, Mask: 0xffffffff}},
		{Handle: 11, CtMark: &grammar.MarkMatch{Value: 0x10000, Mask: 0xffffffff}, MetaMark: &grammar.MarkMatch{Neg: true, Value: 0x4000, Mask: 0x4000, HasMask: true},
			Daddr: prefixes("192.0.2.0/24", "198.51.100.7"), Family: grammar.FamilyIPv4,
			Actions: []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: netip.MustParseAddr("203.0.113.9"), DNATPort: 8080}, funnelTo(grammar.ProtoUDP, 0, 4789)}},
		{Handle: 12, Proto: grammar.ProtoTCP, Dport: ports(5201), Actions: []*grammar.Action{act(grammar.ActRewrite, grammar.ProtoUDP)}},
		{Handle: 13, Proto: grammar.ProtoUDP, Sport: ports(5201), Actions: []*grammar.Action{act(grammar.ActRewrite, grammar.ProtoTCP)}},
		{Handle: 14, Counter: true, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}},
	}
	var grouped []*grammar.Rule
	for i := 0; i < 9; i++ {
		a := netip.AddrFrom4([4]byte{198, 51, 100, byte(i)})
		r := &grammar.Rule{Handle: uint64(20 + i), Family: grammar.FamilyIPv4, Daddr: &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a, 32)}},
			Proto: grammar.ProtoUDP, Dport: ports(4739), Counter: i%2 == 0, Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, uint16(1000+i))}}
		if i == 4 {
			r.Actions = []*grammar.Action{act(grammar.ActDrop, 0)}
		}
		grouped = append(grouped, r)
	}
	// Telemetry rules: a host address and a port per rule, one repeated.
	var pairs []*grammar.Rule
	for i := 0; i < 9; i++ {
		a := netip.AddrFrom4([4]byte{198, 51, 100, byte(i % 8)})
		pairs = append(pairs, &grammar.Rule{Handle: uint64(40 + i), Saddr: &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a, 32)}},
			Proto: grammar.ProtoUDP, Dport: ports([]uint16{2055, 4739}[i%2]), Counter: true, Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}})
	}
	// A table segment: 24 rules of four shapes (IPv4 host + port list, a
	// /24 with a port range and a negated port kept in the shape, IPv6 with
	// a meta mark under a mask, one UDP port: a port-indexed table), then
	// a counter rule.
	var classified []*grammar.Rule
	for i := 0; i < 6; i++ {
		classified = append(classified,
			&grammar.Rule{Handle: uint64(60 + 3*i), Family: grammar.FamilyIPv4, Saddr: prefixes(fmt.Sprintf("192.0.2.%d", i)), Proto: grammar.ProtoUDP,
				Dport: &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: 2055, Hi: 2055}, {Lo: 4739, Hi: 4739}}}, Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}},
			&grammar.Rule{Handle: uint64(61 + 3*i), Family: grammar.FamilyIPv4, Daddr: prefixes(fmt.Sprintf("198.51.%d.0/24", i)), Proto: grammar.ProtoTCP,
				Sport: &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: 1000, Hi: 1003}}}, Dport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: 22, Hi: 22}}},
				Counter: true, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}},
			&grammar.Rule{Handle: uint64(62 + 3*i), Family: grammar.FamilyIPv6, Saddr: prefixes(fmt.Sprintf("2001:db8:%x::/48", i)),
				MetaMark: &grammar.MarkMatch{Value: uint32(i), Mask: 0xff, HasMask: true}, Actions: []*grammar.Action{act(grammar.ActAccept, 0)}},
			&grammar.Rule{Handle: uint64(80 + i), Proto: grammar.ProtoUDP, Dport: ports(uint16(7000 + i)), Actions: []*grammar.Action{act(grammar.ActDrop, 0)}})
	}
	classified = append(classified, &grammar.Rule{Handle: 99, Proto: grammar.ProtoUDP, Counter: true})
	return map[string]g{
		"classifier":      {rules: classified, opts: compiler.Options{Hook: grammar.HookEgress}},
		"group":           {rules: grouped, opts: compiler.Options{Hook: grammar.HookIngress}},
		"pair-group":      {rules: pairs, opts: compiler.Options{Hook: grammar.HookEgress}},
		"default-egress":  {rules: defaultRuleset(), opts: compiler.Options{Hook: grammar.HookEgress}},
		"default-ingress": {rules: defaultRuleset(), opts: compiler.Options{Hook: grammar.HookIngress}},
		"ipv6-sets-l3":    {rules: v6rules, sets: sets, opts: compiler.Options{Hook: grammar.HookIngress, L3: true}},
		"mixed":           {rules: mixed, opts: compiler.Options{Hook: grammar.HookEgress}},
		"empty":           {opts: compiler.Options{Hook: grammar.HookIngress}},
		// 20 shapes of three rules: a few are code, the others shape
		// records of the record scan (shapescan.go).
		"shape-records": {rules: sharedShapes(20, 3, 2055), opts: compiler.Options{Hook: grammar.HookEgress}},
	}
}

func listing(p *compiler.Program) string {
	var b strings.Builder
	b.WriteString(compiler.Listing(p.Spec.Programs[compiler.ProgramName].Instructions))
	var names []string
	for n := range p.Spec.Maps {
		names = append(names, n)
	}
	slices.Sort(names)
	b.WriteString("\nmaps:\n")
	for _, n := range names {
		m := p.Spec.Maps[n]
		fmt.Fprintf(&b, "  %s: %s key %d value %d max %d flags %#x, %d elements\n", n, m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags, len(m.Contents))
	}
	fmt.Fprintf(&b, "handles: %v\nnamed sets: %v\n", p.Handles, p.NamedSets)
	return b.String()
}

func TestGolden(t *testing.T) {
	for name, g := range goldenRulesets() {
		t.Run(name, func(t *testing.T) {
			// The checksum helper keeps listings independent of the
			// running kernel's BTF.
			g.opts.ChecksumHelper = true
			p, err := compiler.Compile(g.rules, g.sets, g.opts)
			if err != nil {
				t.Fatal(err)
			}
			got := listing(p)
			path := filepath.Join("testdata", name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./compiler -run TestGolden -update)", err)
			}
			if got != string(want) {
				t.Errorf("listing of %s changed (go test ./compiler -run TestGolden -update, then review the diff):\n%s", name, firstDiff(string(want), got))
			}
			// Every golden program passes the verifier.
			compileLoad(t, g.rules, g.sets, g.opts)
		})
	}
}

func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < len(al) || i < len(bl); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			return fmt.Sprintf("line %d:\n- %s\n+ %s", i+1, x, y)
		}
	}
	return ""
}

// TestNoJumpToJump: no jump of a golden program, with the checksum helper
// or inline checksums, lands on an unconditional jump (emit.go threads
// them: an action's end would otherwise cost a chain of taken jumps per
// packet).
func TestNoJumpToJump(t *testing.T) {
	for name, g := range goldenRulesets() {
		for _, helper := range []bool{true, false} {
			g.opts.ChecksumHelper = helper
			p, err := compiler.Compile(g.rules, g.sets, g.opts)
			if err != nil {
				t.Fatal(err)
			}
			insns := p.Spec.Programs[compiler.ProgramName].Instructions
			at := map[string]int{}
			for i, ins := range insns {
				if s := ins.Symbol(); s != "" {
					at[s] = i
				}
			}
			jumps := 0
			for i, ins := range insns {
				op := ins.OpCode
				if !op.Class().IsJump() || op.JumpOp() == asm.Call || op.JumpOp() == asm.Exit || ins.Reference() == "" {
					continue
				}
				jumps++
				t2 := insns[at[ins.Reference()]]
				if t2.OpCode.Class() == asm.JumpClass && t2.OpCode.JumpOp() == asm.Ja {
					t.Errorf("%s (helper %v): instruction %d (%v) jumps to %s, itself a jump to %s", name, helper, i, ins, ins.Reference(), t2.Reference())
				}
			}
			if jumps == 0 {
				t.Errorf("%s: no jumps found", name)
			}
		}
	}
}
