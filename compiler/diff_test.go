package compiler_test

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

var (
	poolV4   = []string{"192.0.2.1", "192.0.2.77", "198.51.100.7", "203.0.113.9"}
	poolV6   = []string{"2001:db8::1", "2001:db8::77", "2001:db8:1::2", "2001:db8:2::9"}
	poolPort = []uint16{53, 179, 540, 2055, 4739, 6343, 80, 443, 0, 65535}
	poolMark = []uint32{0, 1, 0x10000, 0x20000, 0x4000, 0xffffffff, 0x00010001}
)

type gen struct{ r *rand.Rand }

func (g gen) pick(n int) int { return g.r.IntN(n) }
func (g gen) chance(p float64) bool {
	return g.r.Float64() < p
}

func (g gen) port() uint16 {
	if g.chance(0.2) {
		return uint16(g.r.IntN(65536))
	}
	return poolPort[g.pick(len(poolPort))]
}

func (g gen) addr(v6 bool) netip.Addr {
	if v6 {
		return netip.MustParseAddr(poolV6[g.pick(len(poolV6))])
	}
	return netip.MustParseAddr(poolV4[g.pick(len(poolV4))])
}

func (g gen) prefix(v6 bool) netip.Prefix {
	a := g.addr(v6)
	bits := a.BitLen()
	if g.chance(0.5) {
		bits = g.pick(a.BitLen() + 1)
	}
	return netip.PrefixFrom(a, bits).Masked()
}

func (g gen) portMatch(sets map[string]*grammar.Set) *grammar.PortMatch {
	m := &grammar.PortMatch{Neg: g.chance(0.2)}
	switch g.pick(5) {
	case 0:
		m.Set = "svc"
		return m
	case 1: // large: a bitmap map
		for i := 0; i < 8+g.pick(20); i++ {
			p := g.port()
			m.Ranges = append(m.Ranges, grammar.PortRange{Lo: p, Hi: p})
		}
	default:
		for i := 0; i < 1+g.pick(3); i++ {
			lo := g.port()
			hi := lo
			if g.chance(0.3) {
				hi = lo + uint16(g.pick(int(65535-lo)+1))
			}
			m.Ranges = append(m.Ranges, grammar.PortRange{Lo: lo, Hi: hi})
		}
	}
	return m
}

func (g gen) addrMatch(v6 bool) *grammar.AddrMatch {
	m := &grammar.AddrMatch{Neg: g.chance(0.2)}
	if g.chance(0.2) {
		m.Set = map[bool]string{false: "v4s", true: "v6s"}[v6]
		return m
	}
	n := 1 + g.pick(3)
	hosts := false
	if g.chance(0.2) {
		n = 5 + g.pick(10) // an LPM map, or a host table when all are IPv4 hosts
		hosts = g.chance(0.4)
	}
	for i := 0; i < n; i++ {
		if hosts {
			a := g.addr(v6)
			m.Prefixes = append(m.Prefixes, netip.PrefixFrom(a, a.BitLen()))
			continue
		}
		m.Prefixes = append(m.Prefixes, g.prefix(v6))
	}
	return m
}

func (g gen) funnel() *grammar.Action {
	proto := []grammar.Proto{grammar.ProtoTCP, grammar.ProtoUDP}[g.pick(2)]
	f := &grammar.FunnelHeader{Flags: grammar.DefaultFunnelFlags, Seq: grammar.DefaultFunnelSeq, Ack: grammar.DefaultFunnelAck, Window: grammar.DefaultFunnelWindow}
	if g.chance(0.7) {
		f.Sport, f.HasSport = g.port(), true
	}
	if g.chance(0.7) {
		f.Dport, f.HasDport = g.port(), true
	}
	if g.chance(0.2) {
		f.Flags, f.Seq, f.Ack, f.Window = uint8(g.pick(256)), g.r.Uint32(), g.r.Uint32(), uint16(g.pick(65536))
	}
	return &grammar.Action{Kind: grammar.ActFunnel, Proto: proto, Funnel: f}
}

