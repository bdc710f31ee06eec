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
	// Scan is the record scan (linear.go); nil when the program has none.
	Scan *ScanLayout `json:"scan,omitempty"`
	// Params: the hook's bodies are shared by action kind and read their
	// values from abi.ActionParams (params.go); body keys are kinds.
	Params bool `json:"params,omitempty"`
	// PrefilterExtra: how many destination port ranges the IPv4 early
	// exit's map takes besides Needs.Dports (prefilter.go; 0: none).
	PrefilterExtra int `json:"prefilter_extra,omitempty"`
	// SegIfindex, SegReturnIfindex: the segmentation device the program
	// redirects to (Options; in its code), 0 when none.
	SegIfindex       int `json:"seg_ifindex,omitempty"`
	SegReturnIfindex int `json:"seg_return_ifindex,omitempty"`
}

// ScanLayout is what PlaceRecord needs of a program's record scan: what
// its callback tests, and where free records are.
type ScanLayout struct {
	Cap  int `json:"cap"`  // records per generation (an immediate in the code)
	Dirs int `json:"dirs"` // directory entries: SegmentLayout.ScanLists per segment with a scan (linear.go)
	// Used: entries of a generation that lists may occupy; a list
	// rewritten incrementally goes after them (both generations agree on
	// everything a directory reaches below Used).
	Used int      `json:"used"`
	Sets []string `json:"sets,omitempty"` // named sets, by index in the callback
	// SetTypes are the types of Sets (a record of an address set takes
	// its family from it).
	SetTypes []grammar.SetType `json:"set_types,omitempty"`
	// Kinds[f] has bit k set when the callback tests kind k of field f
	// (sport, dport, saddr, daddr).
	Kinds [4]uint8 `json:"kinds"`
	Uses  ScanUses `json:"uses"`
	// Tracing: a rule without a terminal action ends its segment (its
	// body runs, it traces); SegDev: bodies that segment do their own
	// counting (fxInScan).
	Tracing bool `json:"tracing,omitempty"`
	SegDev  bool `json:"segdev,omitempty"`
	// Lists: room in the shared list maps (anon.go) for the lists of
	// records added without compiling (PlaceRecordLists).
	Lists *ListsLayout `json:"lists,omitempty"`
}

// ListsLayout says where the shared list maps have room: port range lists
// (linRangesMap), port bitmaps (anon_ports) and address lists (anon_v4,
// anon_v6). Ids are never reused before the hook is compiled again: the
// live generation's records may still name a list a change removes.
type ListsLayout struct {
	Ranges ListSpace `json:"ranges"`
	Ports  ListSpace `json:"ports"`
	V4     ListSpace `json:"v4"`
	V6     ListSpace `json:"v6"`
}

// ListSpace is one list map: Next is the next list id; Cap and Used the
// map's entries (an array: one per id; a trie: one per prefix). Next 0 in
// a trie: the callback has no code for that family's lists.
type ListSpace struct {
	Next uint32 `json:"next"`
	Cap  uint32 `json:"cap"`
	Used uint32 `json:"used"`
}

