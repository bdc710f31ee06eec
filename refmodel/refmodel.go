// Package refmodel is the reference model of sfunnel's datapath: an
// interpreter over the rule AST that operates on packet bytes with the same
// semantics as the programs package compiler generates. It is the oracle of
// the differential tests: same verdict, same output bytes, same mark, same
// counters and stats, for a skb whose checksums are complete (as
// BPF_PROG_TEST_RUN builds it).
//
// Semantics (shared with compiler):
//   - The packet is Ethernet (EtherType IPv4/IPv6) or, on L3 devices, raw IP
//     (version nibble). Anything else, or an IPv4 header length below 20,
//     matches no rule.
//   - IPv4 options and IPv6 extension headers (hop-by-hop, routing,
//     destination options, AH; at most 4, then a fragment header) are
//     skipped to find the transport protocol. Fragments (IPv4 MF or offset,
//     IPv6 fragment header) have a protocol but no transport header.
//   - Ports and TCP flags are absent when the transport header is absent
//     (fragment, truncated, other protocol); a match on an absent field
//     fails, negated or not.
//   - Rules run top to bottom; counter and mark set run when a rule matches,
//     then its actions in order. accept and drop end at once; after
//     rewriting actions (funnel, unfunnel, rewrite, dnat) the packet passes.
//     A rewriting action that can't apply leaves the packet as it is,
//     counts a stat (abi.Stat*) and passes it; the rule's later
//     actions don't run. No rule ends evaluation: VerdictNext.
//   - Rewriting actions never touch fragments. funnel and unfunnel work
//     behind IPv4 options and IPv6 extension headers (up to
//     abi.MaxOptMove bytes), not with an IPv6 routing header or AH
//     (nor does dnat), and not on GSO packets.
//   - Checksums are updated incrementally from the packet's own checksums
//     (the inner one of a funneled packet is address-neutral), so a packet
//     with valid checksums leaves with valid checksums, and one with a bad
//     checksum keeps it bad.
package refmodel

