package datapath

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/faults"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Incremental rule changes. `add/insert/replace/delete rule` on a hook
// whose compiled program already has the rule's shapes and action body
// (compiler.Layout) write that rule's table entries and nothing else: no
// compilation, no program load, O(change) map updates.
//
// Priorities are sparse (prioGap apart when assigned afresh), so a rule
// inserted between two others takes a priority between theirs; counter
// slots belong to a rule for its life (a deleted rule frees its slot, no
// other rule's counter moves). When two neighbours leave no priority
// between them, or the change needs new code, the hook is compiled again
// (the full path), which assigns priorities afresh where needed.
//
// The entries go into the spare table generation, which the program does
// not read, and the commit's roll-forward flips the control map: a packet
// sees the old rules or the new ones. To keep that O(change), the spare
// generation must be known: every hook's state record says which keys its
// spare generation differs from the live one by (spareRecord, the previous
// commit's change). Before a writer touches a spare generation it marks
// the namespace's tables dirty (bpf.Store.MarkTablesDirty); a writer that
// finds the mark (an earlier writer died or failed before its commit
// point, its scribbles left in a spare generation) rebuilds the spare
// generations it patches from the live ones, forgets what it knew of the
// others, and clears the mark once its own commit is published.

// prioGap is the distance between priorities assigned afresh: 14 inserts
// at one place before the hook is compiled again.
const prioGap = 1 << 14

// maxPatch is the most rules one incremental change adds and removes.
const maxPatch = 256

// tableMap is the map of table name (a layout's name) that holds
// generation gen: the perfect-hash tables have a map per generation
// (abi.PerfectGen), the other tables hold both generations. Nil when the
// hook has no such map.
func tableMap(h *bpf.Hook, name string, gen uint32) *ebpf.Map {
	if name == abi.PerfectTables {
		return h.Maps[abi.PerfectGen(gen)]
	}
	return h.Maps[name]
}

// spareRecord says how a hook's spare table generation differs from its
// live one: at the keys the last commit changed (table name → keys in
// their generation-0 form, hex). A hook without one has an unknown spare.
type spareRecord struct {
	Delta map[string][]string `json:"delta"`
}

// hookPatch is a hook changed by table entries only.
type hookPatch struct {
	hs  hookState
	gen uint32 // the table generation to switch to
}

