package datapath

import (
	"errors"
	"testing"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/ruleset"
)

func TestLastInsnAndRuleAt(t *testing.T) {
	log := []string{"0: R1=ctx() R10=fp0", "0: (bf) r6 = r1", "1: (18) r1 = 0x0", "3: (85) call bpf_map_lookup_elem#1", "R1 type=scalar expected=map_ptr", "processed 4 insns"}
	if got := lastInsn(log); got != 3 {
		t.Errorf("lastInsn = %d, want 3", got)
	}
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1).WithSource(asm.Comment("prologue")),
		asm.LoadImm(asm.R1, 1, asm.DWord).WithSource(asm.Comment("x; rule 0 handle 5: udp")), // raw 1-2
		asm.Mov.Imm(asm.R0, 0).WithSource(asm.Comment("rule 1 handle 6: tcp")),               // raw 3
		asm.Return(), // raw 4
	}
	for off, want := range map[int]int{0: -1, 1: 0, 2: 0, 3: 1, 4: 1, -1: -1} {
		if got := ruleAt(insns, off); got != want {
			t.Errorf("ruleAt(%d) = %d, want %d", off, got, want)
		}
	}
}

// A program the verifier refuses is blamed on the rule whose code it
// refused.
func TestVerifierErrorNamesRule(t *testing.T) {
	testenv.RequireRoot(t)
	rules := []*grammar.Rule{udpRule(10, 4739, grammar.ActAccept), udpRule(11, 5000, grammar.ActDrop)}
	prog, err := compiler.Compile(rules, nil, compiler.Options{Hook: grammar.HookIngress})
	if err != nil {
		t.Fatal(err)
	}
	ps := prog.Spec.Programs[bpf.ProgramName]
	at := -1
	for i, ins := range ps.Instructions {
		if src := ins.Source(); src != nil && ruleComment.MatchString(src.String()) && ruleComment.FindStringSubmatch(src.String())[1] == "1" {
			at = i
		}
	}
	if at < 0 {
		t.Fatalf("no rule 1 comment in the listing:\n%v", ps.Instructions)
	}
	// Read above the stack frame inside rule 1's code.
	bad := asm.LoadMem(asm.R1, asm.R10, 8, asm.DWord)
	ps.Instructions = append(ps.Instructions[:at+1], append(asm.Instructions{bad}, ps.Instructions[at+1:]...)...)
	_, err = bpf.LoadCollection(prog.Spec, bpf.LoadOptions{What: "vb ingress"})
	var verr *bpf.VerifierError
	if !errors.As(err, &verr) {
		t.Fatalf("want a verifier error, got %v", err)
	}
	if r := ruleOf(err, rules, ps.Instructions); r != rules[1] {
		t.Errorf("verifier error %q blamed on %+v, want the rule with handle 11", err, r)
	}
}

// A compile error is an error of the hook naming the rule.
func TestCompileErrorNamesRule(t *testing.T) {
	e := newEnv(t, Options{})
	ok, err := grammar.ParseRule("<cmdline>", "udp dport 1 counter", nil)
	if err != nil {
		t.Fatal(err)
	}
	bad, err := grammar.ParseRule("<cmdline>", "udp dport 2 ct mark set 0x100", nil) // outside the ct mark mask
	if err != nil {
		t.Fatal(err)
	}
	ok.Handle, bad.Handle = 1, 2
	rs := &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{{Name: "vb", Egress: []*grammar.Rule{ok, bad}}}}
	var herr *HookError
	e.do(t, func() error {
		if err := e.be.Commit(rs); !errors.As(err, &herr) || herr.Rule != bad {
			t.Errorf("Commit: %v (rule %+v), want a HookError naming the second rule", err, herr)
		}
		return nil
	})
}
