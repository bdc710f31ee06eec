package compiler

import (
	"encoding/binary"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Shapes past the code budget: the record scan looks them up.
//
// Each shape emitted as code (a table lookup, or an inline rule) is code
// the verifier walks once per way the program can reach it, and the ways
// multiply from one lookup to the next (each keeps a "best so far"): a
// hundred shapes of ten rules each exceeded its limit. So in a hook of more
// than smallHook rules at most maxCodeShapes shapes and inline rules are
// code, the shapes with the most rules first. Every other shape that
// several rules share becomes a *shape record* in the record scan
// (linear.go): the record holds the shape's residual tests as any record
// does, its keyed fields are left out, and when the packet passes them
// the scan builds the shape's key and looks it up in the shape's table
// (tableName(shapeKeyWords)): a hit lower than the best so far becomes the
// best, and the scan goes on. A shape record sits where the shape's first
// rule is, with its priority, so the records stay in priority order. Rules
// over the budget that don't end evaluation become ordinary records.
//
// The scan function is verified once whatever its records, so any number
// of shapes loads; per packet a shape record costs one record's tests and
// one hash lookup, whatever the number of its rules.

// maxCodeShapes bounds the shapes and inline rules of a large hook that
// are code (with scan calls). A unit costs the verifier its code times the
// ways the parse guard reaches it (about 190), and an inline rule can be
// long: 16 reached 260 000 processed on 3 000 rules of 300 templates
// (466 000 while action bodies were code, before tbla), 8 168 000.
const maxCodeShapes = 8

// shapeKeyWords is the key of every shape record's table after the first
// word (shape id<<1 | generation): saddr and daddr (4 words each, masked),
// sport, dport, meta mark & mask, ct mark & mask; fields the shape does not
// key on are 0.
const shapeKeyWords = 12

// shapeKeyMap is the per-CPU scratch the scan builds a shape's key in (the
// scan struct has no room for it).
const shapeKeyMap = "shape_key"

// A shape record's fields (see the record layout in linear.go): the keyed
// fields are left out of the residual tests (kind none, no flag), and
// fields a shape record has no use for hold the key's layout.
const (
	recShape     = 1 << 13 // flag: a shape record
	recShapeID   = recSlot // u32 the shape's id
	recShapeKeys = recBody // u32 keyed fields: shapeKey* bits
	recKeyMeta   = recSetMask
	recKeyCt     = recSetVal
	// keyed addresses: their 4 mask words at recSaddr+4, recDaddr+4
)

const (
	shapeKeySaddr = 1 << iota
	shapeKeyDaddr
	shapeKeySport
	shapeKeyDport
)

// overBudget is which rules the budget sends to the scan.
type overBudget struct {
	on       bool
	demoted  []bool // rule i goes to the record scan
	byShape  []bool // and it is in shape records (else a record of its own)
	variants [][]ruleVariant
	rules    []*grammar.Rule
	scan     []bool // rules scanned for their shapes alone (c.scanned)
}

// any reports whether seg has a rule over the budget.
func (b *overBudget) any(seg segment) bool {
	if b == nil || !b.on {
		return false
	}
	return slices.Contains(b.demoted[seg.first:seg.first+seg.n], true)
}

// newBudget sends to the scan, in a large hook, the rules of the shapes
// past the maxCodeShapes with the most rules.
func (c *compiler) newBudget(rules []*grammar.Rule, variants [][]ruleVariant, scan []bool) *overBudget {
	b := &overBudget{
		on:      len(rules) > smallHook,
		demoted: make([]bool, len(rules)), byShape: make([]bool, len(rules)),
		variants: variants, rules: rules, scan: scan,
	}
	c.over = b
	if !b.on {
		return b
	}
	count, first := map[string]int{}, map[string]int{}
	for i := range rules {
		if scan[i] {
			continue
		}
		for _, v := range variants[i] {
			if _, ok := first[v.sh.key]; !ok {
				first[v.sh.key] = i
			}
			count[v.sh.key]++
		}
	}
	keys := make([]string, 0, len(count))
	for k := range count {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b string) int {
		if count[a] != count[b] {
			return count[b] - count[a]
		}
		return first[a] - first[b]
	})
	if len(keys) <= maxCodeShapes {
		return b
	}
	out := map[string]bool{}
	for _, k := range keys[maxCodeShapes:] {
		out[k] = true
	}
	for i := range rules {
		if !scan[i] && slices.ContainsFunc(variants[i], func(v ruleVariant) bool { return out[v.sh.key] }) {
			b.demote1(i)
		}
	}
	return b
}

