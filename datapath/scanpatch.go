package datapath

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
)

// Incremental changes of scanned rules (the record scan, compiler/linear.go).
// A segment's records are a list in rule order ended by a zero record,
// which directory entry d of the generation points at. Inserting a record
// into a list moves the records after it, so a change writes the segment's
// whole new list into the spare generation past the entries lists use
// (ScanLayout.Used), then points the spare directory entry at it: the
// live generation is not touched, and the control word's flip switches
// every list at once. What the lists left behind is reclaimed when Used
// reaches the capacity: the spare generation's lists are then laid out
// again from the start. A compilation lays them out afresh too.
//
// Keys of the record map in a spare record's delta and in these functions
// are relative: index i of generation g is g*Cap + i. Directory entries
// hold absolute indexes, so copying one between generations moves it.

// scanEdit is a change of one segment's record lists.
type scanEdit struct {
	first   int               // the segment's first directory entry
	lists   int               // its lists: 1, or 9 by family and protocol and more by port bucket (compiler.RecordList)
	buckets int               // its port buckets
	del     map[uint32]bool   // counter slots of the records removed
	prio    map[uint32]uint32 // new priorities of records that stay, by counter slot
	add     [][]byte          // records added
}

// scanWrite is a planned write of the spare generation's records.
type scanWrite struct {
	writes map[uint32][]byte // relative index → value (directory values relative too)
	used   int
}

// planScan computes the spare generation's new lists for edits from the
// live generation's (cur: its records, readRecords). ok is false
// when a removed record is not in its list (the rule is tested by code of
// its own) or the lists do not fit: the hook is compiled then.
func planScan(cur []byte, sc *compiler.ScanLayout, live uint32, edits map[int]*scanEdit) (sw *scanWrite, ok bool) {
	capacity := uint32(sc.Cap)
	at := func(rel uint32) []byte {
		if int(rel+1)*compiler.RecordSize > len(cur) {
			return nil
		}
		return cur[int(rel)*compiler.RecordSize : int(rel+1)*compiler.RecordSize]
	}
	list := func(dir int) ([][]byte, bool) {
		d := at(uint32(dir))
		if d == nil {
			return nil, false
		}
		first := compiler.RecordPrio(d)
		if first < live*capacity || first >= (live+1)*capacity {
			return nil, false
		}
		var recs [][]byte
		for rel := first - live*capacity; rel < capacity; rel++ {
			r := at(rel)
			if r == nil {
				return nil, false
			}
			if compiler.RecordPrio(r) == 0 {
				return recs, true
			}
			recs = append(recs, r)
		}
		return nil, false // no end: not a list sfunnel wrote
	}
	lists := map[int][][]byte{} // the lists that change, by directory entry
	for _, ed := range edits {
		if ed.first < 0 || ed.lists < 1 || ed.first+ed.lists > sc.Dirs {
			return nil, false
		}
		gone, moved := 0, 0
		for g := 0; g < ed.lists; g++ {
			old, ok := list(ed.first + g)
			if !ok {
				return nil, false
			}
			recs := make([][]byte, 0, len(old))
			changed := false
			for _, r := range old {
				if !compiler.RecordOfRule(r) {
					// (A shape record's slot is a shape id: it stays, and a
					// rule inside it is not found here, which compiles.)
					recs = append(recs, r)
					continue
				}
				slot := compiler.RecordSlot(r)
				if ed.del[slot] {
					gone++
					changed = true
					continue
				}
				if p, ok := ed.prio[slot]; ok {
					// (Renumbering keeps the rules' order: the list stays sorted.)
					r = compiler.RecordWithPrio(r, p)
					moved++
					changed = true
				}
				recs = append(recs, r)
			}
			if changed {
				lists[ed.first+g] = recs
			}
		}
		if gone != len(ed.del) || moved != len(ed.prio) {
			return nil, false // a member: its code is in the program
		}
		for _, a := range ed.add {
			dir := ed.first + compiler.RecordList(a, ed.lists, ed.buckets)
			recs, ok := lists[dir]
			if !ok {
				if recs, ok = list(dir); !ok {
					return nil, false
				}
			}
			p := compiler.RecordPrio(a)
			i, found := slices.BinarySearchFunc(recs, p, func(r []byte, p uint32) int {
				return int(int64(compiler.RecordPrio(r)) - int64(p))
			})
			if found {
				return nil, false
			}
			lists[dir] = slices.Insert(slices.Clip(recs), i, a)
		}
	}
	sw = &scanWrite{writes: map[uint32][]byte{}, used: sc.Used}
	need := 0
	for _, recs := range lists {
		need += len(recs) + 1
	}
	zero := make([]byte, compiler.RecordSize)
	put := func(dir int, recs [][]byte) {
		if len(recs) == 0 {
			// An empty list: the zero record after the directory (0
			// would be the directory itself).
			sw.writes[uint32(dir)] = compiler.DirectoryEntry(uint32(sc.Dirs))
			return
		}
		sw.writes[uint32(dir)] = compiler.DirectoryEntry(uint32(sw.used))
		for _, r := range recs {
			sw.writes[uint32(sw.used)] = r
			sw.used++
		}
		sw.writes[uint32(sw.used)] = zero
		sw.used++
	}
	dirs := make([]int, 0, len(lists))
	for d := range lists {
		dirs = append(dirs, d)
	}
	slices.Sort(dirs)
	if sw.used+need <= sc.Cap {
		for _, d := range dirs {
			put(d, lists[d])
		}
		return sw, true
	}
	// Out of room: every list again, from after the directory and the
	// zero record that empty lists point at.
	sw = &scanWrite{writes: map[uint32][]byte{uint32(sc.Dirs): zero}, used: sc.Dirs + 1}
	for d := 0; d < sc.Dirs; d++ {
		recs, ok := lists[d]
		if !ok {
			if recs, ok = list(d); !ok {
				return nil, false
			}
		}
		if sw.used+len(recs)+1 > sc.Cap {
			return nil, false
		}
		put(d, recs)
	}
	return sw, true
}

