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
// TCP per segment (funnel, rewrite udp) and so wants a segmentation device.
func NeedsSegmentation(rules []*grammar.Rule) bool {
	for _, r := range rules {
		if segments(r) {
			return true
		}
	}
	return false
}

// segments reports whether rule r's TCP segments take the detour: a TCP
// rule whose actions push a header in front of the TCP header or rewrite
// it in place. UDP rules don't: UDP GSO (UDP_SEGMENT) funnels are rare and
// are left alone (gso), and a UDP socket's checksum is complete whenever
// the device lacks checksum offload.
func segments(r *grammar.Rule) bool {
	if r.Proto != grammar.ProtoTCP {
		return false
	}
	for _, a := range r.Actions {
		if a.Kind == grammar.ActFunnel || a.Kind == grammar.ActRewrite {
			return true
		}
	}
	return false
}

// segmentFirst emits, at the start of rule i's body, the detour to the
// segmentation device: every TCP segment the rule matches goes there
// before the rule touches it — GSO packets to be cut, CHECKSUM_PARTIAL ones
// to be finished, and the single-segment ones too, so that they can't
// overtake GSO packets of their flow queued on the pair. Without a device
// (ingress, L3 devices, Options.SegIfindex 0) the actions' own guards count
// the packets they can't rewrite (StatGSO, StatPartialChecksum).
func (c *compiler) segmentFirst(r *grammar.Rule) {
	if !segments(r) || c.opts.SegIfindex == 0 || c.opts.SegReturnIfindex == 0 || c.opts.Hook != grammar.HookEgress || c.opts.L3 {
		return
	}
	e := &c.e
	back := e.newLabel("segmented")
	e.comment("TCP: through the segmentation device, unless back from it")
	e.emit(
		ldx(asm.R1, asm.R6, skbIngressIfindex, asm.Word),
		asm.JEq.Imm(asm.R1, int32(c.opts.SegReturnIfindex), back),
		asm.Ja.Label(c.segLabel()),
	)
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
	e.emit(bump(done)...)
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
