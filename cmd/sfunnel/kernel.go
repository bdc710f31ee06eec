package main

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"

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
	var he *datapath.HookError
	if errors.As(err, &he) && he.Rule != nil {
		return &grammar.Error{Span: he.Rule.Span, Msg: fmt.Sprintf("%s %s: %s", he.Hook, "rejected", oneLine(he.Err))}
	}
	return err
}

// oneLine shortens verifier errors to their reason; -v prints the full log.
func oneLine(err error) string {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Sprintf("%v", ve)
	}
	return err.Error()
}