// write puts the planned entries into generation spare of m and returns
// their delta keys.
func (sw *scanWrite) write(m *ebpf.Map, sc *compiler.ScanLayout, spare uint32) ([]string, error) {
	var ks, vs [][]byte
	var delta []string
	for rel, v := range sw.writes {
		if int(rel) < sc.Dirs {
			v = compiler.DirectoryEntry(spare*uint32(sc.Cap) + compiler.RecordPrio(v))
		}
		ks = append(ks, binary.NativeEndian.AppendUint32(nil, spare*uint32(sc.Cap)+rel))
		vs = append(vs, v)
		delta = append(delta, hex.EncodeToString(binary.NativeEndian.AppendUint32(nil, rel)))
	}
	if err := putAll(m, ks, vs); err != nil {
		return nil, fmt.Errorf("table %s: %w", compiler.RecordMap, err)
	}
	return delta, nil
}

// copyRecords makes the spare generation's records at the relative
// indexes rels what the live generation has (cur: its records).
func copyRecords(m *ebpf.Map, sc *compiler.ScanLayout, cur []byte, rels []uint32, live uint32) error {
	capacity := uint32(sc.Cap)
	var ks, vs [][]byte
	for _, rel := range rels {
		if rel >= capacity || int(rel+1)*compiler.RecordSize > len(cur) {
			return errors.New("stored ruleset is corrupt: record index past the capacity")
		}
		v := cur[int(rel)*compiler.RecordSize : int(rel+1)*compiler.RecordSize]
		if int(rel) < sc.Dirs {
			v = compiler.DirectoryEntry(compiler.RecordPrio(v) - live*capacity + (1-live)*capacity)
		}
		ks = append(ks, binary.NativeEndian.AppendUint32(nil, (1-live)*capacity+rel))
		vs = append(vs, v)
	}
	return putAll(m, ks, vs)
}

