package compiler

import (
	"encoding/binary"
	"slices"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/abi"
)

// Perfect-hash rule tables.
//
// A shape's table is, when it fits, a perfect hash ("hash and displace")
// kept in the value of an ARRAY map of one element per generation, map g
// holding generation g of every such table of the program
// (abi.PerfectGen). The program takes the live generation's value pointer
// once per segment (one of two constants: direct value access, no lookup)
// and then reads each table with plain loads: no helper call, no hashing in the kernel, a few multiplications
// and two dependent loads per shape. The hash seeds live in the value, next
// to the displacements and slots, so new contents (and a new seed) need no
// new program; only the layout — each table's offset and its slot and
// bucket counts, capacities with headroom like the hash tables'
// max_entries — is part of the program (and of Program.Digest).
//
// A table whose key is k u64 chunks (its key words paired in order, the
// last one alone when their number is odd; address words in host order,
// so that a prefix is a range; address words that the prefix masks out
// entirely are not key words) sits at offset off of the generation's
// value:
//
//	off+0         u64 S: the seed
//	off+8         u32 lowest priority of the entries (abi.NoRule when none), u32 0
//	off+16        u32 lowest, u32 highest first key word of the entries
//	              (the highest with the bits its mask clears set)
//	off+24        [nb]u32 displacements
//	off+slotsOff  [ns]{[k]u64 key chunks; u32 prio, slot, body; u32 0}
//	              (padded to 32 bytes when k ≤ 2; the displacements are
//	              then stored shifted left by 5)
//
// A packet whose first key word is outside the entries' range misses at
// once (rules tend to use a few subnets and port ranges: most shapes a
// packet can't match cost one key word, two loads and two compares). Else h = c0, then
// h = h*S + c for each further chunk c, then h *= S (64-bit arithmetic).
// The bucket is the top bb bits of h, the slot the next sb bits of h xor
// disp[bucket] (mod ns). A key is in the table when its slot holds its
// chunks; empty slots have priority abi.NoRule, which never beats the
// best so far.
//
// A shape keyed on one port only is indexed by the port directly:
//
//	off+0  u32 lowest priority, u32 0
//	off+8  [65537]{u32 prio, slot, body} (prio abi.NoRule: no entry; the
//	       last is for an absent port, 0x10000, which is in no table)
const (
	perfectMap = abi.PerfectTables
	// maxPerfectBytes bounds a generation's value: the kernel refuses array
	// values above KMALLOC_MAX_SIZE (4 MiB on x86-64). Shapes that no longer
	// fit keep hash tables.
	maxPerfectBytes = 4 << 20
	perfectHeader   = 24
	// maxPerfectShapes bounds the perfect-hash tables of a program: a
	// probe is about twice the code of a hash table lookup, and with many
	// shapes the verifier walks each shape's code many times (1 000 mixed
	// rules of 40 templates: +40-70 % processed instructions over hash
	// tables with no bound, +10 % with 8). Past it, shapes keep hash
	// tables; the per-packet cost is then mostly the number of shapes.
	maxPerfectShapes = 8
)

// keyWord is where the program finds one 32-bit word of a shape's key.
type keyWord struct {
	slot int16  // stack slot of the u32; unused for marks
	mask uint32 // applied to the word (host order)
	mark bool   // skb->mark instead of a stack slot
	addr bool   // an address word: network order in the packet and the key
	idx  int    // index of the word in tabEntry.key
}

// value returns the word of an entry's key, as the program computes it.
func (w keyWord) value(key []byte) uint32 {
	if w.addr {
		return binary.BigEndian.Uint32(key[4*w.idx:]) & w.mask
	}
	return binary.NativeEndian.Uint32(key[4*w.idx:]) & w.mask
}

// perfectTable is the layout of one shape's perfect-hash table and, once
// built, where each of its entries goes.
type perfectTable struct {
	port                     bool // indexed by the port (see above)
	words                    []keyWord
	chunks                   int
	bb, sb                   int // log2 of the bucket and slot counts
	off, slotsOff, esz, size int
	// shift: log2 of esz when a power of two (keys of one or two chunks:
	// entries padded to 32 bytes); the displacements are then stored
	// shifted, and the slot's offset is a shift and an xor away from the
	// hash. 0: esz is multiplied.
	shift int

	seed   uint64
	disp   []uint32
	slotOf []int // slot of each of the shape's entries
}

