package compiler

import (
	"maps"

	"github.com/sfunnel/sfunnel/grammar"
)

// Limits of one table segment's bodies: every jump from the dispatch to a
// body and from a body to the segment's end or to the exits before the
// segment must stay within 16-bit offsets (exits come at most stubDistance
// instructions apart otherwise).
const (
	maxGroupBodies    = 2048
	maxGroupBodyInsns = 16000
)

// bodySize emits rule i's body as a table segment would, to count its
// instructions, and then restores the compiler.
func (c *compiler) bodySize(i int, r *grammar.Rule) int {
	e, stats, fresh, info, dyn := c.e, maps.Clone(c.statLabels), c.fresh, c.infoInR1, c.dynRule
	c.e, c.dynRule = emitter{n: e.n}, true
	err := c.body(i, r, "segment_end")
	n := len(c.e.insns)
	c.e, c.statLabels, c.fresh, c.infoInR1, c.dynRule = e, stats, fresh, info, dyn
	if err != nil {
		return 0 // emitting it for real reports the error
	}
	return n
}
