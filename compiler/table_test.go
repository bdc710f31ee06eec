package compiler_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

type tableCase struct {
	name    string
	rules   []*grammar.Rule
	sets    map[string]*grammar.Set
	in      []byte
	mark    uint32
	verdict int32
	out     []byte // nil: unchanged
	markOut uint32
	stat    int // expected stats index counted once, -1 none
}

func familyOf(v6 bool) grammar.Family {
	if v6 {
		return grammar.FamilyIPv6
	}
	return grammar.FamilyIPv4
}

func udpPkt(t testing.TB, v6 bool, sport, dport uint16, payload []byte) []byte {
	return craft(t, pktSpec{v6: v6, l4: &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}, payload: payload})
}

func tcpPkt(t testing.TB, v6 bool, sport, dport uint16, syn, ack bool, payload []byte) []byte {
	return craft(t, pktSpec{v6: v6, l4: &layers.TCP{SrcPort: layers.TCPPort(sport), DstPort: layers.TCPPort(dport), Seq: 0x01020304, Ack: 0x0a0b0c0d, SYN: syn, ACK: ack, PSH: true, Window: 512}, payload: payload})
}

// expectRewriteUDP lays a TCP packet out as TCP-in-UDP (independently of
// the compiler) with a checksum computed from scratch.
func expectRewriteUDP(pkt []byte, v6 bool) []byte {
	iphl := map[bool]int{false: 20, true: 40}[v6]
	out := append([]byte(nil), pkt...)
	ip := out[14:]
	seg := ip[iphl:]
	tcp := append([]byte(nil), seg[:20]...)
	binary.BigEndian.PutUint16(seg[4:], uint16(len(seg)))
	seg[6], seg[7] = 0, 0
	copy(seg[8:12], tcp[12:16])
	seg[9] &^= grammar.TCPUrg
	copy(seg[12:16], tcp[4:8])
	copy(seg[16:20], tcp[8:12])
	src, dst := net.IP(ip[12:16]), net.IP(ip[16:20])
	if v6 {
		src, dst = net.IP(ip[8:24]), net.IP(ip[24:40])
		ip[6] = 17
	} else {
		ip[9] = 17
		fixIPv4Checksum(ip)
	}
	binary.BigEndian.PutUint16(seg[6:], l4Checksum(src, dst, v6, 17, seg))
	return out
}