// perfectWords returns the key words of a shape, in tabEntry.key order
// (see variants), leaving out address words the prefix masks out.
func perfectWords(sh *shape) []keyWord {
	var out []keyWord
	idx := 0
	for j, slot := range []int16{slotSaddr, slotDaddr} {
		if !sh.keyed[keySaddr+keyField(j)] {
			continue
		}
		n := 1
		if sh.fam == 6 {
			n = 4
		}
		left := sh.bits[j]
		for w := 0; w < n; w++ {
			bits := min(max(left, 0), 32)
			left -= 32
			if bits > 0 {
				out = append(out, keyWord{slot: slot + 4 + int16(4*w), mask: ^uint32(0) << (32 - bits), addr: true, idx: idx})
			}
			idx++
		}
	}
	for j, slot := range []int16{slotSport, slotDport} {
		if sh.keyed[keySport+keyField(j)] {
			out = append(out, keyWord{slot: slot, mask: 0xffffffff, idx: idx})
			idx++
		}
	}
	for j := 0; j < 2; j++ {
		if sh.keyed[keyMeta+keyField(j)] {
			out = append(out, keyWord{mark: true, mask: sh.mask[j], idx: idx})
			idx++
		}
	}
	return out
}

// newPerfectTable lays out a table for the shape's entries at offset off
// and finds its hash; nil when the shape has no key words, the table
// doesn't fit or no hash was found (the shape then keeps a hash table).
func newPerfectTable(sh *shape, off int) *perfectTable {
	words := perfectWords(sh)
	if len(words) == 0 {
		return nil
	}
	// Twice the entries and a quarter more (RebuildPerfect takes up to half
	// the slots): room for new keys of the shape without a compilation,
	// also when the entries are a power of two.
	n := len(sh.ents)
	ns := capacity(2*(n+n/4), 8)
	t := &perfectTable{words: words, chunks: (len(words) + 1) / 2, off: off, sb: bitsFor(ns)}
	t.bb = t.sb - 2
	t.esz = 8*t.chunks + 16
	if t.chunks <= 2 {
		t.esz, t.shift = 32, 5
	}
	t.slotsOff = (perfectHeader + 4<<t.bb + 7) &^ 7
	t.size = t.slotsOff + ns*t.esz
	if off+t.size > maxPerfectBytes {
		return nil
	}
	keys := make([][]uint64, len(sh.ents))
	for i, en := range sh.ents {
		keys[i] = t.chunksOf(en.key)
	}
	if !t.build(keys) {
		return nil
	}
	return t
}

// portTableSize is the size of a port-indexed table: a value per port and
// one for an absent port, so that the probe needs no bounds test. (Tables
// laid out before that have no value for an absent port: fill goes by the
// layout's size.)
const portTableSize = 8 + (1<<16+1)*tableValueSize

// newPortTable lays out a port-indexed table for a shape keyed on one
// port at offset off; nil when it doesn't fit.
func newPortTable(sh *shape, off int) *perfectTable {
	if off+portTableSize > maxPerfectBytes {
		return nil
	}
	return &perfectTable{port: true, words: perfectWords(sh), off: off, esz: tableValueSize, slotsOff: 8, size: portTableSize}
}

// chunksOf returns the key chunks of an entry's key words.
func (t *perfectTable) chunksOf(key []byte) []uint64 {
	out := make([]uint64, 0, t.chunks)
	for i := 0; i < len(t.words); i += 2 {
		c := uint64(t.words[i].value(key))
		if i+1 < len(t.words) {
			c = c<<32 | uint64(t.words[i+1].value(key))
		}
		out = append(out, c)
	}
	return out
}

// hash returns a key's bucket and slot hash.
func (t *perfectTable) hash(key []uint64, s uint64) (uint32, uint32) {
	h := key[0]
	for _, c := range key[1:] {
		h = h*s + c
	}
	h *= s
	return uint32(h >> (64 - t.bb)), uint32(h << t.bb >> (64 - t.sb))
}