func (b *overBudget) demote1(i int) {
	b.demoted[i] = true
	b.byShape[i] = terminal(b.rules[i]) && !b.scan[i] && len(b.variants[i]) > 0
}

// demote counts the code of segs (each shape looked up, each rule tested
// inline, each scan call) and sends what is past the budget to the scan:
// the shapes and inline rules past it, and every rule of the segments
// after the one where it ran out. It reports whether it sent any rule
// (then the rules are classified again: rules all scanned make one
// segment).
func (b *overBudget) demote(segs []segment) bool {
	if !b.on {
		return false
	}
	used, more := 0, false
	send := func(i int) {
		if !b.demoted[i] {
			b.demote1(i)
			more = true
		}
	}
	for _, seg := range segs {
		if used > maxCodeShapes {
			for i := seg.first; i < seg.first+seg.n; i++ {
				send(i)
			}
			continue
		}
		if seg.inline {
			for i := seg.first; i < seg.first+seg.n; i++ {
				if used++; used > maxCodeShapes {
					send(i)
				}
			}
			continue
		}
		for _, sh := range seg.shapes {
			if used++; used > maxCodeShapes {
				for _, en := range sh.ents {
					send(en.rule)
				}
			}
		}
		for _, i := range seg.members {
			if used++; used > maxCodeShapes {
				send(i)
			}
		}
		if len(seg.linear) > 0 || more {
			used++ // a scan call (sending rules to the scan makes one)
		}
	}
	return more
}

// scanShapesOf makes the shapes of seg's linear rules that are in shape
// records: one per shape key, in the order of their first rules, holding
// the keys of its rules (the first rule of a key wins: they all end
// evaluation). A record of a rule that doesn't end evaluation (it may set
// the mark the next ones test) starts new shape records for the rules
// after it.
func (c *compiler) scanShapesOf(rules []*grammar.Rule, seg *segment) {
	b := c.over
	if !b.on {
		return
	}
	var byKey map[string]*shape
	var owner map[ownerKey]bool
	for k, i := range seg.linear {
		if k == 0 || !terminal(rules[i]) {
			byKey, owner = map[string]*shape{}, map[ownerKey]bool{}
		}
		if !b.byShape[i] {
			continue
		}
		for _, v := range b.variants[i] {
			sh := byKey[v.sh.key]
			if sh == nil {
				cp := *v.sh
				sh = &cp
				sh.tmpl, sh.first = rules[i], i
				byKey[sh.key] = sh
				seg.scanShapes = append(seg.scanShapes, sh)
			}
			for _, k := range v.keys.all() {
				ok := ownerKey{sh, string(k)}
				if owner[ok] {
					sh.shadowed = true
					continue
				}
				owner[ok] = true
				sh.ents = append(sh.ents, tabEntry{rule: i, key: fixedKey(sh, k)})
			}
		}
	}
}

// fixedKey lays a shape's key (the words after the first, keyed fields
// only) out as shapeKeyWords words.
func fixedKey(sh *shape, k []byte) []byte {
	out := make([]byte, 4*shapeKeyWords)
	at := 0
	take := func(dst, n int) {
		copy(out[dst:], k[at:at+n])
		at += n
	}
	for j := 0; j < 2; j++ {
		if sh.keyed[keySaddr+keyField(j)] {
			n := 4
			if sh.fam == 6 {
				n = 16
			}
			take(16*j, n)
		}
	}
	for j := 0; j < 2; j++ {
		if sh.keyed[keySport+keyField(j)] {
			take(32+4*j, 4)
		}
	}
	for j := 0; j < 2; j++ {
		if sh.keyed[keyMeta+keyField(j)] {
			take(40+4*j, 4)
		}
	}
	return out
}

