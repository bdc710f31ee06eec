// Prologue shared by header-moving actions: packet guards, transport
// dispatch and the adjust_room grow.

package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Register use in actions: R6 ctx, R7 skb->data, R8 skb->data_end (reloaded
// after every helper that may move the packet), R9 transport offset; R0-R5
// scratch. Values that must survive helpers live in the slotT* slots.

// reload refreshes the packet pointers.
func (c *compiler) reload() {
	c.fastPtrs = false
	c.e.emit(
		ldx(asm.R7, asm.R6, skbData, asm.Word),
		ldx(asm.R8, asm.R6, skbDataEnd, asm.Word),
	)
}

// guards emits the checks every header-moving action starts with.
func (c *compiler) guards(unsafe, gso bool) {
	c.guardsNoL4(unsafe, gso)
	if c.fast {
		c.e.emit(movi(asm.R9, int32(c.l3)+20))
		return
	}
	c.e.emit(ldx(asm.R9, asm.R10, slotL4Off, asm.DWord))
}

// guardsNoL4 is guards without loading R9; it leaves the info slot in R1
// (infoInR1) for the caller's next test.
func (c *compiler) guardsNoL4(unsafe, gso bool) {
	e := &c.e
	if !c.fast { // the fast path has seen neither fragments nor options
		e.emit(ldx(asm.R1, asm.R10, slotInfo, asm.DWord), asm.JSet.Imm(asm.R1, infoFrag, c.stat(StatFragment)))
		if unsafe {
			e.emit(asm.JSet.Imm(asm.R1, infoUnsafe, c.stat(StatIPOptions)))
		}
	}
	if gso {
		e.emit(ldx(asm.R2, asm.R6, skbGSOSize, asm.Word), asm.JNE.Imm(asm.R2, 0, c.stat(StatGSO)))
	}
	if !c.fresh {
		c.reload()
	}
	c.fresh = false
	c.infoInR1 = !c.fast
}

// optsDispatch jumps to opts for packets with IPv4 options or IPv6
// extension headers.
func (c *compiler) optsDispatch(opts string) {
	e := &c.e
	if c.fast {
		return // no options on the fast path: opts is not reached
	}
	if !c.infoInR1 {
		e.emit(ldx(asm.R1, asm.R10, slotInfo, asm.DWord))
	}
	c.infoInR1 = false
	e.emit(asm.JSet.Imm(asm.R1, infoOpts, opts))
}

// growNet opens h bytes after the network header:
// bpf_skb_adjust_room(skb, h, BPF_ADJ_ROOM_NET, 0), or the helper-failed stat.
func (c *compiler) growNet(h int16) {
	c.e.emit(
		mov(asm.R1, asm.R6),
		movi(asm.R2, int32(h)),
		movi(asm.R3, 0), // BPF_ADJ_ROOM_NET
		movi(asm.R4, 0),
		asm.FnSkbAdjustRoom.Call(),
		asm.JNE.Imm(asm.R0, 0, c.stat(StatHelperFailed)),
	)
}

// transport sets slotT2 = protocol, slotT4 = check field offset, R3 = the
// minimal header length, or jumps to fail when neither TCP nor UDP.
func (c *compiler) transport(fail string) {
	e := &c.e
	ok := e.newLabel("l4_ok")
	e.emit(
		ldx(asm.R2, asm.R10, slotProto, asm.DWord),
		movi(asm.R3, 8),
		movi(asm.R4, 6),
		asm.JEq.Imm(asm.R2, 17, ok),
		asm.JNE.Imm(asm.R2, 6, fail),
		movi(asm.R3, 20),
		movi(asm.R4, 16),
	)
	e.label(ok)
	e.emit(
		stx(asm.R10, slotT2, asm.R2, asm.DWord),
		stx(asm.R10, slotT4, asm.R4, asm.DWord),
		asm.JGT.Imm(asm.R9, 0xffff, fail),
		mov(asm.R5, asm.R7),
		asm.Add.Reg(asm.R5, asm.R9),
		mov(asm.R1, asm.R5),
		asm.Add.Reg(asm.R1, asm.R3),
		asm.JGT.Reg(asm.R1, asm.R8, fail),
	)
}

// byProto emits gen for the transport protocol the packet has at this
// point: known at compile time, or dispatched on the proto slot (other
// protocols go to fail).
func (c *compiler) byProto(known grammar.Proto, fail string, gen func(p grammar.Proto)) {
	if known != grammar.ProtoAny {
		gen(known)
		return
	}
	e := &c.e
	c.infoInR1 = false
	tcp, done := e.newLabel("tcp"), e.newLabel("proto_done")
	e.emit(
		ldx(asm.R1, asm.R10, slotProto, asm.DWord),
		asm.JEq.Imm(asm.R1, 6, tcp),
		asm.JNE.Imm(asm.R1, 17, fail),
	)
	gen(grammar.ProtoUDP)
	e.emit(asm.Ja.Label(done))
	e.label(tcp)
	gen(grammar.ProtoTCP)
	e.label(done)
}

// hdrInfo gives the minimal header length and check field offset.
func hdrInfo(p grammar.Proto) (min, check int16) {
	if p == grammar.ProtoTCP {
		return 20, 16
	}
	return 8, 6
}
