package compiler

import (
	"encoding/binary"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// Emission of table segments (see classify.go).
//
// Per packet the program reads the live generation from the control map
// once (abi.ControlMap); every table key starts with the word
// shape id<<1 | generation, so a commit can write the other generation's
// entries and switch with one 4-byte write: a packet sees the old tables or
// the new ones, never a mix.
//
// Table values are tableValue: {prio, slot, body} as three native u32.
const tableValueSize = 12

// tableName is the map of the shapes whose keys have words words after the
// first (one map per key size keeps the program's map count small).
func tableName(words int) string { return fmt.Sprintf("%s%d", abi.TablePrefix, 1+words) }

// place gives the segments' shapes their ids and tables: a perfect-hash
// table for a shape while the value stays under 4 MiB and the program has
// fewer than maxPerfectShapes of them (perfect.go), else a hash table per
// key size. Shapes keyed on one port are placed last, in the space the
// others leave. In a segment that takes the perfect-hash tables' value
// pointer anyway (another shape has a table there, or it has several
// one-port shapes), each is a port-indexed table in that value: its probe
// is three loads from the pointer. A segment's only one-port shape is a
// port array first: one inlined array lookup, where the value's would
// come on top of the probe. Then the other kind, then a hash table.
func (c *compiler) place(segs []segment) {
	var ports []*shape
	inValue := map[*shape]bool{} // one-port shapes whose segment takes the value
	for si := range segs {
		var segPorts []*shape
		perfect := false
		for _, sh := range segs[si].shapes {
			sh.id = c.nextShape
			c.nextShape++
			sh.table = tableName(sh.words)
			switch {
			case sh.portOnly():
				segPorts = append(segPorts, sh)
				continue
			case c.perfectShapes >= maxPerfectShapes:
				// Many shapes: hash tables, whose lookups are shorter
				// code for the verifier to walk.
			default:
				if t := newPerfectTable(sh, c.perfectSize); t != nil {
					sh.perfect, sh.table = t, perfectMap
					c.perfectSize += t.size
					c.perfectShapes++
					perfect = true
				}
			}
			c.tables[sh.table] = append(c.tables[sh.table], sh)
		}
		for _, sh := range segPorts {
			inValue[sh] = perfect || len(segPorts) > 1
		}
		ports = append(ports, segPorts...)
		c.placeScanShapes(&segs[si])
	}
	for _, sh := range ports {
		value := c.perfectSize+portTableSize <= maxPerfectBytes
		array := c.portArrays < maxPortArrays
		switch {
		case value && (inValue[sh] || !array):
			sh.perfect, sh.table = newPortTable(sh, c.perfectSize), perfectMap
			c.perfectSize += portTableSize
		case array:
			// An array indexed by generation<<16 | port; its entries
			// change one by one (Layout.Place).
			c.portArrays++
			sh.array = true
			sh.table = fmt.Sprintf("%sp%d", abi.TablePrefix, sh.id)
		}
		c.tables[sh.table] = append(c.tables[sh.table], sh)
	}
}

// segment emits one segment.
func (c *compiler) segment(rules []*grammar.Rule, seg segment) error {
	if seg.inline {
		for i := seg.first; i < seg.first+seg.n; i++ {
			c.maybeStubs()
			if err := c.rule(i, rules[i]); err != nil {
				return err
			}
		}
		return nil
	}
	c.maybeStubs()
	e := &c.e
	first := seg.first
	end := fmt.Sprintf("seg%d_end", first)
	e.comment("rules %d-%d: %d rules in %d shapes, looked up in tables; the lowest rule wins", first, first+seg.n-1, seg.n, len(seg.shapes))
	// The segment right after readGeneration finds "none yet" in slotBest
	// and the generation in R2.
	afterGen := len(e.insns) == c.genAt && e.pending == ""
	if !afterGen {
		c.noRuleYet()
	}
	if slices.ContainsFunc(seg.shapes, func(sh *shape) bool { return sh.perfect != nil }) {
		c.perfectBase(fmt.Sprintf("seg%d_tables", first), afterGen)
	}
	if len(seg.shapes) > 0 { // none: a segment of scanned rules (linear.go)
		if err := c.lookups(seg.shapes); err != nil {
			return err
		}
	}
	// The bodies of the segment's table and linear rules, one per
	// distinct body (known before emitLinear, which stores them).
	var classes []int // rule of each body
	classOf := map[string]int{}
	addClass := func(i int) {
		k := c.bodyKeys[i]
		if _, ok := classOf[k]; !ok {
			classOf[k] = len(classes)
			classes = append(classes, i)
		}
		c.bodyOf[i] = uint32(classOf[k])
	}
	for _, sh := range seg.shapes {
		for _, en := range sh.ents {
			addClass(en.rule)
		}
	}
	for _, i := range seg.linear {
		addClass(i)
	}
	if err := c.emitLinear(rules, seg); err != nil {
		return err
	}
	// Members: rules of shapes of their own, in order, each unless a table
	// rule before it matched.
	// They jump to the dispatch through a trampoline every few thousand
	// instructions, so the jumps stay in range however many they are.
	hop := 0
	found := fmt.Sprintf("seg%d_found%d", first, hop)
	since := len(e.insns)
	for _, i := range seg.members {
		if len(e.insns)-since > stubDistance/2 {
			hop++
			over := e.newLabel("over")
			e.emit(asm.Ja.Label(over))
			e.label(found)
			found = fmt.Sprintf("seg%d_found%d", first, hop)
			e.emit(asm.Ja.Label(found))
			e.label(over)
			since = len(e.insns)
		}
		c.maybeStubs()
		next := fmt.Sprintf("rule%d_end", i)
		e.owner = i + 1
		e.comment("rule %d handle %d: %s", i, rules[i].Handle, Describe(rules[i]))
		e.emit(
			ldx(asm.R1, asm.R10, slotBest, asm.DWord),
			asm.JLT.Imm(asm.R1, int32(c.prio(i)), found), // a table rule before it matched
		)
		err := c.matchesExcept(rules[i], next, [numKeyFields]bool{})
		if err == nil {
			err = c.body(i, rules[i], end)
		}
		e.owner = 0
		if err != nil {
			return err
		}
		e.label(next)
	}
	e.label(found)
	e.emit(
		ldx(asm.R1, asm.R10, slotBest, asm.DWord),
		asm.JEq.Imm32(asm.R1, -1, end),
		ldx(asm.R1, asm.R10, slotBody, asm.DWord),
	)
	label := func(cl int) string { return fmt.Sprintf("seg%d_body%d", first, cl) }
	c.dispatch(label, 0, len(classes))
	c.dynRule = true
	defer func() { c.dynRule = false }()
	for cl, i := range classes {
		r := rules[i]
		e.label(label(cl))
		if (len(seg.linear) > 0 || len(rules) > poolHook) && terminal(r) {
			// Shared with every segment (linscan.go: bodyPool).
			e.emit(asm.LongJump(c.pooledBody(i)))
			continue
		}
		r, fx := bodyRule(r, c.bodyKeys[i])
		e.comment("body %d, as rule %d handle %d: %s", cl, i, r.Handle, Describe(r))
		e.owner = i + 1
		c.famProtoAgain(r, end)
		c.fxDone = fx
		err := c.body(i, r, end)
		c.fxDone = false
		e.owner = 0
		if err != nil {
			return err
		}
	}
	e.label(end)
	return nil
}

// famProtoAgain emits, at the start of a body reached from a dispatch,
// the test of the rule's family and protocol again: the packet has them
// (its shape or record checked them), but the verifier would otherwise walk
// every body with every family and protocol some path reaches the dispatch
// with, and an action's code depends on them. A body that only accepts or
// drops (with counter, mark sets, trace) does not: it is walked the same
// whatever they are, and the matching packet skips two loads and compares.
func (c *compiler) famProtoAgain(r *grammar.Rule, fail string) {
	if !slices.ContainsFunc(r.Actions, func(a *grammar.Action) bool {
		return a.Kind != grammar.ActAccept && a.Kind != grammar.ActDrop
	}) {
		return
	}
	e := &c.e
	if r.Family != grammar.FamilyAny {
		fam := int32(4)
		if r.Family == grammar.FamilyIPv6 {
			fam = 6
		}
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, fam, fail))
	}
	if r.Proto != grammar.ProtoAny {
		e.emit(ldx(asm.R1, asm.R10, slotProto, asm.DWord), asm.JNE.Imm(asm.R1, int32(r.Proto.Number()), fail))
	}
}

