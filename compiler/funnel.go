// funnel: push a TCP or UDP header in front of the transport header.

package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// funnel pushes a TCP or UDP header between the IP and transport headers
// (packets without IPv4 options or IPv6 extension headers, so every offset
// is a constant).
func (c *compiler) funnel(rule, fam int, known grammar.Proto, a *grammar.Action) {
	notApp := c.stat(StatNotApplicable)
	c.guardsNoL4(true, true)
	c.byProto(known, notApp, func(inner grammar.Proto) { c.funnelFrom(rule, fam, inner, a) })
}

func (c *compiler) funnelFrom(rule, fam int, inner grammar.Proto, a *grammar.Action) {
	e := &c.e
	f := a.Funnel
	outer := a.Proto.Number()
	h, _ := hdrInfo(a.Proto)
	minIn, checkIn := hdrInfo(inner)
	notApp := c.stat(StatNotApplicable)
	l4 := c.l3 + int16(ipHdrLen(fam))
	iphl := int32(ipHdrLen(fam))
	if fam == 6 {
		iphl = 0 // the IPv6 length field excludes the fixed header
	}
	e.comment("funnel %s in %s", inner, a.Proto)
	if inner == grammar.ProtoTCP {
		c.mssClamp(f, h)
	}
	opts, done := e.newLabel("funnel_opts"), e.newLabel("funnel_done")
	c.optsDispatch(opts)
	c.inBounds(l4+minIn, notApp)
	c.ipLength(fam, asm.R4, int32(minIn), 0xffff-int32(h)-iphl, notApp)
	c.requireUDPLength(inner, asm.R7, l4, asm.R4, map[bool]int32{true: 0, false: 20}[fam == 6])
	c.requireUDPChecksum(inner, asm.R7, l4)
	e.comment("grow by the funnel header")
	c.growNet(h)
	c.reload()
	e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(l4+h+checkIn+2)),
		asm.JGT.Reg(asm.R1, asm.R8, c.exit("pass")),
	)
	c.readSummed()
	// R8 (data_end) is not needed any more: it keeps the folded address
	// sum for the outer checksum and the inner one.
	c.addrSumRaw(fam, asm.R8)
	c.foldBelow(asm.R8, asm.R1, addrSumBound(fam))
	e.comment("funnel header")
	switch {
	case c.parametric():
		e.emit(ldx(asm.R1, asm.R7, l4+h, asm.Word))
		c.funnelPorts(asm.R7, l4)
	case f.HasSport && f.HasDport:
		if a.Proto != grammar.ProtoTCP { // funnelHeader writes a TCP header whole
			e.emit(sti(asm.R7, l4, int64(int32(uint32(n16(f.Sport))|uint32(n16(f.Dport))<<16)), asm.Word))
		}
	default:
		e.emit(ldx(asm.R1, asm.R7, l4+h, asm.Word), stx(asm.R7, l4, asm.R1, asm.Word))
	}
	if a.Proto == grammar.ProtoUDP {
		e.emit(
			ldx(asm.R2, asm.R10, slotT1, asm.DWord),
			asm.Sub.Imm(asm.R2, int32(ipHdrLen(fam))-map[bool]int32{true: 40, false: 0}[fam == 6]),
		)
	}
	c.funnelHeader(asm.R7, l4, a, inner, asm.R8, 0xffff)
	e.comment("IP header")
	c.ipHeader(fam, int32(h), inner.Number(), outer, false)
	// Last, as it may move the packet: no direct access after it.
	e.comment("inner checksum without addresses")
	c.csumSub16(l4+h+checkIn, inner == grammar.ProtoUDP, asm.R8)
	c.summed = 0
	if c.opts.Hook == grammar.HookEgress {
		// The new IP length: the length field (slotT1) plus the header,
		// and IPv6's fixed header, which its field leaves out.
		c.mtuCheckIPLen(rule, func() {
			e.emit(ldx(asm.R4, asm.R10, slotT1, asm.DWord), asm.Add.Imm(asm.R4, int32(h)+map[bool]int32{true: 40}[fam == 6]))
		})
	}
	e.emit(asm.Ja.Label(done))
	if !c.fast { // the fast path has no options
		e.label(opts)
		c.funnelOpts(rule, fam, inner, a)
	}
	e.label(done)
}

// funnelPorts writes the funnel header's ports at base+off in a
// parametric body: the inner ports word (in R1) where the rule gives none,
// the rule's ports where it does. R2 is clobbered.
func (c *compiler) funnelPorts(base asm.Register, off int16) {
	e := &c.e
	c.param(asm.R2, parFunKeep, asm.Word)
	e.emit(asm.And.Reg(asm.R1, asm.R2))
	c.param(asm.R2, parFunPorts, asm.Word)
	e.emit(asm.Or.Reg(asm.R1, asm.R2), stx(base, off, asm.R1, asm.Word))
}

