// rewrite: TCP-in-UDP in place (draft-cheshire-tcp-over-udp).

package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// rewrite turns TCP into UDP (to == udp) or back, in place, following
// draft-cheshire-tcp-over-udp as multipath-tcp/tcp-in-udp lays it out:
//
//	TCP: ports | seq | ack | doff,flags,window | check,urg | options
//	UDP: ports | len,check | doff,flags(URG=0),window | seq | ack | options
func (c *compiler) rewrite(fam int, to grammar.Proto) {
	e := &c.e
	notApp := c.stat(StatNotApplicable)
	c.guards(false, true)
	c.ipBound(fam, notApp)
	e.emit(
		asm.JGT.Imm(asm.R9, 0xffff, notApp),
	)
	e.emit(l4Bound(20, notApp)...)
	c.l4Len(fam, asm.R4, notApp)
	e.emit(asm.JLT.Imm(asm.R4, 20, notApp))
	// probe is the field used to tell a CHECKSUM_PARTIAL skb: it is
	// overwritten by the rewrite anyway.
	probe := int16(18)
	if to == grammar.ProtoUDP {
		e.emit(
			ldx(asm.R1, asm.R5, 12, asm.Byte),
			asm.RSh.Imm(asm.R1, 4),
			asm.LSh.Imm(asm.R1, 2),
			asm.JLT.Imm(asm.R1, 20, notApp),
			asm.JGT.Reg(asm.R1, asm.R4, notApp),
			// TCP-in-UDP has no urgent pointer: leave such segments TCP.
			ldx(asm.R1, asm.R5, 13, asm.Byte),
			asm.JSet.Imm(asm.R1, int32(grammar.TCPUrg), c.stat(StatUrgent)),
		)
	} else {
		probe = 4
		e.emit(
			ldx(asm.R1, asm.R5, 4, asm.Half),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.JNE.Reg(asm.R1, asm.R4, notApp),
			ldx(asm.R1, asm.R5, 8, asm.Byte),
			asm.RSh.Imm(asm.R1, 4),
			asm.LSh.Imm(asm.R1, 2),
			asm.JLT.Imm(asm.R1, 20, notApp),
			asm.JGT.Reg(asm.R1, asm.R4, notApp),
			ldx(asm.R1, asm.R5, 6, asm.Half),
			asm.JEq.Imm(asm.R1, 0, c.stat(StatNoChecksum)),
		)
	}
	full := e.newLabel("csum_complete")
	e.emit(
		stx(asm.R10, slotT1, asm.R4, asm.DWord),
		ldx(asm.R1, asm.R5, probe, asm.Half),
		stx(asm.R10, slotT2, asm.R1, asm.DWord),
	)
	if c.kern.ok {
		e.comment("CHECKSUM_PARTIAL: the finaliser would write into the moved fields")
		c.ipSummed(asm.R3)
		e.emit(asm.JEq.Imm(asm.R3, c.summedIs(checksumPartial), c.stat(StatPartialChecksum)))
	} else {
		e.comment("CHECKSUM_PARTIAL probe: l4_csum_replace without pseudo flag changes only complete checksums")
		e.emit(
			sti(asm.R5, probe, 0, asm.Half),
			mov(asm.R1, asm.R6),
			mov(asm.R2, asm.R9),
			asm.Add.Imm(asm.R2, int32(probe)),
			movi(asm.R3, 0),
			movi(asm.R4, 1),
			movi(asm.R5, 2),
			asm.FnL4CsumReplace.Call(),
		)
		c.reload()
		c.ipBound(fam, c.exit("pass"))
	}
	e.emit(l4Bound(20, c.exit("pass"))...)
	if !c.kern.ok {
		e.emit(
			ldx(asm.R1, asm.R5, probe, asm.Half),
			asm.JNE.Imm(asm.R1, 0, full),
			ldx(asm.R1, asm.R10, slotT2, asm.DWord),
			stx(asm.R5, probe, asm.R1, asm.Half),
			asm.Ja.Label(c.stat(StatPartialChecksum)),
		)
	}
	e.label(full)
	if to == grammar.ProtoUDP {
		e.comment("TCP -> UDP")
		e.emit(
			ldx(asm.R0, asm.R5, 16, asm.Half),
			asm.Xor.Imm(asm.R0, 0xffff),
			asm.Add.Imm(asm.R0, int32(n16(17-6))),
			ldx(asm.R1, asm.R10, slotT2, asm.DWord), // urgent pointer
			asm.Xor.Imm(asm.R1, 0xffff),
			asm.Add.Reg(asm.R0, asm.R1),
			ldx(asm.R2, asm.R10, slotT1, asm.DWord),
			asm.HostTo(asm.BE, asm.R2, asm.Half),
			asm.Add.Reg(asm.R0, asm.R2),
			ldx(asm.R3, asm.R5, 12, asm.Word),
			mov(asm.R1, asm.R3),
			asm.And.Imm(asm.R1, 0xffff),
			asm.Xor.Imm(asm.R1, 0xffff),
			asm.Add.Reg(asm.R0, asm.R1),
			asm.And.Imm32(asm.R3, ^int32(uint32(grammar.TCPUrg)<<8)),
			mov(asm.R1, asm.R3),
			asm.And.Imm(asm.R1, 0xffff),
			asm.Add.Reg(asm.R0, asm.R1),
		)
		c.fold(asm.R0, asm.R1)
		nz := e.newLabel("nonzero")
		e.emit(
			asm.Xor.Imm(asm.R0, 0xffff),
			asm.JNE.Imm(asm.R0, 0, nz),
			movi(asm.R0, 0xffff),
		)
		e.label(nz)
		e.emit(
			ldx(asm.R1, asm.R5, 4, asm.Word),
			ldx(asm.R4, asm.R5, 8, asm.Word),
			stx(asm.R5, 4, asm.R2, asm.Half),
			stx(asm.R5, 6, asm.R0, asm.Half),
			stx(asm.R5, 8, asm.R3, asm.Word),
			stx(asm.R5, 12, asm.R1, asm.Word),
			stx(asm.R5, 16, asm.R4, asm.Word),
		)
	} else {
		e.comment("UDP -> TCP")
		e.emit(
			ldx(asm.R0, asm.R5, 6, asm.Half),
			asm.Xor.Imm(asm.R0, 0xffff),
			asm.Add.Imm(asm.R0, int32(n16(17-6)^0xffff)),
			ldx(asm.R1, asm.R10, slotT2, asm.DWord), // length field
			asm.Xor.Imm(asm.R1, 0xffff),
			asm.Add.Reg(asm.R0, asm.R1),
		)
		c.fold(asm.R0, asm.R1)
		e.emit(
			asm.Xor.Imm(asm.R0, 0xffff),
			ldx(asm.R1, asm.R5, 8, asm.Word),
			ldx(asm.R2, asm.R5, 12, asm.Word),
			ldx(asm.R3, asm.R5, 16, asm.Word),
			stx(asm.R5, 4, asm.R2, asm.Word),
			stx(asm.R5, 8, asm.R3, asm.Word),
			stx(asm.R5, 12, asm.R1, asm.Word),
			stx(asm.R5, 16, asm.R0, asm.Half),
			sti(asm.R5, 18, 0, asm.Half),
		)
	}
	c.ipProto(fam, to.Number())
	if c.opts.Hook == grammar.HookIngress {
		// CHECKSUM_COMPLETE: the segment's sum moves opposite to its
		// pseudo-header protocol; IPv6's next-header byte (a low byte) too.
		seg := int64(n16(17 - 6)) // TCP -> UDP: the segment loses this
		nh := int64(17 - 6)
		d := 0xffff - seg
		if to == grammar.ProtoTCP {
			d, nh = seg, 0xffff-nh
		}
		if fam == 6 {
			d = (d + nh) % 0xffff
		}
		c.whenComplete(func() {
			e.emit(movi(asm.R2, int32(d)))
			c.csumUpdate()
		})
	}
}