// build finds seeds and displacements that give every key its own slot.
// The seeds come from a fixed sequence: the same keys give the same table.
func (t *perfectTable) build(keys [][]uint64) bool {
	seed := uint64(0x243f6a8885a308d3)
	next := func() uint64 {
		seed += 0x9e3779b97f4a7c15
		z := seed
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		return (z ^ z>>31) | 1
	}
	for try := 0; try < 32; try++ {
		if s := next(); t.place(keys, s) {
			t.seed = s
			return true
		}
	}
	return false
}

// place finds a displacement per bucket, largest buckets first.
func (t *perfectTable) place(keys [][]uint64, s uint64) bool {
	nb, ns := 1<<t.bb, 1<<t.sb
	bucketOf := make([]uint32, len(keys))
	hashOf := make([]uint32, len(keys))
	count := make([]int, nb+1)
	for i, k := range keys {
		bucketOf[i], hashOf[i] = t.hash(k, s)
		count[bucketOf[i]+1]++
	}
	// members of bucket x: byBucket[count[x]:count[x+1]] (a counting sort).
	for x := 1; x <= nb; x++ {
		count[x] += count[x-1]
	}
	byBucket := make([]int, len(keys))
	fill := slices.Clone(count[:nb])
	for i := range keys {
		byBucket[fill[bucketOf[i]]] = i
		fill[bucketOf[i]]++
	}
	order := make([]int, 0, nb)
	for x := 0; x < nb; x++ {
		if count[x+1] > count[x] {
			order = append(order, x)
		}
	}
	slices.SortStableFunc(order, func(x, y int) int { return (count[y+1] - count[y]) - (count[x+1] - count[x]) })
	used := make([]bool, ns)
	disp := make([]uint32, nb)
	slotOf := make([]int, len(keys))
	for _, x := range order {
		members := byBucket[count[x]:count[x+1]]
		// Two keys with one slot hash in one bucket: no displacement
		// separates them; another seed will.
		for j, i := range members {
			for _, o := range members[:j] {
				if hashOf[i] == hashOf[o] {
					return false
				}
			}
		}
		found := false
		for d := uint32(0); d < uint32(ns) && !found; d++ {
			found = true
			for _, i := range members {
				if used[(hashOf[i]^d)&uint32(ns-1)] {
					found = false
					break
				}
			}
			if found {
				disp[x] = d
				for _, i := range members {
					sl := (hashOf[i] ^ d) & uint32(ns-1)
					used[sl] = true
					slotOf[i] = int(sl)
				}
			}
		}
		if !found {
			return false
		}
	}
	t.disp, t.slotOf = disp, slotOf
	return true
}

// perfectEntry is one entry of a perfect-hash table: its key chunks
// (the port for a port-indexed table) and value.
type perfectEntry struct {
	key   []uint64
	value abi.TableValue
}

// entriesOf returns the shape's entries with their values.
func (t *perfectTable) entriesOf(sh *shape, value func(rule int) abi.TableValue) []perfectEntry {
	out := make([]perfectEntry, len(sh.ents))
	for i, en := range sh.ents {
		out[i] = perfectEntry{key: t.chunksOf(en.key), value: value(en.rule)}
	}
	return out
}

