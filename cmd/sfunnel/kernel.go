package main

import (
	"errors"
	"fmt"

	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// newKernelBackend returns the backend that makes rulesets live in the
// kernel (eBPF programs on tcx/clsact, pinned under /sys/fs/bpf/sfunnel).
func newKernelBackend(verbose bool, ctMarkMask uint32) ruleset.Backend {
	return datapath.New(datapath.Options{Verbose: verbose, CtMarkMask: ctMarkMask})
}

// locateKernelError turns datapath errors about one rule into located
// errors that underline the rule and quote the kernel's reason in one line.
func locateKernelError(err error) error {
	var ce *compiler.Error
	if errors.As(err, &ce) && ce.Span.Pos.Line > 0 {
		// A compile error names its own token (e.g. a ct mark value too wide).
		return &grammar.Error{Span: ce.Span, Msg: ce.Msg}
	}
	var he *datapath.HookError
	if errors.As(err, &he) && he.Rule != nil {
		return &grammar.Error{Span: he.Rule.Span, Msg: fmt.Sprintf("%s rejected: %s", he.Hook, he.Err.Error())}
	}
	return err
}
