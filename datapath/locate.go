package datapath

import (
	"errors"
	"regexp"
	"strconv"
	"strings"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// ruleOf finds the rule an error of one hook's program is about, so the
// CLI can underline it: for a verifier refusal, the rule whose instructions
// the verifier was looking at. Compile errors are located by blameCompile.
func ruleOf(err error, rules []*grammar.Rule, insns asm.Instructions) *grammar.Rule {
	var verr *bpf.VerifierError
	if errors.As(err, &verr) && verr.Err != nil {
		if i := compiler.RuleAt(insns, lastInsn(verr.Err.Log)); i >= 0 && i < len(rules) {
			return rules[i]
		}
	}
	return nil
}

// blameCompile finds the rule a compile error is about by compiling the
// rules one at a time (spans alone can't tell: rules added by earlier
// commands share the file name "<cmdline>" and overlapping offsets). Nil
// when no single rule fails alone.
func blameCompile(rules []*grammar.Rule, sets map[string]*grammar.Set, opts compiler.Options) *grammar.Rule {
	opts.Prios, opts.Slots = nil, nil // for the whole hook
	for _, r := range rules {
		if _, err := compiler.Compile([]*grammar.Rule{r}, sets, opts); err != nil {
			return r
		}
	}
	return nil
}

var insnLine = regexp.MustCompile(`^(\d+): \(`)

// lastInsn returns the index of the last instruction the verifier log
// shows ("123: (bf) r1 = r6"), -1 if none.
func lastInsn(log []string) int {
	for i := len(log) - 1; i >= 0; i-- {
		if m := insnLine.FindStringSubmatch(strings.TrimSpace(log[i])); m != nil {
			n, _ := strconv.Atoi(m[1])
			return n
		}
	}
	return -1
}
