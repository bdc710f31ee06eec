package grammar

import (
	"os"
	"runtime/debug"
	"sync"
)

// Parsing a large file is mostly garbage collection: participle allocates
// some 480 objects (50 KB) per rule that die at once (branch contexts,
// reflection), while the file's tokens and parse tree stay live and are
// rescanned at every cycle. Letting the heap grow to 3x the live data while
// such a file is parsed cut BenchmarkParse10k from 2.16 s to 1.63 s of CPU
// for about 30 % more peak RSS (140 MB instead of 110 MB for `sfunnel -c -f`
// of that file); 5x the live data saved more CPU (1.30 s) but peaked at
// 185 MB, and peak memory is a goal too (BENCHMARKS.md, "Rule text parsing").
// GOGC in the environment overrides this.
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