// syncRecords makes the spare generation's records equal to the live one's.
func syncRecords(m *ebpf.Map, sc *compiler.ScanLayout, cur []byte, live uint32) error {
	rels := make([]uint32, sc.Cap)
	for i := range rels {
		rels[i] = uint32(i)
	}
	return copyRecords(m, sc, cur, rels, live)
}

// readRecords returns generation gen of the record map m: Cap records,
// read in batches (stopping past the generation) where the kernel can.
func readRecords(m *ebpf.Map, sc *compiler.ScanLayout, gen uint32) ([]byte, error) {
	const size = compiler.RecordSize
	if m.ValueSize() != size || m.KeySize() != 4 {
		return nil, errors.New("the record map has another layout")
	}
	lo, hi := gen*uint32(sc.Cap), (gen+1)*uint32(sc.Cap)
	out := make([]byte, sc.Cap*size)
	const chunk = 4096
	keys := make([]uint32, chunk)
	vals := make([][size]byte, chunk)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		for i := 0; i < n; i++ {
			if keys[i] >= lo && keys[i] < hi {
				copy(out[int(keys[i]-lo)*size:], vals[i][:])
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) || err == nil && n > 0 && keys[n-1] >= hi-1 {
			return out, nil
		}
		if err != nil {
			break // no batch API: one by one
		}
	}
	v := make([]byte, size)
	for k := lo; k < hi; k++ {
		if err := m.Lookup(k, v); err != nil {
			return nil, err
		}
		copy(out[int(k-lo)*size:], v)
	}
	return out, nil
}

// putAll writes entries, batched where the kernel can.
func putAll(m *ebpf.Map, ks, vs [][]byte) error {
	if len(ks) == 0 {
		return nil
	}
	if _, err := m.BatchUpdate(records(int(m.KeySize()), ks), records(int(m.ValueSize()), vs), nil); err == nil {
		return nil
	}
	for i := range ks {
		if err := m.Put(ks[i], vs[i]); err != nil {
			return err
		}
	}
	return nil
}

// relKeys decodes a delta's record indexes.
func relKeys(keys []string) ([]uint32, error) {
	rels := make([]uint32, 0, len(keys))
	for _, hk := range keys {
		k, err := hex.DecodeString(hk)
		if err != nil || len(k) != 4 {
			return nil, errors.New("stored ruleset is corrupt: bad record index")
		}
		rels = append(rels, binary.NativeEndian.Uint32(k))
	}
	return rels, nil
}

// rewritesAll reports whether the last commit's record delta rels only
// changed lists that edits write again: their directory entries are
// written anew and the lists the delta holds are then reached by none,
// so copying them over would be wasted.
func rewritesAll(rels []uint32, sc *compiler.ScanLayout, sw *scanWrite) bool {
	if sw == nil {
		return false
	}
	for _, rel := range rels {
		if _, again := sw.writes[rel]; int(rel) < sc.Dirs && !again {
			return false
		}
	}
	return true
}

// scrubLists removes from the address-list tries the prefixes of lists
// whose ids are past lists' (a writer that died before its commit left
// them; the next list given such an id must start empty). Array lists
// need nothing: a new list's entry is written whole.
func scrubLists(h *bpf.Hook, lists *compiler.ListsLayout) error {
	for name, sp := range map[string]compiler.ListSpace{compiler.AnonV4Map: lists.V4, compiler.AnonV6Map: lists.V6} {
		m := h.Maps[name]
		if m == nil {
			continue
		}
		var gone [][]byte
		k, v := make([]byte, m.KeySize()), make([]byte, m.ValueSize())
		it := m.Iterate()
		for it.Next(&k, &v) {
			if binary.BigEndian.Uint32(k[4:]) >= sp.Next {
				gone = append(gone, slices.Clone(k))
			}
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("table %s: %w", name, err)
		}
		for _, k := range gone {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("table %s: %w", name, err)
			}
		}
	}
	return nil
}