func TestActions(t *testing.T) {
	payload := bytes.Repeat([]byte{0xab, 0xcd, 0x01}, 33)
	var cases []tableCase
	for _, v6 := range []bool{false, true} {
		fam := familyOf(v6)
		sfx := map[bool]string{false: "/ipv4", true: "/ipv6"}[v6]
		dflt := grammar.FunnelHeader{Flags: grammar.DefaultFunnelFlags, Seq: grammar.DefaultFunnelSeq, Ack: grammar.DefaultFunnelAck, Window: grammar.DefaultFunnelWindow}

		udp := udpPkt(t, v6, 40000, 4739, payload)
		tcp := tcpPkt(t, v6, 33000, 80, false, true, payload)

		// funnel
		funnelUDPoverUDP := funnelTo(grammar.ProtoUDP, 0, 4789)
		cases = append(cases,
			tableCase{name: "funnel tcp" + sfx, rules: []*grammar.Rule{{Family: fam, Proto: grammar.ProtoUDP, Dport: ports(4739), Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}}},
				in: udp, verdict: compiler.VerdictPass, out: expectFunnel(udp, 14, v6, grammar.ProtoTCP, 540, 179, &dflt), stat: -1},
			tableCase{name: "funnel udp, sport copied" + sfx, rules: []*grammar.Rule{{Family: fam, Proto: grammar.ProtoUDP, Actions: []*grammar.Action{funnelUDPoverUDP}}},
				in: udp, verdict: compiler.VerdictPass, out: expectFunnel(udp, 14, v6, grammar.ProtoUDP, 0, 4789, nil), stat: -1},
			tableCase{name: "funnel a tcp segment over udp" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoTCP, Dport: ports(80), Actions: []*grammar.Action{funnelTo(grammar.ProtoUDP, 5000, 5001)}}},
				in: tcp, verdict: compiler.VerdictPass, out: expectFunnel(tcp, 14, v6, grammar.ProtoUDP, 5000, 5001, nil), stat: -1},
		)
		custom := funnelTo(grammar.ProtoTCP, 0, 0)
		custom.Funnel.Flags, custom.Funnel.Seq, custom.Funnel.Ack, custom.Funnel.Window = grammar.TCPAck|grammar.TCPPsh, 7, 9, 65535
		cases = append(cases, tableCase{name: "funnel tcp with flags seq ack window, ports copied" + sfx,
			rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Actions: []*grammar.Action{custom}}},
			in:    udp, verdict: compiler.VerdictPass, out: expectFunnel(udp, 14, v6, grammar.ProtoTCP, 0, 0, custom.Funnel), stat: -1})

		// unfunnel: every funneled form comes back byte for byte.
		for _, c := range []struct {
			name  string
			pkt   []byte
			outer grammar.Proto
			inner grammar.Proto
		}{
			{"unfunnel udp from tcp", expectFunnel(udp, 14, v6, grammar.ProtoTCP, 540, 179, &dflt), grammar.ProtoTCP, grammar.ProtoUDP},
			{"unfunnel udp from udp", expectFunnel(udp, 14, v6, grammar.ProtoUDP, 0, 4789, nil), grammar.ProtoUDP, grammar.ProtoUDP},
			{"unfunnel tcp from udp", expectFunnel(tcp, 14, v6, grammar.ProtoUDP, 5000, 5001, nil), grammar.ProtoUDP, grammar.ProtoTCP},
		} {
			cases = append(cases, tableCase{name: c.name + sfx, rules: []*grammar.Rule{{Proto: c.outer, Actions: []*grammar.Action{act(grammar.ActUnfunnel, c.inner)}}},
				in: c.pkt, verdict: compiler.VerdictPass, out: map[grammar.Proto][]byte{grammar.ProtoUDP: udp, grammar.ProtoTCP: tcp}[c.inner], stat: -1})
		}
		// A real TCP packet to the funnel port is not a funnel: untouched, counted.
		bgp := tcpPkt(t, v6, 540, 179, false, true, []byte("BGP OPEN not a datagram"))
		cases = append(cases, tableCase{name: "unfunnel refuses an inconsistent inner header" + sfx,
			rules: []*grammar.Rule{{Proto: grammar.ProtoTCP, Dport: ports(179), Sport: ports(540), Actions: []*grammar.Action{act(grammar.ActUnfunnel, grammar.ProtoUDP)}}},
			in:    bgp, verdict: compiler.VerdictPass, stat: compiler.StatUnfunnelInvalid})

		// rewrite
		tcpNoUrg := tcpPkt(t, v6, 33000, 5201, true, false, payload)
		rewritten := expectRewriteUDP(tcpNoUrg, v6)
		cases = append(cases,
			tableCase{name: "rewrite udp" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoTCP, Dport: ports(5201), Actions: []*grammar.Action{act(grammar.ActRewrite, grammar.ProtoUDP)}}},
				in: tcpNoUrg, verdict: compiler.VerdictPass, out: rewritten, stat: -1},
			tableCase{name: "rewrite tcp" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Dport: ports(5201), Actions: []*grammar.Action{act(grammar.ActRewrite, grammar.ProtoTCP)}}},
				in: rewritten, verdict: compiler.VerdictPass, out: tcpNoUrg, stat: -1},
		)

		// dnat
		to := netip.MustParseAddr("203.0.113.9")
		if v6 {
			to = netip.MustParseAddr("2001:db8:2::9")
		}
		dnatted := craft(t, pktSpec{v6: v6, src: map[bool]net.IP{false: v4a, true: v6a}[v6], dst: to.AsSlice(), l4: &layers.UDP{SrcPort: 40000, DstPort: 4740}, payload: payload})
		dnattedTCP := craft(t, pktSpec{v6: v6, src: map[bool]net.IP{false: v4a, true: v6a}[v6], dst: to.AsSlice(),
			l4: &layers.TCP{SrcPort: 33000, DstPort: 80, Seq: 0x01020304, Ack: 0x0a0b0c0d, ACK: true, PSH: true, Window: 512}, payload: payload})
		cases = append(cases,
			tableCase{name: "dnat addr:port" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Actions: []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: to, DNATPort: 4740}}}},
				in: udp, verdict: compiler.VerdictPass, out: dnatted, stat: -1},
			tableCase{name: "dnat addr" + sfx, rules: []*grammar.Rule{{Family: fam, Actions: []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: to}}}},
				in: tcp, verdict: compiler.VerdictPass, out: dnattedTCP, stat: -1},
			tableCase{name: "dnat then funnel" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Actions: []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: to, DNATPort: 4740}, funnelTo(grammar.ProtoTCP, 540, 179)}}},
				in: udp, verdict: compiler.VerdictPass, out: expectFunnel(dnatted, 14, v6, grammar.ProtoTCP, 540, 179, &dflt), stat: -1},
		)

		// verdicts and matches
		cases = append(cases,
			tableCase{name: "accept" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Dport: ports(4739), Actions: []*grammar.Action{act(grammar.ActAccept, 0)}}}, in: udp, verdict: compiler.VerdictPass, stat: -1},
			tableCase{name: "drop" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Sport: ports(40000), Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}}, in: udp, verdict: compiler.VerdictDrop, stat: -1},
			tableCase{name: "no match" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoTCP, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}}, in: udp, verdict: compiler.VerdictNext, stat: -1},
			tableCase{name: "dport != and ranges" + sfx, rules: []*grammar.Rule{
				{Proto: grammar.ProtoUDP, Dport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: 4000, Hi: 5000}}}, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}},
				{Proto: grammar.ProtoUDP, Dport: &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: 1, Hi: 10}, {Lo: 4739, Hi: 4739}}}, Actions: []*grammar.Action{act(grammar.ActAccept, 0)}},
			}, in: udp, verdict: compiler.VerdictPass, stat: -1},
			tableCase{name: "statements then a later rule" + sfx, rules: []*grammar.Rule{
				{Counter: true, SetMetaMark: &grammar.MarkSet{Value: 0x10, Mask: 0xff}, SetCtMark: &grammar.MarkSet{Value: 0x30000, Mask: 0xffffffff}},
				{CtMark: &grammar.MarkMatch{Value: 0x30000, Mask: 0xffffffff}, MetaMark: &grammar.MarkMatch{Value: 0x10, Mask: 0xf0, HasMask: true}, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}},
			}, in: udp, mark: 0x12345601, verdict: compiler.VerdictDrop, markOut: 0x13035610, stat: -1}, // ct mark set: the value and the flag bit 0x01000000
			tableCase{name: "meta mark != " + sfx, rules: []*grammar.Rule{{MetaMark: &grammar.MarkMatch{Neg: true, Value: 7, Mask: 0xffffffff}, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}},
				in: udp, mark: 7, verdict: compiler.VerdictNext, markOut: 7, stat: -1},
		)
		srcNet := "192.0.2.0/24"
		other := "198.51.100.0/24"
		if v6 {
			srcNet, other = "2001:db8::/48", "2001:db8:1::/48"
		}
		many := prefixes(other, other, other, other, other, srcNet) // an LPM map
		cases = append(cases,
			tableCase{name: "saddr prefix" + sfx, rules: []*grammar.Rule{{Family: fam, Saddr: prefixes(srcNet), Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}}, in: udp, verdict: compiler.VerdictDrop, stat: -1},
			tableCase{name: "saddr != prefix" + sfx, rules: []*grammar.Rule{{Family: fam, Saddr: &grammar.AddrMatch{Neg: true, Prefixes: prefixes(srcNet).Prefixes}, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}}, in: udp, verdict: compiler.VerdictNext, stat: -1},
			tableCase{name: "saddr in a large anonymous set" + sfx, rules: []*grammar.Rule{{Family: fam, Saddr: many, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}}, in: udp, verdict: compiler.VerdictDrop, stat: -1},
			tableCase{name: "daddr in a named set, dport in a named set" + sfx, rules: []*grammar.Rule{{Family: fam, Proto: grammar.ProtoUDP, Daddr: &grammar.AddrMatch{Set: "dsts"}, Dport: &grammar.PortMatch{Set: "svc"}, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}},
				sets: map[string]*grammar.Set{
					"dsts": {Name: "dsts", Type: map[bool]grammar.SetType{false: grammar.SetIPv4Addr, true: grammar.SetIPv6Addr}[v6], Prefixes: prefixes(map[bool]string{false: "198.51.100.0/24", true: "2001:db8:1::/64"}[v6]).Prefixes},
					"svc":  {Name: "svc", Type: grammar.SetInetService, Ports: []grammar.PortRange{{Lo: 2055, Hi: 2055}, {Lo: 4700, Hi: 4800}}},
				}, in: udp, verdict: compiler.VerdictDrop, stat: -1},
		)

		// fragments and options
		frag := makeFragment(gen{r: newRand(2)}, append([]byte(nil), udp...), v6)
		cases = append(cases,
			tableCase{name: "fragment: ports absent" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Dport: &grammar.PortMatch{Neg: true, Ranges: []grammar.PortRange{{Lo: 1, Hi: 1}}}, Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}},
				in: frag, verdict: compiler.VerdictNext, stat: -1},
			tableCase{name: "fragment: never rewritten" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}}},
				in: frag, verdict: compiler.VerdictPass, stat: compiler.StatFragment},
		)
		var withOpts []byte
		if v6 {
			withOpts = addExtHeaders(gen{r: newRand(1)}, append([]byte(nil), udp...))
		} else {
			withOpts = addIPv4Options(gen{r: newRand(1)}, append([]byte(nil), udp...))
		}
		// funnel and unfunnel behind IPv4 options / IPv6 extension headers
		funneled := expectFunnel(udp, 14, v6, grammar.ProtoTCP, 540, 179, &dflt)
		withOptsIn := withHeaders(udp, v6, false)
		withOptsOut := withHeaders(funneled, v6, false)
		cases = append(cases,
			tableCase{name: "funnel after options" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Dport: ports(4739), Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}}},
				in: withOptsIn, verdict: compiler.VerdictPass, out: withOptsOut, stat: -1},
			tableCase{name: "unfunnel after options" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoTCP, Dport: ports(179), Actions: []*grammar.Action{act(grammar.ActUnfunnel, grammar.ProtoUDP)}}},
				in: withOptsOut, verdict: compiler.VerdictPass, out: withOptsIn, stat: -1},
		)
		if v6 {
			cases = append(cases, tableCase{name: "funnel refuses a routing header" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}}},
				in: withHeaders(udp, true, true), verdict: compiler.VerdictPass, stat: compiler.StatIPOptions})
		}
		cases = append(cases,
			tableCase{name: "options: match the real transport header" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Dport: ports(4739), Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}},
				in: withOpts, verdict: compiler.VerdictDrop, stat: -1},
		)
		if !v6 {
			nocsum := append([]byte(nil), udp...)
			nocsum[14+20+6], nocsum[14+20+7] = 0, 0
			cases = append(cases, tableCase{name: "funnel of a datagram without checksum" + sfx, rules: []*grammar.Rule{{Proto: grammar.ProtoUDP, Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}}},
				in: nocsum, verdict: compiler.VerdictPass, stat: compiler.StatNoChecksum})
		}
	}

	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := compileLoad(t, tc.rules, tc.sets, compiler.Options{Hook: grammar.HookEgress})
			res := l.run(t, tc.in, tc.mark)
			want := tc.out
			if want == nil {
				want = tc.in
			}
			if res.ret != tc.verdict {
				t.Errorf("verdict %d, want %d", res.ret, tc.verdict)
			}
			if !bytes.Equal(res.out, want) {
				t.Errorf("output\n got %s\nwant %s", hex.EncodeToString(res.out), hex.EncodeToString(want))
			}
			wantMark := tc.markOut
			if wantMark == 0 {
				wantMark = tc.mark
			}
			if res.mark != wantMark {
				t.Errorf("mark %#x, want %#x", res.mark, wantMark)
			}
			stats := l.stats(t)
			for i, v := range stats {
				want := uint64(0)
				if i == tc.stat {
					want = 1
				}
				if v != want {
					t.Errorf("stat %s = %d, want %d", abi.StatNames[i], v, want)
				}
			}
			// The model agrees.
			m, err := refmodel.New(tc.rules, tc.sets, refmodel.Options{Hook: grammar.HookEgress})
			if err != nil {
				t.Fatal(err)
			}
			mr := m.Run(refmodel.Input{Packet: tc.in, Mark: tc.mark})
			if mr.Verdict != tc.verdict || !bytes.Equal(mr.Packet, want) || mr.Mark != wantMark {
				t.Errorf("model: verdict %d mark %#x out %s", mr.Verdict, mr.Mark, hex.EncodeToString(mr.Packet))
			}
		})
	}
}

