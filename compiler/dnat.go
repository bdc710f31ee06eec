// dnat: destination address/port rewrite.

package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// dnat rewrites the destination address (and port) with checksum updates.
func (c *compiler) dnat(r *grammar.Rule, a *grammar.Action) {
	e := &c.e
	fam := 4
	if !a.DNATAddr.Is4() {
		fam = 6
	}
	notApp := c.stat(StatNotApplicable)
	if r.Family == grammar.FamilyAny {
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, int32(fam), notApp))
	}
	l3 := c.l3
	c.guards(true, false)
	c.ipBound(fam, notApp)
	c.transport(notApp)
	addr := a.DNATAddr.AsSlice()
	var newSum uint64
	for w := 0; w < len(addr); w += 4 {
		newSum += uint64(uint32(addr[w]) | uint32(addr[w+1])<<8 | uint32(addr[w+2])<<16 | uint32(addr[w+3])<<24)
	}
	daddr := l3 + 16
	if fam == 6 {
		daddr = l3 + 24
	}
	e.comment("address difference")
	e.emit(ldx(asm.R4, asm.R7, daddr, asm.Word))
	for w := int16(1); w < int16(len(addr)/4); w++ {
		e.emit(ldx(asm.R1, asm.R7, daddr+4*w, asm.Word), asm.Add.Reg(asm.R4, asm.R1))
	}
	c.fold(asm.R4, asm.R1)
	e.emit(asm.Xor.Imm(asm.R4, 0xffff))
	if c.parametric() {
		c.param(asm.R1, parDNATSum, asm.Half)
		e.emit(asm.Add.Reg(asm.R4, asm.R1))
	} else {
		e.emit(asm.Add.Imm(asm.R4, int32(fold16(newSum))))
	}
	c.fold(asm.R4, asm.R1)
	e.emit(stx(asm.R10, slotT3, asm.R4, asm.DWord))
	c.l4CsumDiff(0, fPseudoHdr)
	// A parametric body has the port code of every dnat, skipped when the
	// rule's keeps the port.
	par := c.parametric()
	keepsPort := func() string {
		skip := e.newLabel("dnat_port_kept")
		c.param(asm.R1, parDNATKeep, asm.Half)
		e.emit(asm.JNE.Imm(asm.R1, 0, skip))
		return skip
	}
	if a.DNATPort != 0 || par {
		e.comment("port")
		skip := ""
		if par {
			skip = keepsPort()
		}
		c.reload()
		e.emit(l4Bound(4, c.exit("pass"))...)
		e.emit(ldx(asm.R3, asm.R5, 2, asm.Half))
		if par {
			c.param(asm.R4, parDNATPort, asm.Half)
		} else {
			e.emit(movi(asm.R4, int32(n16(a.DNATPort))))
		}
		udp := e.newLabel("csum_udp")
		e.emit(
			ldx(asm.R2, asm.R10, slotT4, asm.DWord),
			asm.Add.Reg(asm.R2, asm.R9),
			movi(asm.R5, 2),
			ldx(asm.R1, asm.R10, slotT2, asm.DWord),
			asm.JNE.Imm(asm.R1, 17, udp),
			asm.Or.Imm(asm.R5, fMarkMangled0),
		)
		e.label(udp)
		e.emit(mov(asm.R1, asm.R6), asm.FnL4CsumReplace.Call())
		if skip != "" {
			e.label(skip)
		}
	}
	c.reload()
	c.ipBound(fam, c.exit("pass"))
	e.emit(l4Bound(4, c.exit("pass"))...)
	for w := 0; w < len(addr); w += 4 {
		if c.parametric() {
			c.param(asm.R1, parDNATAddr+int16(w), asm.Word)
			e.emit(stx(asm.R7, daddr+int16(w), asm.R1, asm.Word))
			continue
		}
		v := uint32(addr[w]) | uint32(addr[w+1])<<8 | uint32(addr[w+2])<<16 | uint32(addr[w+3])<<24
		e.emit(sti(asm.R7, daddr+int16(w), int64(int32(v)), asm.Word))
	}
	switch {
	case par:
		skip := keepsPort()
		c.param(asm.R1, parDNATPort, asm.Half)
		e.emit(stx(asm.R5, 2, asm.R1, asm.Half))
		e.label(skip)
	case a.DNATPort != 0:
		e.emit(sti(asm.R5, 2, int64(n16(a.DNATPort)), asm.Half))
	}
	if fam == 4 {
		e.emit(
			ldx(asm.R0, asm.R7, l3+10, asm.Half),
			asm.Xor.Imm(asm.R0, 0xffff),
			ldx(asm.R1, asm.R10, slotT3, asm.DWord),
			asm.Add.Reg(asm.R0, asm.R1),
		)
		c.fold(asm.R0, asm.R1)
		e.emit(asm.Xor.Imm(asm.R0, 0xffff), stx(asm.R7, l3+10, asm.R0, asm.Half))
	} else if c.opts.Hook == grammar.HookIngress {
		// CHECKSUM_COMPLETE: the destination address is covered by skb->csum.
		c.whenComplete(func() {
			e.emit(ldx(asm.R2, asm.R10, slotT3, asm.DWord))
			c.csumUpdate()
		})
	}
}