func (g gen) rule(sets map[string]*grammar.Set) *grammar.Rule {
	r := &grammar.Rule{Handle: uint64(g.pick(1000))}
	r.Family = grammar.Family(g.pick(3))
	if g.chance(0.7) {
		r.Proto = grammar.Proto(1 + g.pick(2))
	}
	v6 := r.Family == grammar.FamilyIPv6 || (r.Family == grammar.FamilyAny && g.chance(0.5))
	if g.chance(0.25) {
		r.Saddr = g.addrMatch(v6)
		r.Family = map[bool]grammar.Family{false: grammar.FamilyIPv4, true: grammar.FamilyIPv6}[v6]
	}
	if g.chance(0.25) {
		r.Daddr = g.addrMatch(v6)
		r.Family = map[bool]grammar.Family{false: grammar.FamilyIPv4, true: grammar.FamilyIPv6}[v6]
	}
	if r.Proto != grammar.ProtoAny {
		if g.chance(0.5) {
			r.Dport = g.portMatch(sets)
		}
		if g.chance(0.3) {
			r.Sport = g.portMatch(sets)
		}
	}
	if r.Proto == grammar.ProtoTCP && g.chance(0.3) {
		r.TCPFlags = &grammar.FlagsMatch{Form: grammar.FlagsForm(g.pick(4)), Flags: uint8(g.pick(256)), Mask: uint8(g.pick(256))}
		if r.TCPFlags.Form == grammar.FlagsMasked {
			r.TCPFlags.Flags &= r.TCPFlags.Mask
		}
	}
	if g.chance(0.15) {
		r.MetaMark = &grammar.MarkMatch{Neg: g.chance(0.3), Value: poolMark[g.pick(len(poolMark))], Mask: 0xffffffff}
		if g.chance(0.5) {
			r.MetaMark.Mask, r.MetaMark.HasMask = uint32(g.r.Uint32()), true
		}
	}
	if g.chance(0.1) {
		r.CtMark = &grammar.MarkMatch{Neg: g.chance(0.3), Value: uint32(g.pick(3)) << 16, Mask: 0xffffffff}
	}
	r.Counter = g.chance(0.5)
	if g.chance(0.15) {
		r.SetMetaMark = &grammar.MarkSet{Value: poolMark[g.pick(len(poolMark))], Mask: 0xffffffff}
		if g.chance(0.5) {
			// As the parser gives `meta mark set V/0xff00ff00`: HasMask,
			// and no bits outside the mask. (Without HasMask the rule
			// printed, and so was keyed, as `meta mark set V`: two rules
			// differing only in that mask shared a body.)
			r.SetMetaMark.Value &= 0xff00ff00
			r.SetMetaMark.Mask, r.SetMetaMark.HasMask = 0xff00ff00, true
		}
	}
	if g.chance(0.1) {
		r.SetCtMark = &grammar.MarkSet{Value: uint32(g.pick(256)) << 16, Mask: 0xffffffff}
	}
	// Tracing code must change nothing the packet or the verdict shows.
	r.Trace = g.chance(0.1)
	switch g.pick(9) {
	case 0:
	case 1:
		r.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
	case 2:
		r.Actions = []*grammar.Action{act(grammar.ActDrop, 0)}
	case 3, 4:
		r.Actions = []*grammar.Action{g.funnel()}
	case 5, 6:
		if r.Proto == grammar.ProtoAny {
			r.Proto = grammar.Proto(1 + g.pick(2))
		}
		r.Actions = []*grammar.Action{act(grammar.ActUnfunnel, grammar.Proto(1+g.pick(2)))}
	case 7:
		if r.Proto == grammar.ProtoAny {
			r.Proto = grammar.Proto(1 + g.pick(2))
		}
		to := grammar.ProtoUDP
		if r.Proto == grammar.ProtoUDP {
			to = grammar.ProtoTCP
		}
		r.Actions = []*grammar.Action{act(grammar.ActRewrite, to)}
	case 8:
		v6 := r.Family == grammar.FamilyIPv6 || (r.Family == grammar.FamilyAny && g.chance(0.5))
		a := &grammar.Action{Kind: grammar.ActDNAT, DNATAddr: g.addr(v6)}
		if g.chance(0.5) {
			a.DNATPort = g.port()
		}
		r.Actions = []*grammar.Action{a}
		if g.chance(0.3) {
			r.Actions = append(r.Actions, g.funnel())
		}
	}
	return r
}

func (g gen) sets() map[string]*grammar.Set {
	s := map[string]*grammar.Set{
		"v4s": {Name: "v4s", Type: grammar.SetIPv4Addr},
		"v6s": {Name: "v6s", Type: grammar.SetIPv6Addr},
		"svc": {Name: "svc", Type: grammar.SetInetService},
	}
	for i := 0; i < g.pick(4); i++ {
		s["v4s"].Prefixes = append(s["v4s"].Prefixes, g.prefix(false))
		s["v6s"].Prefixes = append(s["v6s"].Prefixes, g.prefix(true))
		lo := g.port()
		s["svc"].Ports = append(s["svc"].Ports, grammar.PortRange{Lo: lo, Hi: lo + uint16(g.pick(int(65535-lo)/100+1))})
	}
	return s
}

