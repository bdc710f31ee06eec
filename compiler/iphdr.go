// IP header accessors and rewrites shared by the actions.

package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
	"math"
)

func ipHdrLen(fam int) int32 {
	if fam == 6 {
		return 40
	}
	return 20
}

// ipBound proves the fixed IP header is in the packet (to the verifier).
// l4Bound points R5 at the L4 header (data + R9) and jumps to fail unless
// n bytes of it lie inside the packet (R8 = data_end).
func l4Bound(n int32, fail string) []asm.Instruction {
	return []asm.Instruction{
		mov(asm.R5, asm.R7),
		asm.Add.Reg(asm.R5, asm.R9),
		mov(asm.R1, asm.R5),
		asm.Add.Imm(asm.R1, n),
		asm.JGT.Reg(asm.R1, asm.R8, fail),
	}
}

func (c *compiler) ipBound(fam int, fail string) {
	c.e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(c.l3)+ipHdrLen(fam)),
		asm.JGT.Reg(asm.R1, asm.R8, fail),
	)
}

// l4Len sets dst to the transport length the IP header claims (host order)
// and jumps to fail when it does not fit the packet. Needs R9 and ipBound.
func (c *compiler) l4Len(fam int, dst asm.Register, fail string) {
	e := &c.e
	l3 := c.l3
	if fam == 4 {
		e.emit(ldx(dst, asm.R7, l3+2, asm.Half))
	} else {
		e.emit(ldx(dst, asm.R7, l3+4, asm.Half))
	}
	hdr := int32(l3)
	if fam == 6 {
		hdr += 40 // payload length excludes the fixed header
	}
	e.emit(
		asm.HostTo(asm.BE, dst, asm.Half),
		ldx(asm.R0, asm.R6, skbLen, asm.Word),
		asm.Sub.Imm(asm.R0, hdr),
		asm.JGT.Reg(dst, asm.R0, fail),
		mov(asm.R0, asm.R9),
		asm.Sub.Imm(asm.R0, hdr),
		asm.JLT.Reg(dst, asm.R0, fail),
		asm.Sub.Reg(dst, asm.R0),
	)
}

// ipProto rewrites the transport protocol in the IP header (and the IPv4
// checksum) and the proto slot. Needs ipBound.
func (c *compiler) ipProto(fam int, proto uint8) {
	e := &c.e
	l3 := c.l3
	if fam == 4 {
		e.emit(
			ldx(asm.R1, asm.R7, l3+8, asm.Half),
			mov(asm.R2, asm.R1),
			asm.And.Imm(asm.R2, 0xff),
			asm.Or.Imm(asm.R2, int32(proto)<<8),
		)
		c.ipv4Replace16(8)
	} else {
		done := e.newLabel("nh_done")
		e.emit(
			ldx(asm.R1, asm.R10, slotNHOff, asm.DWord),
			asm.JGT.Imm(asm.R1, 0xffff, done),
			mov(asm.R2, asm.R7),
			asm.Add.Reg(asm.R2, asm.R1),
			mov(asm.R3, asm.R2),
			asm.Add.Imm(asm.R3, 1),
			asm.JGT.Reg(asm.R3, asm.R8, done),
			sti(asm.R2, 0, int64(proto), asm.Byte),
		)
		e.label(done)
	}
	e.emit(sti(asm.R10, slotProto, int64(proto), asm.DWord))
}

// ipLen adds delta (in R3, may be negative) to the IP length field and
// fixes the IPv4 checksum. Needs ipBound.
func (c *compiler) ipLen(fam int) {
	e := &c.e
	l3 := c.l3
	if fam == 6 {
		e.emit(
			ldx(asm.R1, asm.R7, l3+4, asm.Half),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.Add.Reg(asm.R1, asm.R3),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			stx(asm.R7, l3+4, asm.R1, asm.Half),
		)
		return
	}
	e.emit(
		ldx(asm.R1, asm.R7, l3+2, asm.Half),
		mov(asm.R2, asm.R1),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
		asm.Add.Reg(asm.R2, asm.R3),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
	)
	c.ipv4Replace16(2)
}

// ipv4Replace16 stores R2 over the 16-bit IPv4 header word at offset off,
// whose old value is in R1 (both in network order), and updates the
// header checksum incrementally: HC' = ~(~HC + ~old + new) (RFC 1624).
func (c *compiler) ipv4Replace16(off int16) {
	e := &c.e
	l3 := c.l3
	e.emit(
		ldx(asm.R0, asm.R7, l3+10, asm.Half),
		asm.Xor.Imm(asm.R0, 0xffff),
		asm.Xor.Imm(asm.R1, 0xffff),
		asm.Add.Reg(asm.R0, asm.R1),
		asm.Add.Reg(asm.R0, asm.R2),
	)
	c.fold(asm.R0, asm.R1)
	e.emit(
		asm.Xor.Imm(asm.R0, 0xffff),
		stx(asm.R7, l3+off, asm.R2, asm.Half),
		stx(asm.R7, l3+10, asm.R0, asm.Half),
	)
}

