package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Funnel and unfunnel of packets with IPv4 options or IPv6 extension
// headers. BPF_ADJ_ROOM_NET inserts and removes right after the fixed IP
// header, so the options are moved across the gap with
// bpf_skb_load_bytes/bpf_skb_store_bytes; the transport header keeps its
// absolute position, as CHECKSUM_PARTIAL needs. Offsets are variable
// (R9), so the header is built on the stack and stored with a helper.

// optLen checks the options length (R9 minus the fixed header) and keeps it
// in slotOpt, jumping to StatIPOptions when there is nothing to move or too
// much.
func (c *compiler) optLen(fam int) {
	e := &c.e
	base := int32(c.l3) + ipHdrLen(fam)
	e.emit(
		mov(asm.R1, asm.R9),
		asm.Sub.Imm(asm.R1, base),
		asm.JEq.Imm(asm.R1, 0, c.stat(StatIPOptions)),
		asm.JGT.Imm(asm.R1, MaxOptMove, c.stat(StatIPOptions)),
		stx(asm.R10, slotOpt, asm.R1, asm.DWord),
	)
}

// moveOpts copies slotOpt bytes from offset from (+ R2 extra when
// fromReg) to offset to (+ the value in slotT2 when toVar).
func (c *compiler) moveOpts(from, to int32, toVar bool) {
	e := &c.e
	e.emit(
		mov(asm.R1, asm.R6),
		movi(asm.R2, from),
		mov(asm.R3, asm.R10),
		asm.Add.Imm(asm.R3, slotBuf),
		ldx(asm.R4, asm.R10, slotOpt, asm.DWord),
		asm.FnSkbLoadBytes.Call(),
		asm.JNE.Imm(asm.R0, 0, c.exit("pass")),
		mov(asm.R1, asm.R6),
		movi(asm.R2, to),
	)
	if toVar {
		e.emit(ldx(asm.R3, asm.R10, slotT2, asm.DWord), asm.Add.Reg(asm.R2, asm.R3))
	}
	e.emit(
		mov(asm.R3, asm.R10),
		asm.Add.Imm(asm.R3, slotBuf),
		ldx(asm.R4, asm.R10, slotOpt, asm.DWord),
		movi(asm.R5, 0),
		asm.FnSkbStoreBytes.Call(),
	)
}

// ipLenField stores in slotT1 the IP length field value for transport
// length dst: dst + R9 - (l3, or l3+40 for IPv6). R1 scratch.
func (c *compiler) ipLenField(fam int, l4len asm.Register) {
	hdr := int32(c.l3)
	if fam == 6 {
		hdr += 40
	}
	c.e.emit(
		mov(asm.R1, l4len),
		asm.Add.Reg(asm.R1, asm.R9),
		asm.Sub.Imm(asm.R1, hdr),
		stx(asm.R10, slotT1, asm.R1, asm.DWord),
	)
}

// optsTransport loads the transport offset into R9 and the options'
// length (optLen), points R5 at the transport header, checks that min
// bytes of it and the IP header are in the packet and puts the transport
// length in R4 (l4Len); any failure jumps to fail.
func (c *compiler) optsTransport(fam int, min int32, fail string) {
	e := &c.e
	e.emit(ldx(asm.R9, asm.R10, slotL4Off, asm.DWord))
	c.optLen(fam)
	e.emit(
		asm.JGT.Imm(asm.R9, 0xffff, fail),
	)
	e.emit(l4Bound(min, fail)...)
	c.ipBound(fam, fail)
	c.l4Len(fam, asm.R4, fail)
}

