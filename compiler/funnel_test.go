package compiler_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"
	"net"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// expectFunnel builds the funneled form of pkt independently of the
// compiler: a fresh header after the IP header, recomputed checksums, the
// inner checksum computed with zero addresses.
func expectFunnel(pkt []byte, l3 int, v6 bool, outer grammar.Proto, sport, dport uint16, f *grammar.FunnelHeader) []byte {
	iphl := 20
	if v6 {
		iphl = 40
	}
	ip := append([]byte(nil), pkt[l3:l3+iphl]...)
	inner := append([]byte(nil), pkt[l3+iphl:]...)
	innerProto := ip[9]
	if v6 {
		innerProto = ip[6]
	}
	src, dst := net.IP(ip[12:16]), net.IP(ip[16:20])
	if v6 {
		src, dst = net.IP(ip[8:24]), net.IP(ip[24:40])
	}
	// Inner checksum without addresses.
	co := 6
	if innerProto == 6 {
		co = 16
	}
	inner[co], inner[co+1] = 0, 0
	binary.BigEndian.PutUint16(inner[co:], l4Checksum(nil, nil, v6, innerProto, inner))
	if sport == 0 {
		sport = binary.BigEndian.Uint16(inner[0:])
	}
	if dport == 0 {
		dport = binary.BigEndian.Uint16(inner[2:])
	}
	var hdr []byte
	if outer == grammar.ProtoTCP {
		hdr = make([]byte, 20)
		binary.BigEndian.PutUint32(hdr[4:], f.Seq)
		binary.BigEndian.PutUint32(hdr[8:], f.Ack)
		hdr[12] = 0x50
		hdr[13] = f.Flags
		binary.BigEndian.PutUint16(hdr[14:], f.Window)
	} else {
		hdr = make([]byte, 8)
		binary.BigEndian.PutUint16(hdr[4:], uint16(len(inner)+8))
	}
	binary.BigEndian.PutUint16(hdr[0:], sport)
	binary.BigEndian.PutUint16(hdr[2:], dport)
	seg := append(hdr, inner...)
	binary.BigEndian.PutUint16(seg[len(hdr)-map[bool]int{true: 4, false: 2}[outer == grammar.ProtoTCP]:], l4Checksum(src, dst, v6, outer.Number(), seg))
	if v6 {
		binary.BigEndian.PutUint16(ip[4:], uint16(len(seg)))
		ip[6] = outer.Number()
	} else {
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(seg)))
		ip[9] = outer.Number()
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:], ^foldSum(onesSum(ip, 0)))
	}
	out := append([]byte(nil), pkt[:l3]...)
	out = append(out, ip...)
	return append(out, seg...)
}

func TestFunnelDefaultRuleset(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, l3 := range []bool{false, true} {
			if l3 {
				continue // L3 devices: see TestL3Device
			}
			name := map[bool]string{false: "ipv4", true: "ipv6"}[v6]
			t.Run(name, func(t *testing.T) {
				rules := defaultRuleset()
				if v6 {
					for _, r := range rules {
						r.Family = grammar.FamilyIPv6
					}
				}
				l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookEgress})
				payload := bytes.Repeat([]byte("IPFIX-"), 20)
				in := craft(t, pktSpec{v6: v6, l4: &layers.UDP{SrcPort: 40000, DstPort: 4739}, payload: payload})
				res := l.run(t, in, 0)
				if res.ret != compiler.VerdictPass {
					t.Fatalf("funnel verdict %d, want %d", res.ret, compiler.VerdictPass)
				}
				want := expectFunnel(in, 14, v6, grammar.ProtoTCP, 540, 179, rules[1].Actions[0].Funnel)
				if !bytes.Equal(res.out, want) {
					t.Fatalf("funnel output\n got %s\nwant %s", hex.EncodeToString(res.out), hex.EncodeToString(want))
				}
				// sfunnel's own expectations, spelled out.
				iphl := map[bool]int{false: 20, true: 40}[v6]
				tcp := res.out[14+iphl:]
				if got := binary.BigEndian.Uint32(tcp[4:]); got != 0xCAFEBABE {
					t.Errorf("seq %#x", got)
				}
				if got := binary.BigEndian.Uint32(tcp[8:]); got != 0xBABECAFE {
					t.Errorf("ack %#x", got)
				}
				if tcp[13] != grammar.TCPSyn || tcp[12] != 0x50 || binary.BigEndian.Uint16(tcp[14:]) != 1024 {
					t.Errorf("flags/doff/window %x", tcp[12:16])
				}
				if binary.BigEndian.Uint16(tcp[0:]) != 540 || binary.BigEndian.Uint16(tcp[2:]) != 179 {
					t.Errorf("ports %x", tcp[0:4])
				}
				// Unfunnel restores the original bytes.
				back := l.run(t, res.out, 0)
				if back.ret != compiler.VerdictPass || !bytes.Equal(back.out, in) {
					t.Fatalf("unfunnel verdict %d\n got %s\nwant %s", back.ret, hex.EncodeToString(back.out), hex.EncodeToString(in))
				}
			})
		}
	}
}