// lookups emits the shapes' lookups grouped by the family, then the
// protocol their packets have, each tested once per group: groups of one
// family (protocol) in the order of their first shapes, then the group
// of either. A packet skips the shapes of other families and protocols in
// a jump or two: a group of one family (protocol) ends with a jump past
// the other ones to the group of either.
func (c *compiler) lookups(shapes []*shape) error {
	e := &c.e
	c.firstProbe = true
	defer func() { c.firstProbe = false }()
	fams := groupBy(shapes, shapeFam)
	anyFam := e.newLabel("family_any")
	for fi, fam := range fams {
		f := shapeFam(fam[0])
		if f == 0 {
			e.label(anyFam)
		}
		famEnd := e.newLabel("family_end")
		if f == 4 && c.ruleNeeds.v6 || f == 6 && c.ruleNeeds.v4 {
			e.comment("shapes of IPv%d packets", f)
			e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, int32(f), famEnd))
		}
		c.knownFam = f
		protos := groupBy(fam, shapeProto)
		anyProto := e.newLabel("proto_any")
		for pi, group := range protos {
			p := shapeProto(group[0])
			if p == 0 {
				e.label(anyProto)
			}
			end := e.newLabel("proto_end")
			if p != 0 {
				e.comment("shapes of %s packets", group[0].tmpl.Proto)
				e.emit(ldx(asm.R1, asm.R10, slotProto, asm.DWord), asm.JNE.Imm(asm.R1, int32(p), end))
			}
			c.knownProto = p
			for _, sh := range group {
				if err := c.shapeLookup(sh, !c.firstProbe); err != nil {
					return err
				}
				c.firstProbe = false
			}
			c.knownProto = 0
			if p != 0 && pi+1 < len(protos) && shapeProto(protos[pi+1][0]) != 0 {
				e.emit(asm.Ja.Label(anyProto))
			}
			e.label(end)
		}
		if shapeProto(protos[len(protos)-1][0]) != 0 {
			e.label(anyProto)
		}
		c.knownFam = 0
		if f != 0 && fi+1 < len(fams) && shapeFam(fams[fi+1][0]) != 0 {
			e.emit(asm.Ja.Label(anyFam))
		}
		e.label(famEnd)
	}
	if shapeFam(fams[len(fams)-1][0]) != 0 {
		e.label(anyFam)
	}
	return nil
}