func TestCounters(t *testing.T) {
	rules := defaultRuleset()
	rules[1].Counter = true
	l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookIngress})
	in := udpPkt(t, false, 1000, 4739, make([]byte, 100))
	for i := 0; i < 3; i++ {
		l.run(t, in, 0)
	}
	if c := l.counter(t, 1); c.Packets != 3 || c.Bytes != uint64(3*len(in)) {
		t.Fatalf("counter %+v, want 3 packets %d bytes", c, 3*len(in))
	}
	if c := l.counter(t, 0); c.Packets != 0 {
		t.Fatalf("rule without counter counted %+v", c)
	}
	if got := l.prog.Handles; len(got) != 4 || got[1] != 2 {
		t.Fatalf("handles %v", got)
	}
}

// A NAT between the ends rewrites the outer addresses and ports of a
// funneled packet (here: our own dnat on the middle hop); the receiver's
// unfunnel still yields a datagram whose checksum is valid for the new
// addresses.
func TestNATBetweenEnds(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		to := netip.MustParseAddr("203.0.113.50")
		if v6 {
			to = netip.MustParseAddr("2001:db8:9::50")
		}
		rules := defaultRuleset()
		for _, r := range rules {
			r.Family = grammar.FamilyAny
		}
		sender := compileLoad(t, rules[:3], nil, compiler.Options{Hook: grammar.HookEgress})
		nat := compileLoad(t, []*grammar.Rule{{Proto: grammar.ProtoTCP, Dport: ports(179), Actions: []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: to, DNATPort: 1179}}}}, nil, compiler.Options{Hook: grammar.HookIngress})
		receiver := compileLoad(t, []*grammar.Rule{{Proto: grammar.ProtoTCP, Dport: ports(1179), Actions: []*grammar.Action{act(grammar.ActUnfunnel, grammar.ProtoUDP)}}}, nil, compiler.Options{Hook: grammar.HookIngress})

		in := udpPkt(t, v6, 40000, 2055, []byte("netflow v9 record"))
		f := sender.run(t, in, 0)
		n := nat.run(t, f.out, 0)
		r := receiver.run(t, n.out, 0)
		if f.ret != 0 || n.ret != 0 || r.ret != 0 {
			t.Fatalf("verdicts %d %d %d", f.ret, n.ret, r.ret)
		}
		if ok, known := checksumsOK(n.out); !known || !ok {
			t.Fatalf("funneled packet after NAT has bad checksums: %x", n.out)
		}
		if ok, known := checksumsOK(r.out); !known || !ok {
			t.Fatalf("unfunneled datagram has bad checksums: %x", r.out)
		}
		l4 := 14 + map[bool]int{false: 20, true: 40}[v6]
		dst := r.out[14+16 : 14+20]
		if v6 {
			dst = r.out[14+24 : 14+40]
		}
		if !bytes.Equal(dst, to.AsSlice()) || len(r.out) != len(in) ||
			!bytes.Equal(r.out[l4:l4+6], in[l4:l4+6]) || !bytes.Equal(r.out[l4+8:], in[l4+8:]) {
			t.Fatalf("unfunneled datagram\n got %x\n  in %x", r.out, in)
		}
	}
}

