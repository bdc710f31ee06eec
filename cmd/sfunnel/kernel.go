package main

import (
	"path/filepath"

	"github.com/sfunnel/sfunnel/ruleset"
)

// newKernelBackend returns the backend that makes rulesets live.
// Until the datapath is wired in, the ruleset is kept in a state file.
func newKernelBackend(verbose bool, ctMarkMask uint32) ruleset.Backend {
	return &ruleset.FileBackend{Path: filepath.Join(runDir, "state.json")}
}

func locateKernelError(err error) error { return err }