// funnelHeader fills the funnel header at base+off, whose ports already
// hold the inner header's, and its checksum. For a UDP header R2 holds the
// inner transport length (host order); the address sum, at most sumMax,
// is in sum (R10: in slotT3).
func (c *compiler) funnelHeader(base asm.Register, off int16, a *grammar.Action, inner grammar.Proto, sum asm.Register, sumMax uint64) {
	e := &c.e
	f := a.Funnel
	h, checkOut := hdrInfo(a.Proto)
	// A parametric body has written the ports (funnelPorts).
	par := c.parametric()
	if !(f.HasSport && f.HasDport) && !par {
		if f.HasSport {
			e.emit(sti(base, off, int64(n16(f.Sport)), asm.Half))
		}
		if f.HasDport {
			e.emit(sti(base, off+2, int64(n16(f.Dport)), asm.Half))
		}
	}
	// The inner segment sums to -(proto + length) once its checksum is
	// final. A byte swap is a multiplication by 256 modulo 0xffff, so in
	// network order the pseudo header's length (inner length + h) and
	// that sum add up to h - proto: the outer checksum is the addresses
	// plus constants, and UDP's length field once more. 0x1fffe (≡ 0)
	// keeps the constant positive.
	hdrConst := uint64(a.Proto.Number())<<8 + uint64(h)<<8 + 0x1fffe - uint64(inner.Number())<<8
	constPorts := f.HasSport && f.HasDport && !par
	// wide: a TCP header with both ports given, in the packet: two 64-bit
	// stores and one 32-bit store of checksum and urgent pointer.
	wide := a.Proto == grammar.ProtoTCP && constPorts && base != asm.R10
	if a.Proto == grammar.ProtoTCP && par {
		// The same stores, of the rule's values (parFunSeq to parFunW12
		// are the header's bytes 4-15).
		for w := int16(4); w < 16; w += 4 {
			c.param(asm.R1, parFunPorts+w, asm.Word)
			e.emit(stx(base, off+w, asm.R1, asm.Word))
		}
		e.emit(sti(base, off+16, 0, asm.Word))
	} else if a.Proto == grammar.ProtoTCP {
		w12 := uint32(0x50) | uint32(f.Flags)<<8 | uint32(n16(f.Window))<<16
		if wide {
			ports := uint32(n16(f.Sport)) | uint32(n16(f.Dport))<<16
			e.emit(
				asm.LoadImm(asm.R1, int64(uint64(ports)|uint64(n32(f.Seq))<<32), asm.DWord),
				stx(base, off, asm.R1, asm.DWord),
				asm.LoadImm(asm.R1, int64(uint64(n32(f.Ack))|uint64(w12)<<32), asm.DWord),
				stx(base, off+8, asm.R1, asm.DWord),
			)
		} else {
			e.emit(
				sti(base, off+4, int64(int32(n32(f.Seq))), asm.Word),
				sti(base, off+8, int64(int32(n32(f.Ack))), asm.Word),
				sti(base, off+12, int64(int32(w12)), asm.Word),
				sti(base, off+16, 0, asm.Word),
			)
		}
		hdrConst += uint64(n32(f.Seq)) + uint64(n32(f.Ack)) + uint64(w12)
	}
	if constPorts {
		hdrConst += uint64(n16(f.Sport)) + uint64(n16(f.Dport))<<16
	}
	e.comment("outer checksum: pseudo header + header + inner segment")
	bound := sumMax + 0xffff + 1 // the address sum, the constant
	if sum == asm.R10 {
		e.emit(ldx(asm.R3, asm.R10, slotT3, asm.DWord))
	} else {
		e.emit(mov(asm.R3, sum))
	}
	e.emit(asm.Add.Imm(asm.R3, int32(fold16(hdrConst))))
	if par && a.Proto == grammar.ProtoTCP {
		// The values' part of the header's sum.
		c.param(asm.R1, parFunSum, asm.Half)
		e.emit(asm.Add.Reg(asm.R3, asm.R1))
		bound += 0xffff
	}
	if a.Proto == grammar.ProtoUDP {
		e.emit(
			mov(asm.R1, asm.R2),
			asm.Add.Imm(asm.R1, int32(h)),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.Add.Reg(asm.R3, asm.R1), // the length field
			stx(base, off+4, asm.R1, asm.Half),
			sti(base, off+6, 0, asm.Half),
		)
		bound += 0xffff
	}
	if !constPorts {
		e.emit(
			ldx(asm.R1, base, off, asm.Word),
			asm.Add.Reg(asm.R3, asm.R1),
		)
		bound += 0xffffffff
	}
	if a.Proto == grammar.ProtoUDP {
		// 0 is "no checksum": the test needs the whole fold.
		c.foldBelow(asm.R3, asm.R1, bound)
		nz := e.newLabel("nonzero")
		e.emit(asm.Xor.Imm(asm.R3, 0xffff), asm.JNE.Imm(asm.R3, 0, nz), movi(asm.R3, 0xffff))
		e.label(nz)
	} else {
		// The urgent pointer after it is 0: written so above, or, for the
		// wide stores, left so by adjust_room, which zeroes the gap.
		c.foldLow16(asm.R3, asm.R1, bound)
		e.emit(asm.Xor.Imm(asm.R3, 0xffff))
	}
	e.emit(stx(base, off+checkOut, asm.R3, asm.Half))
	c.headerSum(base, off, h)
}
