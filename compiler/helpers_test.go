package compiler_test

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/refmodel"
)

// loaded is a compiled hook loaded into the kernel.
type loaded struct {
	prog *compiler.Program
	coll *ebpf.Collection
}

func compileLoad(t testing.TB, rules []*grammar.Rule, sets map[string]*grammar.Set, opts compiler.Options) *loaded {
	t.Helper()
	testenv.RequireRoot(t)
	p, err := compiler.Compile(rules, sets, opts)
	if err != nil {
		t.Fatalf("compile: %v", err)
	}
	coll, err := ebpf.NewCollectionWithOptions(p.Spec, ebpf.CollectionOptions{Programs: ebpf.ProgramOptions{LogSizeStart: 1 << 20}})
	if err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			t.Fatalf("load: %+v", ve)
		}
		t.Fatalf("load: %v", err)
	}
	t.Cleanup(func() { coll.Close() })
	return &loaded{prog: p, coll: coll}
}

// skbCtx is the prefix of struct __sk_buff that BPF_PROG_TEST_RUN accepts.
type skbCtx struct {
	Len, PktType, Mark uint32
	_                  [192 - 12]byte
}

type runResult struct {
	ret  int32
	out  []byte
	mark uint32
}

func (l *loaded) run(t testing.TB, pkt []byte, mark uint32) runResult {
	t.Helper()
	out := make([]byte, len(pkt)+256)
	var ctxOut skbCtx
	opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: skbCtx{Mark: mark}, ContextOut: &ctxOut}
	ret, err := l.coll.Programs[compiler.ProgramName].Run(opts)
	if err != nil {
		t.Fatalf("run: %v (packet %d bytes %x)", err, len(pkt), pkt)
	}
	return runResult{ret: int32(ret), out: opts.DataOut, mark: ctxOut.Mark}
}

func (l *loaded) stats(t testing.TB) [compiler.NumStats]uint64 {
	t.Helper()
	var s [compiler.NumStats]uint64
	for i := range s {
		var per []uint64
		if err := l.coll.Maps[compiler.StatsMap].Lookup(uint32(i), &per); err != nil {
			t.Fatal(err)
		}
		for _, v := range per {
			s[i] += v
		}
	}
	return s
}

func (l *loaded) counter(t testing.TB, i int) abi.Counter {
	t.Helper()
	var per []abi.Counter
	if err := l.coll.Maps[abi.CountersMap].Lookup(uint32(i), &per); err != nil {
		t.Fatal(err)
	}
	var c abi.Counter
	for _, v := range per {
		c.Packets += v.Packets
		c.Bytes += v.Bytes
	}
	return c
}

// Rule constructors.

func ports(ps ...uint16) *grammar.PortMatch {
	m := &grammar.PortMatch{}
	for _, p := range ps {
		m.Ranges = append(m.Ranges, grammar.PortRange{Lo: p, Hi: p})
	}
	return m
}

func prefixes(ss ...string) *grammar.AddrMatch {
	m := &grammar.AddrMatch{}
	for _, s := range ss {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			a := netip.MustParseAddr(s)
			p = netip.PrefixFrom(a, a.BitLen())
		}
		m.Prefixes = append(m.Prefixes, p.Masked())
	}
	return m
}

func funnelTo(proto grammar.Proto, sport, dport uint16) *grammar.Action {
	return &grammar.Action{Kind: grammar.ActFunnel, Proto: proto, Funnel: &grammar.FunnelHeader{
		Sport: sport, Dport: dport, HasSport: sport != 0, HasDport: dport != 0,
		Flags: grammar.DefaultFunnelFlags, Seq: grammar.DefaultFunnelSeq, Ack: grammar.DefaultFunnelAck, Window: grammar.DefaultFunnelWindow,
	}}
}

func act(kind grammar.ActionKind, proto grammar.Proto) *grammar.Action {
	return &grammar.Action{Kind: kind, Proto: proto}
}

// defaultRuleset is sfunnel's default: flows funneled over TCP 179/540 and
// the unfunnel rule, on one hook.
func defaultRuleset() []*grammar.Rule {
	var rules []*grammar.Rule
	for i, p := range []uint16{2055, 4739, 6343} {
		rules = append(rules, &grammar.Rule{Handle: uint64(i + 1), Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP, Dport: ports(p),
			Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}})
	}
	rules = append(rules, &grammar.Rule{Handle: 4, Family: grammar.FamilyIPv4, Proto: grammar.ProtoTCP, Dport: ports(179), Sport: ports(540),
		Actions: []*grammar.Action{act(grammar.ActUnfunnel, grammar.ProtoUDP)}})
	return rules
}