// packet makes a random packet: mostly valid, sometimes funnel-shaped,
// TCP-in-UDP-shaped, with options, extension headers, fragments, bad
// checksums or truncated.
func (g gen) packet(t testing.TB) []byte {
	v6 := g.chance(0.5)
	var src, dst net.IP
	if v6 {
		src, dst = g.addr(true).AsSlice(), g.addr(true).AsSlice()
	} else {
		src, dst = g.addr(false).AsSlice(), g.addr(false).AsSlice()
	}
	payload := make([]byte, g.pick(120))
	for i := range payload {
		payload[i] = byte(g.r.UintN(256))
	}
	var l4 gopacket.SerializableLayer
	inner := func(udp bool) []byte {
		// A funnel-shaped payload: an inner UDP or TCP header + data.
		data := make([]byte, g.pick(40))
		if udp {
			h := make([]byte, 8)
			binary.BigEndian.PutUint16(h[0:], g.port())
			binary.BigEndian.PutUint16(h[2:], g.port())
			binary.BigEndian.PutUint16(h[4:], uint16(8+len(data)))
			if g.chance(0.1) {
				binary.BigEndian.PutUint16(h[4:], uint16(g.pick(100)))
			}
			binary.BigEndian.PutUint16(h[6:], uint16(g.r.UintN(65536)))
			return append(h, data...)
		}
		h := make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], g.port())
		binary.BigEndian.PutUint16(h[2:], g.port())
		h[12] = byte(5+g.pick(3)) << 4
		if g.chance(0.1) {
			h[12] = byte(g.pick(16)) << 4
		}
		binary.BigEndian.PutUint16(h[16:], uint16(g.r.UintN(65536)))
		return append(h, data...)
	}
	switch g.pick(10) {
	case 0, 1, 2, 3:
		l4 = &layers.UDP{SrcPort: layers.UDPPort(g.port()), DstPort: layers.UDPPort(g.port())}
	case 4, 5, 6:
		l4 = &layers.TCP{SrcPort: layers.TCPPort(g.port()), DstPort: layers.TCPPort(g.port()), Seq: g.r.Uint32(), Ack: g.r.Uint32(),
			Window: uint16(g.pick(65536)), SYN: g.chance(0.3), ACK: g.chance(0.5), PSH: g.chance(0.3), URG: g.chance(0.1), FIN: g.chance(0.1), RST: g.chance(0.1)}
	case 7: // funnel-shaped
		if g.chance(0.5) {
			l4 = &layers.TCP{SrcPort: 540, DstPort: 179, Seq: grammar.DefaultFunnelSeq, SYN: true, Window: 1024}
		} else {
			l4 = &layers.UDP{SrcPort: layers.UDPPort(g.port()), DstPort: layers.UDPPort(g.port())}
		}
		payload = inner(g.chance(0.6))
	case 8: // TCP-in-UDP-shaped: doff/flags/window, seq, ack, then data
		h := make([]byte, 12)
		h[0] = 0x50
		h[1] = byte(g.pick(256)) &^ 0x20
		payload = append(h, payload...)
		l4 = &layers.UDP{SrcPort: layers.UDPPort(g.port()), DstPort: layers.UDPPort(g.port())}
	default:
		l4 = nil // ICMP-ish: protocol 1 or 58 with raw bytes
	}
	var pkt []byte
	if l4 == nil {
		pkt = craftRaw(v6, src, dst, map[bool]uint8{false: 1, true: 58}[v6], payload)
	} else {
		pkt = craft(t, pktSpec{v6: v6, src: src, dst: dst, l4: l4, payload: payload})
	}
	// Mutations.
	switch g.pick(14) {
	case 0: // truncated (BPF_PROG_TEST_RUN refuses less than the fixed IP header)
		min := map[bool]int{false: 34, true: 54}[v6]
		pkt = pkt[:min+g.pick(len(pkt)-min+1)]
	case 1:
		if v6 {
			pkt = addExtHeaders(g, pkt)
		} else {
			pkt = addIPv4Options(g, pkt)
		}
	case 2:
		pkt = makeFragment(g, pkt, v6)
	case 3: // corrupt a checksum
		if len(pkt) > 60 {
			pkt[40+g.pick(20)] ^= byte(1 + g.pick(255))
		}
	case 4: // UDP without checksum
		if !v6 && pkt[23] == 17 {
			pkt[14+20+6], pkt[14+20+7] = 0, 0
		}
	case 5: // padding after the IP packet
		pkt = append(pkt, make([]byte, g.pick(20))...)
	}
	return pkt
}

// craftRaw builds Ethernet + IP header + raw transport bytes.
func craftRaw(v6 bool, src, dst net.IP, proto uint8, payload []byte) []byte {
	eth := make([]byte, 14)
	copy(eth, mac2)
	copy(eth[6:], mac1)
	if v6 {
		binary.BigEndian.PutUint16(eth[12:], 0x86dd)
		ip := make([]byte, 40)
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], uint16(len(payload)))
		ip[6], ip[7] = proto, 64
		copy(ip[8:], src.To16())
		copy(ip[24:], dst.To16())
		return append(append(eth, ip...), payload...)
	}
	binary.BigEndian.PutUint16(eth[12:], 0x0800)
	ip := make([]byte, 20)
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(payload)))
	ip[8], ip[9] = 64, proto
	copy(ip[12:], src.To4())
	copy(ip[16:], dst.To4())
	binary.BigEndian.PutUint16(ip[10:], ^foldSum(onesSum(ip, 0)))
	return append(append(eth, ip...), payload...)
}

func fixIPv4Checksum(ip []byte) {
	ihl := int(ip[0]&0xf) * 4
	ip[10], ip[11] = 0, 0
	binary.BigEndian.PutUint16(ip[10:], ^foldSum(onesSum(ip[:ihl], 0)))
}

