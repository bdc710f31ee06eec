// Package grammar turns sfunnel rule text into a validated, canonical AST and
// prints that AST back as canonical text.
//
// The AST in this file is the contract between the front end (parser,
// semantic checks, printer, ruleset model) and the back end (compiler,
// reference model). Every value in a Rule is resolved: `$var` references are
// expanded, the family and L4 protocol are explicit. Only named sets stay as
// references (`@name`), because their elements change at run time.
package grammar

import (
	"net/netip"
)

// Pos is a location in rule text. Line and Column are 1-based; Column counts
// bytes. Offset is the 0-based byte offset in the source.
type Pos struct {
	Filename string
	Offset   int
	Line     int
	Column   int
}

// Span covers the tokens of a node, from the first byte of its first token
// to the byte after its last token (End is exclusive).
type Span struct {
	Pos Pos
	End Pos
}

// Family selects the network layer a rule applies to.
type Family uint8

const (
	FamilyAny  Family = iota // no `ip`/`ip6` and no address match: both
	FamilyIPv4               // `ip`, or an IPv4 address match
	FamilyIPv6               // `ip6`, or an IPv6 address match
)

// Proto is an L4 protocol as the rule language names it.
type Proto uint8

const (
	ProtoAny Proto = iota // no `tcp`/`udp` match
	ProtoTCP              // IPPROTO_TCP (6)
	ProtoUDP              // IPPROTO_UDP (17)
)

// Number returns the IANA protocol number (0 for ProtoAny).
func (p Proto) Number() uint8 {
	switch p {
	case ProtoTCP:
		return 6
	case ProtoUDP:
		return 17
	}
	return 0
}

func (p Proto) String() string {
	switch p {
	case ProtoTCP:
		return "tcp"
	case ProtoUDP:
		return "udp"
	}
	return "any"
}

// Hook is a TC attach point.
type Hook uint8

const (
	HookIngress Hook = iota
	HookEgress
)

func (h Hook) String() string {
	if h == HookEgress {
		return "egress"
	}
	return "ingress"
}

// Rule is one resolved rule. Matches are ANDed; a nil match matches all.
// Statements (Counter, SetMetaMark, SetCtMark, Trace) run when every match holds,
// then Actions run in order.
type Rule struct {
	Span

	// Handle is the stable identifier given by the ruleset model (0 = none yet).
	Handle uint64

	Family Family
	Saddr  *AddrMatch
	Daddr  *AddrMatch

	Proto Proto
	Sport *PortMatch
	Dport *PortMatch

	TCPFlags *FlagsMatch

	MetaMark *MarkMatch
	CtMark   *MarkMatch

	Counter     bool
	SetMetaMark *MarkSet
	SetCtMark   *MarkSet
	// Trace is nft's `meta nftrace set 1`: packets that match are reported
	// to `monitor trace`.
	Trace bool

	Actions []*Action
	Comment string // "" = none
}

// AddrMatch matches an address against prefixes or a named set.
// Exactly one of Prefixes (non-empty) or Set ("name" without '@') is used.
// All prefixes share the rule's Family. Prefixes are masked (no host bits).
type AddrMatch struct {
	Span
	Neg      bool
	Prefixes []netip.Prefix
	Set      string
}

// PortMatch matches an L4 port against ranges or a named set.
// A single port is a range with Lo == Hi.
type PortMatch struct {
	Span
	Neg    bool
	Ranges []PortRange
	Set    string
}

// PortRange is an inclusive port range.
type PortRange struct {
	Lo, Hi uint16
}

// TCP flag bits as they sit in byte 13 of the TCP header.
const (
	TCPFin uint8 = 0x01
	TCPSyn uint8 = 0x02
	TCPRst uint8 = 0x04
	TCPPsh uint8 = 0x08
	TCPAck uint8 = 0x10
	TCPUrg uint8 = 0x20
	TCPEce uint8 = 0x40
	TCPCwr uint8 = 0x80
)

// FlagsForm records how a flags match was written, for printing.
type FlagsForm uint8

const (
	FlagsAny    FlagsForm = iota // `tcp flags syn|ack`      : (flags & Flags) != 0
	FlagsNone                    // `tcp flags != syn|ack`   : (flags & Flags) == 0
	FlagsExact                   // `tcp flags == syn`       : flags == Flags
	FlagsMasked                  // `tcp flags syn / syn,ack`: (flags & Mask) == Flags
)

