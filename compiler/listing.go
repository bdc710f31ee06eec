package compiler

import (
	"fmt"
	"strings"

	"github.com/cilium/ebpf/asm"
)

// Instruction metadata keys.
type (
	ruleMeta     struct{} // int: index of the rule the instruction belongs to
	netOrderMeta struct{} // bool: the constant is in network byte order
)

// netImm marks an instruction's constant as network order (packet bytes as
// a little-endian load sees them): the listing prints it in hex.
func netImm(ins asm.Instruction) asm.Instruction {
	ins.Metadata.Set(netOrderMeta{}, true)
	return ins
}

// RuleAt returns the index of the rule whose code holds raw instruction
// offset off (as the verifier counts: 64-bit immediates take two), from the
// instructions' metadata; -1 when the instruction belongs to no one rule
// (the parse guard, exits, a table segment's lookups).
func RuleAt(insns asm.Instructions, off int) int {
	if off < 0 {
		return -1
	}
	raw := 0
	for _, ins := range insns {
		next := raw + int(ins.Size()/asm.InstructionSize)
		if off < next {
			if r, ok := ins.Metadata.Get(ruleMeta{}).(int); ok {
				return r
			}
			return -1
		}
		raw = next
	}
	return -1
}

// Listing renders instructions for golden files and -v output: labels on
// their own lines, comments as "; ", no instruction offsets (so a change
// touches only the lines it changes), a blank line before each rule's,
// segment's and shape's section, and network-order constants in hex.
func Listing(insns asm.Instructions) string {
	var b strings.Builder
	for _, ins := range insns {
		text := ""
		if src := ins.Source(); src != nil {
			text = src.String()
		}
		if strings.HasPrefix(text, "rule") || strings.HasPrefix(text, "shape") || strings.HasPrefix(text, "body") {
			b.WriteString("\n")
		}
		if sym := ins.Symbol(); sym != "" {
			fmt.Fprintf(&b, "%s:\n", sym)
		}
		if text != "" {
			fmt.Fprintf(&b, "\t; %s\n", text)
		}
		b.WriteString("\t")
		b.WriteString(insnText(ins))
		b.WriteString("\n")
	}
	return b.String()
}

// insnText is one instruction without its offset and jump distance.
func insnText(ins asm.Instruction) string {
	op := ins.OpCode
	var w []string
	w = append(w, op.String())
	imm := func() string {
		if net, _ := ins.Metadata.Get(netOrderMeta{}).(bool); net {
			return fmt.Sprintf("%#x", uint32(ins.Constant))
		}
		return fmt.Sprint(ins.Constant)
	}
	switch cls := op.Class(); {
	case cls.IsJump():
		switch op.JumpOp() {
		case asm.Exit:
		case asm.Call:
			if ins.IsKfuncCall() {
				w = append(w, fmt.Sprintf("kfunc %d", ins.Constant))
			} else if ins.IsBuiltinCall() {
				w = append(w, asm.BuiltinFunc(ins.Constant).String())
			}
		case asm.Ja:
		default:
			w = append(w, ins.Dst.String())
			if op.Source() == asm.RegSource {
				w = append(w, ins.Src.String())
			} else {
				w = append(w, imm())
			}
		}
		if ref := ins.Reference(); ref != "" && op.JumpOp() != asm.Call {
			w = append(w, "<"+ref+">")
		}
	case ins.IsLoadFromMap():
		w = append(w, ins.Dst.String(), "map <"+ins.Reference()+">", fmt.Sprintf("off %d", uint32(ins.Constant>>32)))
	case cls.IsLoad() || cls.IsStore():
		w = append(w, fmt.Sprintf("%s %s %+d", ins.Dst, ins.Src, ins.Offset))
		if op.Mode() == asm.ImmMode || cls == asm.StClass {
			w = append(w, imm())
		}
	case cls.IsALU():
		w = append(w, ins.Dst.String())
		switch {
		case op.ALUOp() == asm.Swap:
			w = append(w, fmt.Sprint(ins.Constant))
		case op.Source() == asm.RegSource:
			w = append(w, ins.Src.String())
		case op.ALUOp() != asm.Neg:
			w = append(w, imm())
		}
	default:
		w = append(w, fmt.Sprint(ins))
	}
	return strings.Join(w, " ")
}
