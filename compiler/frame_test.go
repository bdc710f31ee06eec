package compiler

import (
	"go/ast"
	"go/parser"
	"go/token"
	"strings"
	"testing"

	"github.com/cilium/ebpf/asm"
)

// No two stack slots share a byte, every slot lies in the 512-byte frame,
// and every slot constant of the package is in stackFrame (a slot added
// without listing it would escape the check).
func TestFrameSlotsDoNotOverlap(t *testing.T) {
	for _, o := range stackFrame.overlaps() {
		t.Error(o)
	}
	listed := map[string]bool{}
	for _, s := range stackFrame {
		listed[s.name] = true
	}
	pkgs, err := parser.ParseDir(token.NewFileSet(), ".", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range pkgs["compiler"].Files {
		for _, d := range f.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.CONST {
				continue
			}
			for _, sp := range g.Specs {
				for _, n := range sp.(*ast.ValueSpec).Names {
					if strings.HasPrefix(n.Name, "slot") && !listed[n.Name] {
						t.Errorf("%s is not in stackFrame", n.Name)
					}
				}
			}
		}
	}
}

// The check itself finds an overlap.
func TestFrameOverlapFound(t *testing.T) {
	f := frame{{"a", -16, 16}, {"b", -8, 8}, {"c", -520, 8}}
	if got := f.overlaps(); len(got) != 2 {
		t.Fatalf("overlaps %v, want a/b and c outside", got)
	}
}

// RuleAt reads the rule from instruction metadata, counting 64-bit
// immediates as two raw instructions as the verifier does.
func TestRuleAt(t *testing.T) {
	var e emitter
	e.emit(asm.Mov.Reg(asm.R6, asm.R1))
	e.owner = 1
	e.emit(asm.LoadImm(asm.R1, 1, asm.DWord)) // raw 1-2
	e.owner = 2
	e.emit(asm.Mov.Imm(asm.R0, 0)) // raw 3
	e.owner = 0
	e.emit(asm.Return()) // raw 4
	for off, want := range map[int]int{0: -1, 1: 0, 2: 0, 3: 1, 4: -1, 5: -1, -1: -1} {
		if got := RuleAt(e.insns, off); got != want {
			t.Errorf("RuleAt(%d) = %d, want %d", off, got, want)
		}
	}
}
