package compiler

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"testing"
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
			const off = 64
			tab := newPerfectTable(sh, off)
			if tab == nil {
				t.Fatalf("%s n=%d: no table", name, n)
			}
			blob := make([]byte, off+tab.size)
			tab.fill(blob, sh, bodyOf, (&compiler{}).at)
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
			again.fill(blob2, sh, bodyOf, (&compiler{}).at)
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
