package bpf

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
)

// VerifierError is a program the kernel verifier refused. Error() gives the
// verifier's reason in one line; Log has the whole verifier output.
type VerifierError struct {
	// What names the program (e.g. "eth0 egress").
	What string
	// Reason is the last meaningful line of the verifier log.
	Reason string
	// Err is cilium/ebpf's error; fmt.Sprintf("%+v", Err) is the full log.
	Err *ebpf.VerifierError
	// Verbose makes Error() include the full log.
	Verbose bool
}

func (e *VerifierError) Error() string {
	msg := fmt.Sprintf("verifier rejected the program for %s: %s", e.What, e.Reason)
	if e.Verbose {
		msg += "\n" + e.Log()
	}
	return msg
}

// Log returns the full verifier log.
func (e *VerifierError) Log() string { return fmt.Sprintf("%+v", e.Err) }

func (e *VerifierError) Unwrap() error { return e.Err }

// LoadOptions configure LoadCollection.
type LoadOptions struct {
	// What names the program in errors (e.g. "eth0 egress").
	What string
	// Maps replace maps of the spec by name (shared named sets).
	Maps map[string]*ebpf.Map
	// Verbose puts the full verifier log into verifier errors.
	Verbose bool
}

// LoadCollection loads spec into the kernel, through the verifier. Nothing is
// attached or pinned.
func LoadCollection(spec *ebpf.CollectionSpec, opts LoadOptions) (*ebpf.Collection, error) {
	coll, err := ebpf.NewCollectionWithOptions(spec, ebpf.CollectionOptions{
		// Without a log level, cilium/ebpf loads without a log and only
		// retries with one when the verifier refuses the program.
		MapReplacements: opts.Maps,
	})
	if err == nil {
		return coll, nil
	}
	var verr *ebpf.VerifierError
	if errors.As(err, &verr) {
		return nil, &VerifierError{What: opts.What, Reason: verifierReason(verr), Err: verr, Verbose: opts.Verbose}
	}
	return nil, fmt.Errorf("load program for %s: %w", opts.What, permission(err))
}

// verifierReason picks the line of a verifier log that says why: the last
// one that is not the closing statistics, with the line before it when the
// last one only makes sense with it (register state).
func verifierReason(e *ebpf.VerifierError) string {
	var lines []string
	for _, l := range e.Log {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "processed ") || strings.HasPrefix(l, "verification time") ||
			strings.HasPrefix(l, "stack depth") {
			continue
		}
		lines = append(lines, l)
	}
	if len(lines) == 0 {
		return e.Cause.Error()
	}
	last := lines[len(lines)-1]
	if len(lines) > 1 && len(last) > 1 && last[0] == 'R' && last[1] >= '0' && last[1] <= '9' {
		return lines[len(lines)-2] + ": " + last
	}
	return last
}
