// Package abi is the contract between the programs package compiler
// generates and everything else that talks to them: the verdicts they
// return, the maps they own (names, key and value layouts), the events they
// count and the counter type. bpf/ and datapath/ read the maps through it;
// the reference model (refmodel/) shares it with the compiler and nothing
// else, so it stays an independent oracle.
//
// Changing a layout here changes what old pinned maps mean: bump the state
// format in datapath when you do.
package abi

// Verdicts the program returns (tcx naming; clsact direct-action reads them
// the same way).
const (
	// VerdictNext: no rule ended evaluation; the next program / the stack
	// sees the packet (tcx TCX_NEXT, clsact TC_ACT_UNSPEC).
	VerdictNext int32 = -1
	// VerdictPass: accept, or the rule's rewriting actions ran (TCX_PASS).
	VerdictPass int32 = 0
	// VerdictDrop: drop (TC_ACT_SHOT).
	VerdictDrop int32 = 2
)

// Names of the program and its maps in a compiled CollectionSpec.
const (
	ProgramName = "sfunnel"
	// CountersMap: PERCPU_ARRAY, key uint32 rule index, value Counter.
	CountersMap = "counters"
	// StatsMap: PERCPU_ARRAY, key uint32 Stat, value uint64: the hook's
	// events; then, at (slot+1)*NumStats + Stat, the packets the rule in
	// counter slot `slot` matched but left alone, by reason (taken back out
	// of its counter: a rule's counter counts what it transformed).
	StatsMap = "stats"
	// RuleMTUMap: PERCPU_ARRAY, key uint32 rule index, value uint64:
	// funnels of that rule that exceeded the egress MTU.
	RuleMTUMap = "rule_mtu"

	// SetMapPrefix + set name: the map of a named set (layout below),
	// shared by every program that references the set.
	SetMapPrefix = "set_"
	// ControlMap: ARRAY, 1 entry, key uint32 0, value Control. The
	// program reads the generation once per packet.
	ControlMap = "ctl"
	// TablePrefix + key size in words: HASH (BPF_F_NO_PREALLOC) rule
	// tables. Key: uint32 shape id<<1 | generation, then the shape's key
	// words (addresses as in the packet, prefix-masked; ports and marks as
	// native uint32). Value: TableValue.
	// TablePrefix + "p" + shape id: ARRAY of 2<<16 TableValue, index
	// generation<<16 | port, for a shape keyed on one port only.
	TablePrefix = "tbl"
	// PerfectTables names the perfect-hash rule tables in layouts (the
	// shapes' table). Their maps are one per generation, PerfectGen(g):
	// ARRAY of 1 element, key uint32 0, value generation g's perfect-hash
	// rule tables, one after the other (their layout is the compiler's:
	// compiler/perfect.go). Written whole. (One map per generation, not
	// one element per generation, lets the program take the value's
	// address as a constant: no lookup.)
	PerfectTables = TablePrefix + "h"
	// ActionParams: ARRAY, key uint32 counter slot<<1 | generation, value
	// the rule's action parameters (funnel header fields, dnat address and
	// port, mark set values; layout: compiler/params.go), in hooks whose
	// action bodies are shared by rules with different values. The first
	// uint32 is 1 in an entry that holds parameters.
	ActionParams = TablePrefix + "a"
)

// PerfectGen is the map holding generation gen (0 or 1) of the
// perfect-hash rule tables.
func PerfectGen(gen uint32) string {
	if gen&1 == 0 {
		return PerfectTables + "0"
	}
	return PerfectTables + "1"
}

// IsPerfectGen reports whether name is one of PerfectGen's maps.
func IsPerfectGen(name string) bool { return name == PerfectGen(0) || name == PerfectGen(1) }

// Control is the value of the control map.
type Control struct {
	Generation uint32 // live generation of the rule tables: 0 or 1
	NoRule     uint32 // always NoRule: "no match yet", read from here so the verifier can't fold it
}

// NoRule is the priority of "no rule matched".
const NoRule = 0xffffffff

// TableValue is the value of a rule table entry (native uint32s).
type TableValue struct {
	Prio uint32 // the lowest matching priority wins: rule position + 1; 0 = no entry
	Slot uint32 // index of the rule's counters and rule_mtu entries
	Body uint32 // which of the segment's action bodies runs
}

