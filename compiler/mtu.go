// MTU accounting for actions that grow packets.

package compiler

import (
	"github.com/cilium/ebpf/asm"
)

// mtuCheck counts a funneled packet that exceeds the device MTU.
func (c *compiler) mtuCheck(rule int) { c.mtuCount(rule, nil) }

// mtuCheckIPLen counts a funneled packet whose IP length exceeds the
// device MTU; ipLen sets R4 to that length (R2 holds the MTU meanwhile). The IP length
// is what the MTU bounds; skb->len against dev->mtu + hard_header_len (what
// bpf_check_mtu compares) is the same on devices whose link header is the
// program's, and costs one more dependent load through dev (a checked
// load: dev is not a trusted pointer).
func (c *compiler) mtuCheckIPLen(rule int, ipLen func()) { c.mtuCount(rule, ipLen) }

func (c *compiler) mtuCount(rule int, ipLen func()) {
	e := &c.e
	ok := e.newLabel("mtu_ok")
	e.comment("MTU check")
	switch {
	case c.kern.mtu && ipLen != nil:
		e.emit(
			mov(asm.R1, asm.R6),
			asm.Instruction{OpCode: asm.OpCode(asm.JumpClass).SetJumpOp(asm.Call), Src: asm.PseudoKfuncCall, Constant: c.kern.kfunc},
			ldx(asm.R1, asm.R0, c.kern.devOff, asm.DWord),
			ldx(asm.R2, asm.R1, c.kern.mtuOff, asm.Word),
		)
		ipLen()
		if c.fast {
			// Out of line: a packet that fits runs on without a taken jump.
			over := e.newLabel("mtu_over")
			e.emit(asm.JGT.Reg(asm.R4, asm.R2, over))
			e.label(ok)
			e.cold = append(e.cold, func(bool) {
				e.label(over)
				c.mtuExceeded(rule, ok)
				e.emit(asm.Ja.Label(ok))
			})
			return
		}
		e.emit(asm.JLE.Reg(asm.R4, asm.R2, ok))
	case c.kern.mtu:
		// bpf_check_mtu(skb, 0, &0, 0, 0) inline: skb->len against
		// dev->mtu + dev->hard_header_len (GSO skbs never get here).
		e.emit(
			mov(asm.R1, asm.R6),
			asm.Instruction{OpCode: asm.OpCode(asm.JumpClass).SetJumpOp(asm.Call), Src: asm.PseudoKfuncCall, Constant: c.kern.kfunc},
			ldx(asm.R1, asm.R0, c.kern.devOff, asm.DWord),
			ldx(asm.R2, asm.R1, c.kern.mtuOff, asm.Word),
			ldx(asm.R3, asm.R1, c.kern.hhOff, asm.Half),
			asm.Add.Reg(asm.R2, asm.R3),
			ldx(asm.R4, asm.R6, skbLen, asm.Word),
			asm.JLE.Reg(asm.R4, asm.R2, ok),
		)
	default:
		c.mtuHelper(ok)
	}
	c.mtuExceeded(rule, ok)
	e.label(ok)
}

// mtuExceeded counts an MTU overrun of rule's funnel, then goes on at ok.
func (c *compiler) mtuExceeded(rule int, ok string) {
	e := &c.e
	c.lookup(RuleMTUMap, c.ruleKey(rule))
	skip := e.newLabel("mtu_rule")
	e.emit(bump(skip)...)
	e.label(skip)
	e.emit(sti(asm.R10, slotKey, StatMTUExceeded, asm.Word))
	c.lookup(StatsMap, slotKey)
	e.emit(bump(ok)...)
}

// mtuHelper jumps to ok when bpf_check_mtu(skb, 0, &0, 0, 0) passes.
func (c *compiler) mtuHelper(ok string) {
	c.checkMTU(slotT4)
	c.e.emit(asm.JEq.Imm(asm.R0, 0, ok))
}

// checkMTU emits bpf_check_mtu(skb (R6), 0, fp+slot, 0, 0) with 0 in the
// slot: R0 is 0 when skb->len fits the device MTU, and the slot's u32 the
// MTU.
func (c *compiler) checkMTU(slot int16) {
	c.e.emit(
		sti(asm.R10, slot, 0, asm.Word),
		mov(asm.R1, asm.R6),
		movi(asm.R2, 0),
		mov(asm.R3, asm.R10),
		asm.Add.Imm(asm.R3, int32(slot)),
		movi(asm.R4, 0),
		movi(asm.R5, 0),
		asm.FnCheckMtu.Call(),
	)
}