// fill writes the table of ents (the entries the table was built for, in
// that order) into a generation's value.
func (t *perfectTable) fill(blob []byte, ents []perfectEntry) {
	b := blob[t.off : t.off+t.size]
	put := func(v []byte, tv abi.TableValue) {
		binary.NativeEndian.PutUint32(v[0:], tv.Prio)
		binary.NativeEndian.PutUint32(v[4:], tv.Slot)
		binary.NativeEndian.PutUint32(v[8:], tv.Body)
	}
	low := uint32(abi.NoRule)
	if t.port {
		for p := 0; p < (t.size-8)/tableValueSize; p++ {
			put(b[8+p*tableValueSize:], abi.TableValue{Prio: abi.NoRule})
		}
		for _, en := range ents {
			put(b[8+int(en.key[0])*tableValueSize:], en.value)
			low = min(low, en.value.Prio)
		}
		binary.NativeEndian.PutUint32(b, low)
		return
	}
	binary.NativeEndian.PutUint64(b[0:], t.seed)
	for x, d := range t.disp {
		binary.NativeEndian.PutUint32(b[perfectHeader+4*x:], d<<t.shift)
	}
	for sl := 0; sl < 1<<t.sb; sl++ {
		e := b[t.slotsOff+sl*t.esz:]
		clear(e[:t.esz])
		put(e[8*t.chunks:], abi.TableValue{Prio: abi.NoRule})
	}
	lo, hi := ^uint32(0), uint32(0)
	for i, en := range ents {
		e := b[t.slotsOff+t.slotOf[i]*t.esz:]
		for j, c := range en.key {
			binary.NativeEndian.PutUint64(e[8*j:], c)
		}
		w := t.firstWord(en.key)
		lo, hi = min(lo, w), max(hi, w)
		put(e[8*t.chunks:], en.value)
		low = min(low, en.value.Prio)
	}
	if len(ents) > 0 {
		// The program compares the word before masking it.
		hi |= ^t.words[0].mask
	}
	binary.NativeEndian.PutUint32(b[8:], low)
	binary.NativeEndian.PutUint32(b[16:], lo)
	binary.NativeEndian.PutUint32(b[20:], hi)
}

// firstWord is the first key word of a key's chunks.
func (t *perfectTable) firstWord(key []uint64) uint32 {
	if len(t.words) > 1 {
		return uint32(key[0] >> 32)
	}
	return uint32(key[0])
}

// lookup is the Go side of the emitted lookup (for tests): the entry's
// value words, or ok false.
func (t *perfectTable) lookup(blob []byte, key []uint64) (prio, slot, body uint32, ok bool) {
	b := blob[t.off : t.off+t.size]
	if t.port {
		if key[0] > 0xffff {
			return 0, 0, 0, false
		}
		v := b[8+int(key[0])*tableValueSize:]
		prio = binary.NativeEndian.Uint32(v)
		return prio, binary.NativeEndian.Uint32(v[4:]), binary.NativeEndian.Uint32(v[8:]), prio != abi.NoRule
	}
	if w0 := t.firstWord(key); w0 < binary.NativeEndian.Uint32(b[16:]) || w0 > binary.NativeEndian.Uint32(b[20:]) {
		return 0, 0, 0, false
	}
	x, hs := t.hash(key, binary.NativeEndian.Uint64(b))
	d := binary.NativeEndian.Uint32(b[perfectHeader+4*x:])
	e := b[t.slotsOff+int((hs^d>>t.shift)&(1<<t.sb-1))*t.esz:]
	for j, c := range key {
		if binary.NativeEndian.Uint64(e[8*j:]) != c {
			return 0, 0, 0, false
		}
	}
	v := e[8*t.chunks:]
	prio = binary.NativeEndian.Uint32(v)
	return prio, binary.NativeEndian.Uint32(v[4:]), binary.NativeEndian.Uint32(v[8:]), prio != abi.NoRule
}

// regPerfect holds, from perfectBase to a segment's last probe, the
// pointer to the live generation's value of the perfect-hash tables. It is
// regL4 (frame.go), which nothing between the parse and the bodies reads
// and every action that needs reloads: a register copy per probe instead
// of a stack load, and no spill.
const regPerfect = regL4

// perfectBase emits, at the start of a segment with perfect tables, the
// pointer to the live generation's value into regPerfect: each generation
// is a map of its own (abi.PerfectGen), whose value's address is a
// constant of the program (direct value access), so the pointer is one of
// two constants, picked by the generation the packet read (slotGen, or
// R2 when inR2). picked labels the code after it.
func (c *compiler) perfectBase(picked string, inR2 bool) {
	e := &c.e
	e.comment("the live generation of the perfect-hash tables")
	gen := asm.R2
	if !inR2 {
		gen = asm.R1
		e.emit(ldx(gen, asm.R10, slotGen, asm.DWord))
	}
	e.emit(
		asm.LoadMapValue(regPerfect, 0, 0).WithReference(abi.PerfectGen(0)),
		asm.JEq.Imm(gen, 0, picked),
		asm.LoadMapValue(regPerfect, 0, 0).WithReference(abi.PerfectGen(1)),
	)
	e.label(picked)
}

