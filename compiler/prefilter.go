package compiler

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// The IPv4 fast path's early exit (program.go, fastV4) lets through the
// destination ports the rules want, as immediates; a packet to another
// port leaves at once. So that a rule for a port outside them can be
// added without compiling, a packet the immediates let leave first looks
// at a few more ranges, in a map of the program's own (PrefilterMap):
// {u32 count; count × {u16 lo, u16 hi}} in native order. Only packets
// that would leave pay for it: three instructions while the map is empty.
//
// The map is not double-buffered: the early exit only has to let through
// at least the ports the live rules want, so a change adds its ranges
// (the ranges first, then the count) before the flip, a delete leaves
// them, and the next compilation folds them into the immediates.
const (
	PrefilterMap    = "prefilter"
	PrefilterRanges = 4
)

// prefilterExtra emits the early exit's second chance: the destination
// port ranges added since the compilation (prefilter.go), read from a map
// only by packets the immediates let leave. R4 holds the port (in network
// order when net); R1-R3 are the context and packet pointers fast_v4 takes.
func (c *compiler) prefilterExtra(net bool) {
	e := &c.e
	c.usesPrefilter = true
	// (Fixed labels: the code is emitted once, and the listing's numbered
	// labels after it stay as they were.)
	const miss = "prefilter_miss"
	e.comment("destination ports added without compiling (%s)", PrefilterMap)
	e.emit(
		asm.LoadMapValue(asm.R5, 0, 0).WithReference(PrefilterMap),
		ldx(asm.R0, asm.R5, 0, asm.Word),
		asm.JEq.Imm(asm.R0, 0, miss),
	)
	if net {
		e.emit(asm.HostTo(asm.BE, asm.R4, asm.Half))
	}
	for k := 0; k < PrefilterRanges; k++ {
		next := fmt.Sprintf("prefilter_%d", k+1)
		if k == PrefilterRanges-1 {
			next = miss
		}
		if k > 0 {
			e.emit(
				ldx(asm.R0, asm.R5, 0, asm.Word), // the count again
				asm.JLE.Imm(asm.R0, int32(k), miss),
			)
		}
		e.emit(
			ldx(asm.R0, asm.R5, int16(4+4*k), asm.Half),
			asm.JLT.Reg(asm.R4, asm.R0, next),
			ldx(asm.R0, asm.R5, int16(6+4*k), asm.Half),
			asm.JLE.Reg(asm.R4, asm.R0, "fast_v4"),
		)
		if k < PrefilterRanges-1 {
			e.label(next)
		}
	}
	e.label(miss)
}

// prefilterMap adds the early exit's map when the program reads it.
func (c *compiler) prefilterMap() {
	if !c.usesPrefilter {
		return
	}
	c.spec.Maps[PrefilterMap] = &ebpf.MapSpec{Name: PrefilterMap, Type: ebpf.Array, KeySize: 4, ValueSize: 4 + 4*PrefilterRanges, MaxEntries: 1}
}

// PrefilterValue is the map's value holding ranges (at most
// PrefilterRanges).
func PrefilterValue(ranges []grammar.PortRange) []byte {
	v := binary.NativeEndian.AppendUint32(nil, uint32(len(ranges)))
	for _, r := range ranges {
		v = binary.NativeEndian.AppendUint16(v, r.Lo)
		v = binary.NativeEndian.AppendUint16(v, r.Hi)
	}
	return append(v, make([]byte, 4+4*PrefilterRanges-len(v))...)
}

// PrefilterRangesOf reads the ranges of a value of the map.
func PrefilterRangesOf(v []byte) []grammar.PortRange {
	if len(v) < 4 {
		return nil
	}
	n := min(int(binary.NativeEndian.Uint32(v)), (len(v)-4)/4)
	out := make([]grammar.PortRange, n)
	for k := range out {
		out[k] = grammar.PortRange{Lo: binary.NativeEndian.Uint16(v[4+4*k:]), Hi: binary.NativeEndian.Uint16(v[6+4*k:])}
	}
	return out
}

// PrefilterMisses returns the destination port ranges of rules that the
// early exit of a hook with needs n does not let through (merged); ok is
// false when a rule has no positive port list (the early exit would have
// to go: a compilation).
func (n *LayoutNeeds) PrefilterMisses(rules []*grammar.Rule) (miss []grammar.PortRange, ok bool) {
	if n.Dports == nil {
		return nil, true
	}
	for _, r := range rules {
		if r.Dport == nil || r.Dport.Neg || r.Dport.Set != "" {
			return nil, false
		}
		for _, pr := range r.Dport.Ranges {
			if !slices.ContainsFunc(n.Dports, func(h grammar.PortRange) bool { return h.Lo <= pr.Lo && pr.Hi <= h.Hi }) {
				miss = append(miss, pr)
			}
		}
	}
	return mergeRanges(miss), true
}

// WithDports returns a copy of l whose early exit lets ranges through too.
func (l *Layout) WithDports(ranges []grammar.PortRange) *Layout {
	c := *l
	c.Needs.Dports = mergeRanges(append(slices.Clone(l.Needs.Dports), ranges...))
	return &c
}
