package compiler_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
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