func (c *compiler) funnelOpts(rule, fam int, inner grammar.Proto, a *grammar.Action) {
	e := &c.e
	f := a.Funnel
	outer := a.Proto.Number()
	h, _ := hdrInfo(a.Proto)
	minIn, checkIn := hdrInfo(inner)
	notApp := c.stat(StatNotApplicable)
	base := int32(c.l3) + ipHdrLen(fam)
	e.comment("funnel %s in %s after IP options / extension headers", inner, a.Proto)
	c.optsTransport(fam, int32(minIn), notApp)
	e.emit(
		asm.JLT.Imm(asm.R4, int32(minIn), notApp),
		stx(asm.R10, slotT2, asm.R4, asm.DWord),
	)
	c.ipLenField(fam, asm.R4)
	e.emit(
		asm.Add.Imm(asm.R1, int32(h)),
		asm.JGT.Imm(asm.R1, 0xffff, notApp),
	)
	c.requireUDPLength(inner, asm.R5, 0, asm.R4, 0)
	c.requireUDPChecksum(inner, asm.R5, 0)
	e.comment("grow, then move the options in front of the gap")
	c.growNet(h)
	c.moveOpts(base+int32(h), base, false)
	c.reload()
	c.ipBound(fam, c.exit("pass"))
	e.comment("inner checksum without addresses")
	c.addrSum32(fam, asm.R4)
	flags := int32(fPseudoHdr)
	if inner == grammar.ProtoUDP {
		flags |= fMarkMangled0
	}
	e.emit(
		stx(asm.R10, slotT3, asm.R4, asm.DWord),
		asm.Xor.Imm32(asm.R4, -1),
		mov(asm.R1, asm.R6),
		mov(asm.R2, asm.R9),
		asm.Add.Imm(asm.R2, int32(h+checkIn)),
		movi(asm.R3, 0),
		movi(asm.R5, flags),
		asm.FnL4CsumReplace.Call(),
	)
	e.comment("funnel header, built on the stack")
	e.emit(
		mov(asm.R1, asm.R6),
		mov(asm.R2, asm.R9),
		asm.Add.Imm(asm.R2, int32(h)),
		mov(asm.R3, asm.R10),
		asm.Add.Imm(asm.R3, slotHdr),
		movi(asm.R4, 4),
		asm.FnSkbLoadBytes.Call(),
		asm.JNE.Imm(asm.R0, 0, c.exit("pass")),
	)
	switch {
	case c.parametric():
		e.emit(ldx(asm.R1, asm.R10, slotHdr, asm.Word))
		c.funnelPorts(asm.R10, slotHdr)
	case f.HasSport && f.HasDport:
		e.emit(sti(asm.R10, slotHdr, int64(int32(uint32(n16(f.Sport))|uint32(n16(f.Dport))<<16)), asm.Word))
	}
	e.emit(ldx(asm.R2, asm.R10, slotT2, asm.DWord))
	c.funnelHeader(asm.R10, slotHdr, a, inner, asm.R10, 0xffffffff)
	e.emit(
		mov(asm.R1, asm.R6),
		mov(asm.R2, asm.R9),
		mov(asm.R3, asm.R10),
		asm.Add.Imm(asm.R3, slotHdr),
		movi(asm.R4, int32(h)),
		movi(asm.R5, 0),
		asm.FnSkbStoreBytes.Call(),
	)
	c.reload()
	c.ipBound(fam, c.exit("pass"))
	e.comment("IP header")
	c.ipHeader(fam, int32(h), inner.Number(), outer, true)
	if c.opts.Hook == grammar.HookEgress {
		c.mtuCheck(rule)
	}
}

func (c *compiler) unfunnelOpts(fam int, outer, inner grammar.Proto) {
	e := &c.e
	bad := c.stat(StatUnfunnelInvalid)
	minIn, checkIn := hdrInfo(inner)
	minOut, _ := hdrInfo(outer)
	base := int32(c.l3) + ipHdrLen(fam)
	e.comment("unfunnel %s from %s after IP options / extension headers", inner, outer)
	c.optsTransport(fam, int32(minOut), bad)
	c.outerHdrLen(outer, asm.R5, 0, bad)
	c.ipLenField(fam, asm.R4)
	e.emit(
		mov(asm.R1, asm.R3),
		asm.Add.Imm(asm.R1, int32(minIn)),
		asm.JGT.Reg(asm.R1, asm.R4, bad),
		asm.Sub.Reg(asm.R4, asm.R3),
		asm.Add.Reg(asm.R5, asm.R3),
		mov(asm.R1, asm.R5),
		asm.Add.Imm(asm.R1, int32(minIn)),
		asm.JGT.Reg(asm.R1, asm.R8, bad),
	)
	c.innerHdrCheck(inner, asm.R5, 0, bad)
	e.comment("move the options behind the outer header, then pop it")
	e.emit(stx(asm.R10, slotT2, asm.R3, asm.DWord))
	c.moveOpts(base, base, true)
	e.emit(
		ldx(asm.R3, asm.R10, slotT2, asm.DWord),
		movi(asm.R2, 0),
		asm.Sub.Reg(asm.R2, asm.R3),
		mov(asm.R1, asm.R6),
		movi(asm.R3, 0), // BPF_ADJ_ROOM_NET
		movi(asm.R4, 0),
		asm.FnSkbAdjustRoom.Call(),
		asm.JNE.Imm(asm.R0, 0, c.exit("pass")),
	)
	c.reload()
	c.ipBound(fam, c.exit("pass"))
	e.comment("inner checksum gets the addresses back")
	c.addrSum32(fam, asm.R4)
	flags := int32(fPseudoHdr)
	if inner == grammar.ProtoUDP {
		flags |= fMarkMangled0
	}
	e.emit(
		mov(asm.R1, asm.R6),
		mov(asm.R2, asm.R9),
		asm.Add.Imm(asm.R2, int32(checkIn)),
		movi(asm.R3, 0),
		movi(asm.R5, flags),
		asm.FnL4CsumReplace.Call(),
	)
	c.reload()
	c.ipBound(fam, c.exit("pass"))
	c.ipHeader(fam, varDelta, outer.Number(), inner.Number(), true)
}
