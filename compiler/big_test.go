package compiler_test

import (
	"encoding/binary"
	"net/netip"
	"slices"
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

// telemetryRules makes n rules that differ in a host source address and a
// destination port from a small set (per-router telemetry rules).
func telemetryRules(n int) []*grammar.Rule {
	var rules []*grammar.Rule
	for i := 0; i < n; i++ {
		rules = append(rules, &grammar.Rule{
			Handle: uint64(i + 1), Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP,
			Saddr:   &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(telemetryAddr(i), 32)}},
			Dport:   ports(telemetryPorts[i%len(telemetryPorts)]),
			Counter: true, Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)},
		})
	}
	return rules
}

var telemetryPorts = []uint16{2055, 4739, 6343, 9995, 9996}

func telemetryAddr(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}) }

// Rules that differ in a host address and a port compile to one
// composite-key lookup: 2000 of them load (one by one they would exceed
// the verifier's budget) and each packet counts on its own rule only; a
// later duplicate of a terminal rule's address and port never matches.
func TestTelemetryRules(t *testing.T) {
	for _, n := range []int{400, 1000, 2000} {
		if testing.Short() && n > 400 {
			continue
		}
		rules := telemetryRules(n)
		dup := *rules[5]
		dup.Handle, dup.Actions = uint64(n+1), []*grammar.Action{act(grammar.ActDrop, 0)}
		rules = append(rules, &dup)
		start := time.Now()
		l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookEgress})
		insns := len(l.prog.Spec.Programs[compiler.ProgramName].Instructions)
		t.Logf("%d rules: %d instructions, compiled and verified in %v", len(rules), insns, time.Since(start))
		if insns > 2000 { // rule by rule, 400 rules take about 144 000
			t.Fatalf("%d rules: %d instructions: not one group", n, insns)
		}
		pkt := func(i int, dport uint16) []byte {
			return craft(t, pktSpec{src: telemetryAddr(i).AsSlice(), dst: v4b, l4: udpLayer(40000, dport)})
		}
		hits := []int{0, 5, n / 2, n - 1}
		for _, i := range hits {
			if r := l.run(t, pkt(i, telemetryPorts[i%len(telemetryPorts)]), 0); r.ret != compiler.VerdictPass {
				t.Fatalf("%d rules: packet for rule %d: verdict %d", n, i, r.ret)
			}
		}
		// The right address with another rule's port, and an unknown address.
		if r := l.run(t, pkt(7, telemetryPorts[(7+1)%len(telemetryPorts)]), 0); r.ret != compiler.VerdictNext {
			t.Fatalf("%d rules: address of rule 7, port of rule 8: verdict %d", n, r.ret)
		}
		if r := l.run(t, pkt(n+3, telemetryPorts[(n+3)%len(telemetryPorts)]), 0); r.ret != compiler.VerdictNext {
			t.Fatalf("%d rules: unlisted address: verdict %d", n, r.ret)
		}
		for i := range rules {
			want := uint64(0)
			if slices.Contains(hits, i) {
				want = 1
			}
			if c := l.counter(t, i); c.Packets != want {
				t.Fatalf("%d rules: rule %d counted %d packets, want %d", n, i, c.Packets, want)
			}
		}
		l.coll.Close()
	}
}

// A group whose rules do different things keeps each rule's own body:
// past 2048 bodies (bits 20-30 of a map value), and when the bodies
// together are longer than a jump reaches (a group splits in two).
func TestManyGroupBodies(t *testing.T) {
	for _, c := range []struct {
		n      int
		pair   bool
		funnel bool // long bodies, else a mark set
		check  []int
	}{
		{2100, false, false, []int{1, 2047, 2048, 2049, 2099}},
		{160, false, true, []int{0, 80, 159}},
		{160, true, true, []int{0, 80, 159}},
	} {
		var rules []*grammar.Rule
		for i := 0; i < c.n; i++ {
			port := uint16(4739)
			if c.pair {
				port = telemetryPorts[i%len(telemetryPorts)]
			}
			r := &grammar.Rule{
				Handle: uint64(i + 1), Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP,
				Saddr: &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(telemetryAddr(i), 32)}}, Dport: ports(port),
			}
			if c.funnel {
				r.Actions = []*grammar.Action{funnelTo(grammar.ProtoTCP, uint16(1000+i), 179)}
			} else {
				r.SetMetaMark = &grammar.MarkSet{Value: uint32(1000 + i), Mask: 0xffffffff}
			}
			rules = append(rules, r)
		}
		l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookEgress})
		for _, i := range c.check {
			dport := rules[i].Dport.Ranges[0].Lo
			r := l.run(t, craft(t, pktSpec{src: telemetryAddr(i).AsSlice(), dst: v4b, l4: udpLayer(40000, dport)}), 0)
			if !c.funnel {
				if r.ret != compiler.VerdictNext || r.mark != uint32(1000+i) {
					t.Errorf("%d rules: rule %d: verdict %d mark %d, want mark %d", c.n, i, r.ret, r.mark, 1000+i)
				}
				continue
			}
			if r.ret != compiler.VerdictPass || len(r.out) < 36 {
				t.Fatalf("%d rules (pair %v): rule %d: verdict %d, %d bytes", c.n, c.pair, i, r.ret, len(r.out))
			}
			if got := binary.BigEndian.Uint16(r.out[34:]); got != uint16(1000+i) {
				t.Errorf("%d rules (pair %v): rule %d: funnel source port %d, want %d", c.n, c.pair, i, got, 1000+i)
			}
		}
		l.coll.Close()
	}
}

