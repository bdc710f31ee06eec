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

func TestLastInsn(t *testing.T) {
	log := []string{"0: R1=ctx() R10=fp0", "0: (bf) r6 = r1", "1: (18) r1 = 0x0", "3: (85) call bpf_map_lookup_elem#1", "R1 type=scalar expected=map_ptr", "processed 4 insns"}
	if got := lastInsn(log); got != 3 {
		t.Errorf("lastInsn = %d, want 3", got)
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
	at, raw := -1, 0
	for i, ins := range ps.Instructions {
		// An instruction of rule 1 without label, reference or comment,
		// whose metadata the inserted one can copy.
		if compiler.RuleAt(ps.Instructions, raw) == 1 && ins.Symbol() == "" && ins.Reference() == "" && ins.Source() == nil {
			at = i
			break
		}
		raw += int(ins.Size() / asm.InstructionSize)
	}
	if at < 0 {
		t.Fatalf("no instruction of rule 1 in the listing:\n%v", ps.Instructions)
	}
	// Read above the stack frame inside rule 1's code.
	bad := asm.LoadMem(asm.R1, asm.R10, 8, asm.DWord).WithMetadata(ps.Instructions[at].Metadata)
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