// Counter is the value of the counters map (one per CPU).
type Counter struct {
	Packets, Bytes uint64
}

// Named set maps: SetMapPrefix + name is an ARRAY_OF_MAPS of one entry
// (key uint32 0) whose value is the set's elements map (SetElements
// appended to the name in a CollectionSpec): a change of elements builds a
// new elements map and swaps it in with one update, so a packet sees the
// old elements or the new ones, never a part. Elements maps:
//
//   - ipv4_addr / ipv6_addr: LPM_TRIE (BPF_F_NO_PREALLOC), key {prefixlen
//     uint32 (host order); address [4]/[16]byte}, value uint8 1,
//     max_entries NamedAddrSetCapacity.
//   - inet_service: ARRAY of one element (key uint32 0), value a
//     PortBitmapSize-byte bitmap, bit (port & 7) of byte (port >> 3).
const (
	SetElements          = "/elements"
	NamedAddrSetCapacity = 65536
	PortBitmapSize       = 65536 / 8
)

// Stat* index the stats map: events not tied to one rule, each a reason
// why a matched packet was left alone (or, for StatMTUExceeded, sent
// anyway). Untyped, so they serve as map keys and immediates alike.
const (
	// StatFragment: a rewriting action met an IPv4/IPv6 fragment; the packet
	// passed untouched.
	StatFragment = iota
	// StatUnfunnelInvalid: unfunnel found no consistent inner header; the
	// packet passed untouched.
	StatUnfunnelInvalid
	// StatMTUExceeded: a funneled packet is longer than the egress device's
	// MTU (it is still sent; the stack drops or fragments it).
	StatMTUExceeded
	// StatNotApplicable: a rewriting action met a packet it can't rewrite
	// (not TCP/UDP, truncated or inconsistent lengths, family of the dnat
	// address, result longer than 65535); untouched.
	StatNotApplicable
	// StatNoChecksum: funnel or rewrite tcp of a UDP datagram sent without
	// checksum (0), which can't be carried with an O(1) checksum; untouched.
	StatNoChecksum
	// StatIPOptions: funnel/unfunnel of a packet with IPv4 options or IPv6
	// extension headers beyond what is supported; untouched.
	StatIPOptions
	// StatGSO: funnel/unfunnel of a GSO packet (segmentation after TC would
	// corrupt it); untouched.
	StatGSO
	// StatPartialChecksum: TCP-in-UDP rewrite of a packet whose checksum is
	// still to be finalised (CHECKSUM_PARTIAL): the finaliser would write
	// into the moved fields; untouched.
	StatPartialChecksum
	// StatHelperFailed: a kernel helper (adjust_room) refused; untouched.
	StatHelperFailed
	// StatSegmented: a GSO or CHECKSUM_PARTIAL packet that a funnel or
	// rewrite rule matched went to the segmentation device; its segments
	// come back and are rewritten one by one (not a packet left alone).
	StatSegmented
	// StatUrgent: rewrite udp of a TCP segment with URG set: TCP-in-UDP
	// has no urgent pointer, so the segment stays TCP (as tcp-in-udp does).
	StatUrgent
	// StatUDPLength: funnel of a UDP datagram whose length field disagrees
	// with the IP payload length (or is below 8); untouched.
	StatUDPLength
	NumStats
)

// StatNames names the Stat* constants for display (monitor, status).
var StatNames = [NumStats]string{
	"fragment", "unfunnel-invalid", "mtu-exceeded", "not-applicable",
	"no-checksum", "ip-options", "gso", "partial-checksum", "helper-failed",
	"segmented", "urgent", "udp-length",
}

// MaxOptMove is the most IPv4 option or IPv6 extension header bytes funnel
// and unfunnel move; longer chains are passed untouched (StatIPOptions).
const MaxOptMove = 128

// DefaultCtMarkMask is the connection mark bits `ct mark` values live in
// (the same bits of skb->mark carry them). It avoids kube-proxy's
// 0x4000/0x8000 bits. `ct mark set` also sets a flag bit, just above the
// mask (0x01000000 here), that the nftables table saves on; package ctmark
// has the layout.
const DefaultCtMarkMask = 0x00ff0000
