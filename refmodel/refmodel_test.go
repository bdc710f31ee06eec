package refmodel_test

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

func sum(b []byte, acc uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	for acc > 0xffff {
		acc = acc&0xffff + acc>>16
	}
	return acc
}

// valid checks a transport segment's checksum; zero addresses when src
// and dst are nil.
func valid(src, dst []byte, proto uint8, seg []byte) bool {
	acc := uint32(proto) + uint32(len(seg))
	if src != nil {
		acc = sum(src, sum(dst, acc))
	}
	return sum(seg, acc) == 0xffff
}

func packet(t *testing.T) []byte {
	eth := &layers.Ethernet{SrcMAC: []byte{2, 0, 0, 0, 0, 1}, DstMAC: []byte{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv4}
	ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: []byte{192, 0, 2, 1}, DstIP: []byte{198, 51, 100, 7}}
	udp := &layers.UDP{SrcPort: 40000, DstPort: 4739}
	udp.SetNetworkLayerForChecksum(ip)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, udp, gopacket.Payload("ipfix")); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestFunnelRoundTrip(t *testing.T) {
	f := &grammar.FunnelHeader{Sport: 540, Dport: 179, HasSport: true, HasDport: true, Flags: grammar.DefaultFunnelFlags,
		Seq: grammar.DefaultFunnelSeq, Ack: grammar.DefaultFunnelAck, Window: grammar.DefaultFunnelWindow}
	rules := []*grammar.Rule{
		{Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP, Dport: &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: 4739, Hi: 4739}}},
			Counter: true, Actions: []*grammar.Action{{Kind: grammar.ActFunnel, Proto: grammar.ProtoTCP, Funnel: f}}},
		{Family: grammar.FamilyIPv4, Proto: grammar.ProtoTCP, Dport: &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: 179, Hi: 179}}},
			Actions: []*grammar.Action{{Kind: grammar.ActUnfunnel, Proto: grammar.ProtoUDP}}},
	}
	m, err := refmodel.New(rules, nil, refmodel.Options{Hook: grammar.HookEgress})
	if err != nil {
		t.Fatal(err)
	}
	in := packet(t)
	out := m.Run(refmodel.Input{Packet: in})
	if out.Verdict != abi.VerdictPass || out.Rule != 0 || out.Counters[0].Packets != 1 || len(out.Packet) != len(in)+20 {
		t.Fatalf("funnel: %+v", out)
	}
	p := out.Packet
	ip := p[14:34]
	end := 14 + int(binary.BigEndian.Uint16(ip[2:])) // Ethernet padding follows
	if sum(ip, 0) != 0xffff || ip[9] != 6 || end != 14+20+20+8+len("ipfix") {
		t.Fatalf("IP header %x", ip)
	}
	p = p[:end]
	if !valid(ip[12:16], ip[16:20], 6, p[34:]) {
		t.Fatalf("outer TCP checksum invalid: %x", p)
	}
	if !valid(nil, nil, 17, p[54:]) {
		t.Fatalf("inner UDP checksum not address-neutral: %x", p)
	}
	if binary.BigEndian.Uint32(p[38:]) != grammar.DefaultFunnelSeq || p[47] != grammar.TCPSyn {
		t.Fatalf("funnel header %x", p[34:54])
	}
	back := m.Run(refmodel.Input{Packet: out.Packet})
	if back.Verdict != abi.VerdictPass || !bytes.Equal(back.Packet, in) {
		t.Fatalf("unfunnel: %+v", back)
	}
	// A fragment is never rewritten, only counted.
	frag := append([]byte(nil), in...)
	frag[20] = 0x20 // MF
	frag[24], frag[25] = 0, 0
	binary.BigEndian.PutUint16(frag[24:], ^uint16(sum(frag[14:34], 0)))
	fr := m.Run(refmodel.Input{Packet: frag})
	if fr.Verdict != abi.VerdictNext || !bytes.Equal(fr.Packet, frag) {
		t.Fatalf("fragment: %+v", fr)
	}
}