// patchHook tries to make rules the rules of hook oh by writing table
// entries into the spare generation of cur's program. It returns nil, and
// no error, when the change needs a compilation; an error when a map
// operation failed (the spare generation is dirty then, and marked so).
//
// seg gives the hook's segmentation device when its rules need one (the
// commit keeps it); nil: they need none.
//
// rs is the ruleset rules belong to: rules kept from an outline load are
// placeholders (outline.go), parsed here when their entries are needed.
func (b *Backend) patchHook(s *bpf.Store, cur *bpf.Gen, oh *hookState, rs *ruleset.Ruleset, rules []*grammar.Rule, ctMask uint32, dirty bool, seg func() (tx, rx int, err error)) (*hookPatch, error) {
	l := oh.Layout
	if l == nil || cur == nil || l.CtMarkMask != ctMask || len(oh.Rules) == 0 {
		return nil, nil
	}
	if seg != nil {
		// The program redirects TCP segments to the device whose index is
		// in its code: the same device, or a compilation.
		tx, rx, err := seg()
		if err != nil || tx == 0 || tx != l.SegIfindex || rx != l.SegReturnIfindex {
			return nil, err
		}
	} else if l.SegIfindex != 0 {
		return nil, nil // the device goes: a compilation
	}
	oldAt := make(map[uint64]int, len(oh.Rules))
	for i, r := range oh.Rules {
		if r.Prio == 0 {
			return nil, nil // written by an sfunnel without sparse priorities
		}
		oldAt[r.Handle] = i
	}
	// Survivors keep their records; the rest is added or removed.
	recs := make([]ruleRecord, len(rules))
	kept := make([]bool, len(rules))
	keptOld := make([]bool, len(oh.Rules)) // by index in oh.Rules
	changes := 0
	for i, r := range rules {
		if j, ok := oldAt[r.Handle]; ok && b.sameRule(r, &oh.Rules[j]) {
			recs[i], kept[i], keptOld[j] = oh.Rules[j], true, true
			continue
		}
		if changes++; changes > maxPatch {
			return nil, nil
		}
	}
	var removed []ruleRecord
	for j, r := range oh.Rules {
		if !keptOld[j] {
			removed = append(removed, r)
			if changes++; changes > maxPatch {
				return nil, nil
			}
		}
	}
	if changes == 0 {
		return nil, nil
	}

	// Entries to remove (generation-0 keys).
	var dels []entry
	delKey := map[string]bool{}
	// Records of the record scan, by segment (scanpatch.go).
	edits := map[int]*scanEdit{}
	editOf := func(seg int) *scanEdit {
		if edits[seg] == nil {
			sl := &l.Segments[seg-1]
			edits[seg] = &scanEdit{first: sl.Scan - 1, lists: max(sl.ScanLists, 1), buckets: sl.ScanBuckets, del: map[uint32]bool{}, prio: map[uint32]uint32{}}
		}
		return edits[seg]
	}
	for _, rec := range removed {
		if rec.Segment == 0 || rec.Segment > len(l.Segments) {
			return nil, nil // its code is in the program
		}
		if !rec.Table {
			if l.Segments[rec.Segment-1].Scan == 0 {
				return nil, nil // a member: its code is in the program
			}
			editOf(rec.Segment).del[rec.Slot] = true // (planScan checks it is a record)
			continue
		}
		r := b.ruleOf(rec, rs)
		if r == nil {
			return nil, nil
		}
		ents, _, err := l.PlaceParams(r, rec.Segment-1, rec.Prio, rec.Slot, 0)
		if err != nil {
			return nil, nil
		}
		for _, en := range ents {
			c := en.Shadowed || slices.Contains(oh.Contested, en.Table+"/"+hex.EncodeToString(en.Key))
			dels = append(dels, entry{table: en.Table, key: en.Key, perfect: en.Perfect, contested: c, prio: rec.Prio, seg: rec.Segment})
			delKey[en.Table+string(en.Key)] = true
		}
	}

	// Rules to add: a priority between their neighbours', a free slot, a
	// segment of a neighbour that has their shapes and body.
	nslots := l.Slots // (a slice: a map of ten thousand slots cost more)
	for _, r := range oh.Rules {
		nslots = max(nslots, int(r.Slot)+1)
	}
	used := make([]bool, nslots)
	for _, r := range oh.Rules {
		used[r.Slot] = true // slots freed now are reused by a later commit
	}
	nextFree := uint32(0)
	allocSlot := func() (uint32, bool) {
		for ; int(nextFree) < l.Slots; nextFree++ {
			if !used[nextFree] {
				used[nextFree] = true
				return nextFree, true
			}
		}
		return 0, false
	}
	// The next rule that keeps its priority (kept, or replaced in place:
	// its record holds the old priority and segment until it is placed).
	nextKept := make([]int, len(rules)+1)
	nextKept[len(rules)] = -1
	for i := len(rules) - 1; i >= 0; i-- {
		nextKept[i] = nextKept[i+1]
		if j, ok := oldAt[rules[i].Handle]; ok && !kept[i] {
			recs[i].Prio, recs[i].Segment = oh.Rules[j].Prio, oh.Rules[j].Segment
		}
		if kept[i] || recs[i].Prio != 0 {
			nextKept[i] = i
		}
	}
	var puts []entry
	putKey := map[string]bool{}
	putAt := map[string]int{}   // index in puts, by table + key
	shared := map[string]bool{} // keys two new rules have (table + key)
	var params []compiler.Entry // parameter entries of new rules (generation 0 keys)
	nl := l                     // the layout after the change
	var fresh []uint32          // slots to zero
	// New records' lists (port range lists, port bitmaps, address lists)
	// take fresh ids in the shared list maps.
	var lists *compiler.ListsLayout
	if l.Scan != nil && l.Scan.Lists != nil {
		c := *l.Scan.Lists
		lists = &c
	}
	var listEnts []compiler.Entry
	preset, moved, ok := b.renumber(l, oh, rules, recs, kept, oldAt)
	if !ok {
		return nil, nil
	}
	// Rules that stay but take a new priority (renumber): their entries
	// again, with it; a key whose live entry is not theirs (another rule
	// holds it) is left alone.
	var movedPuts []movedEntry
	for _, k := range slices.Sorted(maps.Keys(moved)) {
		rec := recs[k]
		if rec.Table {
			r, err := b.parsed(rules[k], rs)
			if err != nil {
				return nil, nil
			}
			ents, _, err := l.PlaceParams(r, rec.Segment-1, rec.Prio, rec.Slot, 0) // (its parameters stay)
			if err != nil {
				return nil, nil
			}
			for _, en := range ents {
				movedPuts = append(movedPuts, movedEntry{entry{table: en.Table, key: en.Key, val: en.Value, perfect: en.Perfect}, moved[k]})
			}
			continue
		}
		// A record: the live one with its new priority (its lists and
		// parameters stay).
		editOf(rec.Segment).prio[rec.Slot] = rec.Prio
	}
	// Destination ports the early exit does not let through yet go into
	// its map of extra ranges (compiler.PrefilterMap), if it has room.
	pfMiss, ok := b.prefilterMisses(l, rs, rules, kept)
	if !ok {
		return nil, nil
	}
	if len(pfMiss) > 0 {
		l = l.WithDports(pfMiss)
		nl = l
	}
	for i, r := range rules {
		if kept[i] {
			continue
		}
		rec := ruleRecordOf(r)
		var segs, recSegs []int // segments for its table entries, for its record
		if j, ok := oldAt[r.Handle]; ok {
			// Replaced in place: its priority, slot and segment.
			old := oh.Rules[j]
			if old.Segment == 0 || old.Segment > len(l.Segments) {
				return nil, nil
			}
			rec.Prio, rec.Slot = old.Prio, old.Slot
			segs, recSegs = []int{old.Segment}, []int{old.Segment}
		} else {
			prevSeg, nextSeg := 0, 0
			if i > 0 {
				prevSeg = recs[i-1].Segment
			}
			if n := nextKept[i]; n >= 0 {
				nextSeg = recs[n].Segment
			}
			rec.Prio = preset[i] // (renumber gives every new rule one)
			for _, sg := range []int{prevSeg, nextSeg} {
				if sg > 0 && (len(segs) == 0 || segs[0] != sg) {
					segs = append(segs, sg) // (Place checks the segment can hold it)
					recSegs = append(recSegs, sg)
				}
			}
			slot, ok := allocSlot()
			if !ok {
				return nil, nil // the counters map is full
			}
			rec.Slot = slot
			fresh = append(fresh, slot)
		}
		var ents []compiler.Entry
		var param *compiler.Entry
		for _, sg := range segs {
			if n := nextKept[i+1]; n >= 0 && recs[n].Segment == sg && l.AtTail(r, sg-1) {
				continue // (it would not be the segment's last rule)
			}
			var err error
			if ents, param, err = l.PlaceParams(r, sg-1, rec.Prio, rec.Slot, 0); err == nil {
				rec.Segment, rec.Table = sg, true
				if !compiler.Terminal(r) && nl.Segments[sg-1].Terminal {
					nl = nl.WithNonTerminal(sg - 1)
				}
				break
			}
		}
		if !rec.Table {
			// A record of the segment's scan, if it has one that can test it.
			for _, sg := range recSegs {
				if rb, pe, le, err := l.PlaceRecordLists(r, sg-1, rec.Prio, rec.Slot, 0, lists); err == nil {
					rec.Segment = sg
					ed := editOf(sg)
					ed.add = append(ed.add, rb)
					listEnts = append(listEnts, le...)
					if pe != nil {
						params = append(params, *pe)
					}
					break
				}
			}
			if rec.Segment == 0 {
				return nil, nil
			}
			recs[i] = rec
			continue
		}
		if param != nil {
			params = append(params, *param)
		}
		for _, en := range ents {
			e := entry{table: en.Table, key: en.Key, val: en.Value, perfect: en.Perfect, terminal: nl.Segments[rec.Segment-1].Terminal}
			k := en.Table + string(en.Key)
			at, taken := putAt[k]
			if !taken {
				putAt[k], putKey[k] = len(puts), true
				puts = append(puts, e)
				continue
			}
			// Two new rules with one key: the first in rule order takes
			// it (the other's entry is dead, as a compilation drops it),
			// and the key is contested, so that deleting the first hands
			// it to the second. Behind a rule that does not end
			// evaluation the second must still match: a compilation.
			if !e.terminal || !puts[at].terminal {
				return nil, nil
			}
			if entryPrio(e) < entryPrio(puts[at]) {
				puts[at] = e
			}
			shared[k] = true
		}
		recs[i] = rec
	}

	h, err := cur.Hook(oh.id())
	if err != nil || h == nil {
		return nil, err
	}
	defer h.Close()
	live, err := liveGeneration(h)
	if err != nil {
		return nil, err
	}
	pfOld, pfNew, ok, err := prefilterValue(h, pfMiss)
	if err != nil || !ok {
		return nil, err
	}
	if live != oh.TableGen {
		dirty = true // the record and the control map disagree: trust neither spare
	}
	spare := 1 - live
	// Perfect-hash tables: the live generation's value, to rebuild.
	blobs := map[string][]byte{}
	holds := map[*compiler.PerfectLayout]func([]byte) (abi.TableValue, bool){}
	perfects := append(slices.Clone(puts), dels...)
	for _, mp := range movedPuts {
		perfects = append(perfects, mp.entry)
	}
	// Every perfect-hash value goes to the spare generation whole, changed
	// or not: the spare one may be stale (a compilation fills only the
	// live generation, an earlier change only the other one).
	var perfectTables []string
	for _, sl := range l.Segments {
		for _, sh := range sl.Shapes {
			if sh.Perfect && !slices.Contains(perfectTables, sh.Table) {
				perfectTables = append(perfectTables, sh.Table)
			}
		}
	}
	for _, e := range perfects {
		if e.perfect != nil && !slices.Contains(perfectTables, e.table) {
			perfectTables = append(perfectTables, e.table)
		}
	}
	for _, name := range perfectTables {
		if blobs[name] != nil {
			continue
		}
		// Both generations' maps, or a program of another layout (one
		// written by an older sfunnel: a compilation replaces it).
		m, spareMap := tableMap(h, name, live), tableMap(h, name, spare)
		if m == nil || spareMap == nil || m.ValueSize() != spareMap.ValueSize() {
			return nil, nil
		}
		blob := make([]byte, m.ValueSize())
		if err := m.Lookup(uint32(0), blob); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", name, oh.id(), err)
		}
		blobs[name] = blob
	}
	// A key another rule holds in the live tables: when that rule comes
	// first, the new rule's entry is dead (as a compilation drops it);
	// when the new rule comes first, its entry takes the key. Either way
	// the key is contested: deleting the rule that holds it hands it to
	// the next rule that has it.
	contested := slices.Clone(oh.Contested)
	holderAt := func(e entry) (uint32, error) { // its priority, 0: none
		if e.perfect != nil {
			if holds[e.perfect] == nil {
				holds[e.perfect] = compiler.PerfectValues(blobs[e.table], e.perfect)
			}
			if v, ok := holds[e.perfect](e.key); ok {
				return v.Prio, nil
			}
			return 0, nil
		}
		m := h.Maps[e.table]
		v, err := lookupEntry(m, genKey(m, e.key, live))
		if err != nil || v == nil {
			return 0, err
		}
		return binary.NativeEndian.Uint32(v), nil
	}
	var heirs []entry
	live4 := dels[:0:0]
	for _, d := range dels {
		if !d.contested {
			live4 = append(live4, d)
			continue
		}
		if tableMap(h, d.table, live) == nil || putKey[d.table+string(d.key)] {
			return nil, nil // (a new rule takes the key too: a compilation decides)
		}
		holder, err := holderAt(d)
		if err != nil {
			return nil, err
		}
		if holder != d.prio {
			delete(delKey, d.table+string(d.key)) // its entry was dead: the key stays as it is
			continue
		}
		live4 = append(live4, d)
		heir, err := b.heir(l, rs, rules, recs, d.table, d.key, d.prio, d.seg)
		if err != nil {
			return nil, nil
		}
		if heir != nil {
			heirs = append(heirs, entry{table: d.table, key: d.key, val: heir.Value, perfect: d.perfect})
		}
	}
	dels = live4
	live4 = puts[:0:0]
	for _, p := range puts {
		if tableMap(h, p.table, live) == nil {
			return nil, nil
		}
		k := p.table + string(p.key)
		if shared[k] {
			contested = append(contested, p.table+"/"+hex.EncodeToString(p.key))
		}
		if delKey[k] {
			live4 = append(live4, p)
			continue
		}
		holder, err := holderAt(p)
		if err != nil {
			return nil, err
		}
		switch {
		case holder == 0:
			live4 = append(live4, p)
		case shared[k] && holder < entryPrio(p):
			// (contested already)
		case shared[k]:
			live4 = append(live4, p)
		case holder < entryPrio(p) && p.terminal:
			// (Behind a rule that does not end evaluation, the new rule
			// must still match: that takes a new segment.)
			contested = append(contested, p.table+"/"+hex.EncodeToString(p.key))
		case p.terminal:
			live4 = append(live4, p)
			contested = append(contested, p.table+"/"+hex.EncodeToString(p.key))
		default:
			return nil, nil
		}
	}
	puts = append(live4, heirs...)
	for _, mp := range movedPuts {
		k := mp.table + string(mp.key)
		if putKey[k] || delKey[k] || tableMap(h, mp.table, live) == nil {
			return nil, nil // the change takes the key too: a compilation decides
		}
		holder, err := holderAt(mp.entry)
		if err != nil {
			return nil, err
		}
		if holder == mp.old {
			puts = append(puts, mp.entry)
		}
	}
	// The spare generation's perfect-hash value: the live one with each
	// changed shape's table rebuilt (in memory: nothing is written yet).
	type change struct {
		put []compiler.PerfectEntry
		del [][]byte
	}
	var order []*compiler.PerfectLayout
	perfectChanges := map[*compiler.PerfectLayout]*change{}
	table := map[*compiler.PerfectLayout]string{}
	for i, e := range append(slices.Clone(dels), puts...) {
		if e.perfect == nil {
			continue
		}
		ch := perfectChanges[e.perfect]
		if ch == nil {
			ch = &change{}
			perfectChanges[e.perfect], table[e.perfect] = ch, e.table
			order = append(order, e.perfect)
		}
		if i < len(dels) {
			ch.del = append(ch.del, e.key)
		} else {
			ch.put = append(ch.put, compiler.PerfectEntry{Key: e.key, Value: abi.TableValue{
				Prio: binary.NativeEndian.Uint32(e.val), Slot: binary.NativeEndian.Uint32(e.val[4:]), Body: binary.NativeEndian.Uint32(e.val[8:])}})
		}
	}
	for _, l := range order {
		blob, ok := compiler.RebuildPerfect(blobs[table[l]], l, perfectChanges[l].put, perfectChanges[l].del)
		if !ok {
			return nil, nil // past the table's capacity: a compilation lays it out again
		}
		blobs[table[l]] = blob
	}

	// The record scan's new lists (read from the live generation).
	var recMap *ebpf.Map
	var recLive []byte // the live generation's records
	var sw *scanWrite
	if l.Scan != nil {
		recMap = h.Maps[compiler.RecordMap]
		if recMap == nil || recMap.MaxEntries() != uint32(2*l.Scan.Cap) {
			return nil, nil
		}
	}
	if len(edits) > 0 || l.Scan != nil && (dirty || oh.Spare == nil || len(oh.Spare.Delta[compiler.RecordMap]) > 0) {
		if recLive, err = readRecords(recMap, l.Scan, live); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", compiler.RecordMap, oh.id(), err)
		}
	}
	if len(edits) > 0 {
		var ok bool
		if sw, ok = planScan(recLive, l.Scan, live, edits); !ok {
			return nil, nil
		}
	}

	for _, le := range listEnts {
		if h.Maps[le.Table] == nil {
			return nil, nil
		}
	}

	// From here on the spare generation changes.
	if err := s.MarkTablesDirty(); err != nil {
		return nil, err
	}
	if dirty && l.Scan != nil && l.Scan.Lists != nil {
		// Lists a writer that died wrote past the ids the live record knows.
		if err := scrubLists(h, l.Scan.Lists); err != nil {
			return nil, fmt.Errorf("%s: %w", oh.id(), err)
		}
	}
	if pfNew != nil {
		// The ranges first (the count the program reads stays), then the
		// count: a packet sees the old ranges or more.
		m := h.Maps[compiler.PrefilterMap]
		staged := slices.Clone(pfNew)
		copy(staged[:4], pfOld[:4])
		if err := m.Put(uint32(0), staged); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", compiler.PrefilterMap, oh.id(), err)
		}
		if err := m.Put(uint32(0), pfNew); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", compiler.PrefilterMap, oh.id(), err)
		}
		faults.Point("patch prefilter " + oh.id().String())
	}
	// New lists: at ids no live record names (they go live with the
	// records the flip makes live).
	for _, le := range listEnts {
		if err := h.Maps[le.Table].Put(le.Key, le.Value); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", le.Table, oh.id(), err)
		}
	}
	if dirty || oh.Spare == nil {
		if err := syncSpare(h, live); err != nil {
			return nil, fmt.Errorf("%s: %w", oh.id(), err)
		}
		if recMap != nil {
			if err := syncRecords(recMap, l.Scan, recLive, live); err != nil {
				return nil, fmt.Errorf("%s: %w", oh.id(), err)
			}
		}
	} else {
		for name, keys := range oh.Spare.Delta {
			m := h.Maps[name]
			if m == nil {
				return nil, fmt.Errorf("%s has no table %s", oh.id(), name)
			}
			if name == abi.ActionParams {
				if err := copyParams(m, keys, live); err != nil {
					return nil, fmt.Errorf("%s: %w", oh.id(), err)
				}
				continue
			}
			if name == compiler.RecordMap {
				rels, err := relKeys(keys)
				if err == nil && !rewritesAll(rels, l.Scan, sw) {
					err = copyRecords(m, l.Scan, recLive, rels, live)
				}
				if err != nil {
					return nil, fmt.Errorf("%s: %w", oh.id(), err)
				}
				continue
			}
			for _, hk := range keys {
				k, err := hex.DecodeString(hk)
				if err != nil {
					return nil, fmt.Errorf("stored ruleset is corrupt: %w", err)
				}
				if err := copyEntry(m, k, live); err != nil {
					return nil, err
				}
			}
		}
	}
	layout := nl
	var recDelta []string
	if sw != nil {
		keys, err := sw.write(recMap, l.Scan, spare)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", oh.id(), err)
		}
		recDelta = keys
		layout = nl.WithScanUsed(sw.used)
		if len(listEnts) > 0 {
			layout = layout.WithScanLists(lists)
		}
		faults.Point("patch records " + oh.id().String())
	}
	for name, blob := range blobs {
		if err := tableMap(h, name, spare).Put(uint32(0), blob); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", name, oh.id(), err)
		}
	}
	delta := map[string][]string{}
	if recDelta != nil {
		delta[compiler.RecordMap] = recDelta
	}
	for _, d := range dels {
		if d.perfect != nil {
			continue // rewritten whole
		}
		m := h.Maps[d.table]
		if m == nil {
			return nil, fmt.Errorf("%s has no table %s", oh.id(), d.table)
		}
		if err := deleteEntry(m, genKey(m, d.key, spare)); err != nil {
			return nil, err
		}
		delta[d.table] = append(delta[d.table], hex.EncodeToString(d.key))
	}
	for _, p := range puts {
		if p.perfect != nil {
			continue
		}
		m := h.Maps[p.table]
		if err := m.Put(genKey(m, p.key, spare), p.val); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", p.table, oh.id(), err)
		}
		if !delKey[p.table+string(p.key)] {
			delta[p.table] = append(delta[p.table], hex.EncodeToString(p.key))
		}
	}
	// Parameters of new rules (parametric bodies), keyed by their slot.
	for _, pe := range params {
		m := h.Maps[pe.Table]
		if m == nil {
			return nil, fmt.Errorf("%s has no table %s", oh.id(), pe.Table)
		}
		slot := binary.NativeEndian.Uint32(pe.Key) >> 1
		if err := m.Put(compiler.ParamsKey(slot, spare), pe.Value); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", pe.Table, oh.id(), err)
		}
		delta[pe.Table] = append(delta[pe.Table], hex.EncodeToString(pe.Key))
	}
	faults.Point("patch tables " + oh.id().String())
	if err := zeroSlots(h, fresh); err != nil {
		return nil, err
	}

	hs := *oh
	hs.Layout = layout
	hs.Rules = recs
	hs.Digest = "" // the program's tables differ from any compilation's generation 0
	hs.TableGen = spare
	hs.Spare = &spareRecord{Delta: delta}
	hs.Contested = contested
	hs.CounterHandles = append([]uint64(nil), oh.CounterHandles...)
	for _, r := range removed {
		if int(r.Slot) < len(hs.CounterHandles) && hs.CounterHandles[r.Slot] == r.Handle {
			hs.CounterHandles[r.Slot] = 0
		}
	}
	for _, r := range recs {
		for int(r.Slot) >= len(hs.CounterHandles) {
			hs.CounterHandles = append(hs.CounterHandles, 0)
		}
		hs.CounterHandles[r.Slot] = r.Handle
	}
	b.patched++
	return &hookPatch{hs: hs, gen: spare}, nil
}

