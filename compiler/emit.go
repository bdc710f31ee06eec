package compiler

import (
	"fmt"

	"github.com/cilium/ebpf/asm"
)

// emitter collects instructions with symbolic jump targets.
type emitter struct {
	insns   asm.Instructions
	pending string            // label for the next instruction
	alias   map[string]string // label placed where another one already was
	note    string            // comment for the next instruction
	n       int
	// owner is 1 + the index of the rule whose code is being emitted (0:
	// none); instructions carry it as metadata (see RuleAt).
	owner int
	// cold: blocks deferred to the end of a fast-path body (outOfLine).
	cold []func(cold bool)
	// inlineExits marks the jumps emitted meanwhile: finish copies a
	// verdict exit (r0 = v; exit) in place of such a jump to it.
	inlineExits bool
}

// inlineExit marks a jump whose verdict exit finish copies in its place.
type inlineExit struct{}

// newLabel returns a fresh label name.
func (e *emitter) newLabel(what string) string {
	e.n++
	return fmt.Sprintf("%s_%d", what, e.n)
}

// label places name at the next instruction.
func (e *emitter) label(name string) {
	if e.pending != "" {
		// The later label names the place better (an exit after a rule's
		// end, the next rule after a skipped branch): the earlier one
		// becomes its alias.
		if e.alias == nil {
			e.alias = map[string]string{}
		}
		e.alias[e.pending] = name
	}
	e.pending = name
}

// comment attaches a comment to the next instruction (the listing shows it).
func (e *emitter) comment(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	if e.note != "" {
		e.note += "; " + s
		return
	}
	e.note = s
}

func (e *emitter) emit(insns ...asm.Instruction) {
	for _, ins := range insns {
		if e.pending != "" {
			ins = ins.WithSymbol(e.pending)
			e.pending = ""
		}
		if e.note != "" {
			ins = ins.WithSource(asm.Comment(e.note))
			e.note = ""
		}
		if e.owner > 0 {
			ins.Metadata.Set(ruleMeta{}, e.owner-1)
		}
		if e.inlineExits && ins.OpCode.Class() == asm.JumpClass && ins.OpCode.JumpOp() == asm.Ja {
			ins.Metadata.Set(inlineExit{}, true)
		}
		e.insns = append(e.insns, ins)
	}
}

// finish resolves label aliases.
func (e *emitter) finish() asm.Instructions {
	for i := range e.insns {
		ref := e.insns[i].Reference()
		if ref == "" {
			continue
		}
		for {
			to, ok := e.alias[ref]
			if !ok {
				break
			}
			ref = to
		}
		if e.insns[i].IsLoadFromMap() {
			continue
		}
		e.insns[i] = e.insns[i].WithReference(ref)
	}
	threadJumps(e.insns)
	return prune(copyExits(e.insns))
}

// copyExits replaces each jump marked inlineExit whose target is a verdict
// exit (r0 = imm; exit) with a copy of it: on the fast path's bodies that
// is one taken jump less per packet (the JIT turns exit into a jump to the
// epilogue either way).
func copyExits(insns asm.Instructions) asm.Instructions {
	at := symbolIndex(insns)
	var out asm.Instructions
	for _, ins := range insns {
		t, ok := at[ins.Reference()]
		if ins.Metadata.Get(inlineExit{}) == nil || !ok || t+1 >= len(insns) ||
			!ins.OpCode.Class().IsJump() || ins.OpCode.JumpOp() != asm.Ja ||
			insns[t].OpCode != asm.Mov.Op(asm.ImmSource) || insns[t].Dst != asm.R0 ||
			insns[t+1].OpCode.JumpOp() != asm.Exit {
			out = append(out, ins)
			continue
		}
		// The jump's label, comment and rule go to the copy.
		mov := movi(asm.R0, int32(insns[t].Constant)).WithSymbol(ins.Symbol()).WithSource(ins.Source())
		ret := asm.Return()
		if r := ins.Metadata.Get(ruleMeta{}); r != nil {
			mov.Metadata.Set(ruleMeta{}, r)
			ret.Metadata.Set(ruleMeta{}, r)
		}
		out = append(out, mov, ret)
	}
	return out
}