// addIPv4Options inserts NOP options after the fixed header.
func addIPv4Options(g gen, pkt []byte) []byte {
	if len(pkt) < 34 || pkt[14]&0xf != 5 {
		return pkt
	}
	n := 4 * (1 + g.pick(10))
	opts := bytes.Repeat([]byte{1}, n)
	if g.chance(0.5) {
		opts[n-1] = 0
	}
	out := append(append(append([]byte(nil), pkt[:34]...), opts...), pkt[34:]...)
	out[14] = 0x40 | byte((20+n)/4)
	binary.BigEndian.PutUint16(out[16:], binary.BigEndian.Uint16(out[16:])+uint16(n))
	fixIPv4Checksum(out[14:])
	return out
}

// addExtHeaders inserts IPv6 extension headers (sometimes more than the
// datapath walks).
func addExtHeaders(g gen, pkt []byte) []byte {
	if len(pkt) < 54 {
		return pkt
	}
	types := []uint8{}
	if g.chance(0.5) {
		types = append(types, 0)
	}
	for i := 0; i < 1+g.pick(4); i++ {
		types = append(types, []uint8{60, 43, 51}[g.pick(3)])
	}
	proto := pkt[20]
	var ext []byte
	for i, typ := range types {
		next := proto
		if i+1 < len(types) {
			next = types[i+1]
		}
		var h []byte
		if typ == 51 {
			n := 1 + g.pick(3) // (n+2)*4 bytes
			h = make([]byte, (n+2)*4)
			h[1] = byte(n)
		} else {
			n := g.pick(2)
			h = make([]byte, (n+1)*8)
			h[1] = byte(n)
			if typ != 43 {
				h[2] = 1 // PadN
				h[3] = byte(len(h) - 4)
			}
		}
		h[0] = next
		ext = append(ext, h...)
	}
	out := append(append(append([]byte(nil), pkt[:54]...), ext...), pkt[54:]...)
	out[20] = types[0]
	binary.BigEndian.PutUint16(out[18:], binary.BigEndian.Uint16(out[18:])+uint16(len(ext)))
	return out
}

// makeFragment turns a packet into a fragment (first or later).
func makeFragment(g gen, pkt []byte, v6 bool) []byte {
	if !v6 {
		if len(pkt) < 34 {
			return pkt
		}
		v := uint16(0x2000) // MF
		if g.chance(0.5) {
			v = uint16(1 + g.pick(0x1fff))
		}
		binary.BigEndian.PutUint16(pkt[20:], v)
		fixIPv4Checksum(pkt[14:])
		return pkt
	}
	if len(pkt) < 54 {
		return pkt
	}
	fh := make([]byte, 8)
	fh[0] = pkt[20]
	off := uint16(0)
	if g.chance(0.5) {
		off = uint16(1+g.pick(100)) << 3
	}
	binary.BigEndian.PutUint16(fh[2:], off|uint16(g.pick(2)))
	out := append(append(append([]byte(nil), pkt[:54]...), fh...), pkt[54:]...)
	out[20] = 44
	binary.BigEndian.PutUint16(out[18:], binary.BigEndian.Uint16(out[18:])+8)
	return out
}

// checksumsOK verifies the IPv4 header and transport checksums of a plain
// Ethernet packet; known is false when it can't tell.
func checksumsOK(pkt []byte) (ok, known bool) {
	if len(pkt) < 34 {
		return false, false
	}
	var src, dst net.IP
	var proto uint8
	var seg []byte
	v6 := false
	switch binary.BigEndian.Uint16(pkt[12:]) {
	case 0x0800:
		ip := pkt[14:]
		if ip[0] != 0x45 || binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 {
			return false, false
		}
		tl := int(binary.BigEndian.Uint16(ip[2:]))
		if tl < 20 || tl > len(ip) {
			return false, false
		}
		if !ipv4HeaderValid(ip) {
			return false, true
		}
		src, dst, proto, seg = ip[12:16], ip[16:20], ip[9], ip[20:tl]
	case 0x86dd:
		if len(pkt) < 54 {
			return false, false
		}
		ip := pkt[14:]
		pl := int(binary.BigEndian.Uint16(ip[4:]))
		if 40+pl > len(ip) {
			return false, false
		}
		src, dst, proto, seg, v6 = ip[8:24], ip[24:40], ip[6], ip[40:40+pl], true
	default:
		return false, false
	}
	switch proto {
	case 6:
		if len(seg) < 20 {
			return false, false
		}
	case 17:
		if len(seg) < 8 || int(binary.BigEndian.Uint16(seg[4:])) != len(seg) {
			return false, false
		}
		if !v6 && seg[6] == 0 && seg[7] == 0 {
			return true, true
		}
	default:
		return false, false
	}
	return segmentValid(src, dst, v6, proto, seg), true
}

func describeRules(rules []*grammar.Rule) string {
	var b bytes.Buffer
	for i, r := range rules {
		fmt.Fprintf(&b, "  %d: %s\n", i, compiler.Describe(r))
	}
	return b.String()
}

// diffTally sums what the differential tests compared.
type diffTally struct {
	rulesets, tabled, packets, failures int
	byShapeRecord                       int // packets a rule in a shape record won
	changed                             map[grammar.ActionKind]int
	verdicts                            map[int32]int
	stats                               [compiler.NumStats]uint64
}

func newTally() *diffTally {
	return &diffTally{changed: map[grammar.ActionKind]int{}, verdicts: map[int32]int{}}
}