// entry is a table entry a change writes or removes (key in its
// generation-0 form).
type entry struct {
	table    string
	key, val []byte
	perfect  *compiler.PerfectLayout // a table in the perfect-hash value
	terminal bool                    // put in a segment whose rules all end evaluation
	// A removed entry whose key another rule may hold too (contested):
	// the removed rule's priority and segment, to find who takes it.
	contested bool
	prio      uint32
	seg       int
}

// prefilterMisses returns the destination port ranges of the rules a
// change adds (not kept) that the early exit of the hook of layout l does
// not let through; ok is false when a rule needs the early exit gone or it
// has no map for more ranges (a compilation).
func (b *Backend) prefilterMisses(l *compiler.Layout, rs *ruleset.Ruleset, rules []*grammar.Rule, kept []bool) ([]grammar.PortRange, bool) {
	if l.Needs.Dports == nil {
		return nil, true
	}
	var added []*grammar.Rule
	for i, r := range rules {
		if !kept[i] {
			p, err := b.parsed(r, rs)
			if err != nil {
				return nil, false
			}
			added = append(added, p)
		}
	}
	miss, ok := l.Needs.PrefilterMisses(added)
	return miss, ok && (len(miss) == 0 || l.PrefilterExtra > 0)
}

// prefilterValue returns the early exit's map value (old) and, when the
// ranges miss need room in it, the value with them added after the ones
// it has (nil: none to add); ok is false when they don't fit.
func prefilterValue(h *bpf.Hook, miss []grammar.PortRange) (old, next []byte, ok bool, err error) {
	if len(miss) == 0 {
		return nil, nil, true, nil
	}
	m := h.Maps[compiler.PrefilterMap]
	if m == nil {
		return nil, nil, false, nil
	}
	old = make([]byte, m.ValueSize())
	if err := m.Lookup(uint32(0), old); err != nil {
		return nil, nil, false, fmt.Errorf("table %s of %s: %w", compiler.PrefilterMap, h.HookID, err)
	}
	have := compiler.PrefilterRangesOf(old)
	ranges := slices.Clone(have)
	for _, r := range miss {
		if !slices.ContainsFunc(have, func(h grammar.PortRange) bool { return h.Lo <= r.Lo && r.Hi <= h.Hi }) {
			ranges = append(ranges, r)
		}
	}
	if len(ranges) > compiler.PrefilterRanges || len(compiler.PrefilterValue(ranges)) != len(old) {
		return nil, nil, false, nil
	}
	if len(ranges) == len(have) {
		return old, nil, true, nil // (a killed writer's ranges had them)
	}
	return old, compiler.PrefilterValue(ranges), true, nil
}

