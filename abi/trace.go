package abi

import (
	"encoding/binary"
	"fmt"
)

// TraceMap is the RINGBUF of a program with a traced rule (`meta nftrace
// set 1`): one TraceRecord per event. Programs without a traced rule have
// neither the map nor any tracing code.
const (
	TraceMap     = "trace"
	TraceMapSize = 256 << 10 // bytes
)

// A traced packet: once a rule with `meta nftrace set 1` matches, the
// program gives the packet a trace id (random, non-zero) and writes a
// record for that rule, for every later rule that matches, and one for the
// verdict that ends the program; then the id is dropped.

// Trace record kinds.
const (
	TraceRule    = 1 // a rule matched: Rule is its index (counter slot)
	TraceVerdict = 2 // the program ended: Verdict, and Reason if a rule left the packet alone
)

// Trace verdicts (TraceRecord.Verdict).
const (
	TraceNext    = 0 // no rule ended evaluation
	TracePass    = 1 // accept, or the actions ran
	TraceDrop    = 2
	TraceLeft    = 3 // a rule matched but left the packet alone: Reason
	TraceSegment = 4 // redirected to the segmentation device
)

// TraceRecord layout: a fixed header, then up to TraceDataLen bytes of the
// packet from its IP header on (what is left of it).
//
//	off  size
//	0    4    id        trace id of the packet
//	4    1    kind      TraceRule or TraceVerdict
//	5    1    hook      0 ingress, 1 egress
//	6    1    verdict   TraceVerdict: Trace* verdict
//	7    1    reason    TraceLeft: Stat* + 1
//	8    4    rule      TraceRule: rule index
//	12   4    ifindex   skb->ifindex
//	16   4    len       skb->len (with the link-layer header)
//	20   4    caplen    bytes of packet data that follow
//	24   4    mark      skb->mark
//	28   4    (zero)
//	32   8    time      bpf_ktime_get_ns (CLOCK_MONOTONIC)
//	40   128  data
const (
	TraceHeaderLen = 40
	TraceDataLen   = 128
	TraceRecordLen = TraceHeaderLen + TraceDataLen

	TraceOffID      = 0
	TraceOffKind    = 4
	TraceOffHook    = 5
	TraceOffVerdict = 6
	TraceOffReason  = 7
	TraceOffRule    = 8
	TraceOffIfindex = 12
	TraceOffLen     = 16
	TraceOffCaplen  = 20
	TraceOffMark    = 24
	TraceOffTime    = 32
)

// TraceRecord is a decoded record.
type TraceRecord struct {
	ID      uint32
	Kind    uint8
	Hook    uint8
	Verdict uint8
	Reason  uint8 // Stat* + 1, 0 = none
	Rule    uint32
	Ifindex uint32
	Len     uint32
	Mark    uint32
	Time    uint64 // CLOCK_MONOTONIC nanoseconds
	Data    []byte // from the IP header on, at most TraceDataLen bytes
}

// DecodeTrace decodes one ring buffer sample (host byte order).
func DecodeTrace(b []byte) (TraceRecord, error) {
	if len(b) < TraceHeaderLen {
		return TraceRecord{}, fmt.Errorf("trace record of %d bytes, want at least %d", len(b), TraceHeaderLen)
	}
	ne := binary.NativeEndian
	r := TraceRecord{
		ID: ne.Uint32(b[TraceOffID:]), Kind: b[TraceOffKind], Hook: b[TraceOffHook],
		Verdict: b[TraceOffVerdict], Reason: b[TraceOffReason], Rule: ne.Uint32(b[TraceOffRule:]),
		Ifindex: ne.Uint32(b[TraceOffIfindex:]), Len: ne.Uint32(b[TraceOffLen:]), Mark: ne.Uint32(b[TraceOffMark:]),
		Time: ne.Uint64(b[TraceOffTime:]),
	}
	n := int(ne.Uint32(b[TraceOffCaplen:]))
	if n > TraceDataLen || TraceHeaderLen+n > len(b) {
		return TraceRecord{}, fmt.Errorf("trace record claims %d bytes of packet data", n)
	}
	r.Data = append([]byte(nil), b[TraceHeaderLen:TraceHeaderLen+n]...)
	return r, nil
}
