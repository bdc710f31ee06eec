package compiler_test

import (
	"fmt"
	"net"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

// IPv4-mapped IPv6 prefixes (::ffff:a.b.c.d, in IPv6 bogon lists as
// ::ffff:0:0/96) are IPv6 prefixes: a rule with one first in its list, or
// alone, compiles (it was refused as "IPv4 and IPv6 addresses mixed") and
// matches IPv6 packets from such sources as the reference model does,
// whether the rule is tested by its own code, by a table of its shape or
// by the record scan.
func TestMappedIPv6Prefixes(t *testing.T) {
	texts := []string{
		"ip6 saddr ::ffff:10.0.0.0/104 udp dport 8 counter actions drop",
		"ip6 saddr { ::ffff:0:0/96, fc00::/7 } udp dport 9 counter actions drop",
		"ip6 daddr != { ::ffff:192.0.2.2, 2001:db8::2 } udp dport 10 counter actions drop",
	}
	for i := range 40 { // a table of one shape
		texts = append(texts, fmt.Sprintf("ip6 saddr ::ffff:10.0.0.%d udp dport %d counter actions drop", i, 7000+i))
	}
	for i := range 40 { // records
		texts = append(texts, fmt.Sprintf("ip6 saddr ::ffff:10.1.0.%d udp sport != %d dport %d counter actions drop", i, 100+i, 7100+i))
	}
	var rules []*grammar.Rule
	for _, text := range texts {
		r, err := grammar.ParseRule("<test>", text, nil)
		if err != nil {
			t.Fatalf("%s: %v", text, err)
		}
		rules = append(rules, r)
	}
	l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookIngress})
	model, err := refmodel.New(rules, nil, refmodel.Options{Hook: grammar.HookIngress})
	if err != nil {
		t.Fatal(err)
	}
	srcs := []string{"::ffff:10.0.0.3", "::ffff:10.0.0.39", "::ffff:10.1.0.5", "::ffff:10.9.9.9", "::ffff:192.0.2.1", "fc00::1", "2001:db8::1"}
	dsts := []string{"2001:db8::2", "::ffff:192.0.2.2", "2001:db8::9"}
	dports := []int{8, 9, 10, 7003, 7039, 7105, 7139, 7200}
	drops := 0
	for _, src := range srcs {
		for _, dst := range dsts {
			for _, dport := range dports {
				pkt := mappedPacket(t, src, dst, 5000, dport)
				got := l.run(t, pkt, 0)
				want := model.Run(refmodel.Input{Packet: pkt})
				if got.ret != want.Verdict {
					t.Errorf("%s > %s port %d: verdict %d, the model %d (rule %d)", src, dst, dport, got.ret, want.Verdict, want.Rule)
				}
				if want.Verdict == 2 {
					drops++
				}
			}
		}
	}
	if drops < 10 {
		t.Fatalf("only %d packets dropped: the rules were not tested", drops)
	}
}

// mappedPacket is an Ethernet frame carrying UDP over IPv6 from src to dst.
func mappedPacket(t *testing.T, src, dst string, sport, dport int) []byte {
	t.Helper()
	ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolUDP, SrcIP: net.ParseIP(src).To16(), DstIP: net.ParseIP(dst).To16()}
	u := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}
	u.SetNetworkLayerForChecksum(ip)
	eth := &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}, EthernetType: layers.EthernetTypeIPv6}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ip, u, gopacket.Payload("mapped")); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