// entryPrio is the priority in e's value.
func entryPrio(e entry) uint32 { return binary.NativeEndian.Uint32(e.val) }

// movedEntry is an entry of a rule that stays with a new priority; old
// is its priority before.
type movedEntry struct {
	entry
	old uint32
}

// renumberSpacing is the least distance between priorities a renumbering
// leaves, and renumberMax the most rules it moves: past that, the hook is
// compiled (which assigns priorities afresh).
const (
	renumberSpacing = 64
	renumberMax     = 4096
)

// renumber gives the rules added between two that stay (kept) their
// priorities: halving the room between their neighbours' where it lasts,
// else (no room left) spreading a window of rules evenly, which moves the
// rules that stay inside it. preset holds every new rule's priority, moved
// the old priorities of the rules that move (recs holds their new ones).
// A window holds new rules and rules whose priority is in maps alone
// (table entries, records); it grows, at every place that needs one,
// until its neighbours' priorities leave room for all, up to renumberMax
// rules moved in all. ok is false when no window makes room.
func (b *Backend) renumber(l *compiler.Layout, oh *hookState, rules []*grammar.Rule, recs []ruleRecord, kept []bool, oldAt map[uint64]int) (preset, moved map[int]uint32, ok bool) {
	n := len(rules)
	preset, moved = map[int]uint32{}, map[int]uint32{}
	// prio of rule k as far as known (0: a new rule not given one yet).
	prio := func(k int) uint32 {
		if kept[k] {
			return recs[k].Prio
		}
		if j, ok := oldAt[rules[k].Handle]; ok {
			return oh.Rules[j].Prio // replaced in place
		}
		return preset[k]
	}
	// free: rule k may take any priority between its neighbours' (a new
	// rule, or one that stays whose priority is in maps alone).
	free := func(k int) bool {
		if !kept[k] {
			_, replaced := oldAt[rules[k].Handle]
			return !replaced
		}
		r := recs[k]
		return r.Segment > 0 && r.Segment <= len(l.Segments) && (r.Table || l.Segments[r.Segment-1].Scan > 0)
	}
	bounds := func(wl, wr int) (lo, hi uint32) {
		lo, hi = 0, 1<<31
		if wl > 0 {
			lo = prio(wl - 1)
		}
		if wr < n {
			hi = prio(wr)
		}
		return lo, hi
	}
	for i := 0; i < n; {
		if prio(i) != 0 {
			i++
			continue
		}
		j := i
		for j < n && prio(j) == 0 {
			j++
		}
		// New rules [i, j) (rule j, if any, stays: its priority is
		// known): do they fit by halving, as the rules are added?
		lo, hi := bounds(i, j)
		var ps []uint32
		for k, p := i, lo; k < j; k++ {
			if hi-p < 2 {
				ps = nil
				break
			}
			if j == n {
				p += min(prioGap, (hi-p)/2)
			} else {
				p += (hi - p) / 2
			}
			ps = append(ps, p)
		}
		if len(ps) == j-i {
			for k, p := range ps {
				preset[i+k] = p
			}
			i = j
			continue
		}
		// Widen the window [wl, wr) over free rules until the priorities
		// around it leave room for all. A new rule on its right has no
		// priority yet: the window takes it in.
		wl, wr := i, j
		for {
			if wr < n && prio(wr) == 0 {
				wr++
				continue
			}
			lo, hi = bounds(wl, wr)
			if hi > lo && (hi-lo)/uint32(wr-wl+1) >= renumberSpacing {
				break
			}
			switch {
			case wr-wl >= renumberMax:
				return nil, nil, false
			case wl > 0 && free(wl-1) && (wr-i <= j-wl || wr >= n || !free(wr)):
				wl--
			case wr < n && free(wr):
				wr++
			default:
				return nil, nil, false
			}
		}
		step := (hi - lo) / uint32(wr-wl+1)
		if wr == n {
			step = min(step, prioGap)
		}
		for k := wl; k < wr; k++ {
			p := lo + step*uint32(k-wl+1)
			if !kept[k] {
				preset[k] = p
				continue
			}
			if _, again := moved[k]; !again {
				moved[k] = recs[k].Prio
			}
			recs[k].Prio = p
		}
		if len(moved) > renumberMax {
			return nil, nil, false
		}
		i = wr
	}
	return preset, moved, true
}

