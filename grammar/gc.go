package grammar

import (
	"os"
	"runtime/debug"
	"sync"
)

// Parsing a large file is mostly garbage collection: participle allocates
// some 480 objects (50 KB) per rule that die at once (branch contexts,
// reflection), while the file's tokens and parse tree stay live and are
// rescanned at every cycle. With the collector's default target (GOGC=100)
// a 10 000-rule file took 2.0 s of CPU; letting the heap grow to 5x the
// live data while such a file is parsed cut that to 1.3 s, for a peak RSS
// of 185 MB instead of 115 MB (BENCHMARKS.md, "Rule text parsing").
const (
	relaxGCAbove   = 256 << 10 // bytes of source; smaller inputs are left alone
	relaxedPercent = 200
)

var gcRelax struct {
	sync.Mutex
	n     int // parses running with the relaxed target
	saved int // the target to restore when the last one ends
}

// relaxGC raises the collector's target for the parse of a source of
// srcLen bytes and returns what restores it. It does nothing for small
// sources, when GOGC is set in the environment (the user chose), or when
// the target already is as high or collection is off.
func relaxGC(srcLen int) (restore func()) {
	if srcLen < relaxGCAbove || os.Getenv("GOGC") != "" {
		return func() {}
	}
	gcRelax.Lock()
	defer gcRelax.Unlock()
	if gcRelax.n == 0 {
		old := debug.SetGCPercent(relaxedPercent)
		if old < 0 || old >= relaxedPercent {
			debug.SetGCPercent(old)
			return func() {}
		}
		gcRelax.saved = old
	}
	gcRelax.n++
	return func() {
		gcRelax.Lock()
		defer gcRelax.Unlock()
		if gcRelax.n--; gcRelax.n == 0 {
			debug.SetGCPercent(gcRelax.saved)
		}
	}
}