// perfectPtr emits R0 = the live generation's value of the perfect-hash
// tables.
func (c *compiler) perfectPtr() {
	c.e.emit(mov(asm.R0, regPerfect))
}

// perfectLookup emits the probe of a shape's perfect-hash table, after its
// residual checks; a hit with a lower priority than the best so far
// becomes the best. skipLow: first test the table's lowest priority
// against the best so far.
func (c *compiler) perfectLookup(sh *shape, miss string, skipLow bool) {
	e := &c.e
	t := sh.perfect
	if t.port {
		c.portLookup(t, miss)
		return
	}
	// The first key word, its range, then the key chunks: in R4 when
	// one, else at slotTKey. The range's top has the bits the word's
	// mask clears set (fill), so the word is masked after the test: a
	// packet the range rules out skips the mask.
	w0 := t.words[0]
	c.keyWord(asm.R4, keyWord{slot: w0.slot, mask: 0xffffffff, mark: w0.mark, addr: w0.addr, idx: w0.idx})
	// Offsets past 32 KiB don't fit a load: R0 points at the table.
	c.perfectPtr()
	if t.off != 0 {
		e.emit(asm.Add.Imm(asm.R0, int32(t.off)))
	}
	e.emit(
		ldx(asm.R1, asm.R0, 16, asm.Word),
		asm.JLT.Reg(asm.R4, asm.R1, miss),
		ldx(asm.R1, asm.R0, 20, asm.Word),
		asm.JGT.Reg(asm.R4, asm.R1, miss),
	)
	if w0.mask != 0xffffffff {
		e.emit(asm.And.Imm32(asm.R4, int32(w0.mask)))
	}
	for j := 0; j < t.chunks; j++ {
		dst := asm.R4
		if j > 0 {
			dst = asm.R1
			c.keyWord(dst, t.words[2*j])
		}
		if 2*j+1 < len(t.words) {
			c.keyWord(asm.R2, t.words[2*j+1])
			e.emit(asm.LSh.Imm(dst, 32), asm.Or.Reg(dst, asm.R2))
		}
		if t.chunks > 1 {
			e.emit(stx(asm.R10, slotTKey+int16(8*j), dst, asm.DWord))
		}
	}
	if skipLow {
		e.emit(
			ldx(asm.R1, asm.R0, 8, asm.Word),
			ldx(asm.R2, asm.R10, slotBest, asm.DWord),
			asm.JGE.Reg(asm.R1, asm.R2, miss),
		)
	}
	if t.chunks == 1 {
		e.emit(ldx(asm.R1, asm.R0, 0, asm.DWord), asm.Mul.Reg(asm.R1, asm.R4))
	} else {
		e.emit(ldx(asm.R3, asm.R0, 0, asm.DWord), ldx(asm.R1, asm.R10, slotTKey, asm.DWord))
		for j := 1; j < t.chunks; j++ {
			e.emit(asm.Mul.Reg(asm.R1, asm.R3), ldx(asm.R2, asm.R10, slotTKey+int16(8*j), asm.DWord), asm.Add.Reg(asm.R1, asm.R2))
		}
		e.emit(asm.Mul.Reg(asm.R1, asm.R3))
	}
	e.emit(
		// the bucket's displacement (top bb bits)
		mov(asm.R2, asm.R1),
		asm.RSh.Imm(asm.R2, int32(64-t.bb)),
		asm.LSh.Imm(asm.R2, 2),
		asm.Add.Reg(asm.R2, asm.R0),
		ldx(asm.R2, asm.R2, perfectHeader, asm.Word),
		// the slot (the next sb bits; the mask after the xor drops the
		// bucket's bits above them)
	)
	if t.shift > 0 {
		e.emit(
			asm.RSh.Imm(asm.R1, int32(64-t.bb-t.sb-t.shift)),
			asm.Xor.Reg(asm.R1, asm.R2),
			asm.And.Imm(asm.R1, int32((1<<t.sb-1)<<t.shift)),
		)
	} else {
		e.emit(
			asm.RSh.Imm(asm.R1, int32(64-t.bb-t.sb)),
			asm.Xor.Reg(asm.R1, asm.R2),
			asm.And.Imm(asm.R1, int32(1<<t.sb-1)),
			asm.Mul.Imm(asm.R1, int32(t.esz)),
		)
	}
	// The slots' offset in the loads when it fits 16 bits.
	at := int16(0)
	if t.slotsOff+t.esz <= 1<<15 {
		at = int16(t.slotsOff)
	} else {
		e.emit(asm.Add.Imm(asm.R1, int32(t.slotsOff)))
	}
	e.emit(asm.Add.Reg(asm.R0, asm.R1))
	for j := 0; j < t.chunks; j++ {
		e.emit(ldx(asm.R1, asm.R0, at+int16(8*j), asm.DWord))
		if t.chunks == 1 {
			e.emit(asm.JNE.Reg(asm.R1, asm.R4, miss))
		} else {
			e.emit(ldx(asm.R2, asm.R10, slotTKey+int16(8*j), asm.DWord), asm.JNE.Reg(asm.R1, asm.R2, miss))
		}
	}
	c.hit(at+int16(8*t.chunks), miss, false)
}

