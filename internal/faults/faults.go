// Package faults lets tests kill sfunnel at numbered points of a commit, to
// prove that a crash at any of them leaves a state the next command can
// finish or undo.
//
// SFUNNEL_KILL_AT=N sends SIGKILL to the process at the Nth call of Point
// (counting from 1). SFUNNEL_KILL_TRACE=1 prints "sfunnel-point N NAME" to
// stderr at every point, so a test can learn how many points a commit has.
// Without these variables Point costs one atomic add.
package faults

import (
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"syscall"
)

var (
	killAt = func() int64 {
		n, _ := strconv.ParseInt(os.Getenv("SFUNNEL_KILL_AT"), 10, 64)
		return n
	}()
	trace = os.Getenv("SFUNNEL_KILL_TRACE") == "1"
	count atomic.Int64
)

// Point marks a place in a commit where a crash must be survivable: right
// before or after one change to the kernel or to the pinned state.
func Point(name string) {
	if killAt == 0 && !trace {
		return
	}
	n := count.Add(1)
	if trace {
		fmt.Fprintf(os.Stderr, "sfunnel-point %d %s\n", n, name)
	}
	if n == killAt {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way
	}
}
