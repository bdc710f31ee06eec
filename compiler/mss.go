// MSS clamping of the TCP SYN and SYN-ACK segments a funnel transforms.

package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// mssOptScan is how many TCP options are looked at before the MSS option
// is given up on (every stack puts it first or second).
const mssOptScan = 8

// mssClamp lowers the MSS option of an inner TCP SYN (or SYN-ACK) before
// funnel pushes h bytes in front of it, so the peer's full-size segments
// still fit the MTU once funneled: to the rule's `mss N`, or by default to
// the device MTU minus the IP header (with options), 20 bytes of TCP
// header and the funnel header. The MSS option only ever goes down. The
// checksum follows with bpf_l4_csum_replace (a CHECKSUM_PARTIAL seed is
// left alone: the option is inside the summed bytes). Packet pointers are
// reloaded; R9 holds the transport offset.
func (c *compiler) mssClamp(f *grammar.FunnelHeader, h int16) {
	if f.MSSOff {
		return
	}
	e := &c.e
	c.infoInR1 = false
	done, syn := e.newLabel("mss_done"), e.newLabel("mss_syn")
	e.comment("MSS clamp of a SYN")
	e.emit(
		ldx(asm.R9, asm.R10, slotL4Off, asm.DWord),
		asm.JGT.Imm(asm.R9, 0xffff, done),
	)
	e.emit(l4Bound(20, done)...)
	e.emit(
		ldx(asm.R1, asm.R5, 13, asm.Byte),
		asm.JSet.Imm(asm.R1, int32(grammar.TCPSyn), syn),
		asm.Ja.Label(done),
	)
	e.label(syn)
	if f.HasMSS && c.parametric() {
		c.param(asm.R2, parMSS, asm.Half)
	} else if f.HasMSS {
		e.emit(movi(asm.R2, int32(f.MSS)))
	} else {
		// bpf_check_mtu(skb, 0, &mtu, 0, 0) returns the device MTU in mtu.
		e.emit(
			sti(asm.R10, slotT4, 0, asm.DWord),
			mov(asm.R1, asm.R6),
			movi(asm.R2, 0),
			mov(asm.R3, asm.R10),
			asm.Add.Imm(asm.R3, slotT4),
			movi(asm.R4, 0),
			movi(asm.R5, 0),
			asm.FnCheckMtu.Call(),
			ldx(asm.R2, asm.R10, slotT4, asm.Word),
			ldx(asm.R9, asm.R10, slotL4Off, asm.DWord),
			asm.Sub.Reg(asm.R2, asm.R9),
			asm.Sub.Imm(asm.R2, int32(20+h)-int32(c.l3)),
			asm.JSLT.Imm(asm.R2, grammar.MinFunnelMSS, done),
		)
		c.reload()
		e.emit(
			asm.JGT.Imm(asm.R9, 0xffff, done),
		)
		e.emit(l4Bound(20, done)...)
	}
	e.emit(stx(asm.R10, slotT4, asm.R2, asm.DWord))
	// R3 walks the options, R4 is where they end.
	found := e.newLabel("mss_opt")
	e.emit(
		ldx(asm.R1, asm.R5, 12, asm.Byte),
		asm.RSh.Imm(asm.R1, 4),
		asm.LSh.Imm(asm.R1, 2),
		asm.JLE.Imm(asm.R1, 20, done),
		mov(asm.R4, asm.R5),
		asm.Add.Reg(asm.R4, asm.R1),
		mov(asm.R3, asm.R5),
		asm.Add.Imm(asm.R3, 20),
	)
	for i := 0; i < mssOptScan; i++ {
		next := e.newLabel("mss_next")
		e.emit(
			asm.JGE.Reg(asm.R3, asm.R4, done),
			mov(asm.R0, asm.R3),
			asm.Add.Imm(asm.R0, 2),
			asm.JGT.Reg(asm.R0, asm.R8, done),
			ldx(asm.R1, asm.R3, 0, asm.Byte),
			asm.JEq.Imm(asm.R1, 0, done), // end of options
			asm.JNE.Imm(asm.R1, 1, next+"_kind"),
			asm.Add.Imm(asm.R3, 1), // NOP
			asm.Ja.Label(next),
		)
		e.label(next + "_kind")
		e.emit(
			ldx(asm.R2, asm.R3, 1, asm.Byte),
			asm.JEq.Imm(asm.R1, 2, found),
			asm.JLT.Imm(asm.R2, 2, done),
			asm.Add.Reg(asm.R3, asm.R2),
		)
		e.label(next)
	}
	e.emit(asm.Ja.Label(done))
	e.label(found)
	e.emit(
		asm.JNE.Imm(asm.R2, 4, done),
		mov(asm.R0, asm.R3),
		asm.Add.Imm(asm.R0, 4),
		asm.JGT.Reg(asm.R0, asm.R8, done),
		ldx(asm.R1, asm.R3, 2, asm.Half), // old MSS, network order
		mov(asm.R0, asm.R1),
		asm.HostTo(asm.BE, asm.R0, asm.Half),
		ldx(asm.R2, asm.R10, slotT4, asm.DWord),
		asm.JLE.Reg(asm.R0, asm.R2, done),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
		stx(asm.R3, 2, asm.R2, asm.Half),
		// bpf_l4_csum_replace(skb, l4 + 16, old, new, 2)
		mov(asm.R3, asm.R1),
		mov(asm.R4, asm.R2),
		mov(asm.R1, asm.R6),
		mov(asm.R2, asm.R9),
		asm.Add.Imm(asm.R2, 16),
		movi(asm.R5, 2),
		asm.FnL4CsumReplace.Call(),
	)
	e.label(done)
	c.reload()
}