// portLookup emits the probe of a port-indexed table (as cheap as a test
// of its lowest priority would be). The port slot holds a port or 0x10000
// (absent), which the verifier knows, and the table has a value for each.
func (c *compiler) portLookup(t *perfectTable, miss string) {
	e := &c.e
	e.emit(ldx(asm.R1, asm.R10, t.words[0].slot, asm.DWord))
	c.perfectPtr()
	e.emit(
		asm.Add.Imm(asm.R0, int32(t.off+t.slotsOff)),
		asm.Mul.Imm(asm.R1, tableValueSize),
		asm.Add.Reg(asm.R0, asm.R1),
	)
	c.hit(0, miss, false)
}

// keyWord emits dst = one word of a shape's key (zero-extended).
func (c *compiler) keyWord(dst asm.Register, w keyWord) {
	e := &c.e
	if w.mark {
		e.emit(ldx(dst, asm.R6, skbMark, asm.Word))
	} else {
		e.emit(ldx(dst, asm.R10, w.slot, asm.Word))
	}
	if w.addr {
		e.emit(asm.HostTo(asm.BE, dst, asm.Word))
	}
	if w.mask != 0xffffffff {
		e.emit(asm.And.Imm32(dst, int32(w.mask)))
	}
}

// hit takes the table value {prio, slot, body} at R0+at: a priority lower
// than the best so far becomes the best (the segment's first probe has no
// best to compare with). empty0: priority 0 is an empty
// slot (arrays; perfect-hash tables mark empty slots abi.NoRule).
func (c *compiler) hit(at int16, miss string, empty0 bool) {
	c.e.emit(ldx(asm.R1, asm.R0, at, asm.Word))
	switch {
	case empty0:
		c.e.emit(asm.JEq.Imm(asm.R1, 0, miss))
		if c.firstProbe {
			break // no hit yet: any entry is the best
		}
		fallthrough
	case !c.firstProbe:
		c.e.emit(
			ldx(asm.R2, asm.R10, slotBest, asm.DWord),
			asm.JGE.Reg(asm.R1, asm.R2, miss),
		)
	default:
		// No hit yet (the best so far is abi.NoRule): any priority is
		// the best, an empty slot's too, which is abi.NoRule: taking it
		// changes nothing (the slot and body of a best of abi.NoRule
		// are never read).
	}
	c.e.emit(
		stx(asm.R10, slotBest, asm.R1, asm.DWord),
		ldx(asm.R1, asm.R0, at+4, asm.Word),
		stx(asm.R10, slotRule, asm.R1, asm.DWord),
		ldx(asm.R1, asm.R0, at+8, asm.Word),
		stx(asm.R10, slotBody, asm.R1, asm.DWord),
	)
	c.e.label(miss)
}

// Incremental changes (see layout.go): the datapath rebuilds one shape's
// table inside the spare generation's value without compiling.