import (
	"fmt"
	"net/netip"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// Input is one packet with its skb metadata.
type Input struct {
	Packet  []byte
	Mark    uint32
	GSOSize uint32
	// Partial: the skb's transport checksum is still to be finalised
	// (CHECKSUM_PARTIAL). BPF_PROG_TEST_RUN can't make one.
	Partial bool
}

// Result is what the program does to the packet.
type Result struct {
	Verdict  int32
	Packet   []byte
	Mark     uint32
	Counters map[int]abi.Counter // rule index -> increment
	Rule     int                 // index of the rule that ended evaluation, -1 if none
	Stats    [abi.NumStats]uint64
}

// Options say what hook the model stands for.
type Options struct {
	L3         bool         // packet data starts at the IP header
	Hook       grammar.Hook // ingress or egress
	CtMarkMask uint32       // bits of skb->mark that carry `ct mark`; 0 = abi.DefaultCtMarkMask
	MTU        int          // MTU of the device (MSS clamping); 0 = 65536, loopback's
}

// Model interprets the rules of one hook.
type Model struct {
	rules []*grammar.Rule
	sets  map[string]*grammar.Set
	opts  Options
	ct    ctBits
}

// New returns a model; the sets map is read at every packet, so changing a
// set's elements changes what matches, as with live set maps.
func New(rules []*grammar.Rule, sets map[string]*grammar.Set, opts Options) (*Model, error) {
	ct, err := ctLayout(opts.CtMarkMask)
	if err != nil {
		return nil, err
	}
	return &Model{rules: rules, sets: sets, opts: opts, ct: ct}, nil
}

// ctBits places `ct mark` values in skb->mark: a value is the connection
// mark itself, in the mask's bits; `ct mark set` also sets the flag bit
// (the bit above the mask, or the highest free one for a mask reaching bit
// 31) that tells the nftables table to save them. Worked out here, not
// taken from the compiler, so the model checks it.
type ctBits struct {
	mask uint32 // the skb->mark bits
	flag uint32
}

func ctLayout(mask uint32) (ctBits, error) {
	if mask == 0 {
		mask = abi.DefaultCtMarkMask
	}
	if mask == 0xffffffff {
		return ctBits{}, fmt.Errorf("ct mark mask %#x leaves no flag bit", mask)
	}
	c := ctBits{mask: mask}
	if mask&0x80000000 == 0 {
		for c.flag = 1; c.flag <= mask; c.flag <<= 1 {
		}
		return c, nil
	}
	for c.flag = 0x80000000; c.flag&mask != 0; c.flag >>= 1 {
	}
	return c, nil
}

// matchBits returns the skb->mark mask and value `ct mark V[/M]` tests;
// ok is false when V or M has bits outside the ct mark mask.
func (c ctBits) matchBits(mm *grammar.MarkMatch) (m, v uint32, ok bool) {
	m = c.mask
	if mm.HasMask {
		m = mm.Mask
	}
	return m, mm.Value, m&^c.mask == 0 && mm.Value&^m == 0
}

// setBits returns the skb->mark mask and value `ct mark set V` writes.
func (c ctBits) setBits(s *grammar.MarkSet) (m, v uint32, ok bool) {
	if (s.HasMask && s.Mask != c.mask) || s.Value&^c.mask != 0 {
		return 0, 0, false
	}
	return c.mask | c.flag, s.Value | c.flag, true
}

// parsed is what the parse guard finds.
type parsed struct {
	fam          int
	frag, opts   bool
	unsafe       bool // IPv6 routing header or AH
	proto        uint32
	l4off, nhoff int
	l4           bool // transport header present
	sport, dport uint32
	flags        uint32 // TCP only
	saddr, daddr netip.Addr
}

const (
	infoAbsentFlags = 0x100
)

// parse mirrors the parse guard; ok false means no rule can match.
func (m *Model) parse(p []byte) (parsed, bool) {
	var s parsed
	l3 := 14
	if m.opts.L3 {
		l3 = 0
	}
	if len(p) < l3+20 {
		return s, false
	}
	if m.opts.L3 {
		s.fam = int(p[0] >> 4)
	} else {
		switch be16(p[12:]) {
		case 0x0800:
			s.fam = 4
		case 0x86dd:
			s.fam = 6
		}
	}
	switch s.fam {
	case 4:
		if p[l3]>>4 != 4 {
			return s, false
		}
		ihl := int(p[l3]&0xf) * 4
		if ihl < 20 {
			return s, false
		}
		s.opts = ihl != 20
		s.l4off = l3 + ihl
		s.frag = be16(p[l3+6:])&0x3fff != 0
		s.proto = uint32(p[l3+9])
		s.nhoff = l3 + 9
		s.saddr = netip.AddrFrom4([4]byte(p[l3+12 : l3+16]))
		s.daddr = netip.AddrFrom4([4]byte(p[l3+16 : l3+20]))
	case 6:
		if len(p) < l3+40 || p[l3]>>4 != 6 {
			return s, false
		}
		s.saddr = netip.AddrFrom16([16]byte(p[l3+8 : l3+24]))
		s.daddr = netip.AddrFrom16([16]byte(p[l3+24 : l3+40]))
		nh := uint32(p[l3+6])
		s.nhoff = l3 + 6
		s.l4off = l3 + 40
	walk:
		for i := 0; i < 4; i++ {
			switch nh {
			case 0, 43, 60, 51:
				s.opts = true
				if nh == 43 || nh == 51 {
					s.unsafe = true
				}
				if s.l4off+8 > len(p) {
					break walk
				}
				cur, n := nh, int(p[s.l4off+1])
				s.nhoff = s.l4off
				nh = uint32(p[s.l4off])
				if cur == 51 {
					s.l4off += (n + 2) * 4 // AH counts 4-byte words
				} else {
					s.l4off += (n + 1) * 8
				}
			case 44:
				s.opts, s.frag = true, true
				if s.l4off+8 <= len(p) {
					nh = uint32(p[s.l4off])
					s.nhoff = s.l4off
					s.l4off += 8
				}
				break walk
			default:
				break walk
			}
		}
		s.proto = nh
	default:
		return s, false
	}
	s.sport, s.dport, s.flags = 0x10000, 0x10000, infoAbsentFlags
	if s.frag {
		return s, true
	}
	switch s.proto {
	case 17:
		if s.l4off+8 <= len(p) {
			s.l4 = true
		}
	case 6:
		if s.l4off+20 <= len(p) {
			s.l4 = true
			s.flags = uint32(p[s.l4off+13])
		}
	}
	if s.l4 {
		s.sport, s.dport = be16(p[s.l4off:]), be16(p[s.l4off+2:])
	}
	return s, true
}