// placeScanShapes gives seg's shape records their ids and table.
func (c *compiler) placeScanShapes(seg *segment) {
	for _, sh := range seg.scanShapes {
		sh.id = c.nextShape
		c.nextShape++
		sh.words = shapeKeyWords
		sh.table = tableName(shapeKeyWords)
		c.tables[sh.table] = append(c.tables[sh.table], sh)
	}
}

// segmentRecords encodes seg's linear rules in order: a record per rule,
// and for the rules in shape records their shapes' records, each where its
// first rule is.
func (c *compiler) segmentRecords(rules []*grammar.Rule, seg segment) ([]byte, error) {
	var recs []byte
	at := map[int][]*shape{} // shapes by first rule
	for _, sh := range seg.scanShapes {
		at[sh.first] = append(at[sh.first], sh)
	}
	for _, i := range seg.linear {
		if c.over == nil || !c.over.byShape[i] {
			rec, err := c.record(rules[i], i, seg.scanFx && c.fxInScan(rules[i]))
			if err != nil {
				return nil, err
			}
			recs = append(recs, rec...)
			continue
		}
		for _, sh := range at[i] {
			rec, err := c.shapeRecord(sh)
			if err != nil {
				return nil, err
			}
			recs = append(recs, rec...)
		}
	}
	return recs, nil
}

// shapeRecord encodes shape sh's record: its template's residual tests, its
// first rule's priority, its key layout.
func (c *compiler) shapeRecord(sh *shape) ([]byte, error) {
	r := *sh.tmpl
	if sh.keyed[keySaddr] {
		r.Saddr = nil
	}
	if sh.keyed[keyDaddr] {
		r.Daddr = nil
	}
	if sh.keyed[keySport] {
		r.Sport = nil
	}
	if sh.keyed[keyDport] {
		r.Dport = nil
	}
	if sh.keyed[keyMeta] {
		r.MetaMark = nil
	}
	if sh.keyed[keyCt] {
		r.CtMark = nil
	}
	r.Counter, r.SetMetaMark, r.SetCtMark = false, nil, nil
	b, err := c.record(&r, sh.first, false)
	if err != nil {
		return nil, err
	}
	put := func(off int, v uint32) { binary.NativeEndian.PutUint32(b[off:], v) }
	put(recFlags, nativeU32(b[recFlags:])|recShape)
	put(recShapeID, sh.id)
	var keys uint32
	for j := 0; j < 2; j++ {
		if !sh.keyed[keySaddr+keyField(j)] {
			continue
		}
		keys |= shapeKeySaddr << j
		left := sh.bits[j]
		for w := 0; w < 4; w++ {
			bits := min(max(left, 0), 32)
			left -= 32
			var mask [4]byte
			for k := 0; k < bits; k++ {
				mask[k/8] |= 0x80 >> (k % 8)
			}
			put(recSaddr+20*j+4+4*w, binary.NativeEndian.Uint32(mask[:]))
		}
	}
	for j := 0; j < 2; j++ {
		if sh.keyed[keySport+keyField(j)] {
			keys |= shapeKeySport << j
		}
	}
	put(recShapeKeys, keys)
	put(recKeyMeta, 0)
	put(recKeyCt, 0)
	for j, off := range []int{recKeyMeta, recKeyCt} {
		if sh.keyed[keyMeta+keyField(j)] {
			put(off, sh.mask[j])
		}
	}
	if f := shapeFam(sh); f != 0 && b[recFam] == 0 {
		b[recFam] = byte(f)
		c.lin.uses.fam = true
	}
	c.lin.uses.shape = true
	return b, nil
}

