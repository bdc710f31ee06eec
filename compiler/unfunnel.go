// unfunnel: pop the funnel header.

package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// outerHdrLen sets R3 to the length of the outer header at base+off and
// checks it against the transport length in R4: a UDP length field must
// equal it, a TCP data offset must be at least 20 bytes.
func (c *compiler) outerHdrLen(outer grammar.Proto, base asm.Register, off int16, bad string) {
	if outer == grammar.ProtoUDP {
		c.e.emit(
			movi(asm.R3, 8),
			ldx(asm.R1, base, off+4, asm.Half),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.JNE.Reg(asm.R1, asm.R4, bad),
		)
		return
	}
	c.e.emit(
		ldx(asm.R3, base, off+12, asm.Byte),
		asm.RSh.Imm(asm.R3, 4),
		asm.LSh.Imm(asm.R3, 2),
		asm.JLT.Imm(asm.R3, 20, bad),
	)
}

// innerHdrCheck checks the inner header at base+off against the inner
// segment length in R4: a UDP length field must equal it, a TCP header
// must be 20 bytes or more and fit.
func (c *compiler) innerHdrCheck(inner grammar.Proto, base asm.Register, off int16, bad string) {
	if inner == grammar.ProtoUDP {
		c.e.emit(
			ldx(asm.R1, base, off+4, asm.Half),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.JNE.Reg(asm.R1, asm.R4, bad),
		)
		return
	}
	c.e.emit(
		ldx(asm.R1, base, off+12, asm.Byte),
		asm.RSh.Imm(asm.R1, 4),
		asm.LSh.Imm(asm.R1, 2),
		asm.JLT.Imm(asm.R1, 20, bad),
		asm.JGT.Reg(asm.R1, asm.R4, bad),
	)
}

// unfunnel pops the outer header when the inner one is consistent
// (packets without IPv4 options or IPv6 extension headers).
func (c *compiler) unfunnel(fam int, known grammar.Proto, inner grammar.Proto) {
	bad := c.stat(StatUnfunnelInvalid)
	c.guardsNoL4(true, true)
	c.byProto(known, bad, func(outer grammar.Proto) { c.unfunnelFrom(fam, outer, inner) })
}

func (c *compiler) unfunnelFrom(fam int, outer, inner grammar.Proto) {
	e := &c.e
	bad := c.stat(StatUnfunnelInvalid)
	minIn, checkIn := hdrInfo(inner)
	minOut, _ := hdrInfo(outer)
	l4 := c.l3 + int16(ipHdrLen(fam))
	e.comment("unfunnel %s from %s", inner, outer)
	opts, done := e.newLabel("unfunnel_opts"), e.newLabel("unfunnel_done")
	c.optsDispatch(opts)
	c.inBounds(l4+minOut, bad)
	c.ipLength(fam, asm.R4, int32(minOut+minIn), 0xffff, bad)
	if outer == grammar.ProtoTCP {
		c.unfunnelFixed(fam, inner, done)
	}
	if fam == 4 {
		e.emit(asm.Sub.Imm(asm.R4, 20)) // transport length
	}
	e.emit(mov(asm.R5, asm.R7))
	c.outerHdrLen(outer, asm.R7, l4, bad)
	e.comment("inner %s header consistent", inner)
	e.emit(
		mov(asm.R1, asm.R3),
		asm.Add.Imm(asm.R1, int32(minIn)),
		asm.JGT.Reg(asm.R1, asm.R4, bad),
		asm.Sub.Reg(asm.R4, asm.R3),
		asm.Add.Reg(asm.R5, asm.R3),
		mov(asm.R1, asm.R5),
		asm.Add.Imm(asm.R1, int32(l4+minIn)),
		asm.JGT.Reg(asm.R1, asm.R8, bad),
	)
	c.innerHdrCheck(inner, asm.R5, l4, bad)
	e.comment("pop the outer header")
	e.emit(
		stx(asm.R10, slotT2, asm.R3, asm.DWord),
		movi(asm.R2, 0),
		asm.Sub.Reg(asm.R2, asm.R3),
		mov(asm.R1, asm.R6),
		movi(asm.R3, 0), // BPF_ADJ_ROOM_NET
		movi(asm.R4, 0),
		asm.FnSkbAdjustRoom.Call(),
		asm.JNE.Imm(asm.R0, 0, c.stat(StatHelperFailed)),
	)
	c.afterPop(l4 + checkIn + 2)
	c.ipHeader(fam, varDelta, outer.Number(), inner.Number(), false)
	e.comment("inner checksum gets the addresses back (last: it may move the packet)")
	c.pseudoCsum(l4+checkIn, inner == grammar.ProtoUDP, func() { c.addrSumRaw(fam, asm.R4) })
	c.summed = 0
	e.emit(asm.Ja.Label(done))
	if !c.fast { // the fast path has no options
		e.label(opts)
		c.unfunnelOpts(fam, outer, inner)
	}
	e.label(done)
}

// unfunnelFixed pops a TCP outer header of exactly 20 bytes (data offset 5,
// no flags in the low bits: what funnel writes) with every offset and the
// length change constant; other headers go on to the general code after
// it. R4 holds the IP length field (ipLength's checks passed, so the
// inner header's minimum fits); jumps to done.
func (c *compiler) unfunnelFixed(fam int, inner grammar.Proto, done string) {
	e := &c.e
	bad := c.stat(StatUnfunnelInvalid)
	minIn, checkIn := hdrInfo(inner)
	l4 := c.l3 + int16(ipHdrLen(fam))
	general := e.newLabel("unfunnel_var")
	e.emit(ldx(asm.R1, asm.R7, l4+12, asm.Byte), asm.JNE.Imm(asm.R1, 0x50, general))
	sub := int32(20) // the inner segment's length
	if fam == 4 {
		sub += 20
	}
	e.emit(asm.Sub.Imm(asm.R4, sub))
	c.inBounds(l4+20+minIn, bad)
	c.innerHdrCheck(inner, asm.R7, l4+20, bad)
	e.comment("pop the 20-byte outer header")
	e.emit(
		mov(asm.R1, asm.R6),
		movi(asm.R2, -20),
		movi(asm.R3, 0), // BPF_ADJ_ROOM_NET
		movi(asm.R4, 0),
		asm.FnSkbAdjustRoom.Call(),
		asm.JNE.Imm(asm.R0, 0, c.stat(StatHelperFailed)),
	)
	c.afterPop(l4 + checkIn + 2)
	c.ipHeader(fam, -20, uint8(grammar.ProtoTCP.Number()), inner.Number(), false)
	e.comment("inner checksum gets the addresses back (last: it may move the packet)")
	c.pseudoCsum(l4+checkIn, inner == grammar.ProtoUDP, func() { c.addrSumRaw(fam, asm.R4) })
	c.summed = 0
	e.emit(asm.Ja.Label(done))
	e.label(general)
}

// afterPop reloads the packet pointers after the outer header is gone,
// passes the packet when its first end bytes no longer fit, and reads
// ip_summed for the checksum updates that follow.
func (c *compiler) afterPop(end int16) {
	c.reload()
	c.e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(end)),
		asm.JGT.Reg(asm.R1, asm.R8, c.exit("pass")),
	)
	c.readSummed()
}