// shapeFam is the family of a shape's packets (0: either), shapeProto
// their transport protocol (0: any).
func shapeFam(sh *shape) int {
	switch sh.tmpl.Family {
	case grammar.FamilyIPv4:
		return 4
	case grammar.FamilyIPv6:
		return 6
	}
	return sh.fam
}

func shapeProto(sh *shape) int {
	if sh.tmpl.Proto == grammar.ProtoAny {
		return 0
	}
	return int(sh.tmpl.Proto.Number())
}

// groupBy splits shapes by key: the groups of nonzero keys in the order of
// their first shape, then the group of key 0 (either family, any protocol).
func groupBy(shapes []*shape, key func(*shape) int) [][]*shape {
	var out [][]*shape
	var either []*shape
	at := map[int]int{}
	for _, sh := range shapes {
		k := key(sh)
		if k == 0 {
			either = append(either, sh)
			continue
		}
		i, ok := at[k]
		if !ok {
			i = len(out)
			at[k] = i
			out = append(out, nil)
		}
		out[i] = append(out[i], sh)
	}
	if either != nil {
		out = append(out, either)
	}
	return out
}

// shapeLookup emits one shape's residual checks, key and lookup; a hit with
// a lower priority than the best so far becomes the best. Shapes come in
// the order of their first rule; after the first, a perfect-hash table
// whose lowest priority can't beat the best so far is skipped (skipLow).
func (c *compiler) shapeLookup(sh *shape, skipLow bool) error {
	e := &c.e
	miss := fmt.Sprintf("shape%d_miss", sh.id)
	e.comment("shape %d: %s (%d entries in %s)", sh.id, sh.key, len(sh.ents), sh.table)
	c.inShape = true
	err := c.matchesExcept(sh.tmpl, miss, sh.keyed)
	c.inShape = false
	if err != nil {
		return err
	}
	if sh.fam != 0 && sh.tmpl.Family == grammar.FamilyAny && c.knownFam != sh.fam {
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, int32(sh.fam), miss))
	}
	if sh.perfect != nil {
		c.perfectLookup(sh, miss, skipLow)
		return nil
	}
	if sh.array {
		slot := int16(slotDport)
		if sh.keyed[keySport] {
			slot = slotSport
		}
		e.emit(
			ldx(asm.R1, asm.R10, slot, asm.DWord),
			asm.JGT.Imm(asm.R1, 0xffff, miss), // absent
			ldx(asm.R2, asm.R10, slotGen, asm.DWord),
			asm.LSh.Imm(asm.R2, 16),
			asm.Or.Reg(asm.R1, asm.R2),
			stx(asm.R10, slotTKey, asm.R1, asm.Word),
		)
		c.found(sh, miss)
		return nil
	}
	e.emit(
		ldx(asm.R1, asm.R10, slotGen, asm.DWord),
		asm.Or.Imm(asm.R1, int32(sh.id<<1)),
		stx(asm.R10, slotTKey, asm.R1, asm.Word),
	)
	off := int16(slotTKey + 4)
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
			var mask [4]byte
			for k := 0; k < bits; k++ {
				mask[k/8] |= 0x80 >> (k % 8)
			}
			mword := binary.NativeEndian.Uint32(mask[:])
			switch mword {
			case 0:
				e.emit(sti(asm.R10, off, 0, asm.Word))
			case 0xffffffff:
				e.emit(ldx(asm.R1, asm.R10, slot+4+int16(4*w), asm.Word), stx(asm.R10, off, asm.R1, asm.Word))
			default:
				e.emit(ldx(asm.R1, asm.R10, slot+4+int16(4*w), asm.Word), netImm(asm.And.Imm32(asm.R1, int32(mword))), stx(asm.R10, off, asm.R1, asm.Word))
			}
			off += 4
		}
	}
	for j, slot := range []int16{slotSport, slotDport} {
		if sh.keyed[keySport+keyField(j)] {
			// An absent port (abi: 0x10000) is in no table.
			e.emit(ldx(asm.R1, asm.R10, slot, asm.DWord), stx(asm.R10, off, asm.R1, asm.Word))
			off += 4
		}
	}
	for j := 0; j < 2; j++ {
		if sh.keyed[keyMeta+keyField(j)] {
			e.emit(ldx(asm.R1, asm.R6, skbMark, asm.Word))
			if sh.mask[j] != 0xffffffff {
				e.emit(asm.And.Imm32(asm.R1, int32(sh.mask[j])))
			}
			e.emit(stx(asm.R10, off, asm.R1, asm.Word))
			off += 4
		}
	}
	c.found(sh, miss)
	return nil
}