// mixedShapes makes n rules of seven shapes, interleaved (the issue's
// "mixed shapes": host + port, /24 + port, port ranges, two CIDRs, meta
// mark, IPv6 prefix + port, a negated port), none of which matches the
// test packets of udpPkt (192.0.2.1:40000 → 198.51.100.7:4739) or
// tcpPkt; add a rule that does.
func mixedShapes(n int) []*grammar.Rule {
	var rules []*grammar.Rule
	for i := 0; i < n; i++ {
		k := i / 7
		a := func(x byte) netip.Addr { return netip.AddrFrom4([4]byte{10, x, byte(k >> 8), byte(k)}) }
		r := &grammar.Rule{Handle: uint64(i + 1)}
		switch i % 7 {
		case 0:
			r.Family, r.Proto = grammar.FamilyIPv4, grammar.ProtoUDP
			r.Saddr = &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a(1), 32)}}
			r.Dport = ports(telemetryPorts[k%len(telemetryPorts)])
			r.Counter, r.Actions = true, []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}
		case 1:
			r.Family, r.Proto = grammar.FamilyIPv4, grammar.ProtoTCP
			r.Daddr = &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a(2), 24).Masked()}}
			r.Sport = ports(uint16(1000 + k%1000))
			r.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
		case 2:
			lo := uint16(20000 + (k%4000)*10)
			r.Proto = grammar.ProtoUDP
			r.Dport = &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: lo, Hi: lo + 9}}}
			r.Counter, r.Actions = true, []*grammar.Action{act(grammar.ActDrop, 0)}
		case 3:
			r.Family = grammar.FamilyIPv4
			r.Saddr = &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a(3), 24).Masked()}}
			r.Daddr = &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a(4), 16).Masked()}}
			r.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
		case 4:
			r.Proto = grammar.ProtoUDP
			r.MetaMark = &grammar.MarkMatch{Value: uint32(k + 1), Mask: 0xffffffff}
			r.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
		case 5:
			b := netip.MustParseAddr("2001:db8::").As16()
			b[4], b[5], b[6], b[7] = byte(k>>8), byte(k), 0, 1
			r.Family, r.Proto = grammar.FamilyIPv6, grammar.ProtoUDP
			r.Saddr = &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(netip.AddrFrom16(b), 64)}}
			r.Dport = ports(4739)
			r.Actions = []*grammar.Action{funnelTo(grammar.ProtoUDP, 4739, 4789)}
		case 6:
			r.Family, r.Proto = grammar.FamilyIPv4, grammar.ProtoTCP
			r.Saddr = &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a(6), 32)}}
			r.Dport = &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: 22, Hi: 22}}}
			r.Actions = []*grammar.Action{act(grammar.ActDrop, 0)}
		}
		rules = append(rules, r)
	}
	return rules
}

// matchingIPFIX is a rule of mixedShapes' first shape that the udpPkt
// packet matches.
func matchingIPFIX(handle uint64) *grammar.Rule {
	return &grammar.Rule{Handle: handle, Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP, Saddr: prefixes("192.0.2.1"), Dport: ports(4739),
		Counter: true, Actions: []*grammar.Action{act(grammar.ActAccept, 0)}}
}

// 100 000 rules of mixed shapes load, in tables of a few shapes, and the
// last one matches; an earlier rule of the same shape and key shadows it.
func TestHundredThousandRules(t *testing.T) {
	rules := append(mixedShapes(100000-1), matchingIPFIX(100000))
	start := time.Now()
	p, err := compiler.Compile(rules, nil, compiler.Options{Hook: grammar.HookEgress})
	if err != nil {
		t.Fatal(err)
	}
	compiled := time.Since(start)
	l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookEgress})
	insns := len(l.prog.Spec.Programs[compiler.ProgramName].Instructions)
	t.Logf("100 000 rules: %d instructions, %d table maps; compiled in %v, compiled and loaded in %v", insns, len(p.Tables), compiled, time.Since(start)-compiled)
	if insns > 20000 {
		t.Errorf("%d instructions for 100 000 rules of 8 shapes", insns)
	}
	pkt := udpPkt(t, false, 40000, 4739, nil)
	if r := l.run(t, pkt, 0); r.ret != compiler.VerdictPass {
		t.Fatalf("last rule: verdict %d", r.ret)
	}
	if c := l.counter(t, len(rules)-1); c.Packets != 1 {
		t.Fatalf("last rule counted %+v", c)
	}
	// A packet for rule 70 000 (shape 0: 10.1.k.k, port of k).
	k := 70000 / 7
	src := netip.AddrFrom4([4]byte{10, 1, byte(k >> 8), byte(k)})
	r := l.run(t, craft(t, pktSpec{src: src.AsSlice(), dst: v4b, l4: udpLayer(40000, telemetryPorts[k%len(telemetryPorts)])}), 0)
	if r.ret != compiler.VerdictPass || len(r.out) != len(pkt)+20 {
		t.Fatalf("rule 70 000: verdict %d, %d bytes (want funneled)", r.ret, len(r.out))
	}
	if c := l.counter(t, 70000); c.Packets != 1 {
		t.Fatalf("rule 70 000 counted %+v", c)
	}
	// The meta mark shape: mark k+1 matches rule 7k+4 and accepts.
	if r := l.run(t, pkt, uint32(5+1)); r.ret != compiler.VerdictPass {
		t.Fatalf("meta mark 6: verdict %d", r.ret)
	}
}

// BenchmarkCompile10kMixed is the compiler's share of applying 10 000
// rules (the control-plane goal is nft -f's time for the whole apply).
func BenchmarkCompile10kMixed(b *testing.B) {
	rules := append(mixedShapes(10000-1), matchingIPFIX(10000))
	for n := 0; n < b.N; n++ {
		if _, err := compiler.Compile(rules, nil, compiler.Options{Hook: grammar.HookEgress}); err != nil {
			b.Fatal(err)
		}
	}
}