func (d *diffTally) String() string {
	return fmt.Sprintf("%d rulesets (%d with table segments), %d packets compared (%d won by a rule in a shape record); verdicts %v; rewritten by action %v; stats %v",
		d.rulesets, d.tabled, d.packets, d.byShapeRecord, d.verdicts, d.changed, d.stats)
}

// diffRuleset compiles and loads rules, runs perSet random packets through
// the program and the reference model and compares verdicts, bytes, marks,
// counters and stats.
func diffRuleset(t *testing.T, g gen, d *diffTally, rs int, rules []*grammar.Rule, sets map[string]*grammar.Set, opts compiler.Options, perSet int) {
	t.Helper()
	l := compileLoad(t, rules, sets, opts)
	defer l.coll.Close()
	diffLoaded(t, g, d, rs, l, rules, sets, opts, perSet)
}

// diffLoaded is diffRuleset for a hook already loaded.
func diffLoaded(t *testing.T, g gen, d *diffTally, rs int, l *loaded, rules []*grammar.Rule, sets map[string]*grammar.Set, opts compiler.Options, perSet int) {
	t.Helper()
	d.rulesets++
	listing := fmt.Sprint(l.prog.Spec.Programs[compiler.ProgramName].Instructions)
	if strings.Contains(listing, "looked up in tables") {
		d.tabled++
	}
	show := func() string {
		if len(rules) > 64 {
			return fmt.Sprintf("  (%d rules; SFUNNEL_SEED replays)\n", len(rules))
		}
		return describeRules(rules)
	}
	model, err := refmodel.New(rules, sets, modelOptions(opts))
	if err != nil {
		t.Fatal(err)
	}
	counters := map[int]abi.Counter{}
	var stats [compiler.NumStats]uint64
	inShapeRecord := compiler.ShapeRecordRules(l.prog)
	for n := 0; n < perSet && d.failures < 5; n++ {
		pkt := g.packet(t)
		mark := poolMark[g.pick(len(poolMark))]
		got := l.run(t, pkt, mark)
		want := model.Run(refmodel.Input{Packet: pkt, Mark: mark})
		d.packets++
		if inShapeRecord[want.Rule] {
			d.byShapeRecord++
		}
		d.verdicts[want.Verdict]++
		if want.Rule >= 0 && !bytes.Equal(pkt, want.Packet) {
			for _, a := range rules[want.Rule].Actions {
				d.changed[a.Kind]++
			}
		}
		for i, v := range want.Stats {
			d.stats[i] += v
		}
		for i, c := range want.Counters {
			cc := counters[i]
			cc.Packets += c.Packets
			cc.Bytes += c.Bytes
			counters[i] = cc
		}
		for i, v := range want.Stats {
			stats[i] += v
		}
		if got.ret != want.Verdict || !bytes.Equal(got.out, want.Packet) || got.mark != want.Mark {
			d.failures++
			t.Errorf("ruleset %d packet %d mismatch (model: rule %d)\nrules:\n%sin   %s\ngot  verdict %d mark %#x %s\nwant verdict %d mark %#x %s",
				rs, n, want.Rule, show(), hex.EncodeToString(pkt), got.ret, got.mark, hex.EncodeToString(got.out),
				want.Verdict, want.Mark, hex.EncodeToString(want.Packet))
			continue
		}
		if want.Rule >= 0 && want.Verdict == compiler.VerdictPass && !bytes.Equal(pkt, want.Packet) && !hasUnfunnel(rules[want.Rule]) {
			if ok, known := checksumsOK(pkt); known && ok {
				if ok2, known2 := checksumsOK(want.Packet); known2 && !ok2 {
					d.failures++
					t.Errorf("ruleset %d packet %d: valid input, invalid checksums out\nrules:\n%sin  %s\nout %s", rs, n, show(), hex.EncodeToString(pkt), hex.EncodeToString(want.Packet))
				}
			}
		}
	}
	for i := range rules {
		slot := i
		if opts.Slots != nil {
			slot = int(opts.Slots[i])
		}
		if c := l.counter(t, slot); c != counters[i] {
			d.failures++
			t.Errorf("ruleset %d rule %d counter %+v, model %+v\nrules:\n%s", rs, i, c, counters[i], show())
			break
		}
	}
	if s := l.stats(t); s != stats {
		d.failures++
		t.Errorf("ruleset %d stats %v, model %v\nrules:\n%s", rs, s, stats, show())
	}
}

// diffSeed returns the generator of a differential test. CI runs one fixed
// seed per test, so that a red run is a change's fault and not the draw's;
// SFUNNEL_LONG=1 (or SFUNNEL_RANDOM=1) draws a fresh seed to look for new
// failures, and SFUNNEL_SEED replays one.
func diffSeed(t *testing.T) gen {
	h := fnv.New64a()
	h.Write([]byte(t.Name()))
	seed := h.Sum64()
	if os.Getenv("SFUNNEL_LONG") == "1" || os.Getenv("SFUNNEL_RANDOM") == "1" {
		seed = uint64(rand.Int64())
	}
	if s := os.Getenv("SFUNNEL_SEED"); s != "" {
		fmt.Sscan(s, &seed)
	}
	t.Logf("seed %d (SFUNNEL_SEED to replay)", seed)
	return gen{r: rand.New(rand.NewPCG(seed, 0x5f))}
}