// found looks the key at slotTKey up in the shape's table; a hit with a
// lower priority than the best so far becomes the best.
func (c *compiler) found(sh *shape, miss string) {
	e := &c.e
	c.lookup(sh.table, slotTKey)
	e.emit(asm.JEq.Imm(asm.R0, 0, miss))
	c.hit(0, miss, true)
}

// readGeneration emits the read of the live generation into slotGen (and
// R2). When a segment follows at once (no record scan's set-up), also
// "none yet" into slotBest for it (one read of the control map); genAt
// then lets the segment check that it does start there (nothing emitted
// in between, no label another path jumps to).
func (c *compiler) readGeneration() {
	c.e.comment("live table generation, read once per packet")
	c.e.emit(
		asm.LoadMapValue(asm.R1, 0, 0).WithReference(abi.ControlMap),
		ldx(asm.R2, asm.R1, 0, asm.Word),
	)
	c.genStoreAt = len(c.e.insns)
	c.e.emit(
		asm.And.Imm(asm.R2, 1),
		stx(asm.R10, slotGen, asm.R2, asm.DWord),
	)
	if c.lin == nil {
		c.e.emit(ldx(asm.R1, asm.R1, 4, asm.Word), stx(asm.R10, slotBest, asm.R1, asm.DWord))
		c.genAt = len(c.e.insns)
	}
}

// dropUnreadGeneration removes readGeneration's mask and store of the
// generation when no instruction reads slotGen (the only segment that
// needs it took it from R2, which it compares with 0 only): two
// instructions less per packet.
func (c *compiler) dropUnreadGeneration() {
	i, ins := c.genStoreAt, c.e.insns
	if i <= 0 || i+1 >= len(ins) {
		return
	}
	and, st := ins[i], ins[i+1]
	if and.OpCode != asm.And.Op(asm.ImmSource) || and.Dst != asm.R2 || and.Constant != 1 || and.Symbol() != "" ||
		st.OpCode != asm.StoreMemOp(asm.DWord) || st.Dst != asm.R10 || st.Offset != slotGen || st.Symbol() != "" {
		return
	}
	for j, in := range ins {
		if j != i+1 && (in.Offset == slotGen || in.Constant == slotGen) {
			return
		}
	}
	c.e.insns = slices.Delete(ins, i, i+2)
}

// noRuleYet emits slotBest = abi.NoRule, read from the control map: the
// verifier must not know "none yet" as a constant (a branch it can decide
// marks the slot precise, and then every combination of hits and misses
// of the shapes is a state of its own).
func (c *compiler) noRuleYet() {
	c.e.emit(
		asm.LoadMapValue(asm.R1, 0, 4).WithReference(abi.ControlMap),
		ldx(asm.R1, asm.R1, 0, asm.Word),
		stx(asm.R10, slotBest, asm.R1, asm.DWord),
	)
}

