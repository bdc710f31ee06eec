package compiler

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/sfunnel/sfunnel/abi"
)

// perfectShapes are shapes of every key width: one word (a mark), a masked
// IPv4 pair, an IPv6 /64 (two words kept of four) with a port, and every
// field keyed (twelve words, six chunks).
func perfectShapes() map[string]*shape {
	mark := &shape{mask: [2]uint32{0xffffffff, 0}}
	mark.keyed[keyMeta] = true
	pair := &shape{fam: 4, bits: [2]int{24, 32}}
	pair.keyed[keySaddr], pair.keyed[keyDaddr] = true, true
	v6 := &shape{fam: 6, bits: [2]int{64, 0}}
	v6.keyed[keySaddr], v6.keyed[keyDport] = true, true
	all := &shape{fam: 6, bits: [2]int{128, 100}, mask: [2]uint32{0xff00, 0x00ff0000}}
	for f := keyField(0); f < numKeyFields; f++ {
		all.keyed[f] = true
	}
	out := map[string]*shape{"mark": mark, "pair": pair, "v6": v6, "all": all}
	for _, sh := range out {
		sh.words = keyWords(sh)
	}
	return out
}

// randomKey is a key of the shape: masked address words are zero, as
// variants makes them.
func randomKey(r *rand.Rand, sh *shape) []byte {
	key := make([]byte, 4*sh.words)
	for _, w := range perfectWords(sh) {
		v := r.Uint32() & w.mask
		if r.IntN(2) == 0 {
			v &= 0xf000f000 // keys that differ in a few bits only
		}
		if w.addr {
			binary.BigEndian.PutUint32(key[4*w.idx:], v)
		} else {
			binary.NativeEndian.PutUint32(key[4*w.idx:], v)
		}
	}
	return key
}

// Every entry is found with its priority, slot and body; other keys are
// not; the same entries give the same value; the lowest priority is in
// the header.
func TestPerfectTable(t *testing.T) {
	r := rand.New(rand.NewPCG(8, 8))
	for name, sh := range perfectShapes() {
		for _, n := range []int{1, 3, 100, 5000} {
			sh.ents = nil
			seen := map[string]bool{}
			for len(sh.ents) < n {
				k := randomKey(r, sh)
				if !seen[string(k)] {
					seen[string(k)] = true
					sh.ents = append(sh.ents, tabEntry{rule: 5 + len(sh.ents), key: k})
				}
			}
			bodyOf := make([]uint32, 5+n)
			for i := range bodyOf {
				bodyOf[i] = uint32(i % 7)
			}
			valueOf := func(i int) abi.TableValue {
				return abi.TableValue{Prio: uint32(i) + 1, Slot: uint32(i), Body: bodyOf[i]}
			}
			const off = 64
			tab := newPerfectTable(sh, off)
			if tab == nil {
				t.Fatalf("%s n=%d: no table", name, n)
			}
			blob := make([]byte, off+tab.size)
			tab.fill(blob, tab.entriesOf(sh, valueOf))
			for _, en := range sh.ents {
				prio, slot, body, ok := tab.lookup(blob, tab.chunksOf(en.key))
				if !ok || prio != uint32(en.rule+1) || slot != uint32(en.rule) || body != bodyOf[en.rule] {
					t.Fatalf("%s n=%d: entry of rule %d -> %d %d %d %v", name, n, en.rule, prio, slot, body, ok)
				}
			}
			for i := 0; i < 20000; i++ {
				k := randomKey(r, sh)
				if _, _, _, ok := tab.lookup(blob, tab.chunksOf(k)); ok != seen[string(k)] {
					t.Fatalf("%s n=%d: key %x found %v, member %v", name, n, k, ok, seen[string(k)])
				}
			}
			if low := binary.NativeEndian.Uint32(blob[off+8:]); low != 6 {
				t.Fatalf("%s n=%d: lowest priority %d, want 6", name, n, low)
			}
			again := newPerfectTable(sh, off)
			blob2 := make([]byte, off+again.size)
			again.fill(blob2, again.entriesOf(sh, valueOf))
			if !bytes.Equal(blob, blob2) {
				t.Fatalf("%s n=%d: the same entries gave another table", name, n)
			}
		}
	}
	// 40 000 entries of 6 chunks need 8 MiB: a hash table instead.
	all := perfectShapes()["all"]
	all.ents = make([]tabEntry, 40000)
	if newPerfectTable(all, 0) != nil {
		t.Fatal("a table past maxPerfectBytes")
	}
}