// heir returns the entry at key of table of the first rule after priority
// prio in segment seg that has one (nil: none), among rules (with their
// records recs): who holds a contested key once its holder is gone.
func (b *Backend) heir(l *compiler.Layout, rs *ruleset.Ruleset, rules []*grammar.Rule, recs []ruleRecord, table string, key []byte, prio uint32, seg int) (*compiler.Entry, error) {
	for i, rec := range recs {
		if !rec.Table || rec.Segment != seg || rec.Prio <= prio {
			continue
		}
		r, err := b.parsed(rules[i], rs)
		if err != nil {
			return nil, err
		}
		ents, _, err := l.PlaceParams(r, seg-1, rec.Prio, rec.Slot, 0)
		if err != nil {
			return nil, err
		}
		for k := range ents {
			if ents[k].Table == table && bytes.Equal(ents[k].Key, key) {
				return &ents[k], nil
			}
		}
	}
	return nil, nil
}

// parsed returns r itself, or, for a placeholder of an outline load
// (outline.go), the rule parsed from its stored text.
func (b *Backend) parsed(r *grammar.Rule, rs *ruleset.Ruleset) (*grammar.Rule, error) {
	rec, ok := b.outline.record(r)
	if !ok {
		return r, nil
	}
	if p := b.byHandle[rec.Handle]; p != nil && p != r && b.known[p].Text == rec.Text {
		return p, nil
	}
	p, err := parseStoredRule(rec, rs)
	if err != nil {
		return nil, err
	}
	b.known[p], b.byHandle[rec.Handle] = rec, p
	return p, nil
}