// tableMaps adds the control map and the table maps, filled with
// generation 0.
func (c *compiler) tableMaps() {
	if len(c.tables) == 0 && len(c.extraTables) == 0 {
		return
	}
	if c.lin != nil {
		c.linearMapSpecs()
	}
	c.spec.Maps[abi.ControlMap] = &ebpf.MapSpec{
		Name: abi.ControlMap, Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1,
		Contents: []ebpf.MapKV{{Key: uint32(0), Value: abi.Control{Generation: 0, NoRule: abi.NoRule}}},
	}
	for name, shapes := range c.tables {
		if name == perfectMap {
			// Generation 1 starts zero: a map-only change copies the live
			// generation's value whole into the spare one.
			for gen := range uint32(2) {
				m := abi.PerfectGen(gen)
				c.spec.Maps[m] = &ebpf.MapSpec{Name: m, Type: ebpf.Array, KeySize: 4, ValueSize: uint32(c.perfectSize), MaxEntries: 1}
			}
			c.spec.Maps[abi.PerfectGen(0)].Contents = c.perfectContents(0)
			continue
		}
		if shapes[0].array {
			c.spec.Maps[name] = &ebpf.MapSpec{
				Name: name, Type: ebpf.Array, KeySize: 4, ValueSize: tableValueSize, MaxEntries: 2 << 16,
				Contents: c.entries(shapes, 0),
			}
			continue
		}
		n := 0
		for _, sh := range shapes {
			n += len(sh.ents)
		}
		c.spec.Maps[name] = &ebpf.MapSpec{
			Name: name, Type: ebpf.Hash, KeySize: uint32(4 + 4*shapes[0].words), ValueSize: tableValueSize,
			MaxEntries: uint32(capacity(2*n, 64)), Flags: 1, // BPF_F_NO_PREALLOC
			Contents: c.entries(shapes, 0),
		}
	}
}

// perfectContents is the entry of the perfect-hash tables' map of
// generation gen (abi.PerfectGen): the generation's whole value.
func (c *compiler) perfectContents(gen uint32) []ebpf.MapKV {
	if c.perfectBlob == nil {
		c.perfectBlob = make([]byte, c.perfectSize)
		for _, sh := range c.tables[perfectMap] {
			sh.perfect.fill(c.perfectBlob, sh.perfect.entriesOf(sh, func(i int) abi.TableValue {
				prio, slot := c.at(i)
				return abi.TableValue{Prio: prio, Slot: slot, Body: c.bodyOf[i]}
			}))
		}
	}
	return []ebpf.MapKV{{Key: binary.NativeEndian.AppendUint32(nil, 0), Value: c.perfectBlob}}
}

// entries are the map entries of shapes for generation gen (keys and
// values slices of two buffers: large tables have many).
func (c *compiler) entries(shapes []*shape, gen uint32) []ebpf.MapKV {
	n, keyBytes := 0, 0
	for _, sh := range shapes {
		n += len(sh.ents)
		for _, en := range sh.ents {
			keyBytes += 4 + len(en.key)
		}
	}
	out := make([]ebpf.MapKV, 0, n)
	keys := make([]byte, 0, keyBytes)
	vals := make([]byte, 0, n*tableValueSize)
	for _, sh := range shapes {
		for _, en := range sh.ents {
			at := len(keys)
			if sh.array {
				keys = binary.NativeEndian.AppendUint32(keys, gen<<16|binary.NativeEndian.Uint32(en.key))
			} else {
				keys = binary.NativeEndian.AppendUint32(keys, sh.id<<1|gen)
				keys = append(keys, en.key...)
			}
			v := len(vals)
			vals = binary.NativeEndian.AppendUint32(vals, c.prio(en.rule))
			vals = binary.NativeEndian.AppendUint32(vals, c.slot(en.rule))
			vals = binary.NativeEndian.AppendUint32(vals, c.bodyOf[en.rule])
			out = append(out, ebpf.MapKV{Key: keys[at:len(keys):len(keys)], Value: vals[v:len(vals):len(vals)]})
		}
	}
	return out
}

// capacity is the smallest power of two ≥ n and ≥ least.
func capacity(n, least int) int {
	c := least
	for c < n {
		c *= 2
	}
	return c
}

// dispatch jumps to the body whose class is in R1.
func (c *compiler) dispatch(label func(int) string, lo, hi int) {
	e := &c.e
	if hi-lo == 1 {
		e.emit(asm.Ja.Label(label(lo)))
		return
	}
	mid := (lo + hi) / 2
	upper := e.newLabel("dispatch")
	e.emit(asm.JGE.Imm(asm.R1, int32(mid), upper))
	c.dispatch(label, lo, mid)
	e.label(upper)
	c.dispatch(label, mid, hi)
}