// PerfectLayout is where one shape's table sits in the perfect-hash
// tables' value and how its key is laid out; it is stored with the hook's
// state (JSON).
type PerfectLayout struct {
	Shape      uint32        `json:"shape"`          // the shape's id (ShapeLayout.ID)
	Port       bool          `json:"port,omitempty"` // indexed by the port
	Off        int           `json:"off"`
	Size       int           `json:"size"`
	BucketBits int           `json:"bucket_bits,omitempty"`
	SlotBits   int           `json:"slot_bits,omitempty"`
	Chunks     int           `json:"chunks,omitempty"`
	EntrySize  int           `json:"entry_size"`
	Shift      int           `json:"shift,omitempty"`
	SlotsOff   int           `json:"slots_off"`
	Words      []PerfectWord `json:"words"`
}

// PerfectWord is one key word: its index in the table key (the words after
// the first of abi's TablePrefix keys), its mask, whether an address.
type PerfectWord struct {
	Idx  int    `json:"idx"`
	Mask uint32 `json:"mask"`
	Addr bool   `json:"addr,omitempty"`
}

// PerfectEntry is an entry to put: its key as in abi's TablePrefix tables
// (the words after the first) and value.
type PerfectEntry struct {
	Key   []byte
	Value abi.TableValue
}

func (t *perfectTable) layout() *PerfectLayout {
	l := &PerfectLayout{Port: t.port, Off: t.off, Size: t.size, BucketBits: t.bb, SlotBits: t.sb, Chunks: t.chunks,
		EntrySize: t.esz, Shift: t.shift, SlotsOff: t.slotsOff}
	for _, w := range t.words {
		l.Words = append(l.Words, PerfectWord{Idx: w.idx, Mask: w.mask, Addr: w.addr})
	}
	return l
}

func (l *PerfectLayout) table() *perfectTable {
	t := &perfectTable{port: l.Port, off: l.Off, size: l.Size, bb: l.BucketBits, sb: l.SlotBits, chunks: l.Chunks,
		esz: l.EntrySize, shift: l.Shift, slotsOff: l.SlotsOff}
	for _, w := range l.Words {
		t.words = append(t.words, keyWord{idx: w.Idx, mask: w.Mask, addr: w.Addr})
	}
	return t
}

// entries reads the table's entries back from a generation's value.
func (t *perfectTable) entries(blob []byte) []perfectEntry {
	b := blob[t.off : t.off+t.size]
	value := func(v []byte) abi.TableValue {
		return abi.TableValue{Prio: binary.NativeEndian.Uint32(v), Slot: binary.NativeEndian.Uint32(v[4:]), Body: binary.NativeEndian.Uint32(v[8:])}
	}
	// Counted first, so that the entries and their keys take one
	// allocation each (ten thousand small ones were most of the time).
	n := 0
	if t.port {
		for p := 0; p < 1<<16; p++ {
			if value(b[8+p*tableValueSize:]).Prio != abi.NoRule {
				n++
			}
		}
	} else {
		for sl := 0; sl < 1<<t.sb; sl++ {
			if value(b[t.slotsOff+sl*t.esz+8*t.chunks:]).Prio != abi.NoRule {
				n++
			}
		}
	}
	out := make([]perfectEntry, 0, n)
	if t.port {
		keys := make([]uint64, n)
		for p := 0; p < 1<<16; p++ {
			if v := value(b[8+p*tableValueSize:]); v.Prio != abi.NoRule {
				key := keys[len(out) : len(out)+1 : len(out)+1]
				key[0] = uint64(p)
				out = append(out, perfectEntry{key: key, value: v})
			}
		}
		return out
	}
	keys := make([]uint64, n*t.chunks)
	for sl := 0; sl < 1<<t.sb; sl++ {
		e := b[t.slotsOff+sl*t.esz:]
		if v := value(e[8*t.chunks:]); v.Prio != abi.NoRule {
			k := len(out) * t.chunks
			key := keys[k : k+t.chunks : k+t.chunks]
			for j := range key {
				key[j] = binary.NativeEndian.Uint64(e[8*j:])
			}
			out = append(out, perfectEntry{key: key, value: v})
		}
	}
	return out
}