// mixedRules makes n rules of mixed shapes, as large rulesets are: random
// rules (every match kind, negations, ranges, sets, marks, both families,
// stacked actions) serve as templates, and each rule is a template with new
// values in its positive address, port and mark matches. Shapes that few
// rules share go to the record scan (linear.go). With more than 32
// templates their actions come from 16 action lists: each distinct action
// list is code of its own (sfunnel(8) BUGS).
func (g gen) mixedRules(n, shapes int, sets map[string]*grammar.Set) []*grammar.Rule {
	return g.shapedRules(n, shapes, 0, sets)
}

// shapedRules is mixedRules where a template in nonTerminal (0 to 1) does
// not end evaluation (counter, mark set only). With more than 32 templates,
// what rules do once they match (statements and actions) comes from 16
// tails: each distinct one is a body, code of its own (sfunnel(8) BUGS),
// which is not what these rulesets are about.
func (g gen) shapedRules(n, shapes int, nonTerminal float64, sets map[string]*grammar.Set) []*grammar.Rule {
	var templates []*grammar.Rule
	var tails []*grammar.Rule
	if shapes > 32 {
		for len(tails) < 16 {
			r := g.rule(sets)
			if len(r.Actions) > 0 {
				r.Trace = false
				tails = append(tails, r)
			}
		}
	}
	for i := 0; i < shapes; i++ {
		r := g.rule(sets)
		if tails != nil {
			t := tails[g.pick(len(tails))]
			r.Counter, r.SetMetaMark, r.SetCtMark, r.Trace, r.Actions = t.Counter, t.SetMetaMark, t.SetCtMark, false, t.Actions
			fixActions(r)
		}
		if nonTerminal > 0 && g.chance(nonTerminal) { // (no draw: other tests keep their rulesets)
			r.Actions = nil
			if r.SetMetaMark == nil && r.SetCtMark == nil {
				r.Counter = true
			}
		} else if len(r.Actions) == 0 {
			// Rules that don't end evaluation, interleaved with rules of
			// other shapes, cut segments (sfunnel(8) BUGS); templates end
			// evaluation unless nonTerminal says otherwise.
			r.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
		}
		templates = append(templates, r)
	}
	var rules []*grammar.Rule
	for len(rules) < n {

		r := *templates[g.pick(len(templates))]
		for _, m := range []**grammar.AddrMatch{&r.Saddr, &r.Daddr} {
			if *m != nil && !(*m).Neg && (*m).Set == "" {
				nm := **m
				nm.Prefixes = nil
				for _, p := range (*m).Prefixes {
					a := g.addr(p.Addr().Is6())
					if g.chance(0.5) {
						// A value outside the pools: most rules then match no packet.
						b := a.AsSlice()
						b[len(b)-1] ^= byte(1 + g.pick(255))
						a, _ = netip.AddrFromSlice(b)
					}
					nm.Prefixes = append(nm.Prefixes, netip.PrefixFrom(a, p.Bits()).Masked())
				}
				*m = &nm
			}
		}
		for _, m := range []**grammar.PortMatch{&r.Sport, &r.Dport} {
			wide := false
			if *m != nil {
				n := 0
				for _, rg := range (*m).Ranges {
					n += int(rg.Hi-rg.Lo) + 1
				}
				wide = n > 1024 // not a key: part of the shape, kept as is
			}
			if *m != nil && !(*m).Neg && (*m).Set == "" && !wide {
				nm := **m
				nm.Ranges = nil
				for _, rg := range (*m).Ranges {
					p := g.port()
					hi := uint16(min(65535, int(p)+int(rg.Hi-rg.Lo)))
					nm.Ranges = append(nm.Ranges, grammar.PortRange{Lo: p, Hi: hi})
				}
				*m = &nm
			}
		}
		if m := r.MetaMark; m != nil && !m.Neg {
			nm := *m
			nm.Value = poolMark[g.pick(len(poolMark))] & m.Mask
			r.MetaMark = &nm
		}
		rules = append(rules, &r)
	}
	for i, r := range rules {
		r.Handle = uint64(i + 1)
	}
	return rules
}

func TestDifferential(t *testing.T) {
	rulesets, perSet := 400, 256
	if os.Getenv("SFUNNEL_LONG") == "1" {
		rulesets *= 10
	}
	if testing.Short() {
		rulesets = 40
	}
	g := diffSeed(t)
	d := newTally()
	for rs := 0; rs < rulesets && d.failures < 5; rs++ {
		sets := g.sets()
		var rules []*grammar.Rule
		for i := 0; i < 1+g.pick(6); i++ {
			rules = append(rules, g.rule(sets))
		}
		if g.chance(0.3) {
			// Past the inline limit, few shapes: table segments.
			rules = append(rules, g.mixedRules(17+g.pick(40), 1+g.pick(4), sets)...)
		}
		if g.chance(0.2) {
			at := g.pick(len(rules) + 1)
			rules = append(rules[:at], append(g.groupRun(sets), rules[at:]...)...)
		}
		if g.chance(0.15) {
			at := g.pick(len(rules) + 1)
			rules = append(rules[:at], append(g.portGroupRun(sets), rules[at:]...)...)
		}
		if g.chance(0.15) {
			at := g.pick(len(rules) + 1)
			rules = append(rules[:at], append(g.pairGroupRun(sets), rules[at:]...)...)
		}
		opts := compiler.Options{Hook: grammar.Hook(g.pick(2)), ChecksumHelper: g.chance(0.3)}
		sparseOptions(&opts, len(rules), rs)
		diffRuleset(t, g, d, rs, rules, sets, opts, perSet)
	}
	t.Logf("%v", d)
	if d.tabled == 0 {
		t.Error("no ruleset used table segments")
	}
}

