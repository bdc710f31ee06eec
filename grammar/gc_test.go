package grammar

import (
	"runtime/debug"
	"testing"
)

func gcPercent() int {
	p := debug.SetGCPercent(100)
	debug.SetGCPercent(p)
	return p
}

// TestRelaxGC: a large parse raises the collector's target while it runs,
// overlapping parses restore it once the last ends, and small sources, a
// user's GOGC and collection turned off are left alone.
func TestRelaxGC(t *testing.T) {
	t.Setenv("GOGC", "")
	defer debug.SetGCPercent(debug.SetGCPercent(100))

	small := relaxGC(relaxGCAbove - 1)
	if p := gcPercent(); p != 100 {
		t.Fatalf("small source: GC percent %d, want 100", p)
	}
	small()

	first := relaxGC(relaxGCAbove)
	second := relaxGC(relaxGCAbove)
	if p := gcPercent(); p != relaxedPercent {
		t.Fatalf("during a large parse: GC percent %d, want %d", p, relaxedPercent)
	}
	first()
	if p := gcPercent(); p != relaxedPercent {
		t.Fatalf("one of two parses done: GC percent %d, want %d", p, relaxedPercent)
	}
	second()
	if p := gcPercent(); p != 100 {
		t.Fatalf("after the parses: GC percent %d, want 100 back", p)
	}

	debug.SetGCPercent(-1)
	relaxGC(relaxGCAbove)()
	if p := gcPercent(); p != -1 {
		t.Fatalf("collection off: GC percent %d, want it left off", p)
	}
	debug.SetGCPercent(100)

	t.Setenv("GOGC", "100")
	user := relaxGC(relaxGCAbove)
	if p := gcPercent(); p != 100 {
		t.Fatalf("GOGC set: GC percent %d, want it left at 100", p)
	}
	user()
}
