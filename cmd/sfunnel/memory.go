package main

import (
	"math"
	"os"
	"runtime/debug"
	"strings"

	"github.com/sfunnel/sfunnel/grammar"
)

// limitMemory bounds the heap of a ruleset file that replaces the live
// ruleset (it starts with `flush ruleset`), from the size of its text.
//
// With the collector's default target the heap may grow to twice what was
// live at the last collection, and when that collection fell inside the
// compiler's peak the peak RSS of `sfunnel -f` on 10 000 rules varied from
// 62 to 101 MB between runs of the same file (nft: 48-53 MB). What such a
// batch keeps live grows with its text: about 12 MB plus 30 bytes per byte
// of rules (measured for 10 000 and 100 000 rules), since it reads nothing
// of the rules it replaces. A soft limit of 1.6 times that, and never
// under 48 MiB, made the collector run before the heap doubled and no more
// often than without it at 10 000 rules (7 collections either way; peak
// RSS 58-62 MB). Past 2 MiB of text (some 35 000 rules) the limit is left
// off: at 100 000 rules the same limit cost 25-45 % more CPU (collections
// of a 180 MB live heap). GOMEMLIMIT, when set, is the user's choice.
//
// Under the limit the heap's growth no longer paces the collector (GOGC
// off, unless GOGC is set): with both, the collector ran 5 times on
// bench/control's 10 000-rule files, the first ones at 10 and 20 MB, and
// marked 75-90 MB in all; with the limit alone it runs 2-3 times, marking
// 40-75 MB, for the same peak RSS (59-62 MB). Past the limit both behave
// alike (the limit sets the goal).
//
// limitMemoryEarly sets the limit before the parse when the text reads as
// such a file, so the parse runs under it too (with GOGC=100 the collector
// ran twice during the parse, at 5 and 10 MB); limitMemory then sets it
// from every source the parse read, or takes it back.
func limitMemory(cmds []*grammar.Command, srcs grammar.Sources) {
	if os.Getenv("GOMEMLIMIT") != "" {
		return
	}
	n := 0
	for _, text := range srcs {
		n += len(text)
	}
	if len(cmds) == 0 || cmds[0].Kind != grammar.CmdFlushRuleset || n > 2<<20 {
		if limitedEarly {
			debug.SetMemoryLimit(math.MaxInt64)
			setGCPercent(100)
			limitedEarly = false
		}
		return
	}
	setMemoryLimit(n)
}

// limitedEarly: limitMemoryEarly set the limit.
var limitedEarly bool

// limitMemoryEarly is limitMemory before the parse, from the text alone
// (see limitMemory). A text that may include others is left to
// limitMemory: the limit would be set from this text's size alone, and
// the parse could outgrow it.
func limitMemoryEarly(text string) {
	if os.Getenv("GOMEMLIMIT") != "" || len(text) > 2<<20 || !startsWithFlush(text) || strings.Contains(text, "include") {
		return
	}
	setMemoryLimit(len(text))
	limitedEarly = true
}

// setMemoryLimit sets the limit for n bytes of rules, and GOGC off.
func setMemoryLimit(n int) {
	debug.SetMemoryLimit(max(48<<20, (12<<20+30*int64(n))*8/5))
	setGCPercent(-1)
}

// setGCPercent sets GOGC unless the user did.
func setGCPercent(p int) {
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(p)
	}
}

// startsWithFlush reports whether the first statement of text, after
// blank lines and comments, is `flush ruleset` (as the parse will tell:
// a text it misreads is put right by limitMemory).
func startsWithFlush(text string) bool {
	for {
		text = strings.TrimLeft(text, " \t\r\n;")
		if !strings.HasPrefix(text, "#") {
			break
		}
		if i := strings.IndexByte(text, '\n'); i >= 0 {
			text = text[i:]
		} else {
			return false
		}
	}
	rest, ok := strings.CutPrefix(text, "flush")
	if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '\t') {
		return false
	}
	rest, ok = strings.CutPrefix(strings.TrimLeft(rest, " \t"), "ruleset")
	return ok && (rest == "" || strings.IndexByte(" \t\r\n;#", rest[0]) >= 0)
}
