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
// size of its text, and for nothing else; under it, the collector is paced
// by the limit alone (GOGC off).
func TestLimitMemory(t *testing.T) {
	if os.Getenv("GOMEMLIMIT") != "" || os.Getenv("GOGC") != "" {
		t.Skip("GOMEMLIMIT or GOGC is set: limitMemory leaves them")
	}
	defer debug.SetMemoryLimit(math.MaxInt64)
	defer debug.SetGCPercent(100)
	// limit returns the memory limit and GOGC that limitMemory sets.
	limit := func(text string) (int64, int) {
		t.Helper()
		debug.SetMemoryLimit(math.MaxInt64)
		debug.SetGCPercent(100)
		cmds, srcs, err := grammar.Parse("f", text, nil)
		if err != nil {
			t.Fatal(err)
		}
		limitMemory(cmds, srcs)
		return debug.SetMemoryLimit(-1), debug.SetGCPercent(100)
	}
	rules := strings.Repeat("\t\tudp dport 4739 counter actions drop\n", 30000)
	big := "flush ruleset\ninterface vb {\n\tingress {\n" + rules + "\t}\n}\n"
	if got, gc := limit(big); got != int64(12<<20+30*len(big))*8/5 || gc != -1 {
		t.Errorf("limit for %d bytes: %d, GOGC %d; want %d, off", len(big), got, gc, int64(12<<20+30*len(big))*8/5)
	}
	if got, gc := limit("flush ruleset\n"); got != 48<<20 || gc != -1 {
		t.Errorf("limit for a small file: %d, GOGC %d; want 48 MiB, off", got, gc)
	}
	if got, gc := limit("interface vb {\n\tingress {\n" + rules + "\t}\n}\n"); got != math.MaxInt64 || gc != 100 {
		t.Errorf("a file that adds to the live rules got a limit (%d) or GOGC %d", got, gc)
	}
	if got, gc := limit(big + strings.Repeat("# "+strings.Repeat("x", 1000)+"\n", 2100)); got != math.MaxInt64 || gc != 100 {
		t.Errorf("a file over 2 MiB got a limit (%d) or GOGC %d", got, gc)
	}
	// Before the parse: the text's first statement, read as the parse
	// would; after it, limitMemory keeps the limit only where it belongs.
	for text, want := range map[string]bool{
		"flush ruleset\n": true, "# a comment\n\n  flush   ruleset # again\n": true, ";flush ruleset;": true, "flush ruleset": true,
		"flush rulesets\n": false, "flushruleset\n": false, "flush interface vb\n": false, "udp dport 1 drop\nflush ruleset\n": false,
		"# only a comment": false, "": false,
	} {
		if got := startsWithFlush(text); got != want {
			t.Errorf("startsWithFlush(%q) = %v", text, got)
		}
	}
	early := func(text, parsed string) (int64, int) {
		t.Helper()
		debug.SetMemoryLimit(math.MaxInt64)
		debug.SetGCPercent(100)
		limitMemoryEarly(text)
		if got := debug.SetMemoryLimit(-1); (got != math.MaxInt64) != (startsWithFlush(text) && !strings.Contains(text, "include")) {
			t.Errorf("limit before parsing %.20q: %d", text, got)
		}
		cmds, srcs, err := grammar.Parse("f", parsed, nil)
		if err != nil {
			t.Fatal(err)
		}
		limitMemory(cmds, srcs)
		return debug.SetMemoryLimit(-1), debug.SetGCPercent(100)
	}
	if got, gc := early(big, big); got != int64(12<<20+30*len(big))*8/5 || gc != -1 {
		t.Errorf("limit for %d bytes, set early: %d, GOGC %d", len(big), got, gc)
	}
	// (A text misread before the parse: the parse decides.)
	// (Not before the parse of a text that may include others.)
	if got, gc := early("flush ruleset\ninclude \"/nonexistent/*.conf\"\n", "flush ruleset\n"); got != 48<<20 || gc != -1 {
		t.Errorf("limit for a file with an include, set after the parse: %d, GOGC %d", got, gc)
	}
	if got, gc := early(big, "interface vb {\n\tingress {\n"+rules+"\t}\n}\n"); got != math.MaxInt64 || gc != 100 {
		t.Errorf("an early limit was kept for a file that adds to the live rules: %d, GOGC %d", got, gc)
	}
}
