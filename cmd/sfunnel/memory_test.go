package main

import (
	"math"
	"os"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
)

// The memory limit is set for a file that replaces the ruleset, from the
// size of its text, and for nothing else.
func TestLimitMemory(t *testing.T) {
	if os.Getenv("GOMEMLIMIT") != "" {
		t.Skip("GOMEMLIMIT is set: limitMemory leaves it")
	}
	defer debug.SetMemoryLimit(math.MaxInt64)
	limit := func(text string) int64 {
		t.Helper()
		debug.SetMemoryLimit(math.MaxInt64)
		cmds, srcs, err := grammar.Parse("f", text, nil)
		if err != nil {
			t.Fatal(err)
		}
		limitMemory(cmds, srcs)
		return debug.SetMemoryLimit(-1)
	}
	rules := strings.Repeat("\t\tudp dport 4739 counter actions drop\n", 30000)
	big := "flush ruleset\ninterface vb {\n\tingress {\n" + rules + "\t}\n}\n"
	if got, want := limit(big), int64(12<<20+30*len(big))*8/5; got != want {
		t.Errorf("limit for %d bytes: %d, want %d", len(big), got, want)
	}
	if got := limit("flush ruleset\n"); got != 48<<20 {
		t.Errorf("limit for a small file: %d, want 48 MiB", got)
	}
	if got := limit("interface vb {\n\tingress {\n" + rules + "\t}\n}\n"); got != math.MaxInt64 {
		t.Errorf("a file that adds to the live rules got a limit (%d)", got)
	}
	if got := limit(big + strings.Repeat("# "+strings.Repeat("x", 1000)+"\n", 2100)); got != math.MaxInt64 {
		t.Errorf("a file over 2 MiB got a limit (%d)", got)
	}
}