// RebuildPerfect gives the table a compilation of the changed entries
// would: every kept and put entry found with its value, deleted keys gone,
// the lowest priority and the range updated; past the capacity it refuses.
func TestRebuildPerfect(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 9))
	shapes := perfectShapes()
	port := &shape{}
	port.keyed[keyDport] = true
	port.words = keyWords(port)
	shapes["port"] = port
	for name, sh := range shapes {
		sh.ents = nil
		seen := map[string]bool{}
		for len(sh.ents) < 200 {
			k := randomKey(r, sh)
			if sh == port {
				k = binary.NativeEndian.AppendUint32(nil, uint32(r.IntN(1<<16)))
			}
			if !seen[string(k)] {
				seen[string(k)] = true
				sh.ents = append(sh.ents, tabEntry{rule: len(sh.ents), key: k})
			}
		}
		valueOf := func(i int) abi.TableValue {
			return abi.TableValue{Prio: uint32(i) + 10, Slot: uint32(i), Body: uint32(i % 3)}
		}
		var tab *perfectTable
		if sh == port {
			tab = newPortTable(sh, 16)
		} else {
			tab = newPerfectTable(sh, 16)
		}
		live := make([]byte, 16+tab.size)
		tab.fill(live, tab.entriesOf(sh, valueOf))
		// Delete the first 50 (the lowest priorities), replace the next
		// 10, add 100 more.
		var del [][]byte
		want := map[string]abi.TableValue{}
		for i, en := range sh.ents {
			switch {
			case i < 50:
				del = append(del, en.key)
			default:
				want[string(en.key)] = valueOf(i)
			}
		}
		var put []PerfectEntry
		for i := 50; i < 60; i++ {
			v := abi.TableValue{Prio: 5000 + uint32(i), Slot: 7, Body: 1}
			put = append(put, PerfectEntry{Key: sh.ents[i].key, Value: v})
			want[string(sh.ents[i].key)] = v
		}
		for len(put) < 110 {
			k := randomKey(r, sh)
			if sh == port {
				k = binary.NativeEndian.AppendUint32(nil, uint32(r.IntN(1<<16)))
			}
			if seen[string(k)] {
				continue
			}
			seen[string(k)] = true
			v := abi.TableValue{Prio: 9000 + uint32(len(put)), Slot: 8, Body: 2}
			put = append(put, PerfectEntry{Key: k, Value: v})
			want[string(k)] = v
		}
		l := tab.layout()
		blob, ok := RebuildPerfect(live, l, put, del)
		if !ok {
			t.Fatalf("%s: not rebuilt", name)
		}
		if !bytes.Equal(blob[:16], live[:16]) {
			t.Fatalf("%s: bytes before the table changed", name)
		}
		for k := range seen {
			v, ok := LookupPerfect(blob, l, []byte(k))
			w, member := want[k]
			if ok != member || ok && v != w {
				t.Fatalf("%s: key %x -> %+v %v, want %+v %v", name, k, v, ok, w, member)
			}
		}
		if low := binary.NativeEndian.Uint32(blob[16+map[bool]int{true: 0, false: 8}[sh == port]:]); low != 70 {
			t.Fatalf("%s: lowest priority %d, want 70 (rule 60)", name, low)
		}
		if sh != port {
			// 200 entries got 512 slots: 257 don't fit.
			var many []PerfectEntry
			for len(many) < 257 {
				k := randomKey(r, sh)
				if !seen[string(k)] {
					seen[string(k)] = true
					many = append(many, PerfectEntry{Key: k, Value: abi.TableValue{Prio: 1}})
				}
			}
			if _, ok := RebuildPerfect(blob, l, many, nil); ok {
				t.Fatalf("%s: rebuilt past the capacity", name)
			}
		}
	}
}
