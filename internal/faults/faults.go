// Package faults lets tests kill sfunnel at numbered points of a commit, to
// prove that a crash at any of them leaves a state the next command can
// finish or undo.
//
// SFUNNEL_KILL_AT=N sends SIGKILL to the process at the Nth call of Point
// (counting from 1). SFUNNEL_STOP_AT=N stops it there with SIGSTOP (a
// writer frozen in the middle of a commit, until SIGCONT).
// SFUNNEL_KILL_TRACE=1 prints "sfunnel-point N NAME" to stderr at every
// point, so a test can learn how many points a commit has. Without these
// variables Point does nothing.
package faults

import (
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
)

var (
	killAt = envInt("SFUNNEL_KILL_AT")
	stopAt = envInt("SFUNNEL_STOP_AT")
	trace  = os.Getenv("SFUNNEL_KILL_TRACE") == "1"
	count  atomic.Int64
)

// Point marks a place in a commit where a crash must be survivable: right
// before or after one change to the kernel or to the pinned state.
func Point(name string) {
	if killAt == 0 && stopAt == 0 && !trace {
		return
	}
	n := count.Add(1)
	if trace {
		fmt.Fprintf(os.Stderr, "sfunnel-point %d %s\n", n, name)
	}
	if n == stopAt {
		syscall.Kill(os.Getpid(), syscall.SIGSTOP)
	}
	if n == killAt {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
}

func envInt(name string) int64 {
	n, _ := strconv.ParseInt(os.Getenv(name), 10, 64)
	return n
}
