// MSS clamping of the TCP SYN and SYN-ACK segments a funnel transforms.

package compiler

import (
	"fmt"

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
//
// The SYN test is inline; the clamp is a global function (mssFunc), which
// the kernel verifies once, on its own: the option walk's branches would
// otherwise be walked again in every body that funnels TCP, once per way
// the segments reach it.
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
	switch {
	case f.HasMSS && c.parametric():
		c.param(asm.R3, parMSS, asm.Half)
	case f.HasMSS:
		e.emit(movi(asm.R3, int32(f.MSS)))
	default:
		e.emit(movi(asm.R3, 0))
	}
	e.emit(
		mov(asm.R1, asm.R6),
		mov(asm.R2, asm.R9),
		movi(asm.R4, int32(h)),
		asm.Call.Label(mssFunc),
	)
	c.usesMSS = true
	e.label(done)
	c.reload()
}

// mssFunc is the global function that clamps the MSS option:
// mss_clamp(skb, l4 offset, mss (0: from the device MTU), funnel header
// length).
const mssFunc = "mss_clamp"

// mss_clamp's stack (its own frame, kept small: the kernel limits the
// stack of the program and the functions it calls to 512 bytes together).
const (
	mssSlotMSS = -8  // the MSS to clamp to
	mssSlotH   = -16 // the funnel header's length
)

// mssFunction emits mss_clamp after the program. R6 = skb, R9 = the
// transport offset.
func (c *compiler) mssFunction() {
	if !c.usesMSS {
		return
	}
	e := &c.e
	e.owner = 0
	done := "mss_out"
	e.label(mssFunc)
	e.comment("MSS clamp (mss.go): a global function, verified once")
	e.emit(
		mov(asm.R6, asm.R1),
		mov(asm.R9, asm.R2),
		// Called with any offset, the verifier must see one that packet
		// pointer arithmetic can't overflow (the parse guard's are far
		// below).
		asm.JGT.Imm(asm.R9, 0x7fff, done),
		stx(asm.R10, mssSlotMSS, asm.R3, asm.DWord),
		asm.JNE.Imm(asm.R3, 0, "mss_given"),
		// bpf_check_mtu(skb, 0, &mtu, 0, 0) returns the device MTU in mtu;
		// the MSS is that minus the headers: IP (with options: the
		// transport offset less the link header), TCP and the funnel's.
		stx(asm.R10, mssSlotH, asm.R4, asm.DWord),
	)
	c.checkMTU(mssSlotMSS)
	e.emit(
		ldx(asm.R2, asm.R10, mssSlotMSS, asm.Word),
		asm.Sub.Reg(asm.R2, asm.R9),
		ldx(asm.R1, asm.R10, mssSlotH, asm.DWord),
		asm.Sub.Reg(asm.R2, asm.R1),
		asm.Sub.Imm(asm.R2, 20-int32(c.l3)),
		asm.JSLT.Imm(asm.R2, grammar.MinFunnelMSS, done),
		stx(asm.R10, mssSlotMSS, asm.R2, asm.DWord),
	)
	e.label("mss_given")
	c.reload()
	e.emit(l4Bound(20, done)...)
	// R3 walks the options, R4 is where they end.
	found := "mss_opt"
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
		next := fmt.Sprintf("mss_next%d", i)
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
		ldx(asm.R2, asm.R10, mssSlotMSS, asm.DWord),
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
	e.emit(movi(asm.R0, 0), asm.Return())
}