// ScanUses are the record fields the callback reads.
type ScanUses struct {
	Fam     bool `json:"fam,omitempty"`
	Proto   bool `json:"proto,omitempty"`
	TCP     bool `json:"tcp,omitempty"`
	Meta    bool `json:"meta,omitempty"`
	Ct      bool `json:"ct,omitempty"`
	Count   bool `json:"count,omitempty"`
	SetMark bool `json:"set_mark,omitempty"`
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
	// Scan: 1 + the segment's first directory entry in the record scan
	// (0: the segment has no scan); ScanLists: how many of its entries
	// it uses: 1 (every record in the first list, which every packet
	// reads) or 9 + F*ScanBuckets (lists by family and protocol, and by
	// bucket of F fields, linear.go: entry Scan-1+RecordList(record,
	// ScanLists, ScanBuckets); records that don't end the scan, and set no mark, are
	// in the first list, which is read last). ScanOnly: the segment has no lookups and no
	// inline members; ScanFx: the scan does its terminal records' counter
	// and mark set; ScanMark: the segment writes the scan's mark back.
	// EntriesOnly: every rule of the segment is table entries (no inline
	// members, no scan).
	EntriesOnly bool `json:"entries_only,omitempty"`
	// Tail: the shape of the segment's rules that don't end evaluation,
	// when they are its last rules, all table entries of that one shape
	// ("": none, or not so). A rule of that shape that doesn't end
	// evaluation can go after them (distinct keys of one shape never match
	// one packet, and no rule of the segment comes after it).
	Tail      string `json:"tail,omitempty"`
	Scan      int    `json:"scan,omitempty"`
	ScanLists int    `json:"scan_lists,omitempty"`
	// ScanBuckets: the buckets per indexed field of the segment's lists
	// (linear.go; 0: none, as in layouts stored before them).
	ScanBuckets int  `json:"scan_buckets,omitempty"`
	ScanOnly    bool `json:"scan_only,omitempty"`
	ScanFx      bool `json:"scan_fx,omitempty"`
	ScanMark    bool `json:"scan_mark,omitempty"`
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
		Tables:     map[string]int{},
		Params:     c.params,
		SegIfindex: c.opts.SegIfindex, SegReturnIfindex: c.opts.SegReturnIfindex,
	}
	if c.usesPrefilter {
		l.PrefilterExtra = PrefilterRanges
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
	l.Scan = c.scanLayout()
	dirs := 0
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
		sl.EntriesOnly = len(seg.members) == 0 && len(seg.linear) == 0
		sl.Tail = c.tailShape(seg)
		if len(seg.linear) > 0 {
			// Directory entries follow the order emitLinear meets the
			// segments in.
			dirs++
			sl.Scan, sl.ScanFx = 1+c.lin.dirAt[dirs-1], seg.scanFx
			sl.ScanLists = 1
			if c.lin.grouped[dirs-1] {
				sl.ScanLists, sl.ScanBuckets = len(c.lin.segs[dirs-1]), c.lin.buckets[dirs-1]
			}
			sl.ScanOnly = len(seg.shapes) == 0 && len(seg.members) == 0
			sl.ScanMark = c.lin.marks[dirs-1]
			for _, i := range seg.linear {
				bodies[c.bodyOf[i]] = c.bodyKeys[i]
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

// tailShape is the shape of seg's rules that don't end evaluation when
// they are its last rules and all table entries of that one shape; "":
// none, or not so.
func (c *compiler) tailShape(seg segment) string {
	shapeOf := map[int]string{} // rule → its one shape ("\x00": several)
	for _, sh := range seg.shapes {
		for _, en := range sh.ents {
			if k, ok := shapeOf[en.rule]; ok && k != sh.key {
				shapeOf[en.rule] = "\x00"
			} else {
				shapeOf[en.rule] = sh.key
			}
		}
	}
	tail := ""
	for i := seg.first; i < seg.first+seg.n; i++ {
		if terminal(c.rules[i]) {
			if tail != "" {
				return "" // a rule that ends evaluation after one that doesn't
			}
			continue
		}
		k, ok := shapeOf[i]
		if !ok || k == "\x00" || tail != "" && k != tail || slices.Contains(seg.members, i) || slices.Contains(seg.linear, i) {
			return ""
		}
		tail = k
	}
	return tail
}

// AtTail reports whether rule r goes into segment seg of l only as the
// segment's last rule (Place's caller checks that no rule of the segment
// comes after it): a rule that doesn't end evaluation in a segment of
// several shapes or inline members (SegmentLayout.Tail).
func (l *Layout) AtTail(r *grammar.Rule, seg int) bool {
	if seg < 0 || seg >= len(l.Segments) {
		return false // (Place refuses it)
	}
	sl := &l.Segments[seg]
	return !terminal(r) && !(len(sl.Shapes) == 1 && sl.EntriesOnly)
}

// scanLayout describes the program's record scan (nil: none).
func (c *compiler) scanLayout() *ScanLayout {
	t := c.lin
	if t == nil {
		return nil
	}
	sc := &ScanLayout{Cap: t.cap, Dirs: t.dirEntries(), Used: t.used, Sets: slices.Clone(t.sets),
		Uses:    ScanUses{Fam: t.uses.fam, Proto: t.uses.proto, TCP: t.uses.tcp, Meta: t.uses.meta, Ct: t.uses.ct, Count: t.uses.count, SetMark: t.uses.setMark},
		Tracing: c.tracing, SegDev: c.segDev()}
	for f, kinds := range t.kinds {
		for k, on := range kinds {
			if on {
				sc.Kinds[f] |= 1 << k
			}
		}
	}
	sc.Lists = c.listsLayout()
	for _, name := range t.sets {
		set := c.sets[name]
		if set == nil {
			sc.SetTypes = nil // (PlaceRecord then refuses sets)
			break
		}
		sc.SetTypes = append(sc.SetTypes, set.Type)
	}
	return sc
}

// listsLayout says how full the shared list maps are.
func (c *compiler) listsLayout() *ListsLayout {
	space := func(name string, next uint32) ListSpace {
		m := c.spec.Maps[name]
		if m == nil {
			return ListSpace{Next: next}
		}
		used := uint32(len(m.Contents))
		if m.Type == ebpf.Array {
			used = next
		}
		return ListSpace{Next: next, Cap: m.MaxEntries, Used: used}
	}
	a := &c.anonSets
	return &ListsLayout{
		Ranges: space(linRangesMap, uint32(len(c.lin.ranges))),
		Ports:  space(anonPortsMap, uint32(len(a.ports))),
		V4:     space(anonV4Map, a.next[0]),
		V6:     space(anonV6Map, a.next[1]),
	}
}

// WithNonTerminal returns a copy of l where segment seg holds a rule that
// does not end evaluation.
func (l *Layout) WithNonTerminal(seg int) *Layout {
	c := *l
	c.Segments = slices.Clone(l.Segments)
	c.Segments[seg].Terminal = false
	return &c
}

// WithScanUsed returns a copy of l whose record lists use used entries of
// a generation.
func (l *Layout) WithScanUsed(used int) *Layout {
	c := *l
	sc := *l.Scan
	sc.Used = used
	c.Scan = &sc
	return &c
}

// WithScanLists returns a copy of l whose list maps are as lists says.
func (l *Layout) WithScanLists(lists *ListsLayout) *Layout {
	c := *l
	sc := *l.Scan
	ls := *lists
	sc.Lists = &ls
	c.Scan = &sc
	return &c
}

// Names of the shared address-list maps (ListsLayout.V4, V6).
const (
	AnonV4Map = anonV4Map
	AnonV6Map = anonV6Map
)

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
//
// In a hook with parametric bodies (l.Params) a rule also needs its
// parameter entry, which Place does not return: it refuses the rule;
// PlaceParams returns both.
func (l *Layout) Place(r *grammar.Rule, seg int, prio, slot, gen uint32) ([]Entry, error) {
	if l.Params {
		return nil, ErrNotPlaceable
	}
	ents, _, err := l.PlaceParams(r, seg, prio, slot, gen)
	return ents, err
}

// PlaceParams is Place plus, in a hook with parametric bodies, the rule's
// parameter entry for generation gen (nil in other hooks): Table
// abi.ActionParams, Key ParamsKey(slot, gen), to be written into that
// generation with the table entries.
func (l *Layout) PlaceParams(r *grammar.Rule, seg int, prio, slot, gen uint32) ([]Entry, *Entry, error) {
	ents, err := l.place(r, seg, prio, slot, gen)
	if err != nil || !l.Params {
		return ents, nil, err
	}
	p, err := l.paramsEntry(r, slot, gen)
	if err != nil {
		return nil, nil, err
	}
	return ents, p, nil
}

func (l *Layout) place(r *grammar.Rule, seg int, prio, slot, gen uint32) ([]Entry, error) {
	if seg < 0 || seg >= len(l.Segments) || !l.Needs.covers(r) {
		return nil, ErrNotPlaceable
	}
	sl := &l.Segments[seg]
	// A rule that does not end evaluation (or any rule in a segment of
	// such rules) only in a segment of one shape whose rules are all
	// table entries: distinct keys of one shape never match one packet,
	// so after the one that ran no other rule of the segment could have.
	oneShape := len(sl.Shapes) == 1 && sl.EntriesOnly
	// Or after the segment's last rules, if they are of its shape and
	// don't end evaluation either (Tail; the caller puts it last: AtTail).
	tail := !terminal(r) && sl.Tail != "" && sl.Scan == 0
	if !(terminal(r) && sl.Terminal) && !oneShape && !tail {
		return nil, ErrNotPlaceable
	}
	body := slices.Index(sl.Bodies, (&compiler{params: l.Params}).bodyKeyOf(r))
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
	if len(vs) == 0 || !(terminal(r) && sl.Terminal) && len(vs) != 1 || !oneShape && tail && vs[0].sh.key != sl.Tail {
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
			for _, k := range v.keys.all() {
				out = append(out, Entry{Table: sh.Table, Key: k, Value: val, Shadowed: sh.Shadowed, Perfect: sh.PerfectLayout})
			}
			continue
		}
		for _, k := range v.keys.all() {
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

// PlaceRecord returns the record (linear.go) of rule r in the record scan
// of segment seg of l, with priority prio and counter slot slot: for a
// rule no table of the segment holds. The callback must already test what
// the record asks, the segment's dispatch must have the rule's body, and
// lists past a record's own fields (range lists, address lists, port
// bitmaps) are refused: they live in maps of the program's own. An error
// wrapping ErrNotPlaceable means the rule needs new code. In a hook with
// parametric bodies (l.Params) the rule would need its parameter entry
// too: refused.
func (l *Layout) PlaceRecord(r *grammar.Rule, seg int, prio, slot uint32) ([]byte, error) {
	if l.Params {
		return nil, ErrNotPlaceable
	}
	rec, _, err := l.PlaceRecordParams(r, seg, prio, slot, 0)
	return rec, err
}

// PlaceRecordParams is PlaceRecord plus, in a hook with parametric bodies,
// the rule's parameter entry for generation gen (nil in other hooks), as
// PlaceParams: the winner's body reads it by the record's counter slot.
func (l *Layout) PlaceRecordParams(r *grammar.Rule, seg int, prio, slot, gen uint32) ([]byte, *Entry, error) {
	rec, p, _, err := l.PlaceRecordLists(r, seg, prio, slot, gen, nil)
	return rec, p, err
}

// PlaceRecordLists is PlaceRecordParams for a rule whose matches may need
// lists in the shared list maps (port range lists, port bitmaps, address
// lists): they take fresh ids from lists (nil: such a rule is refused),
// which it advances, and lists are their maps' new entries (Table the
// map, Key and Value its entry), to be written before the record goes
// live. The callback must already test that kind of list.
func (l *Layout) PlaceRecordLists(r *grammar.Rule, seg int, prio, slot, gen uint32, lists *ListsLayout) (rec []byte, param *Entry, listEntries []Entry, err error) {
	rec, listEntries, err = l.placeRecord(r, seg, prio, slot, lists)
	if err != nil || !l.Params {
		return rec, nil, listEntries, err
	}
	p, err := l.paramsEntry(r, slot, gen)
	if err != nil {
		return nil, nil, nil, err
	}
	return rec, p, listEntries, nil
}

func (l *Layout) placeRecord(r *grammar.Rule, seg int, prio, slot uint32, lists *ListsLayout) ([]byte, []Entry, error) {
	sc := l.Scan
	if sc == nil || seg < 0 || seg >= len(l.Segments) || l.Segments[seg].Scan == 0 || !l.Needs.covers(r) || lists == nil && !recordFits(r) {
		return nil, nil, ErrNotPlaceable
	}
	sl := &l.Segments[seg]
	ct, err := CtMarkLayout(l.CtMarkMask)
	if err != nil {
		return nil, nil, err
	}
	c := &compiler{ct: ct, tracing: sc.Tracing, params: l.Params, opts: Options{Prios: []uint32{prio}, Slots: []uint32{slot}},
		lin: &linearTable{sets: slices.Clone(sc.Sets)}, spec: &ebpf.CollectionSpec{Maps: map[string]*ebpf.MapSpec{}}}
	if lists != nil {
		// New lists take ids after the maps' (no sharing with theirs).
		c.lin.ranges = make([][]byte, lists.Ranges.Next)
		c.anonSets.ports = make([][]byte, lists.Ports.Next)
		c.anonSets.next = [2]uint32{lists.V4.Next, lists.V6.Next}
	}
	// The named sets the callback tests, by their types: a record of one
	// of them is its index in the callback's switch (another set needs
	// code).
	if len(sc.SetTypes) == len(sc.Sets) {
		c.sets = map[string]*grammar.Set{}
		for i, name := range sc.Sets {
			c.sets[name] = &grammar.Set{Name: name, Type: sc.SetTypes[i]}
		}
	}
	if sc.SegDev {
		c.opts.SegIfindex, c.opts.SegReturnIfindex, c.opts.Hook = 1, 1, grammar.HookEgress
	}
	fx, body := false, 0
	if terminal(r) {
		// Its body runs from the segment's dispatch.
		fx = sl.ScanFx && c.fxInScan(r)
		key := c.bodyKeyOf(r)
		if fx {
			key = c.scanBodyKey(r)
		}
		if body = slices.Index(sl.Bodies, key); body < 0 {
			return nil, nil, ErrNotPlaceable
		}
	} else if sc.Tracing || !sl.ScanOnly {
		// The scan does its counter and mark set and goes on, which only
		// a segment of records alone allows (classify); a hook that
		// traces runs its body.
		return nil, nil, ErrNotPlaceable
	}
	c.bodyOf = []uint32{uint32(body)}
	rec, err := c.record(r, 0, fx)
	if err != nil {
		return nil, nil, err
	}
	if sl.ScanLists > 1 && sequential(nativeU32(rec[recFlags:])) {
		// A mark set that later records may test: the segment's records
		// must be one list in rule order (linscan.go).
		return nil, nil, ErrNotPlaceable
	}
	t := c.lin
	uses := ScanUses{Fam: t.uses.fam, Proto: t.uses.proto, TCP: t.uses.tcp, Meta: t.uses.meta, Ct: t.uses.ct, Count: t.uses.count, SetMark: t.uses.setMark}
	if !sc.Uses.covers(uses) || len(t.sets) != len(sc.Sets) || lists == nil && len(t.ranges) > 0 {
		return nil, nil, ErrNotPlaceable
	}
	for f, kinds := range t.kinds {
		for k, on := range kinds {
			if on && k != kindNone && sc.Kinds[f]&(1<<k) == 0 {
				return nil, nil, ErrNotPlaceable
			}
		}
	}
	if nativeU32(rec[recFlags:])&recSetMark != 0 && !sl.ScanMark {
		return nil, nil, ErrNotPlaceable // the segment does not write the scan's mark back
	}
	var ents []Entry
	if lists != nil {
		if ents, err = c.newLists(lists); err != nil {
			return nil, nil, err
		}
	}
	return rec, ents, nil
}

// newLists returns the entries of the lists c made after the ids lists
// had, and advances lists past them; ErrNotPlaceable when a map has no
// room, or the callback no code for a family's lists.
func (c *compiler) newLists(lists *ListsLayout) ([]Entry, error) {
	var out []Entry
	next := *lists
	key := func(id uint32) []byte { return binary.NativeEndian.AppendUint32(nil, id) }
	for id := lists.Ranges.Next; id < uint32(len(c.lin.ranges)); id++ {
		out = append(out, Entry{Table: linRangesMap, Key: key(id), Value: c.lin.ranges[id]})
		next.Ranges.Next, next.Ranges.Used = id+1, id+1
	}
	for id := lists.Ports.Next; id < uint32(len(c.anonSets.ports)); id++ {
		out = append(out, Entry{Table: anonPortsMap, Key: key(id), Value: c.anonSets.ports[id]})
		next.Ports.Next, next.Ports.Used = id+1, id+1
	}
	for f, name := range []string{anonV4Map, anonV6Map} {
		sp := []*ListSpace{&next.V4, &next.V6}[f]
		seen := map[string]bool{}
		for i, p := range c.anonSets.prefixes[f] {
			if sp.Next == 0 {
				return nil, ErrNotPlaceable // (the callback has no code for this family's lists)
			}
			k := anonKey(p, c.anonSets.ids[f][i])
			if !seen[string(k)] {
				seen[string(k)] = true
				out = append(out, Entry{Table: name, Key: k, Value: []byte{1}})
				sp.Used++
			}
		}
		sp.Next = c.anonSets.next[f]
	}
	for _, sp := range []ListSpace{next.Ranges, next.Ports, next.V4, next.V6} {
		if sp.Used > sp.Cap {
			return nil, ErrNotPlaceable // no room: a compilation lays the maps out again
		}
	}
	*lists = next
	return out, nil
}

// recordFits reports whether rule r's record holds all its matches: no
// address or port list that would need an entry in a shared map (a named
// set is checked against the sets the callback has).
func recordFits(r *grammar.Rule) bool {
	for _, m := range []*grammar.AddrMatch{r.Saddr, r.Daddr} {
		if m != nil && m.Set == "" && len(m.Prefixes) != 1 {
			return false
		}
	}
	for _, m := range []*grammar.PortMatch{r.Sport, r.Dport} {
		if m != nil && m.Set == "" && len(m.Ranges) > recRanges {
			return false
		}
	}
	return true
}

// covers reports whether a callback reading u's fields reads v's.
func (u ScanUses) covers(v ScanUses) bool {
	return (u.Fam || !v.Fam) && (u.Proto || !v.Proto) && (u.TCP || !v.TCP) && (u.Meta || !v.Meta) &&
		(u.Ct || !v.Ct) && (u.Count || !v.Count) && (u.SetMark || !v.SetMark)
}

// Terminal reports whether rule r ends evaluation.
func Terminal(r *grammar.Rule) bool { return terminal(r) }

// RecordSize is the size of a record; RecordPrio and RecordSlot read a
// record's priority (in a directory entry: its list's first index) and
// counter slot.
const RecordSize = recSize

func RecordPrio(rec []byte) uint32 { return nativeU32(rec[recPrio:]) }

// RecordOfRule reports whether rec is one rule's record (its slot is the
// rule's counter slot), not a shape record (shapescan.go), whose slot is a
// shape id.
func RecordOfRule(rec []byte) bool { return nativeU32(rec[recFlags:])&recShape == 0 }
func RecordSlot(rec []byte) uint32 { return nativeU32(rec[recSlot:]) }

// RecordWithPrio returns a copy of record rec with priority prio.
func RecordWithPrio(rec []byte, prio uint32) []byte {
	out := slices.Clone(rec)
	binary.NativeEndian.PutUint32(out[recPrio:], prio)
	return out
}

// DirectoryEntry is a directory entry pointing at index first.
func DirectoryEntry(first uint32) []byte {
	b := make([]byte, recSize)
	binary.NativeEndian.PutUint32(b[recPrio:], first)
	return b
}

// RecordMap is the name of the record scan's map.
const RecordMap = linearMap

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

// PerfectTableValues returns the values of table l in a generation's
// perfect-hash value (for checks of what the maps hold).
func PerfectTableValues(blob []byte, l *PerfectLayout) []abi.TableValue {
	t := l.table()
	if len(blob) < t.off+t.size {
		return nil
	}
	var out []abi.TableValue
	for _, en := range t.entries(blob) {
		if en.value.Prio != 0 { // (an empty slot)
			out = append(out, en.value)
		}
	}
	return out
}

// PerfectValues returns a lookup in table l of a generation's perfect-hash
// value: the value at a key (in RebuildPerfect's form), if any. Each
// lookup hashes its key as the program does (LookupPerfect), so no index
// of the table's entries is built.
func PerfectValues(blob []byte, l *PerfectLayout) func(key []byte) (abi.TableValue, bool) {
	return func(key []byte) (abi.TableValue, bool) { return LookupPerfect(blob, l, key) }
}

// paramsEntry is rule r's parameter entry for generation gen, keyed by its
// counter slot: what PlaceParams and PlaceRecordParams add to their entries.
func (l *Layout) paramsEntry(r *grammar.Rule, slot, gen uint32) (*Entry, error) {
	ct, err := CtMarkLayout(l.CtMarkMask)
	if err != nil {
		return nil, err
	}
	v, err := (&compiler{ct: ct}).paramsOf(r)
	if err != nil {
		return nil, err
	}
	return &Entry{Table: paramsMap, Key: ParamsKey(slot, gen), Value: v}, nil
}