// Large mixed rulesets (every match kind, negations, ranges, sets, marks,
// both families, stacked actions) of few and of many shapes, some with
// rules that don't end evaluation among them, compiled vs the reference
// model: few packets per ruleset, so that CI time stays modest;
// SFUNNEL_LONG=1 sweeps more sizes and packets. Past 16 shapes most are
// shape records of the record scan (shapescan.go): packets must reach
// rules there.
func TestDifferentialLarge(t *testing.T) {
	type size struct {
		n, templates int
		nonTerminal  float64
	}
	sizes, perSet := []size{{1000, 20, 0}, {1000, 100, 0}, {3000, 300, 0.2}, {10000, 1000, 0.1}}, 300
	if os.Getenv("SFUNNEL_LONG") == "1" {
		sizes, perSet = []size{{100, 10, 0}, {300, 30, 0.3}, {1000, 100, 0}, {1000, 100, 0.5}, {3000, 30, 0},
			{3000, 300, 0.2}, {10000, 20, 0}, {10000, 1000, 0}, {10000, 1000, 0.2}, {10000, 3000, 0.1}}, 3000
	}
	if testing.Short() {
		sizes = sizes[:2]
	}
	g := diffSeed(t)
	d := newTally()
	for rs, sz := range sizes {
		sets := g.sets()
		rules := g.shapedRules(sz.n, sz.templates, sz.nonTerminal, sets)
		opts := compiler.Options{Hook: grammar.Hook(g.pick(2)), ChecksumHelper: g.chance(0.3)}
		sparseOptions(&opts, len(rules), rs+1)
		start := time.Now()
		if os.Getenv("SFUNNEL_DUMP") == fmt.Sprint(rs) {
			p, err := compiler.Compile(rules, sets, opts)
			if err != nil {
				t.Fatal(err)
			}
			dumpVerifier(t, p)
		}
		diffRuleset(t, g, d, rs, rules, sets, opts, perSet)
		t.Logf("%d rules of %d templates: compiled, loaded and compared in %v", sz.n, sz.templates, time.Since(start))
		if d.failures > 0 {
			break
		}
	}
	t.Logf("%v", d)
	if d.byShapeRecord == 0 {
		t.Error("no packet was won by a rule in a shape record")
	}
}

func hasUnfunnel(r *grammar.Rule) bool {
	for _, a := range r.Actions {
		if a.Kind == grammar.ActUnfunnel {
			return true
		}
	}
	return false
}

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, 1)) }

// groupRun makes a run of rules that differ only in one address match, with
// distinct addresses, so the compiler turns them into one map lookup.
func (g gen) groupRun(sets map[string]*grammar.Set) []*grammar.Rule {
	v6 := g.chance(0.5)
	shape := g.rule(sets)
	shape.Family = map[bool]grammar.Family{false: grammar.FamilyIPv4, true: grammar.FamilyIPv6}[v6]
	if shape.Saddr != nil && (shape.Saddr.Set != "" || (len(shape.Saddr.Prefixes) > 0 && shape.Saddr.Prefixes[0].Addr().Is6() != v6)) {
		shape.Saddr = nil
	}
	shape.Daddr = nil
	pool := poolV4
	if v6 {
		pool = poolV6
	}
	var addrs []netip.Addr
	for _, a := range pool {
		addrs = append(addrs, netip.MustParseAddr(a))
	}
	for i := 0; i < 20; i++ {
		if v6 {
			addrs = append(addrs, netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0, 3, 14: byte(i)}))
		} else {
			addrs = append(addrs, netip.AddrFrom4([4]byte{10, 0, 0, byte(i)}))
		}
	}
	g.r.Shuffle(len(addrs), func(i, j int) { addrs[i], addrs[j] = addrs[j], addrs[i] })
	var run []*grammar.Rule
	for k := 0; k < 8+g.pick(8) && len(addrs) > 0; k++ {
		r := *shape
		other := g.rule(sets)
		r.Counter, r.SetMetaMark, r.SetCtMark, r.Handle = other.Counter, other.SetMetaMark, other.SetCtMark, uint64(1000+k)
		r.Actions = nil
		switch g.pick(4) {
		case 0:
			r.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
		case 1:
			r.Actions = []*grammar.Action{act(grammar.ActDrop, 0)}
		case 2:
			r.Actions = []*grammar.Action{g.funnel()}
		}
		n := 1 + g.pick(2)
		if n > len(addrs) {
			n = len(addrs)
		}
		m := &grammar.AddrMatch{}
		for _, a := range addrs[:n] {
			m.Prefixes = append(m.Prefixes, netip.PrefixFrom(a, a.BitLen()))
		}
		addrs = addrs[n:]
		r.Daddr = m
		run = append(run, &r)
	}
	return run
}

