package compiler

import (
	"encoding/binary"
	"errors"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// Incremental changes. A rule whose shapes and action body a table segment
// already has can be added to (or removed from) a compiled hook by writing
// its table entries alone: the instructions do not change. The datapath
// keeps the hook's Layout with its state and asks Place for the entries of
// one rule, without compiling the hook again.
//
// For that, priorities and counter slots are not rule positions: the
// datapath gives them (Options.Prios, Options.Slots), sparse priorities
// leave room between two rules, and a rule keeps its slot while it lives.

// Layout is what a compiled hook offers to incremental changes. It is
// stored with the hook's state (JSON), so its fields are explicit.
type Layout struct {
	CtMarkMask uint32          `json:"ct_mark_mask"`
	Needs      LayoutNeeds     `json:"needs"`
	Slots      int             `json:"slots"`  // capacity of the counters map
	Tables     map[string]int  `json:"tables"` // capacity of each hash table (both generations)
	Segments   []SegmentLayout `json:"segments"`
}

// LayoutNeeds is what the parse guard and the fast path read: a new rule
// must need no more.
type LayoutNeeds struct {
	V4     bool                `json:"v4,omitempty"`
	V6     bool                `json:"v6,omitempty"`
	Protos []uint8             `json:"protos,omitempty"` // nil: any protocol
	Sport  bool                `json:"sport,omitempty"`
	Dport  bool                `json:"dport,omitempty"`
	Flags  bool                `json:"flags,omitempty"`
	Saddr  bool                `json:"saddr,omitempty"`
	Daddr  bool                `json:"daddr,omitempty"`
	Dports []grammar.PortRange `json:"dports,omitempty"` // set: packets to other ports leave early
}

// SegmentLayout is one table segment.
type SegmentLayout struct {
	Shapes []ShapeLayout `json:"shapes"`
	Bodies []string      `json:"bodies"` // body keys by body index
	// Terminal: every rule of the segment ends evaluation.
	Terminal bool `json:"terminal"`
}

// ShapeLayout is one shape of a table segment.
type ShapeLayout struct {
	Key   string `json:"key"`
	ID    uint32 `json:"id"`
	Table string `json:"table"`
	Array bool   `json:"array,omitempty"`
	// Shadowed: a key of the shape belongs to two rules (the later one's
	// entry was dropped); removing the earlier rule must restore it, which
	// only a compilation can.
	Shadowed bool `json:"shadowed,omitempty"`
	// Perfect: the shape is in the perfect-hash tables' value (one value
	// per generation): a change rebuilds the shape's table in a copy of
	// the live value (RebuildPerfect).
	Perfect bool `json:"perfect,omitempty"`
	// PerfectLayout: where, for RebuildPerfect (set when Perfect).
	PerfectLayout *PerfectLayout `json:"perfect_layout,omitempty"`
}

func perfectLayoutOf(sh *shape) *PerfectLayout {
	if sh.perfect == nil {
		return nil
	}
	l := sh.perfect.layout()
	l.Shape = sh.id
	return l
}

// Placement says where rule i of a compiled hook is: Segment indexes
// Layout.Segments (-1: rule-by-rule code), Table is whether its matching is
// all table entries (false: a member tested inline, whose code holds it).
type Placement struct {
	Segment int
	Table   bool
}

// prio and slot are rule i's priority and counter slot.
func (c *compiler) prio(i int) uint32 {
	if c.opts.Prios != nil {
		return c.opts.Prios[i]
	}
	return uint32(i) + 1
}

func (c *compiler) slot(i int) uint32 {
	if c.opts.Slots != nil {
		return c.opts.Slots[i]
	}
	return uint32(i)
}

// at is rule i's priority and slot.
func (c *compiler) at(i int) (prio, slot uint32) { return c.prio(i), c.slot(i) }

// slotsUsed is one more than the highest slot of n rules.
func (c *compiler) slotsUsed(n int) int {
	m := n
	for _, s := range c.opts.Slots {
		m = max(m, int(s)+1)
	}
	return m
}

// checkPrios refuses priorities that do not grow with the rules.
func (c *compiler) checkPrios(n int) error {
	if c.opts.Prios != nil && len(c.opts.Prios) != n || c.opts.Slots != nil && len(c.opts.Slots) != n {
		return errors.New("compiler: Prios/Slots do not cover the rules")
	}
	for i, p := range c.opts.Prios {
		if p == 0 || p >= 1<<31 || i > 0 && p <= c.opts.Prios[i-1] {
			return errors.New("compiler: priorities must grow with the rules, from 1 to below 1<<31")
		}
	}
	seen := map[uint32]bool{}
	for _, s := range c.opts.Slots {
		if seen[s] {
			return errors.New("compiler: two rules share a counter slot")
		}
		seen[s] = true
	}
	return nil
}

// Layout returns the hook's layout and where each rule is.
func (p *Program) Layout() (*Layout, []Placement) {
	c := p.c
	n := c.ruleNeeds
	l := &Layout{
		CtMarkMask: c.opts.CtMarkMask,
		Needs: LayoutNeeds{V4: n.v4, V6: n.v6, Protos: n.protos, Sport: n.sport, Dport: n.dport, Flags: n.flags,
			Saddr: n.saddr, Daddr: n.daddr, Dports: n.dports},
		Tables: map[string]int{},
	}
	if m := p.Spec.Maps[CountersMap]; m != nil {
		l.Slots = int(m.MaxEntries)
	}
	for _, name := range p.Tables {
		if m := p.Spec.Maps[name]; m != nil && m.Type == ebpf.Hash {
			l.Tables[name] = int(m.MaxEntries)
		}
	}
	place := make([]Placement, len(c.bodyOf))
	for i := range place {
		place[i].Segment = -1
	}
	for _, seg := range c.segs {
		if seg.inline {
			continue
		}
		sl := SegmentLayout{Terminal: true}
		s := len(l.Segments)
		for i := seg.first; i < seg.first+seg.n; i++ {
			place[i] = Placement{Segment: s, Table: true}
			sl.Terminal = sl.Terminal && terminal(c.rules[i])
		}
		for _, i := range append(slices.Clone(seg.members), seg.linear...) {
			place[i].Table = false
		}
		bodies := map[uint32]string{}
		for _, sh := range seg.shapes {
			sl.Shapes = append(sl.Shapes, ShapeLayout{Key: sh.key, ID: sh.id, Table: sh.table, Array: sh.array, Shadowed: sh.shadowed, Perfect: sh.perfect != nil, PerfectLayout: perfectLayoutOf(sh)})
			for _, en := range sh.ents {
				bodies[c.bodyOf[en.rule]] = c.bodyKeys[en.rule]
			}
		}
		sl.Bodies = make([]string, len(bodies))
		for b, k := range bodies {
			sl.Bodies[b] = k
		}
		l.Segments = append(l.Segments, sl)
	}
	return l, place
}

// ErrNotPlaceable: the rule needs code the hook does not have (a new shape
// or body, a rule that does not end evaluation, a packet the parse guard
// does not read): the hook must be compiled again.
var ErrNotPlaceable = errors.New("rule needs new code")

// Entry is one table entry of a rule.
type Entry struct {
	Table string
	Key   []byte // for generation gen
	Value []byte // abi.TableValue
	// Shadowed: the shape holds keys of several rules (see ShapeLayout).
	Shadowed bool
	// Perfect, for a shape in the perfect-hash value: its table, and Key
	// is the key words after the first (RebuildPerfect's form).
	Perfect *PerfectLayout
}

// Place returns the table entries of rule r in segment seg of l, with
// priority prio and counter slot slot, for table generation gen. An error
// wrapping ErrNotPlaceable means the rule needs new code.
func (l *Layout) Place(r *grammar.Rule, seg int, prio, slot, gen uint32) ([]Entry, error) {
	if seg < 0 || seg >= len(l.Segments) || !terminal(r) || !l.Needs.covers(r) {
		return nil, ErrNotPlaceable
	}
	sl := &l.Segments[seg]
	body := slices.Index(sl.Bodies, bodyKey(r))
	if body < 0 {
		return nil, ErrNotPlaceable
	}
	ct, err := CtMarkLayout(l.CtMarkMask)
	if err != nil {
		return nil, err
	}
	c := &compiler{ct: ct}
	vs, err := c.variants(r)
	if err != nil {
		return nil, err
	}
	if len(vs) == 0 {
		return nil, ErrNotPlaceable
	}
	val := binary.NativeEndian.AppendUint32(nil, prio)
	val = binary.NativeEndian.AppendUint32(val, slot)
	val = binary.NativeEndian.AppendUint32(val, uint32(body))
	var out []Entry
	for _, v := range vs {
		i := slices.IndexFunc(sl.Shapes, func(s ShapeLayout) bool { return s.Key == v.sh.key })
		if i < 0 {
			return nil, ErrNotPlaceable
		}
		sh := &sl.Shapes[i]
		if sh.Perfect {
			if sh.PerfectLayout == nil {
				return nil, ErrNotPlaceable
			}
			for _, k := range v.keys {
				out = append(out, Entry{Table: sh.Table, Key: k, Value: val, Shadowed: sh.Shadowed, Perfect: sh.PerfectLayout})
			}
			continue
		}
		for _, k := range v.keys {
			var key []byte
			if sh.Array {
				key = binary.NativeEndian.AppendUint32(nil, gen&1<<16|binary.NativeEndian.Uint32(k))
			} else {
				key = binary.NativeEndian.AppendUint32(nil, sh.ID<<1|gen&1)
				key = append(key, k...)
			}
			out = append(out, Entry{Table: sh.Table, Key: key, Value: val, Shadowed: sh.Shadowed})
		}
	}
	return out, nil
}

// covers reports whether the parse guard and fast path of a hook with
// needs n read everything rule r matches on.
func (n *LayoutNeeds) covers(r *grammar.Rule) bool {
	rn := (&compiler{}).needs([]*grammar.Rule{r})
	if rn.v4 && !n.V4 || rn.v6 && !n.V6 {
		return false
	}
	if n.Protos != nil && (rn.protos == nil || !slices.Contains(n.Protos, rn.protos[0])) {
		return false
	}
	if rn.sport && !n.Sport || rn.dport && !n.Dport || rn.flags && !n.Flags || rn.saddr && !n.Saddr || rn.daddr && !n.Daddr {
		return false
	}
	if n.Dports != nil {
		if r.Dport == nil || r.Dport.Neg || r.Dport.Set != "" {
			return false
		}
		for _, pr := range r.Dport.Ranges {
			if !slices.ContainsFunc(n.Dports, func(h grammar.PortRange) bool { return h.Lo <= pr.Lo && pr.Hi <= h.Hi }) {
				return false
			}
		}
	}
	return true
}

// PerfectValues returns a lookup in table l of a generation's perfect-hash
// value: the value at a key (in RebuildPerfect's form), if any.
func PerfectValues(blob []byte, l *PerfectLayout) func(key []byte) (abi.TableValue, bool) {
	t := l.table()
	have := map[string]abi.TableValue{}
	str := func(k []uint64) string {
		var b []byte
		for _, c := range k {
			b = binary.NativeEndian.AppendUint64(b, c)
		}
		return string(b)
	}
	if len(blob) >= t.off+t.size {
		for _, en := range t.entries(blob) {
			have[str(en.key)] = en.value
		}
	}
	return func(key []byte) (abi.TableValue, bool) {
		v, ok := have[str(t.chunksOf(key))]
		return v, ok
	}
}