// Packet crafting.

var (
	mac1 = net.HardwareAddr{0x02, 0, 0, 0, 0, 1}
	mac2 = net.HardwareAddr{0x02, 0, 0, 0, 0, 2}
	v4a  = net.IP{192, 0, 2, 1}
	v4b  = net.IP{198, 51, 100, 7}
	v6a  = net.ParseIP("2001:db8::1")
	v6b  = net.ParseIP("2001:db8:1::2")
)

type pktSpec struct {
	v6      bool
	l3      bool // no Ethernet header
	src     net.IP
	dst     net.IP
	l4      gopacket.SerializableLayer // *layers.UDP or *layers.TCP
	payload []byte
}

func craft(t testing.TB, s pktSpec) []byte {
	t.Helper()
	var ls []gopacket.SerializableLayer
	var netl gopacket.NetworkLayer
	src, dst := s.src, s.dst
	if s.v6 {
		if src == nil {
			src, dst = v6a, v6b
		}
		ip := &layers.IPv6{Version: 6, HopLimit: 64, SrcIP: src, DstIP: dst}
		switch s.l4.(type) {
		case *layers.UDP:
			ip.NextHeader = layers.IPProtocolUDP
		case *layers.TCP:
			ip.NextHeader = layers.IPProtocolTCP
		}
		netl = ip
		if !s.l3 {
			ls = append(ls, &layers.Ethernet{SrcMAC: mac1, DstMAC: mac2, EthernetType: layers.EthernetTypeIPv6})
		}
		ls = append(ls, ip)
	} else {
		if src == nil {
			src, dst = v4a, v4b
		}
		ip := &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Id: 0x1234, Flags: layers.IPv4DontFragment, SrcIP: src, DstIP: dst}
		switch s.l4.(type) {
		case *layers.UDP:
			ip.Protocol = layers.IPProtocolUDP
		case *layers.TCP:
			ip.Protocol = layers.IPProtocolTCP
		}
		netl = ip
		if !s.l3 {
			ls = append(ls, &layers.Ethernet{SrcMAC: mac1, DstMAC: mac2, EthernetType: layers.EthernetTypeIPv4})
		}
		ls = append(ls, ip)
	}
	switch l := s.l4.(type) {
	case *layers.UDP:
		l.SetNetworkLayerForChecksum(netl)
	case *layers.TCP:
		l.SetNetworkLayerForChecksum(netl)
	}
	ls = append(ls, s.l4, gopacket.Payload(s.payload))
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

// Independent checksum arithmetic for expectations.

func onesSum(b []byte, acc uint32) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		acc += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		acc += uint32(b[len(b)-1]) << 8
	}
	return acc
}

func foldSum(acc uint32) uint16 {
	for acc > 0xffff {
		acc = acc&0xffff + acc>>16
	}
	return uint16(acc)
}

// pseudoSum is the pseudo-header sum; src/dst nil mean zero addresses
// (the address-neutral form).
func pseudoSum(src, dst net.IP, v6 bool, proto uint8, n int) uint32 {
	var acc uint32
	for _, a := range []net.IP{src, dst} {
		switch {
		case a == nil:
		case v6:
			acc = onesSum(a.To16(), acc)
		default:
			acc = onesSum(a.To4(), acc)
		}
	}
	return acc + uint32(proto) + uint32(n)
}

// l4Checksum computes a transport checksum over seg (its check field zero).
func l4Checksum(src, dst net.IP, v6 bool, proto uint8, seg []byte) uint16 {
	c := ^foldSum(onesSum(seg, pseudoSum(src, dst, v6, proto, len(seg))))
	if c == 0 && proto == 17 {
		c = 0xffff
	}
	return c
}

func ipv4HeaderValid(ip []byte) bool {
	ihl := int(ip[0]&0xf) * 4
	return foldSum(onesSum(ip[:ihl], 0)) == 0xffff
}

// segmentValid verifies a transport segment's checksum.
func segmentValid(src, dst net.IP, v6 bool, proto uint8, seg []byte) bool {
	return foldSum(onesSum(seg, pseudoSum(src, dst, v6, proto, len(seg)))) == 0xffff
}

func udpLayer(sport, dport uint16) *layers.UDP {
	return &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}
}

// modelOptions are the reference model's options for a compiled hook.
func modelOptions(o compiler.Options) refmodel.Options {
	return refmodel.Options{L3: o.L3, Hook: o.Hook, CtMarkMask: o.CtMarkMask}
}