// FlagsMatch matches the TCP flags byte.
type FlagsMatch struct {
	Span
	Form  FlagsForm
	Flags uint8
	Mask  uint8 // only for FlagsMasked
}

// Test reports whether a TCP flags byte matches.
func (f *FlagsMatch) Test(flags uint8) bool {
	switch f.Form {
	case FlagsAny:
		return flags&f.Flags != 0
	case FlagsNone:
		return flags&f.Flags == 0
	case FlagsExact:
		return flags == f.Flags
	default:
		return flags&f.Mask == f.Flags
	}
}

// MarkMatch matches (mark & Mask) == Value, negated with Neg.
// Mask is 0xffffffff when the rule gives none (HasMask false).
type MarkMatch struct {
	Span
	Neg     bool
	Value   uint32
	Mask    uint32
	HasMask bool
}

// MarkSet sets mark = (mark &^ Mask) | (Value & Mask).
// Mask is 0xffffffff when the rule gives none (HasMask false).
type MarkSet struct {
	Span
	Value   uint32
	Mask    uint32
	HasMask bool
}

// ActionKind names an action.
type ActionKind uint8

const (
	ActAccept ActionKind = iota
	ActDrop
	ActFunnel
	ActUnfunnel
	ActRewrite
	ActDNAT
)

func (k ActionKind) String() string {
	return [...]string{"accept", "drop", "funnel", "unfunnel", "rewrite", "dnat"}[k]
}

// Action is one action of a rule. Accept, Drop, Funnel, Unfunnel, Rewrite
// and DNAT all end rule evaluation for the packet once the rule's actions
// have run; several may be stacked in one rule and run in order.
type Action struct {
	Span
	Kind ActionKind

	// Proto: for funnel, the pushed header; for unfunnel, the protocol the
	// inner header is (the one restored); for rewrite, the protocol the
	// packet is turned into (udp: TCP→UDP, tcp: UDP→TCP).
	Proto Proto

	Funnel *FunnelHeader // ActFunnel only

	DNATAddr netip.Addr // ActDNAT only
	DNATPort uint16     // ActDNAT: 0 = keep the port
}

// Funnel header defaults, byte-compatible with sfunnel v0.0.11.
const (
	DefaultFunnelFlags  = TCPSyn
	DefaultFunnelSeq    = 0xCAFEBABE
	DefaultFunnelAck    = 0xBABECAFE
	DefaultFunnelWindow = 1024
	// MinFunnelMSS is the smallest `mss` a funnel takes (RFC 9293's
	// default IPv4 MSS).
	MinFunnelMSS = 536
)

// FunnelHeader holds the fields of the pushed header. Has* record which
// fields the rule text gave, so the printer reproduces the rule; the value
// fields always hold the effective value (defaults filled in).
// A zero Sport/Dport that the text did not give means "copy the inner
// packet's port".
type FunnelHeader struct {
	Sport, Dport       uint16
	HasSport, HasDport bool

	// TCP only.
	Flags     uint8
	Seq, Ack  uint32
	Window    uint16
	HasFlags  bool
	HasSeq    bool
	HasAck    bool
	HasWindow bool

	// MSS clamping of the inner TCP SYN and SYN-ACK (either protocol):
	// by default to what fits the device MTU once funneled; `mss N` clamps
	// to N, `mss off` leaves the option alone.
	MSS    uint16
	HasMSS bool
	MSSOff bool
}

// SetType is the element type of a named set.
type SetType uint8

const (
	SetIPv4Addr    SetType = iota // ipv4_addr (elements may be prefixes)
	SetIPv6Addr                   // ipv6_addr (elements may be prefixes)
	SetInetService                // inet_service (ports, ranges)
)

func (t SetType) String() string {
	return [...]string{"ipv4_addr", "ipv6_addr", "inet_service"}[t]
}

// MaxSetElements is the most elements a named set holds, and the size of a
// set declared without `size`: the capacity of the datapath's LPM trie.
const MaxSetElements = 65536

// Set is a named set. Addr sets hold Prefixes, service sets hold Ports.
type Set struct {
	Span
	Name string
	Type SetType
	// Size is the declared `size N` (0 = not given: MaxSetElements).
	Size     uint32
	Prefixes []netip.Prefix
	Ports    []PortRange
}

// Limit is the number of elements s may hold.
func (s *Set) Limit() int {
	if s.Size == 0 {
		return MaxSetElements
	}
	return int(s.Size)
}