// withHeaders inserts IPv4 options (12 bytes: a record-route-like option
// and NOPs) or IPv6 extension headers (hop-by-hop + destination options, or
// a routing header) after the fixed IP header, fixing lengths and the
// IPv4 checksum.
func withHeaders(pkt []byte, v6, routing bool) []byte {
	if !v6 {
		opts := []byte{0x07, 0x07, 0x04, 0, 0, 0, 0, 0x01, 0x01, 0x01, 0x01, 0x00}
		out := append(append(append([]byte(nil), pkt[:34]...), opts...), pkt[34:]...)
		out[14] = 0x40 | byte((20+len(opts))/4)
		binary.BigEndian.PutUint16(out[16:], binary.BigEndian.Uint16(out[16:])+uint16(len(opts)))
		fixIPv4Checksum(out[14:])
		return out
	}
	proto := pkt[20]
	var ext []byte
	first := byte(0)
	if routing {
		first = 43
		ext = []byte{proto, 0, 0, 0, 0, 0, 0, 0} // type 0, segments left 0
	} else {
		hbh := []byte{60, 0, 1, 4, 0, 0, 0, 0}
		dst := []byte{proto, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
		ext = append(hbh, dst...)
	}
	out := append(append(append([]byte(nil), pkt[:54]...), ext...), pkt[54:]...)
	out[20] = first
	binary.BigEndian.PutUint16(out[18:], binary.BigEndian.Uint16(out[18:])+uint16(len(ext)))
	return out
}
