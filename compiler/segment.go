// Segmentation: GSO packets and checksums still to be finalised, handed to
// the kernel to cut and finish before a per-segment rewrite.

package compiler

import (
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// A header pushed in front of a TCP GSO packet is segmented as if it were
// the TCP header, and an in-place TCP-in-UDP rewrite of a CHECKSUM_PARTIAL
// segment is finalised at the old TCP checksum offset (KERNEL-NOTES). BPF
// cannot change either, so at egress such packets are redirected, before
// the rule touches them, to a veth pair that the datapath creates with
// segmentation and checksum offload off ("segmentation device"): the
// kernel segments and checksums them at its transmit, the peer's ingress
// program (SegReturn) redirects every segment back out of the real
// device, and this program sees each segment again, now one MTU-sized
// packet with a complete checksum that the rule rewrites in O(1).
// Unmatched traffic never takes the detour and keeps GSO.

// __sk_buff.ingress_ifindex (skb->skb_iif): where the packet was received.
const skbIngressIfindex = 36

// TC_ACT_REDIRECT (tcx: TCX_REDIRECT).
const verdictRedirect = 7

// NeedsSegmentation reports whether some rule of an egress hook rewrites
// packets per segment (funnel, rewrite) and so wants a segmentation device.
func NeedsSegmentation(rules []*grammar.Rule) bool {
	for _, r := range rules {
		if segmentKind(r) != segNone {
			return true
		}
	}
	return false
}

type segKind int

const (
	segNone    segKind = iota
	segGSO             // GSO packets (funnel)
	segPartial         // GSO packets and CHECKSUM_PARTIAL ones (rewrite)
)

// segmentKind says which packets rule r must see segmented and checksummed.
// Only the first rewriting action counts: the detour happens before any
// action runs, so that every segment meets the rule unchanged.
func segmentKind(r *grammar.Rule) segKind {
	k := segNone
	for _, a := range r.Actions {
		switch a.Kind {
		case grammar.ActFunnel:
			k = max(k, segGSO)
		case grammar.ActRewrite:
			k = segPartial
		}
	}
	return k
}

// segmentFirst emits, at the start of rule i's body, the detour to the
// segmentation device for the packets the rule can't rewrite whole.
// Without a device (ingress, L3 devices, Options.SegIfindex 0) the actions'
// own guards count such packets instead (StatGSO, StatPartialChecksum).
func (c *compiler) segmentFirst(r *grammar.Rule) {
	k := segmentKind(r)
	if k == segNone || c.opts.SegIfindex == 0 || c.opts.SegReturnIfindex == 0 || c.opts.Hook != grammar.HookEgress || c.opts.L3 {
		return
	}
	e := &c.e
	seg := c.segLabel()
	// Every TCP segment of a matched flow takes the detour, not only the
	// GSO ones: a single-segment skb sent directly would overtake the GSO
	// packets queued before it on the device pair (reordering the flow).
	// A segment coming back from the device (received on its return end)
	// is rewritten here and now.
	back := e.newLabel("segmented")
	e.comment("back from the segmentation device?")
	e.emit(
		ldx(asm.R1, asm.R6, skbIngressIfindex, asm.Word),
		asm.JEq.Imm(asm.R1, int32(c.opts.SegReturnIfindex), back),
	)
	e.comment("TCP, or a GSO packet: through the segmentation device")
	e.emit(
		ldx(asm.R1, asm.R10, slotProto, asm.DWord),
		asm.JEq.Imm(asm.R1, 6, seg),
		ldx(asm.R1, asm.R6, skbGSOSize, asm.Word),
		asm.JNE.Imm(asm.R1, 0, seg),
	)
	if k == segPartial && c.kern.ok {
		e.comment("checksum still to be finalised: finalise it first")
		c.ipSummed(asm.R1)
		e.emit(asm.JEq.Imm(asm.R1, checksumPartial, seg))
	}
	e.label(back)
}

// segLabel returns the label of the current generation's redirect to the
// segmentation device, emitted with the exits.
func (c *compiler) segLabel() string {
	c.segUsed = true
	return c.exit("segment")
}

// segExit emits the redirect: count it, then bpf_redirect(dev, 0).
func (c *compiler) segExit() {
	e := &c.e
	e.label(c.exit("segment"))
	c.traceExit(traceSegment, false)
	e.emit(sti(asm.R10, slotKey, StatSegmented, asm.Word))
	c.lookup(StatsMap, slotKey)
	done := e.newLabel("seg_counted")
	e.emit(
		asm.JEq.Imm(asm.R0, 0, done),
		ldx(asm.R1, asm.R0, 0, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		stx(asm.R0, 0, asm.R1, asm.DWord),
	)
	e.label(done)
	e.emit(
		movi(asm.R1, int32(c.opts.SegIfindex)),
		movi(asm.R2, 0),
		asm.FnRedirect.Call(),
		asm.Return(),
	)
}

// pktOtherHost is PACKET_OTHERHOST: a frame addressed to another MAC.
const pktOtherHost = 3

// SegReturn is the program at the ingress of the segmentation device's
// peer: every segment goes back out of the real device (ifindex), whose
// egress program then rewrites it. Only frames the datapath redirected
// (addressed to the real device's neighbour, so PACKET_OTHERHOST here) are
// sent on; anything the host's own stack sends into the pair is dropped.
func SegReturn(ifindex int) *ebpf.CollectionSpec {
	insns := asm.Instructions{
		ldx(asm.R2, asm.R1, 4, asm.Word).WithSource(asm.Comment("segmentation device: back out of ifindex " + strconv.Itoa(ifindex))), // pkt_type
		asm.JNE.Imm(asm.R2, pktOtherHost, "drop"),
		movi(asm.R1, int32(ifindex)),
		movi(asm.R2, 0),
		asm.FnRedirect.Call(),
		asm.Return(),
		movi(asm.R0, VerdictDrop).WithSymbol("drop"),
		asm.Return(),
	}
	return &ebpf.CollectionSpec{
		Maps: map[string]*ebpf.MapSpec{},
		Programs: map[string]*ebpf.ProgramSpec{ProgramName: {
			Name: ProgramName, Type: ebpf.SchedCLS, License: "GPL", Instructions: insns,
		}},
	}
}