// threadJumps points every jump whose target is an unconditional jump at
// that jump's final target: an action's end ("done" labels, a rule's end,
// then pass) is otherwise a chain of taken jumps on every packet it
// transforms. The intermediate jumps are then pruned if nothing else
// reaches them.
func threadJumps(insns asm.Instructions) {
	at := symbolIndex(insns)
	// A long jump (Ja32, e.g. a dispatch's to a shared body) is taken
	// through too when every offset of the program fits a jump's 16 bits.
	size := 0
	for _, ins := range insns {
		size += int(ins.Size())
	}
	short := size/asm.InstructionSize < 1<<15
	isJa := func(ins asm.Instruction) bool {
		class := ins.OpCode.Class()
		return (class == asm.JumpClass || class == asm.Jump32Class && short) && ins.OpCode.JumpOp() == asm.Ja && ins.Reference() != ""
	}
	for i, ins := range insns {
		op := ins.OpCode
		if !op.Class().IsJump() || op.JumpOp() == asm.Call || op.JumpOp() == asm.Exit || ins.IsFunctionReference() {
			continue
		}
		ref := ins.Reference()
		// A chain is at most as long as the program; the bound also stops
		// a jump cycle (an infinite loop no generator emits).
		for n := 0; n < len(insns); n++ {
			t, ok := at[ref]
			if !ok || !isJa(insns[t]) || t == i {
				break
			}
			ref = insns[t].Reference()
		}
		if ref != ins.Reference() {
			insns[i] = ins.WithReference(ref)
		}
	}
}

// prune drops instructions no path reaches (the verifier refuses them);
// generators may then emit exits and stat blocks unconditionally.
func prune(insns asm.Instructions) asm.Instructions {
	at := symbolIndex(insns)
	seen := make([]bool, len(insns))
	work := []int{0}
	for len(work) > 0 {
		i := work[len(work)-1]
		work = work[:len(work)-1]
		if i >= len(insns) || seen[i] {
			continue
		}
		seen[i] = true
		ins := insns[i]
		if ins.IsFunctionReference() {
			// A function (linscan.go) is reached through its call or pointer.
			if t, ok := at[ins.Reference()]; ok {
				work = append(work, t)
			}
		}
		op := ins.OpCode
		cls := op.Class()
		if cls.IsJump() && op.JumpOp() != asm.Call {
			if op.JumpOp() == asm.Exit {
				continue
			}
			if t, ok := at[ins.Reference()]; ok {
				work = append(work, t)
			}
			if op.JumpOp() == asm.Ja {
				continue
			}
		}
		work = append(work, i+1)
	}
	out := insns[:0:0]
	for i, ins := range insns {
		if seen[i] {
			out = append(out, ins)
		}
	}
	return out
}

// symbolIndex maps each label to the index of the instruction it names.
func symbolIndex(insns asm.Instructions) map[string]int {
	at := map[string]int{}
	for i, ins := range insns {
		if s := ins.Symbol(); s != "" {
			at[s] = i
		}
	}
	return at
}

// Small instruction shorthands.

func mov(dst, src asm.Register) asm.Instruction { return asm.Mov.Reg(dst, src) }
func movi(dst asm.Register, v int32) asm.Instruction {
	return asm.Mov.Imm(dst, v)
}

// bump adds one to the u64 that a map lookup returned in R0, or jumps to
// skip when the lookup found nothing.
func bump(skip string) asm.Instructions {
	return asm.Instructions{
		asm.JEq.Imm(asm.R0, 0, skip),
		ldx(asm.R1, asm.R0, 0, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		stx(asm.R0, 0, asm.R1, asm.DWord),
	}
}

// countPacket adds one packet and the u32 length at lenPtr+lenOff to the
// abi.Counter that a map lookup returned in R0, or jumps to skip when the
// lookup found nothing. Clobbers R1 and R2.
func countPacket(skip string, lenPtr asm.Register, lenOff int16) asm.Instructions {
	return append(bump(skip),
		ldx(asm.R1, asm.R0, 8, asm.DWord),
		ldx(asm.R2, lenPtr, lenOff, asm.Word),
		asm.Add.Reg(asm.R1, asm.R2),
		stx(asm.R0, 8, asm.R1, asm.DWord),
	)
}

func ldx(dst, src asm.Register, off int16, size asm.Size) asm.Instruction {
	return asm.LoadMem(dst, src, off, size)
}
func stx(dst asm.Register, off int16, src asm.Register, size asm.Size) asm.Instruction {
	return asm.StoreMem(dst, off, src, size)
}

// sti stores an immediate; for DWord the kernel sign-extends the 32-bit
// immediate (cilium/ebpf's StoreImm refuses DWord, so build it here).
func sti(dst asm.Register, off int16, v int64, size asm.Size) asm.Instruction {
	if size == asm.DWord {
		return asm.Instruction{OpCode: asm.StoreImmOp(asm.DWord), Dst: dst, Offset: off, Constant: v}
	}
	return asm.StoreImm(dst, off, v, size)
}

// n16 is a 16-bit network-order field as a little-endian load sees it.
func n16(v uint16) uint16 { return v>>8 | v<<8 }

// n32 is a 32-bit network-order field as a little-endian load sees it.
func n32(v uint32) uint32 {
	return v>>24 | (v>>8)&0xff00 | (v<<8)&0xff0000 | v<<24
}
