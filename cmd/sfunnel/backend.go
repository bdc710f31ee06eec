package main

import (
	"os"

	"github.com/sfunnel/sfunnel/ruleset"
)

// openBackend picks where the ruleset lives: the kernel datapath, or a
// state file with --state (or SFUNNEL_STATE) for use without the kernel.
// No lock is taken here: readers never wait, and a batch that changes the
// ruleset takes its backend's writer lock (ruleset.Locker) once it has
// been parsed.
func (a *app) openBackend() (ruleset.Backend, error) {
	if a.backend != nil {
		return a.backend, nil
	}
	state := a.opts.state
	if state == "" {
		state = os.Getenv("SFUNNEL_STATE")
	}
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