// varDelta as ipHeader's delta: the length changes by minus slotT2.
const varDelta = math.MinInt32

// ipHeader rewrites the IP length (slotT1, host order, plus delta, or
// minus the value in slotT2 for varDelta) and the transport protocol
// (from, known at compile time, to proto). The IPv4 checksum changes by
// exactly the length delta plus the protocol delta.
func (c *compiler) ipHeader(fam int, delta int32, from, proto uint8, ext bool) {
	e := &c.e
	l3 := c.l3
	e.emit(ldx(asm.R1, asm.R10, slotT1, asm.DWord))
	if delta != varDelta {
		e.emit(asm.Add.Imm(asm.R1, delta))
	} else {
		e.emit(ldx(asm.R2, asm.R10, slotT2, asm.DWord), asm.Sub.Reg(asm.R1, asm.R2))
	}
	e.emit(asm.HostTo(asm.BE, asm.R1, asm.Half))
	if fam == 6 {
		// IPv6 has no header checksum: on a CHECKSUM_COMPLETE skb at
		// ingress, skb->csum must follow the length and next-header change
		// (the next-header byte sits at an even offset: a low byte).
		complete := c.opts.Hook == grammar.HookIngress
		if complete {
			e.emit(
				ldx(asm.R3, asm.R7, l3+4, asm.Half),
				asm.Xor.Imm(asm.R3, 0xffff),
				asm.Add.Reg(asm.R3, asm.R1),
				asm.Add.Imm(asm.R3, int32((int64(proto)-int64(from)+0xffff)%0xffff)),
				stx(asm.R10, slotDiff, asm.R3, asm.DWord),
			)
		}
		e.emit(stx(asm.R7, l3+4, asm.R1, asm.Half))
		if ext {
			c.ipProto(6, proto) // the last extension header names it
		} else {
			e.emit(sti(asm.R7, l3+6, int64(proto), asm.Byte))
			c.protoSlot(proto)
		}
		if complete {
			c.whenComplete(func() {
				e.emit(ldx(asm.R2, asm.R10, slotDiff, asm.DWord))
				c.csumUpdate()
			})
		}
		return
	}
	// Checksum delta in network order: length + protocol (the low byte of
	// the TTL/protocol word), made positive modulo 0xffff.
	d := (int64(proto) - int64(from) + 0xffff) % 0xffff
	bound := uint64(0x10000 + 0xffff)
	if delta != varDelta {
		d = (d + int64(delta)%0xffff + 0xffff) % 0xffff
	}
	e.emit(
		stx(asm.R7, l3+2, asm.R1, asm.Half),
		sti(asm.R7, l3+9, int64(proto), asm.Byte),
		ldx(asm.R0, asm.R7, l3+10, asm.Half),
		asm.Xor.Imm(asm.R0, 0xffff),
		asm.Add.Imm(asm.R0, int32(n16(uint16(d)))),
	)
	if delta == varDelta {
		e.emit(
			asm.HostTo(asm.BE, asm.R2, asm.Half),
			asm.Xor.Imm(asm.R2, 0xffff),
			asm.Add.Reg(asm.R0, asm.R2),
		)
		bound += 0xffff
	}
	c.foldLow16(asm.R0, asm.R1, bound)
	e.emit(
		asm.Xor.Imm(asm.R0, 0xffff),
		stx(asm.R7, l3+10, asm.R0, asm.Half),
	)
	c.protoSlot(proto)
}

// protoSlot records the new transport protocol in its slot for the
// actions after this one (the body's last action has none).
func (c *compiler) protoSlot(proto uint8) {
	if !c.lastAction {
		c.e.emit(sti(asm.R10, slotProto, int64(proto), asm.DWord))
	}
}

// ipLength loads the IP length field (total length for IPv4, payload
// length for IPv6) in host order into dst, checks that it fits the packet
// (skb->len) and is at least min bytes of transport, and stores it in
// slotT1. Without options the transport header is at a fixed offset.
func (c *compiler) ipLength(fam int, dst asm.Register, min int32, max int32, fail string) {
	e := &c.e
	l3 := c.l3
	hdr := int32(l3)
	lenOff := l3 + 2
	if fam == 6 {
		hdr += 40
		lenOff = l3 + 4
		min -= 0
	} else {
		min += 20
		max += 20
	}
	e.emit(
		ldx(dst, asm.R7, lenOff, asm.Half),
		asm.HostTo(asm.BE, dst, asm.Half),
		ldx(asm.R0, asm.R6, skbLen, asm.Word),
		asm.Sub.Imm(asm.R0, hdr),
		asm.JGT.Reg(dst, asm.R0, fail),
		asm.JLT.Imm(dst, min, fail),
	)
	if max < 0xffff {
		e.emit(asm.JGT.Imm(dst, max, fail))
	}
	e.emit(stx(asm.R10, slotT1, dst, asm.DWord))
}
