package main

import (
	"os"
	"path/filepath"

	"github.com/sfunnel/sfunnel/ruleset"
)

// runDir holds the lock (and the state file of the file backend).
const runDir = "/run/sfunnel"

// openBackend picks where the ruleset lives: the kernel datapath, or a
// state file with --state (or SFUNNEL_STATE) for use without the kernel.
func (a *app) openBackend() (ruleset.Backend, error) {
	if a.backend != nil {
		return a.backend, nil
	}
	state := a.opts.state
	if state == "" {
		state = os.Getenv("SFUNNEL_STATE")
	}
	lockPath := filepath.Join(runDir, "lock")
	if state != "" {
		lockPath = state + ".lock"
	}
	unlock, err := ruleset.Lock(lockPath)
	if err != nil {
		return nil, err
	}
	a.unlock = unlock
	if state != "" {
		a.backend = &ruleset.FileBackend{Path: state}
	} else {
		a.backend = newKernelBackend(a.opts.verbose, a.opts.ctMarkMask)
	}
	return a.backend, nil
}

// release drops the backend and its lock, so the next command (in the REPL)
// sees changes made by other invocations.
func (a *app) release() {
	if a.unlock != nil {
		a.unlock()
		a.unlock = nil
	}
	a.backend = nil
}