// PerfectEntries returns the entries of table l in a generation's
// perfect-hash value, keys in PerfectEntry's form (for checks of what the
// maps hold, entry by entry).
func PerfectEntries(blob []byte, l *PerfectLayout) []PerfectEntry {
	t := l.table()
	if len(blob) < t.off+t.size {
		return nil
	}
	n := 0
	for _, w := range t.words {
		n = max(n, w.idx+1)
	}
	var out []PerfectEntry
	for _, en := range t.entries(blob) {
		key := make([]byte, 4*n)
		for i, w := range t.words {
			v := uint32(en.key[i/2]) // the chunk's second word, or its only one
			if i%2 == 0 && i+1 < len(t.words) {
				v = uint32(en.key[i/2] >> 32)
			}
			if w.addr {
				binary.BigEndian.PutUint32(key[4*w.idx:], v)
			} else {
				binary.NativeEndian.PutUint32(key[4*w.idx:], v)
			}
		}
		out = append(out, PerfectEntry{Key: key, Value: en.value})
	}
	return out
}

// LookupPerfect returns the value of a key (as in PerfectEntry) in table l
// of a generation's value.
func LookupPerfect(blob []byte, l *PerfectLayout, key []byte) (abi.TableValue, bool) {
	t := l.table()
	if len(blob) < t.off+t.size || len(key) < 4*(slices.MaxFunc(t.words, func(a, b keyWord) int { return a.idx - b.idx }).idx+1) {
		return abi.TableValue{}, false
	}
	prio, slot, body, ok := t.lookup(blob, t.chunksOf(key))
	return abi.TableValue{Prio: prio, Slot: slot, Body: body}, ok
}

// RebuildPerfect returns a copy of live (a generation's value of the
// perfect-hash tables) whose table l holds its entries less the keys of
// del, with put's added or replaced. ok is false when the entries exceed
// the table's capacity (a compilation would lay the table out larger: the
// program changes) or no hash was found: compile the hook again.
func RebuildPerfect(live []byte, l *PerfectLayout, put []PerfectEntry, del [][]byte) (blob []byte, ok bool) {
	t := l.table()
	if len(live) < t.off+t.size {
		return nil, false
	}
	// Only the changed keys are indexed: the table may hold ten thousand
	// (a map of them all was a sixth of a rule change's CPU).
	var buf []byte
	keyOf := func(k []uint64) []byte {
		buf = buf[:0]
		for _, c := range k {
			buf = binary.NativeEndian.AppendUint64(buf, c)
		}
		return buf
	}
	gone := make(map[string]bool, len(del))
	for _, k := range del {
		gone[string(keyOf(t.chunksOf(k)))] = true
	}
	// The entries put, in order; a key put twice keeps its first place
	// and its last value.
	var puts []perfectEntry
	at := make(map[string]int, len(put))
	for _, p := range put {
		en := perfectEntry{key: t.chunksOf(p.Key), value: p.Value}
		if t.port && en.key[0] > 0xffff {
			return nil, false
		}
		if i, ok := at[string(keyOf(en.key))]; ok {
			puts[i] = en
			continue
		}
		at[string(keyOf(en.key))] = len(puts)
		puts = append(puts, en)
	}
	// Kept entries in their order, a put value replacing a kept key's in
	// place; the other puts (deleted keys put again too) at the end.
	ents := t.entries(live)
	next := make([]perfectEntry, 0, len(ents)+len(puts))
	placed := make([]bool, len(puts))
	for _, en := range ents {
		k := keyOf(en.key)
		if gone[string(k)] {
			continue
		}
		if i, ok := at[string(k)]; ok {
			en, placed[i] = puts[i], true
		}
		next = append(next, en)
	}
	for i, en := range puts {
		if !placed[i] {
			next = append(next, en)
		}
	}
	if !t.port {
		// A compilation gives a table of n entries 2n slots.
		if len(next) > 1<<t.sb/2 {
			return nil, false
		}
		keys := make([][]uint64, len(next))
		for i, en := range next {
			keys[i] = en.key
		}
		if len(keys) > 0 && !t.build(keys) {
			return nil, false
		}
		if len(keys) == 0 {
			t.disp = make([]uint32, 1<<t.bb)
		}
	}
	blob = slices.Clone(live)
	t.fill(blob, next)
	return blob, true
}