// shapeHit emits the scan callback's part for a shape record that passed
// its residual tests: R6 the scan struct, R7 the record, R8 its flags. It
// builds the key in shapeKeyMap, looks it up, keeps a hit lower than the
// best so far and goes on with the next record.
func (c *compiler) shapeHit(next string) {
	t := c.lin
	e := &c.e
	e.label("lin_shape")
	e.comment("shape record (shapescan.go): look the packet's key up in the shape's table")
	e.emit(
		sti(asm.R6, scanKey, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, 0).WithReference(shapeKeyMap),
		mov(asm.R2, asm.R6),
		asm.Add.Imm(asm.R2, scanKey),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, next),
		mov(asm.R9, asm.R0),
		// Word 0: shape id<<1 | the generation whose records these are.
		ldx(asm.R1, asm.R7, recShapeID, asm.Word),
		asm.LSh.Imm(asm.R1, 1),
		ldx(asm.R2, asm.R6, scanCur, asm.Word),
		asm.JLT.Imm(asm.R2, int32(t.cap), "lin_shape_gen"),
		asm.Or.Imm(asm.R1, 1),
	)
	e.label("lin_shape_gen")
	e.emit(
		stx(asm.R9, 0, asm.R1, asm.Word),
		ldx(asm.R5, asm.R7, recShapeKeys, asm.Word),
	)
	// keyedMask leaves in R4 all ones when the shape keys on field bit,
	// else 0 (no branch: one path for the verifier).
	keyedMask := func(bit int32) {
		e.emit(
			mov(asm.R4, asm.R5),
			asm.RSh.Imm(asm.R4, int32(bitIndex(bit))),
			asm.And.Imm(asm.R4, 1),
			asm.Neg.Imm(asm.R4, 0),
		)
	}
	for j := int16(0); j < 2; j++ {
		keyedMask(shapeKeySaddr << j)
		for w := int16(0); w < 4; w++ {
			e.emit(
				ldx(asm.R1, asm.R6, scanSaddr+24*j+8+4*w, asm.Word),
				ldx(asm.R3, asm.R7, recSaddr+20*j+4+4*w, asm.Word),
				asm.And.Reg(asm.R3, asm.R4),
				asm.And.Reg(asm.R1, asm.R3),
				stx(asm.R9, 4+16*j+4*w, asm.R1, asm.Word),
			)
		}
	}
	for j := int16(0); j < 2; j++ {
		keyedMask(shapeKeySport << j)
		e.emit(
			ldx(asm.R1, asm.R6, scanSport+4*j, asm.Word),
			asm.And.Reg(asm.R1, asm.R4),
			stx(asm.R9, 36+4*j, asm.R1, asm.Word),
		)
	}
	for j, off := range []int16{recKeyMeta, recKeyCt} {
		e.emit(
			ldx(asm.R1, asm.R6, scanMark, asm.Word),
			ldx(asm.R3, asm.R7, off, asm.Word),
			asm.And.Reg(asm.R1, asm.R3),
			stx(asm.R9, 44+4*int16(j), asm.R1, asm.Word),
		)
	}
	e.emit(
		asm.LoadMapPtr(asm.R1, 0).WithReference(tableName(shapeKeyWords)),
		mov(asm.R2, asm.R9),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, next),
		ldx(asm.R1, asm.R0, 0, asm.Word),
		ldx(asm.R2, asm.R6, scanBest, asm.Word),
		asm.JGE.Reg(asm.R1, asm.R2, next),
		stx(asm.R6, scanBest, asm.R1, asm.Word),
		ldx(asm.R1, asm.R0, 4, asm.Word),
		stx(asm.R6, scanRule, asm.R1, asm.Word),
		ldx(asm.R1, asm.R0, 8, asm.Word),
		stx(asm.R6, scanBody, asm.R1, asm.Word),
		// The winner is this record (it has no counter or mark set for
		// lin_scan to do: the hit's body does them).
		ldx(asm.R1, asm.R6, scanCur, asm.Word),
		stx(asm.R6, scanWin, asm.R1, asm.Word),
		asm.Ja.Label(next),
	)
}

func bitIndex(bit int32) int {
	n := 0
	for bit > 1 {
		bit >>= 1
		n++
	}
	return n
}

// shapeKeySpec is the scratch map shape records build their keys in.
func (c *compiler) shapeKeySpec() {
	if c.lin == nil || !c.lin.uses.shape {
		return
	}
	c.spec.Maps[shapeKeyMap] = &ebpf.MapSpec{Name: shapeKeyMap, Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 4 * (1 + shapeKeyWords), MaxEntries: 1}
}

// IsShapeRecord reports whether rec (a record of the scan's map) is a
// shape record: its recSlot is a shape id, not a rule's counter slot.
func IsShapeRecord(rec []byte) bool {
	return len(rec) >= recSize && nativeU32(rec[recFlags:])&recShape != 0
}