// sameRule reports whether r is the rule rec records.
func (b *Backend) sameRule(r *grammar.Rule, rec *ruleRecord) bool {
	if k, ok := b.recordOf(r); ok {
		return k.Handle == rec.Handle && k.Text == rec.Text
	}
	return ruleRecordOf(r).Text == rec.Text
}

// ruleOf returns the syntax tree of a stored rule: as the last Load
// returned it, or parsed from its text (a rule an outline load left as a
// placeholder, or one it did not parse); nil if it does not parse (the
// hook is compiled again then).
func (b *Backend) ruleOf(rec ruleRecord, rs *ruleset.Ruleset) *grammar.Rule {
	if r := b.byHandle[rec.Handle]; r != nil && b.known[r].Text == rec.Text {
		if _, placeholder := b.outline.record(r); !placeholder {
			return r
		}
	}
	r, err := parseStoredRule(rec, rs)
	if err != nil {
		return nil
	}
	return r
}

// liveGeneration reads the table generation h's program reads.
func liveGeneration(h *bpf.Hook) (uint32, error) {
	ctl := h.Maps[abi.ControlMap]
	if ctl == nil {
		return 0, fmt.Errorf("%s has no control map", h.HookID)
	}
	var c abi.Control
	if err := ctl.Lookup(uint32(0), &c); err != nil {
		return 0, fmt.Errorf("read control map of %s: %w", h.HookID, err)
	}
	return c.Generation & 1, nil
}