// portGroupRun makes a run of rules that differ only in their destination
// (or source) ports, with distinct ports and small ranges.
func (g gen) portGroupRun(sets map[string]*grammar.Set) []*grammar.Rule {
	shape := g.rule(sets)
	if shape.Proto == grammar.ProtoAny {
		shape.Proto = grammar.Proto(1 + g.pick(2))
	}
	field := "dport"
	if g.chance(0.3) {
		field = "sport"
	}
	var pool []uint16
	for _, p := range poolPort {
		pool = append(pool, p)
	}
	for i := 0; i < 30; i++ {
		pool = append(pool, uint16(20000+i*10))
	}
	g.r.Shuffle(len(pool), func(i, j int) { pool[i], pool[j] = pool[j], pool[i] })
	seen := map[uint16]bool{}
	var run []*grammar.Rule
	for k := 0; k < 8+g.pick(8) && len(pool) > 0; k++ {
		r := *shape
		other := g.rule(sets)
		r.Counter, r.SetMetaMark, r.Handle = other.Counter, other.SetMetaMark, uint64(2000+k)
		r.Actions = nil
		switch g.pick(4) {
		case 0:
			r.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
		case 1:
			r.Actions = []*grammar.Action{act(grammar.ActDrop, 0)}
		case 2:
			r.Actions = []*grammar.Action{g.funnel()}
		}
		p := pool[0]
		pool = pool[1:]
		if seen[p] {
			continue
		}
		seen[p] = true
		m := &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: p, Hi: p}}}
		if p >= 20000 && p < 21000 && g.chance(0.3) {
			m.Ranges[0].Hi = p + 5 // a small range, still disjoint
		}
		if field == "dport" {
			r.Dport = m
		} else {
			r.Sport = m
		}
		run = append(run, &r)
	}
	return run
}

// pairGroupRun makes a run of rules that differ only in an IPv4 host
// address and one port, drawn from the packet pools so that packets hit
// them; keys repeat now and then (the first rule of a key wins when it has
// actions, and ends the run when it has none).
func (g gen) pairGroupRun(sets map[string]*grammar.Set) []*grammar.Rule {
	shape := g.rule(sets)
	shape.Family = grammar.FamilyIPv4
	if g.chance(0.3) {
		shape.Family = grammar.FamilyAny
	}
	if shape.Proto == grammar.ProtoAny {
		shape.Proto = grammar.Proto(1 + g.pick(2))
	}
	af, pf := "saddr", "dport"
	if g.chance(0.4) {
		af = "daddr"
	}
	if g.chance(0.3) {
		pf = "sport"
	}
	v4only := func(m *grammar.AddrMatch) *grammar.AddrMatch {
		if m == nil || m.Set != "" {
			return nil
		}
		for _, p := range m.Prefixes {
			if !p.Addr().Is4() {
				return nil
			}
		}
		return m
	}
	shape.Saddr, shape.Daddr = v4only(shape.Saddr), v4only(shape.Daddr)
	var run []*grammar.Rule
	for k := 0; k < 8+g.pick(12); k++ {
		r := *shape
		other := g.rule(sets)
		r.Counter, r.SetMetaMark, r.SetCtMark, r.Handle = other.Counter, other.SetMetaMark, other.SetCtMark, uint64(3000+k)
		r.Actions = nil
		switch g.pick(4) {
		case 0:
			r.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
		case 1:
			r.Actions = []*grammar.Action{act(grammar.ActDrop, 0)}
		case 2:
			r.Actions = []*grammar.Action{g.funnel()}
		}
		a := g.addr(false)
		m := &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(a, 32)}}
		p := &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: poolPort[g.pick(len(poolPort))]}}}
		p.Ranges[0].Hi = p.Ranges[0].Lo
		if af == "saddr" {
			r.Saddr = m
		} else {
			r.Daddr = m
		}
		if pf == "dport" {
			r.Dport = p
		} else {
			r.Sport = p
		}
		run = append(run, &r)
	}
	return run
}

// sparseOptions gives every other ruleset (by its number, not the
// generator's draw) the priorities and counter slots the datapath gives:
// sparse priorities (gaps of 1, 3 or 2^14, as after inserts) and slots out
// of rule order with holes (as after deletes).
func sparseOptions(o *compiler.Options, n, rs int) {
	if rs%2 == 0 {
		return
	}
	gap := []uint32{2, 4, 1 << 14}[rs/2%3]
	if uint64(gap)*uint64(n+2) >= 1<<31 {
		gap = 2
	}
	for i := 0; i < n; i++ {
		o.Prios = append(o.Prios, uint32(i+1)*gap+uint32(i%2))
		o.Slots = append(o.Slots, uint32(2*(n-1-i)+i%2))
	}
}