// TestFunnelChecksumEdges funnels and unfunnels IPv4 datagrams through the
// default ruleset's fast path at both hooks: random addresses, ports,
// lengths and payloads, and UDP and IPv4 header checksums forced to the
// values where a ones' complement fold carries or ends at 0 / 0xffff. Each
// output must equal the funneled form computed independently
// (expectFunnel), and unfunnel must give the original bytes back. The fast
// path ends some folds without their mask (foldLow16): a step taken on a
// sum above its bound would leave a carry in the checksum.
func TestFunnelChecksumEdges(t *testing.T) {
	rng := rand.New(rand.NewPCG(8, 2026))
	f := defaultRuleset()[1].Actions[0].Funnel
	udpTargets := []uint16{0xffff, 0x0001, 0xfffe, 0x8000, 0x7fff}
	ipTargets := []uint16{0x0000, 0x0001, 0xfffe, 0x8000}
	for _, hook := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
		l := compileLoad(t, defaultRuleset(), nil, compiler.Options{Hook: hook})
		for i := 0; i < 2000; i++ {
			src := net.IP{byte(rng.Uint32()), byte(rng.Uint32()), byte(rng.Uint32()), byte(rng.Uint32())}
			dst := net.IP{byte(rng.Uint32()), byte(rng.Uint32()), byte(rng.Uint32()), byte(rng.Uint32())}
			payload := make([]byte, 18+rng.IntN(200)) // no Ethernet padding after it
			for j := range payload {
				payload[j] = byte(rng.Uint32())
			}
			in := craft(t, pktSpec{src: src, dst: dst, l4: udpLayer(uint16(1+rng.IntN(65535)), 4739), payload: payload})
			if i%3 == 1 {
				forceUDPChecksum(t, in, udpTargets[rng.IntN(len(udpTargets))])
			}
			if i%4 == 2 {
				forceIPChecksum(t, in, ipTargets[rng.IntN(len(ipTargets))])
			}
			res := l.run(t, in, 0)
			want := expectFunnel(in, 14, false, grammar.ProtoTCP, 540, 179, f)
			if res.ret != compiler.VerdictPass || !bytes.Equal(res.out, want) {
				t.Fatalf("%s: funnel of %x: verdict %d\n got %x\nwant %x", hook, in, res.ret, res.out, want)
			}
			back := l.run(t, res.out, 0)
			if back.ret != compiler.VerdictPass || !bytes.Equal(back.out, in) {
				t.Fatalf("%s: unfunnel of %x: verdict %d\n got %x\nwant %x", hook, res.out, back.ret, back.out, in)
			}
		}
	}
}

// forceUDPChecksum rewrites the first payload word of an IPv4 UDP packet
// (Ethernet framed) so that its correct checksum is want.
func forceUDPChecksum(t *testing.T, pkt []byte, want uint16) {
	ip, seg := pkt[14:34], pkt[34:]
	fold := ^want // the fold of the whole sum the checksum complements
	if want == 0xffff {
		fold = 0xffff // a computed 0 is sent as 0xffff
	}
	seg[6], seg[7], seg[8], seg[9] = 0, 0, 0, 0
	s0 := foldSum(onesSum(seg, pseudoSum(net.IP(ip[12:16]), net.IP(ip[16:20]), false, 17, len(seg))))
	binary.BigEndian.PutUint16(seg[8:], uint16((uint32(fold)+0xffff-uint32(s0))%0xffff))
	binary.BigEndian.PutUint16(seg[6:], l4Checksum(net.IP(ip[12:16]), net.IP(ip[16:20]), false, 17, seg))
	if got := binary.BigEndian.Uint16(seg[6:]); got != want {
		t.Fatalf("UDP checksum %#x, want %#x", got, want)
	}
}

// forceIPChecksum sets the IPv4 identification so that the header checksum
// is want.
func forceIPChecksum(t *testing.T, pkt []byte, want uint16) {
	ip := pkt[14:34]
	ip[4], ip[5], ip[10], ip[11] = 0, 0, 0, 0
	s0 := foldSum(onesSum(ip, 0))
	binary.BigEndian.PutUint16(ip[4:], uint16((uint32(^want)+0xffff-uint32(s0))%0xffff))
	binary.BigEndian.PutUint16(ip[10:], ^foldSum(onesSum(ip, 0)))
	if got := binary.BigEndian.Uint16(ip[10:]); got != want || !ipv4HeaderValid(ip) {
		t.Fatalf("IPv4 checksum %#x, want %#x", got, want)
	}
}