// genKey turns a generation-0 key of table m into generation gen's.
func genKey(m *ebpf.Map, k []byte, gen uint32) []byte {
	out := append([]byte(nil), k...)
	w := binary.NativeEndian.Uint32(out)
	if m.Type() == ebpf.Array {
		binary.NativeEndian.PutUint32(out, w&0xffff|gen<<16)
	} else {
		binary.NativeEndian.PutUint32(out, w&^1|gen)
	}
	return out
}

// lookupEntry returns the value at k (nil: no entry, or an empty array slot).
func lookupEntry(m *ebpf.Map, k []byte) ([]byte, error) {
	v := make([]byte, m.ValueSize())
	if err := m.Lookup(k, v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil, nil
		}
		return nil, err
	}
	if binary.NativeEndian.Uint32(v) == 0 {
		return nil, nil // priority 0: no rule
	}
	return v, nil
}

// deleteEntry removes k (an array slot is zeroed).
func deleteEntry(m *ebpf.Map, k []byte) error {
	if m.Type() == ebpf.Array {
		return m.Put(k, make([]byte, m.ValueSize()))
	}
	if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return err
	}
	return nil
}

// copyEntry makes the spare generation's entry at generation-0 key k what
// the live generation has.
func copyEntry(m *ebpf.Map, k []byte, live uint32) error {
	v, err := lookupEntry(m, genKey(m, k, live))
	if err != nil {
		return err
	}
	if v == nil {
		return deleteEntry(m, genKey(m, k, 1-live))
	}
	return m.Put(genKey(m, k, 1-live), v)
}

// syncSpare makes every table's spare generation equal to the live one.
func syncSpare(h *bpf.Hook, live uint32) error {
	for name, m := range h.Maps {
		if name == abi.ActionParams {
			if err := syncParams(m, live); err != nil {
				return fmt.Errorf("table %s: %w", name, err)
			}
			continue
		}
		if !strings.HasPrefix(name, abi.TablePrefix) || name == compiler.RecordMap || m.Type() == ebpf.Array && m.MaxEntries() != 2<<16 {
			// Not a table of entries (the perfect-hash value is rebuilt
			// whole; records: syncRecords).
			continue
		}
		all, err := readTable(m)
		if err != nil {
			return err
		}
		var kvs []ebpf.MapKV
		if m.Type() == ebpf.Array {
			zero := make([]byte, m.ValueSize())
			for port := uint32(0); port < 1<<16; port++ {
				v := all[string(binary.NativeEndian.AppendUint32(nil, live<<16|port))]
				if v == nil {
					v = zero
				}
				kvs = append(kvs, ebpf.MapKV{Key: binary.NativeEndian.AppendUint32(nil, (1-live)<<16|port), Value: v})
			}
		} else {
			for k, v := range all {
				if binary.NativeEndian.Uint32([]byte(k[:4]))&1 == live {
					kvs = append(kvs, ebpf.MapKV{Key: genKey(m, []byte(k), 1-live), Value: v})
				}
			}
		}
		if err := fillGeneration(m, 1-live, kvs); err != nil {
			return fmt.Errorf("table %s: %w", name, err)
		}
	}
	return nil
}

// copyParams makes the spare generation's parameter entries at the delta
// keys (generation-0 keys, slot<<1) what the live generation has.
func copyParams(m *ebpf.Map, keys []string, live uint32) error {
	v := make([]byte, m.ValueSize())
	for _, hk := range keys {
		k, err := hex.DecodeString(hk)
		if err != nil || len(k) != 4 {
			return errors.New("stored ruleset is corrupt: bad parameter key")
		}
		slot := binary.NativeEndian.Uint32(k) >> 1
		if err := m.Lookup(compiler.ParamsKey(slot, live), v); err != nil {
			return fmt.Errorf("table %s: %w", abi.ActionParams, err)
		}
		if err := m.Put(compiler.ParamsKey(slot, 1-live), v); err != nil {
			return fmt.Errorf("table %s: %w", abi.ActionParams, err)
		}
	}
	return nil
}

// syncParams makes every slot's spare parameter entry the live one's.
func syncParams(m *ebpf.Map, live uint32) error {
	all, err := readTable(m)
	if err != nil {
		return err
	}
	var ks, vs [][]byte
	for k, v := range all {
		w := binary.NativeEndian.Uint32([]byte(k))
		if w&1 == live {
			ks, vs = append(ks, compiler.ParamsKey(w>>1, 1-live)), append(vs, v)
		}
	}
	return putAll(m, ks, vs)
}

// zeroSlots zeroes what counter slots hold (counters, MTU overruns,
// left-alone counts), left there by rules deleted earlier, before new
// rules count in them. The live program does not use them.
func zeroSlots(h *bpf.Hook, slots []uint32) error {
	if len(slots) == 0 {
		return nil
	}
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	for _, slot := range slots {
		if m := h.Maps[abi.CountersMap]; m != nil && slot < m.MaxEntries() {
			if err := m.Put(slot, make([]abi.Counter, ncpu)); err != nil {
				return fmt.Errorf("reset counter slot %d: %w", slot, err)
			}
		}
		if m := h.Maps[abi.RuleMTUMap]; m != nil && slot < m.MaxEntries() {
			if err := m.Put(slot, make([]uint64, ncpu)); err != nil {
				return fmt.Errorf("reset slot %d: %w", slot, err)
			}
		}
		if m := h.Maps[abi.StatsMap]; m != nil {
			for st := uint32(0); st < abi.NumStats; st++ {
				if k := (slot+1)*abi.NumStats + st; k < m.MaxEntries() {
					if err := m.Put(k, make([]uint64, ncpu)); err != nil {
						return fmt.Errorf("reset slot %d: %w", slot, err)
					}
				}
			}
		}
	}
	return nil
}

// assignSlots gives rules their priorities and counter slots for a
// compilation: rules that were in oh keep theirs, new ones take free slots
// and priorities between their neighbours'. When that is not possible (no
// room between two priorities, slots too sparse, no usable record),
// everything is assigned afresh: prioGap apart, slots in rule order.
func assignSlots(oh *hookState, rules []*grammar.Rule) (prios, slots []uint32) {
	n := len(rules)
	prios, slots = make([]uint32, n), make([]uint32, n)
	fresh := func() ([]uint32, []uint32) {
		gap := uint32(min(prioGap, (1<<31-1)/(n+1)))
		for i := range rules {
			prios[i], slots[i] = uint32(i+1)*gap, uint32(i)
		}
		return prios, slots
	}
	if oh == nil || len(oh.Rules) == 0 {
		return fresh()
	}
	old := make(map[uint64]ruleRecord, len(oh.Rules))
	used := map[uint32]bool{}
	for _, r := range oh.Rules {
		if r.Prio == 0 {
			return fresh()
		}
		old[r.Handle] = r
		used[r.Slot] = true
	}
	survivors := 0
	for _, r := range rules {
		if _, ok := old[r.Handle]; ok {
			survivors++
		}
	}
	if survivors == 0 {
		return fresh() // nothing to keep (flush ruleset): no holes for the old rules' slots
	}
	free, top := uint32(0), 0
	for i, r := range rules {
		if o, ok := old[r.Handle]; ok {
			slots[i] = o.Slot
		} else {
			for used[free] {
				free++
			}
			used[free] = true
			slots[i] = free
		}
		top = max(top, int(slots[i])+1)
	}
	if top > 2*n+16 {
		return fresh() // mostly holes: compact them (the program is loaded again)
	}
	lo := uint32(0)
	for i := 0; i < n; {
		if o, ok := old[rules[i].Handle]; ok {
			if o.Prio <= lo {
				return fresh()
			}
			prios[i], lo = o.Prio, o.Prio
			i++
			continue
		}
		j := i
		for j < n {
			if _, ok := old[rules[j].Handle]; ok {
				break
			}
			j++
		}
		hi := uint32(1 << 31)
		if j < n {
			hi = old[rules[j].Handle].Prio
		}
		k := uint32(j - i)
		if hi <= lo || hi-lo <= k {
			return fresh()
		}
		step := (hi - lo) / (k + 1)
		if j == n {
			step = min(step, prioGap)
		}
		for t := uint32(0); t < k; t++ {
			prios[i+int(t)] = lo + step*(t+1)
		}
		lo, i = prios[j-1], j
	}
	return prios, slots
}
