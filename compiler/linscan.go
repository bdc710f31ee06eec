package compiler

import (
	"fmt"

	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
	"github.com/sfunnel/sfunnel/grammar"
)

// Emission of the record scan (see linear.go).
//
// The scan is a global function, linScanFunc(struct scan *s): the kernel
// verifies a global function once, on its own, with s pointing to memory
// of unknown contents — not once per way the program reaches each call —
// so what it costs the verifier does not depend on the rules before it or
// on how many segments call it. It runs bpf_loop over the records with
// linRecordFunc as the callback. The program fills the scan struct (the
// packet's fields, the best priority so far, where the list starts) in
// slotBuf, which only action bodies use otherwise, calls the function and
// reads the winner back.

// The scan struct, at slotBuf in the program's frame.
const (
	scanAt    = slotBuf
	scanSport = 0  // u32, absentPort when absent
	scanDport = 4  // u32
	scanFam   = 8  // u8 4 or 6
	scanProto = 9  // u8
	scanFlags = 10 // u16, absentFlags when absent
	scanMark  = 12 // u32 skb->mark as the scan sees and sets it
	scanLen   = 16 // u32 skb->len, for counters
	scanBase  = 20 // u32 index of the list's first record
	scanBest  = 24 // u32 in: the best priority so far; out: the winner's
	scanRule  = 28 // u32 out: the winner's counter slot
	scanBody  = 32 // u32 out: the winner's body
	scanKey   = 36 // u32 map key scratch
	// scanSaddr, scanDaddr: {u32 prefix length; u32 list id (big endian);
	// 4 u32 address words as in the packet}: an anon trie key in place,
	// and from +4 a named set's LPM key.
	scanSaddr = 40
	scanDaddr = 64
	scanDir   = 88 // u32 the segment's first directory entry (linear.go)
	scanCur   = 92 // u32 the record being tested
	scanWin   = 96 // u32 the winning record, 0: none (its counter and mark set run last)
	// scanLists: linReads u16, the lists still to read (each its
	// directory entry's index in the segment + 1; 0: none), in the order
	// lin_scan reads them.
	scanLists   = 100
	scanBuckets = 124 // u32 the segment's buckets per field (0: none)
	scanSize    = 128
	// linReads: the lists a packet reads: its family/any, any/its
	// protocol, its family/protocol, a bucket per indexed field, any/any.
	linReads = 3 + linIndexFields + 1
)

// The list marks fit before the bucket count.
var _ = [scanBuckets - scanLists - 2*linReads]struct{}{}

const (
	linScanFunc   = "lin_scan"
	linRecordFunc = "lin_record"
	// linCapSymbol stands for the records per generation until the program
	// is finished (capRefs are patched then).
	linCapSymbol = 0x7fff0000
)

// emitLinear emits the scan of seg's linear rules: it leaves the winner
// in slotBest, slotRule and slotBody (when lower than what the lookups
// found) and applies the counter and mark set of the records that do them.
func (c *compiler) emitLinear(rules []*grammar.Rule, seg segment) error {
	if len(seg.linear) == 0 {
		return nil
	}
	t := c.lin
	all, err := c.segmentRecords(rules, seg)
	if err != nil {
		return err
	}
	var recs [][]byte
	setsMark, grouped := false, true
	for k := 0; k < len(all); k += recSize {
		rec := all[k : k+recSize]
		flags := nativeU32(rec[recFlags:])
		setsMark = setsMark || flags&recSetMark != 0
		grouped = grouped && !sequential(flags)
		recs = append(recs, rec)
	}
	// Records go to the lists of their family and protocol, or of their
	// port's bucket (linear.go), those that don't end the scan to list 0,
	// which is read last; when one sets the mark, all stay in list 0, in
	// rule order.
	buckets, nlists := 0, linGroups
	if grouped {
		buckets = segBuckets(recs)
		nlists += linIndexFields * buckets
	}
	lists := make([][]byte, nlists)
	for _, rec := range recs {
		l := 0
		if grouped {
			l = RecordList(rec, nlists, buckets)
		}
		lists[l] = append(lists[l], rec...)
	}
	s := len(t.segs)
	t.dirAt = append(t.dirAt, t.dirEntries())
	t.segs = append(t.segs, lists)
	t.buckets = append(t.buckets, buckets)
	t.marks = append(t.marks, setsMark)
	t.grouped = append(t.grouped, grouped)
	e := &c.e
	how := "one list"
	if grouped {
		how = "lists by family and protocol"
	}
	if buckets > 0 {
		how += fmt.Sprintf(" and %d buckets per field", buckets)
	}
	e.comment("rules %d...%d: %d records, scanned in order (linscan.go), %s", seg.linear[0], seg.linear[len(seg.linear)-1], len(recs), how)
	// Per segment: the mark (bodies before may have set it), the best so
	// far, no winner, no list taken yet (the packet's fields: scanFill).
	e.emit(
		ldx(asm.R1, asm.R6, skbMark, asm.Word), stx(asm.R10, scanAt+scanMark, asm.R1, asm.Word),
		ldx(asm.R1, asm.R10, slotBest, asm.DWord), stx(asm.R10, scanAt+scanBest, asm.R1, asm.Word),
	)
	for off := int16(scanWin); off < scanSize; off += 8 {
		e.emit(sti(asm.R10, scanAt+off, 0, asm.DWord))
	}
	if buckets > 0 {
		e.emit(sti(asm.R10, scanAt+scanBuckets, int64(buckets), asm.Word))
	}
	// The segment's directory in the live generation.
	e.emit(
		ldx(asm.R1, asm.R10, slotGen, asm.DWord),
		asm.Mul.Imm(asm.R1, linCapSymbol),
		asm.Add.Imm(asm.R1, int32(t.dirAt[s])),
		stx(asm.R10, scanAt+scanDir, asm.R1, asm.Word),
		// Overwrite the map key slot, as a lookup here did: what a body
		// before left there (a constant key the verifier tracks) must not
		// keep the states of every way here apart.
		stx(asm.R10, slotKey, asm.R1, asm.Word),
	)
	t.capRefs = append(t.capRefs, len(e.insns)-4)
	e.emit(
		mov(asm.R1, asm.R10),
		asm.Add.Imm(asm.R1, scanAt),
		asm.Call.Label(linScanFunc),
	)
	if setsMark {
		e.emit(
			ldx(asm.R1, asm.R10, scanAt+scanMark, asm.Word),
			stx(asm.R6, skbMark, asm.R1, asm.Word),
		)
	}
	// A record won: it beat what the lookups found (the scan reads no
	// record whose priority is not below it).
	e.emit(
		ldx(asm.R1, asm.R10, scanAt+scanWin, asm.Word),
		asm.JEq.Imm(asm.R1, 0, fmt.Sprintf("lin%d_done", s)),
		ldx(asm.R1, asm.R10, scanAt+scanBest, asm.Word), stx(asm.R10, slotBest, asm.R1, asm.DWord),
		ldx(asm.R1, asm.R10, scanAt+scanRule, asm.Word), stx(asm.R10, slotRule, asm.R1, asm.DWord),
		ldx(asm.R1, asm.R10, scanAt+scanBody, asm.Word), stx(asm.R10, slotBody, asm.R1, asm.DWord),
	)
	e.label(fmt.Sprintf("lin%d_done", s))
	return nil
}

// scanFill fills the scan struct with the packet's fields once, before
// the first segment: nothing between segments changes them (slotBuf is
// otherwise only used by actions, which end evaluation), and the
// verifier then walks this once, not once per segment and path.
func (c *compiler) scanFill() {
	e := &c.e
	n := c.ruleNeeds
	e.comment("the record scan's struct: the packet's fields (linscan.go)")
	for off := int16(0); off < scanSize; off += 8 {
		e.emit(sti(asm.R10, scanAt+off, 0, asm.DWord))
	}
	e.emit(
		ldx(asm.R1, asm.R10, slotFam, asm.DWord), stx(asm.R10, scanAt+scanFam, asm.R1, asm.Byte),
		ldx(asm.R1, asm.R10, slotProto, asm.DWord), stx(asm.R10, scanAt+scanProto, asm.R1, asm.Byte),
		ldx(asm.R1, asm.R6, skbLen, asm.Word), stx(asm.R10, scanAt+scanLen, asm.R1, asm.Word),
	)
	for _, f := range []struct {
		need  bool
		slot  int16
		off   int16
		size  asm.Size
		absnt int64
	}{{n.sport, slotSport, scanSport, asm.Word, absentPort}, {n.dport, slotDport, scanDport, asm.Word, absentPort}, {n.flags, slotFlags, scanFlags, asm.Half, absentFlags}} {
		if f.need {
			e.emit(ldx(asm.R1, asm.R10, f.slot, asm.DWord), stx(asm.R10, scanAt+f.off, asm.R1, f.size))
		} else {
			e.emit(sti(asm.R10, scanAt+f.off, f.absnt, f.size))
		}
	}
	for _, a := range []struct {
		need bool
		slot int16
		off  int16
	}{{n.saddr, slotSaddr, scanSaddr}, {n.daddr, slotDaddr, scanDaddr}} {
		if !a.need {
			continue
		}
		e.emit(ldx(asm.R1, asm.R10, a.slot+4, asm.Word), stx(asm.R10, scanAt+a.off+8, asm.R1, asm.Word))
		if n.v6 {
			v4 := e.newLabel("scan_v4")
			e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, 6, v4))
			for w := int16(1); w < 4; w++ {
				e.emit(ldx(asm.R1, asm.R10, a.slot+4+4*w, asm.Word), stx(asm.R10, scanAt+a.off+8+4*w, asm.R1, asm.Word))
			}
			e.label(v4)
		}
	}
}

// Bodies of terminal rules in segments with a scan are emitted once, after
// the last segment, and every segment's dispatch jumps there (a long jump:
// the program may be longer than a 16-bit offset reaches): a terminal body
// ends the program, so it needs no way back. Many segments then share one
// copy of each action list, and a segment is not cut when its bodies are
// long.

// poolHook: in hooks of more rules than this, every table segment's
// terminal bodies are shared too (a large hook has many segments).
const poolHook = 64

// pooledBody returns the label of rule i's shared body.
func (c *compiler) pooledBody(i int) string {
	k := c.bodyKeys[i]
	if l, ok := c.poolOf[k]; ok {
		return l
	}
	if c.poolOf == nil {
		c.poolOf = map[string]string{}
	}
	l := fmt.Sprintf("pool_body%d", len(c.pool))
	c.poolOf[k] = l
	c.pool = append(c.pool, i)
	return l
}

// bodyPool emits the shared bodies.
func (c *compiler) bodyPool(rules []*grammar.Rule) error {
	e := &c.e
	if len(c.pool) == 0 {
		return nil
	}
	// The rules end here: no rule ended evaluation.
	e.emit(asm.Ja.Label(c.exit("next")))
	c.dynRule = true
	defer func() { c.dynRule = false }()
	for n, i := range c.pool {
		c.maybeStubs()
		r, fx := bodyRule(rules[i], c.bodyKeys[i])
		e.label(fmt.Sprintf("pool_body%d", n))
		e.comment("shared body %d, as rule %d handle %d: %s", n, i, r.Handle, Describe(r))
		e.owner = i + 1
		c.famProtoAgain(r, c.exit("next"))
		c.fxDone = fx
		err := c.body(i, r, c.exit("next"))
		c.fxDone = false
		e.owner = 0
		if err != nil {
			return err
		}
	}
	return nil
}

// linearFunctions emits the scan function and its callback after the
// program.
func (c *compiler) linearFunctions() {
	e := &c.e
	e.owner = 0
	// lin_scan(R1 = s): the lists of the packet's family and protocol
	// (linear.go), then the winner's counter and mark set. R6 = s, R8 =
	// the protocol's list index (0 any), R9 = the family's (0 any).
	e.label(linScanFunc)
	e.comment("record scan (linscan.go): a global function, verified once")
	e.emit(
		asm.JEq.Imm(asm.R1, 0, "lin_scan_out"),
		mov(asm.R6, asm.R1),
		// bpf_loop's callback context must be on the stack: it holds s.
		stx(asm.R10, -8, asm.R1, asm.DWord),
	)
	c.linIndex(asm.R9, scanFam, 4, 3, 6, 6)
	c.linIndex(asm.R8, scanProto, 6, 1, 17, 2)
	// Each list once: family/any, any/protocol, family/protocol, the
	// buckets of its fields' values, then any/any (last: it holds the
	// records that don't end the scan, whose counters count only below
	// the winner of the others); the program zeroed scanLists. Then one
	// bpf_loop over them all.
	e.emit(asm.JEq.Imm(asm.R9, 0, "lin_no_fam"))
	c.linList(0, func() { e.emit(mov(asm.R1, asm.R9)) })
	e.label("lin_no_fam")
	e.emit(asm.JEq.Imm(asm.R8, 0, "lin_any"))
	c.linList(1, func() { e.emit(mov(asm.R1, asm.R8)) })
	e.emit(asm.JEq.Imm(asm.R9, 0, "lin_any"))
	c.linList(2, func() { e.emit(mov(asm.R1, asm.R9), asm.Add.Reg(asm.R1, asm.R8)) })
	e.label("lin_any")
	// The bucket list of each indexed field's value (linear.go's
	// addrBucket, portBucket; no ports: no port buckets), when the
	// segment has buckets (R7 of them per field).
	e.emit(
		ldx(asm.R7, asm.R6, scanBuckets, asm.Word),
		asm.JEq.Imm(asm.R7, 0, "lin_no_buckets"),
	)
	for f := 2; f < linIndexFields; f++ {
		// The host's bucket (addrBucket): its four words (an IPv4
		// packet's last three are zero) XORed, in host order.
		addr := []int16{scanSaddr, scanDaddr}[f-2] + 8
		c.linList(int16(3+f), func() {
			e.emit(ldx(asm.R1, asm.R6, addr, asm.Word))
			for w := int16(1); w < 4; w++ {
				e.emit(ldx(asm.R2, asm.R6, addr+4*w, asm.Word), asm.Xor.Reg32(asm.R1, asm.R2))
			}
			e.emit(
				asm.HostTo(asm.BE, asm.R1, asm.Word),
				asm.Mul.Imm32(asm.R1, int32(-(1<<32-addrHashMul))),
				asm.RSh.Imm32(asm.R1, 16),
			)
			c.bucketList(f)
		})
	}
	for f := range 2 {
		port := []int16{scanDport, scanSport}[f]
		none := e.newLabel("lin_no_port")
		e.emit(
			ldx(asm.R1, asm.R6, port, asm.Word),
			asm.JGT.Imm(asm.R1, 0xffff, none),
		)
		c.linList(int16(3+f), func() {
			e.emit(
				ldx(asm.R1, asm.R6, port, asm.Word),
				asm.Mul.Imm(asm.R1, portHashMul),
				asm.And.Imm(asm.R1, 0xffff),
			)
			c.bucketList(f)
		})
		e.label(none)
	}
	e.label("lin_no_buckets")
	c.linList(linReads-1, func() { e.emit(movi(asm.R1, 0)) })
	c.linNextList("lin_lists_done")
	e.emit(
		stx(asm.R6, scanBase, asm.R1, asm.Word),
		movi(asm.R1, int32(c.lin.cap)),
		asm.Instruction{OpCode: asm.LoadImmOp(asm.DWord), Dst: asm.R2, Src: asm.PseudoFunc, Constant: -1}.WithReference(linRecordFunc),
		mov(asm.R3, asm.R10),
		asm.Add.Imm(asm.R3, -8),
		movi(asm.R4, 0),
		asm.FnLoop.Call(),
	)
	e.label("lin_lists_done")
	if c.lin.uses.count || c.lin.uses.setMark {
		e.comment("the winning record's counter and mark set")
		e.emit(
			ldx(asm.R1, asm.R6, scanWin, asm.Word),
			asm.JEq.Imm(asm.R1, 0, "lin_scan_out"),
			stx(asm.R6, scanKey, asm.R1, asm.Word),
		)
		e.emit(linLookup()...)
		e.emit(
			asm.JEq.Imm(asm.R0, 0, "lin_scan_out"),
			mov(asm.R7, asm.R0),
			ldx(asm.R8, asm.R7, recFlags, asm.Word),
		)
		c.linEffects()
	}
	e.label("lin_scan_out")
	e.emit(movi(asm.R0, 0), asm.Return())
	c.linearCallback()
}

// sequential reports whether a record of these flags keeps its segment's
// records in one list in rule order: it doesn't end the scan and sets the
// mark, which later records may test.
func sequential(flags uint32) bool {
	return flags&recTerminal == 0 && flags&recSetMark != 0
}

// linIndex sets dst to i1 when the scan struct's byte at off is v1, i2
// when it is v2, else 0.
func (c *compiler) linIndex(dst asm.Register, off int16, v1, i1, v2, i2 int32) {
	e := &c.e
	second, done := e.newLabel("lin_index"), e.newLabel("lin_index_done")
	e.emit(
		movi(dst, 0),
		ldx(asm.R1, asm.R6, off, asm.Byte),
		asm.JNE.Imm(asm.R1, v1, second),
		movi(dst, i1),
	)
	e.label(second)
	e.emit(
		asm.JNE.Imm(asm.R1, v2, done),
		movi(dst, i2),
	)
	e.label(done)
}

// linLookup is R0 = the record at s.key (R6 = s), or 0.
func linLookup() asm.Instructions {
	return asm.Instructions{
		asm.LoadMapPtr(asm.R1, 0).WithReference(linearMap),
		mov(asm.R2, asm.R6),
		asm.Add.Imm(asm.R2, scanKey),
		asm.FnMapLookupElem.Call(),
	}
}

// bucketList turns the 16-bit hash of field f's value in R1 into the
// index of its bucket list: 9 + f*B + hash*B>>16 (R7 holds B).
func (c *compiler) bucketList(f int) {
	e := &c.e
	e.emit(asm.Mul.Reg(asm.R1, asm.R7), asm.RSh.Imm(asm.R1, 16), asm.Add.Imm(asm.R1, linGroups))
	for range f {
		e.emit(asm.Add.Reg(asm.R1, asm.R7)) // field f's buckets start at 9 + f*B
	}
}

// linList marks one list of the segment in scanLists[k] (its directory
// entry's index in the segment + 1, a u16) unless the list is empty:
// list sets R1 to that index.
func (c *compiler) linList(k int16, list func()) {
	e := &c.e
	done, empty := e.newLabel("lin_list_done"), e.newLabel("lin_list_empty")
	list()
	e.emit(
		mov(asm.R2, asm.R1),
		asm.Add.Imm(asm.R2, 1),
		stx(asm.R6, scanLists+2*k, asm.R2, asm.Half),
		ldx(asm.R2, asm.R6, scanDir, asm.Word),
		asm.Add.Reg(asm.R1, asm.R2),
		stx(asm.R6, scanKey, asm.R1, asm.Word),
	)
	e.emit(linLookup()...)
	e.emit(
		asm.JEq.Imm(asm.R0, 0, empty),
		ldx(asm.R1, asm.R0, recPrio, asm.Word),
		stx(asm.R6, scanKey, asm.R1, asm.Word),
	)
	e.emit(linLookup()...)
	e.emit(
		asm.JEq.Imm(asm.R0, 0, empty),
		ldx(asm.R1, asm.R0, recPrio, asm.Word),
		asm.JNE.Imm(asm.R1, 0, done),
	)
	e.label(empty)
	e.emit(sti(asm.R6, scanLists+2*k, 0, asm.Half))
	e.label(done)
}

// linNextList takes the next list to read out of scanLists: R1 = its
// first record (from its directory entry), or a jump to none.
func (c *compiler) linNextList(none string) {
	e := &c.e
	taken := e.newLabel("lin_list")
	var takes []string
	for k := int16(0); k < linReads; k++ {
		takes = append(takes, e.newLabel("lin_take"))
		e.emit(
			ldx(asm.R1, asm.R6, scanLists+2*k, asm.Half),
			asm.JNE.Imm(asm.R1, 0, takes[k]),
		)
	}
	e.emit(asm.Ja.Label(none))
	for k := int16(0); k < linReads; k++ {
		e.label(takes[k])
		e.emit(sti(asm.R6, scanLists+2*k, 0, asm.Half), asm.Ja.Label(taken))
	}
	e.label(taken)
	e.emit(
		ldx(asm.R2, asm.R6, scanDir, asm.Word),
		asm.Add.Reg(asm.R1, asm.R2),
		asm.Sub.Imm(asm.R1, 1),
		stx(asm.R6, scanKey, asm.R1, asm.Word),
	)
	e.emit(linLookup()...)
	e.emit(
		asm.JEq.Imm(asm.R0, 0, none),
		ldx(asm.R1, asm.R0, recPrio, asm.Word),
	)
}

// linEffects emits the counter and mark set of the record at R7 (flags in
// R8; R6 = s).
func (c *compiler) linEffects() {
	t := c.lin
	e := &c.e
	if t.uses.count {
		done, count := e.newLabel("lin_counted"), e.newLabel("lin_count")
		e.emit(asm.JSet.Imm(asm.R8, recCount, count), asm.Ja.Label(done))
		e.label(count)
		e.emit(
			ldx(asm.R1, asm.R7, recSlot, asm.Word),
			stx(asm.R6, scanKey, asm.R1, asm.Word),
			asm.LoadMapPtr(asm.R1, 0).WithReference(CountersMap),
			mov(asm.R2, asm.R6),
			asm.Add.Imm(asm.R2, scanKey),
			asm.FnMapLookupElem.Call(),
		)
		e.emit(countPacket(done, asm.R6, scanLen)...)
		e.label(done)
	}
	if t.uses.setMark {
		done, set := e.newLabel("lin_marked"), e.newLabel("lin_mark_set")
		e.emit(asm.JSet.Imm(asm.R8, recSetMark, set), asm.Ja.Label(done))
		e.label(set)
		e.emit(
			ldx(asm.R1, asm.R6, scanMark, asm.Word),
			ldx(asm.R2, asm.R7, recSetMask, asm.Word),
			asm.Xor.Imm32(asm.R2, -1),
			asm.And.Reg32(asm.R1, asm.R2),
			ldx(asm.R2, asm.R7, recSetVal, asm.Word),
			asm.Or.Reg32(asm.R1, asm.R2),
			stx(asm.R6, scanMark, asm.R1, asm.Word),
		)
		e.label(done)
	}
}

// linearCallback emits lin_record(R1 = index, R2 = &s): it tests record
// s.base+index and returns 1 to stop the scan. R6 = s, R7 = record, R8 =
// its flags, R9 scratch kept across helpers.
func (c *compiler) linearCallback() {
	t := c.lin
	e := &c.e
	stop, next, end := "lin_stop", "lin_next", "lin_list_end"
	e.label(linRecordFunc)
	e.comment("record test (linscan.go): R1 index, R2 holds the scan struct")
	e.emit(
		ldx(asm.R6, asm.R2, 0, asm.DWord),
		ldx(asm.R2, asm.R6, scanBase, asm.Word),
		asm.Add.Reg32(asm.R1, asm.R2),
		stx(asm.R6, scanKey, asm.R1, asm.Word),
		stx(asm.R6, scanCur, asm.R1, asm.Word),
	)
	e.emit(linLookup()...)
	e.emit(
		asm.JEq.Imm(asm.R0, 0, stop),
		mov(asm.R7, asm.R0),
		ldx(asm.R1, asm.R7, recPrio, asm.Word),
		asm.JEq.Imm(asm.R1, 0, end),
		ldx(asm.R2, asm.R6, scanBest, asm.Word),
		asm.JGE.Reg(asm.R1, asm.R2, end),
		ldx(asm.R8, asm.R7, recFlags, asm.Word),
	)
	for _, f := range []struct {
		use      bool
		rec, pkt int16
		name     string
	}{{t.uses.fam, recFam, scanFam, "fam"}, {t.uses.proto, recProto, scanProto, "proto"}} {
		if !f.use {
			continue
		}
		ok := "lin_" + f.name + "_ok"
		e.emit(
			ldx(asm.R1, asm.R7, f.rec, asm.Byte),
			asm.JEq.Imm(asm.R1, 0, ok),
			ldx(asm.R2, asm.R6, f.pkt, asm.Byte),
			asm.JNE.Reg(asm.R1, asm.R2, next),
		)
		e.label(ok)
	}
	for j := range 2 {
		c.linPort(j, next)
	}
	if t.uses.tcp {
		skip := "lin_tcp_ok"
		e.emit(asm.JSet.Imm(asm.R8, recTCP, "lin_tcp"), asm.Ja.Label(skip))
		e.label("lin_tcp")
		e.emit(
			ldx(asm.R1, asm.R6, scanFlags, asm.Half),
			asm.JGT.Imm(asm.R1, 0xff, next),
			ldx(asm.R2, asm.R7, recTCPMask, asm.Byte),
			asm.And.Reg(asm.R1, asm.R2),
			ldx(asm.R2, asm.R7, recTCPValue, asm.Byte),
		)
		c.linCompare(recTCPNeg, next)
		e.label(skip)
	}
	for j, m := range []struct {
		use       bool
		bit, neg  int32
		mask, val int16
	}{{t.uses.meta, recMeta, recMetaNeg, recMetaMask, recMetaVal}, {t.uses.ct, recCt, recCtNeg, recCtMask, recCtVal}} {
		if !m.use {
			continue
		}
		skip, test := fmt.Sprintf("lin_mark%d_ok", j), fmt.Sprintf("lin_mark%d", j)
		e.emit(asm.JSet.Imm(asm.R8, m.bit, test), asm.Ja.Label(skip))
		e.label(test)
		e.emit(
			ldx(asm.R1, asm.R6, scanMark, asm.Word),
			ldx(asm.R2, asm.R7, m.mask, asm.Word),
			asm.And.Reg(asm.R1, asm.R2),
			ldx(asm.R2, asm.R7, m.val, asm.Word),
		)
		c.linCompare(m.neg, next)
		e.label(skip)
	}
	for j := range 2 {
		c.linAddr(j, next)
	}
	e.comment("the record matches: a record that ends the scan wins (its counter and mark set run last, in lin_scan); the others count and set the mark now")
	if t.uses.shape {
		e.emit(asm.JSet.Imm(asm.R8, recShape, "lin_shape"))
	}
	e.emit(asm.JSet.Imm(asm.R8, recTerminal, "lin_won"))
	c.linEffects()
	e.emit(asm.Ja.Label(next))
	e.label("lin_won")
	e.emit(
		ldx(asm.R1, asm.R7, recPrio, asm.Word),
		stx(asm.R6, scanBest, asm.R1, asm.Word),
		ldx(asm.R1, asm.R7, recSlot, asm.Word),
		stx(asm.R6, scanRule, asm.R1, asm.Word),
		ldx(asm.R1, asm.R7, recBody, asm.Word),
		stx(asm.R6, scanBody, asm.R1, asm.Word),
		ldx(asm.R1, asm.R6, scanCur, asm.Word),
		stx(asm.R6, scanWin, asm.R1, asm.Word),
	)
	e.comment("the list ends (or no record after this one can win): on with the next list, if any; index+1 is its first record")
	e.label(end)
	c.linNextList(stop)
	e.emit(
		ldx(asm.R2, asm.R6, scanCur, asm.Word),
		asm.Sub.Reg32(asm.R1, asm.R2),
		ldx(asm.R2, asm.R6, scanBase, asm.Word),
		asm.Add.Reg32(asm.R1, asm.R2),
		asm.Sub.Imm32(asm.R1, 1),
		stx(asm.R6, scanBase, asm.R1, asm.Word),
		asm.Ja.Label(next),
	)
	e.label(stop)
	e.emit(movi(asm.R0, 1), asm.Return())
	e.label(next)
	e.emit(movi(asm.R0, 0), asm.Return())
	if t.uses.shape {
		c.shapeHit(next)
	}
}

// linCompare jumps to next unless (R1 == R2) != (flags & neg).
func (c *compiler) linCompare(neg int32, next string) {
	e := &c.e
	isNeg, done := e.newLabel("lin_neg"), e.newLabel("lin_ok")
	e.emit(
		asm.JSet.Imm(asm.R8, neg, isNeg),
		asm.JNE.Reg(asm.R1, asm.R2, next),
		asm.Ja.Label(done),
	)
	e.label(isNeg)
	e.emit(asm.JEq.Reg(asm.R1, asm.R2, next))
	e.label(done)
}

// linHit emits the end of a field test: "in" holds the packet's value in
// the match, "out" not; a negated match swaps them.
func (c *compiler) linHit(in, out, done, next string, neg int32) {
	e := &c.e
	e.emit(asm.Ja.Label(next)) // a kind this program's records don't use
	e.label(in)
	e.emit(asm.JSet.Imm(asm.R8, neg, next), asm.Ja.Label(done))
	e.label(out)
	e.emit(asm.JSet.Imm(asm.R8, neg, done), asm.Ja.Label(next))
	e.label(done)
}

// linPort emits the test of port match j (0 sport, 1 dport) of the record.
func (c *compiler) linPort(j int, next string) {
	t := c.lin
	k := t.kinds[j]
	if !k[kindRange] && !k[kindList] && !k[kindSet] && !k[kindBitmap] {
		return
	}
	e := &c.e
	off := int16(recSport + 16*j)
	pkt := int16(scanSport + 4*j)
	neg := int32(recSportNeg << j)
	name := []string{"sport", "dport"}[j]
	done, in, out := "lin_"+name+"_ok", "lin_"+name+"_in", "lin_"+name+"_out"
	e.emit(
		mov(asm.R9, asm.R8),
		asm.RSh.Imm(asm.R9, int32(recKindShift+3*j)),
		asm.And.Imm(asm.R9, 7),
		asm.JEq.Imm(asm.R9, kindNone, done),
		// An absent port never matches, negated or not.
		ldx(asm.R1, asm.R6, pkt, asm.Word),
		asm.JGT.Imm(asm.R1, 0xffff, next),
	)
	// ranges tests n {u16 lo, u16 hi} at base+at, sorted by lo
	// (packRanges), against the port in R1: a range that starts above
	// the port ends the test.
	ranges := func(base asm.Register, at int16, n int) {
		for r := 0; r < n; r++ {
			e.emit(
				ldx(asm.R2, base, at+int16(4*r), asm.Half),
				asm.JLT.Reg(asm.R1, asm.R2, out),
				ldx(asm.R2, base, at+int16(4*r)+2, asm.Half),
				asm.JLE.Reg(asm.R1, asm.R2, in),
			)
		}
		e.emit(asm.Ja.Label(out))
	}
	if k[kindRange] {
		other := e.newLabel("lin_" + name + "_map")
		e.emit(asm.JNE.Imm(asm.R9, kindRange, other))
		ranges(asm.R7, off, recRanges)
		e.label(other)
	}
	if k[kindList] {
		other := e.newLabel("lin_" + name + "_list")
		e.emit(
			asm.JNE.Imm(asm.R9, kindList, other),
			ldx(asm.R1, asm.R7, off, asm.Word),
			stx(asm.R6, scanKey, asm.R1, asm.Word),
			asm.LoadMapPtr(asm.R1, 0).WithReference(linRangesMap),
			mov(asm.R2, asm.R6),
			asm.Add.Imm(asm.R2, scanKey),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, next),
			ldx(asm.R1, asm.R6, pkt, asm.Word),
		)
		ranges(asm.R0, 0, listRanges)
		e.label(other)
	}
	// bitmap tests the port's bit in a bitmap map whose key is at scanKey
	// (a named set: through its outer map).
	bitmap := func(mapName string, set bool) {
		if set {
			c.linSetLookup(mapName, scanKey)
		} else {
			e.emit(
				asm.LoadMapPtr(asm.R1, 0).WithReference(mapName),
				mov(asm.R2, asm.R6),
				asm.Add.Imm(asm.R2, scanKey),
				asm.FnMapLookupElem.Call(),
			)
		}
		e.emit(
			asm.JEq.Imm(asm.R0, 0, next),
			ldx(asm.R1, asm.R6, pkt, asm.Word),
			asm.And.Imm(asm.R1, 0xffff),
			mov(asm.R2, asm.R1),
			asm.RSh.Imm(asm.R2, 3),
			asm.Add.Reg(asm.R0, asm.R2),
			ldx(asm.R2, asm.R0, 0, asm.Byte),
			asm.And.Imm(asm.R1, 7),
			asm.RSh.Reg(asm.R2, asm.R1),
			asm.And.Imm(asm.R2, 1),
			asm.JEq.Imm(asm.R2, 0, out),
			asm.Ja.Label(in),
		)
	}
	if k[kindBitmap] {
		other := e.newLabel("lin_" + name + "_set")
		e.emit(
			asm.JNE.Imm(asm.R9, kindBitmap, other),
			ldx(asm.R1, asm.R7, off, asm.Word),
			stx(asm.R6, scanKey, asm.R1, asm.Word),
		)
		bitmap(anonPortsMap, false)
		e.label(other)
	}
	if k[kindSet] {
		e.emit(asm.JNE.Imm(asm.R9, kindSet, next))
		for si, s := range t.sets {
			if c.sets[s] == nil || c.sets[s].Type != grammar.SetInetService {
				continue
			}
			other := e.newLabel("lin_" + name + "_other")
			e.emit(
				ldx(asm.R1, asm.R7, off, asm.Word),
				asm.JNE.Imm(asm.R1, int32(si), other),
			)
			bitmap(SetMapPrefix+s, true)
			e.label(other)
		}
	}
	c.linHit(in, out, done, next, neg)
}

// linAddr emits the test of address match j (0 saddr, 1 daddr). The
// record's family, tested before, is the packet's.
func (c *compiler) linAddr(j int, next string) {
	t := c.lin
	k := t.kinds[2+j]
	if !k[kindRange] && !k[kindList] && !k[kindSet] {
		return
	}
	e := &c.e
	off := int16(recSaddr + 20*j)
	pkt := int16(scanSaddr + 24*j)
	neg := int32(recSaddrNeg << j)
	name := []string{"saddr", "daddr"}[j]
	done, in, out := "lin_"+name+"_ok", "lin_"+name+"_in", "lin_"+name+"_out"
	e.emit(
		mov(asm.R9, asm.R8),
		asm.RSh.Imm(asm.R9, int32(recKindShift+6+3*j)),
		asm.And.Imm(asm.R9, 7),
		asm.JEq.Imm(asm.R9, kindNone, done),
	)
	if k[kindRange] {
		notPrefix := e.newLabel("lin_" + name + "_map")
		e.emit(asm.JNE.Imm(asm.R9, kindRange, notPrefix))
		// Word w of the prefix compares its first min(32, bits-32w) bits;
		// words past the prefix length match.
		for w := int16(0); w < 4; w++ {
			e.emit(
				ldx(asm.R3, asm.R7, off, asm.Word), // prefix length
				asm.Sub.Imm(asm.R3, int32(32*w)),
				asm.JSLE.Imm(asm.R3, 0, in),
				ldx(asm.R1, asm.R6, pkt+8+4*w, asm.Word),
				asm.HostTo(asm.BE, asm.R1, asm.Word),
				ldx(asm.R2, asm.R7, off+4+4*w, asm.Word),
			)
			full := e.newLabel("lin_full")
			e.emit(
				asm.JSGE.Imm(asm.R3, 32, full),
				movi(asm.R4, 32),
				asm.Sub.Reg(asm.R4, asm.R3),
				asm.RSh.Reg(asm.R1, asm.R4),
				asm.RSh.Reg(asm.R2, asm.R4),
			)
			e.label(full)
			e.emit(asm.JNE.Reg(asm.R1, asm.R2, out))
		}
		e.emit(asm.Ja.Label(in))
		e.label(notPrefix)
	}
	lpm := func(mapName string, key int16, set bool) {
		if set {
			c.linSetLookup(mapName, key)
		} else {
			e.emit(
				asm.LoadMapPtr(asm.R1, 0).WithReference(mapName),
				mov(asm.R2, asm.R6),
				asm.Add.Imm(asm.R2, int32(key)),
				asm.FnMapLookupElem.Call(),
			)
		}
		e.emit(
			asm.JEq.Imm(asm.R0, 0, out),
			asm.Ja.Label(in),
		)
	}
	if k[kindList] {
		notList := e.newLabel("lin_" + name + "_set")
		v6 := e.newLabel("lin_" + name + "_list6")
		// Key {prefix length; list id, big endian; address} in place.
		e.emit(
			asm.JNE.Imm(asm.R9, kindList, notList),
			ldx(asm.R1, asm.R7, off, asm.Word),
			asm.HostTo(asm.BE, asm.R1, asm.Word),
			stx(asm.R6, pkt+4, asm.R1, asm.Word),
			ldx(asm.R1, asm.R6, scanFam, asm.Byte),
			asm.JEq.Imm(asm.R1, 6, v6),
		)
		for f, m := range []string{anonV4Map, anonV6Map} {
			if f == 1 {
				e.label(v6)
			}
			if c.anonSets.next[f] == 0 {
				e.emit(asm.Ja.Label(next)) // no list of this family
				continue
			}
			e.emit(sti(asm.R6, pkt, int64(64+96*f), asm.Word))
			lpm(m, pkt, false)
		}
		e.label(notList)
	}
	if k[kindSet] {
		e.emit(asm.JNE.Imm(asm.R9, kindSet, next))
		for si, s := range t.sets {
			st := c.sets[s]
			if st == nil || st.Type == grammar.SetInetService {
				continue
			}
			other := e.newLabel("lin_" + name + "_other")
			bits := int64(32)
			if st.Type == grammar.SetIPv6Addr {
				bits = 128
			}
			e.emit(
				ldx(asm.R1, asm.R7, off, asm.Word),
				asm.JNE.Imm(asm.R1, int32(si), other),
				sti(asm.R6, pkt+4, bits, asm.Word),
			)
			lpm(SetMapPrefix+s, pkt+4, true)
			e.label(other)
		}
	}
	c.linHit(in, out, done, next, neg)
}

// linSetLookup emits R0 = the element at s+key of named set map name,
// through its outer map (abi: key 0 holds the set's map), 0 when absent.
// Clobbers scanKey.
func (c *compiler) linSetLookup(name string, key int16) {
	e := &c.e
	done := e.newLabel("lin_set_done")
	e.emit(
		sti(asm.R6, scanKey, 0, asm.Word),
		asm.LoadMapPtr(asm.R1, 0).WithReference(name),
		mov(asm.R2, asm.R6),
		asm.Add.Imm(asm.R2, scanKey),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, done),
		mov(asm.R1, asm.R0),
		mov(asm.R2, asm.R6),
		asm.Add.Imm(asm.R2, int32(key)),
		asm.FnMapLookupElem.Call(),
	)
	e.label(done)
}

// linearFinish patches the records per generation into the scan code and
// adds the scan functions; called after the exits.
func (c *compiler) linearFinish() {
	t := c.lin
	if t == nil {
		return
	}
	n := t.entries()
	// Headroom, so that a rule added to a list keeps the map.
	t.cap = capacity(n+n/4, 64)
	for _, at := range t.capRefs {
		ins := &c.e.insns[at]
		if ins.Constant != linCapSymbol {
			panic("linear: capacity reference moved")
		}
		ins.Constant = int64(t.cap)
	}
	c.linearFunctions()
}

// linearFuncInfo gives the program and its functions the BTF function
// records the kernel wants of a program with a global function and a
// callback.
func (c *compiler) linearFuncInfo(insns asm.Instructions) {
	if c.lin == nil && !c.usesMSS && !c.usesTraceFunc {
		return
	}
	u32 := &btf.Int{Name: "unsigned int", Size: 4}
	i32 := &btf.Int{Name: "int", Size: 4, Encoding: btf.Signed}
	long := &btf.Int{Name: "long", Size: 8, Encoding: btf.Signed}
	void := &btf.Pointer{Target: &btf.Void{}}
	scan := &btf.Struct{Name: "sfunnel_scan", Size: scanSize, Members: []btf.Member{
		{Name: "w", Type: &btf.Array{Index: u32, Type: u32, Nelems: scanSize / 4}},
	}}
	// mss.go's clamp: its first argument is the program's context.
	skb := &btf.Pointer{Target: &btf.Struct{Name: "__sk_buff"}}
	funcs := map[string]*btf.Func{
		mssFunc: {Name: mssFunc, Linkage: btf.GlobalFunc, Type: &btf.FuncProto{
			Return: i32, Params: []btf.FuncParam{{Name: "skb", Type: skb}, {Name: "l4", Type: u32}, {Name: "mss", Type: u32}, {Name: "h", Type: u32}},
		}},
		traceFunc: {Name: traceFunc, Linkage: btf.GlobalFunc, Type: &btf.FuncProto{
			Return: i32, Params: []btf.FuncParam{{Name: "skb", Type: skb}, {Name: "id", Type: u32}, {Name: "rule", Type: u32}, {Name: "kind", Type: u32}},
		}},
		linScanFunc: {Name: linScanFunc, Linkage: btf.GlobalFunc, Type: &btf.FuncProto{
			Return: i32, Params: []btf.FuncParam{{Name: "s", Type: &btf.Pointer{Target: scan}}},
		}},
		linRecordFunc: {Name: linRecordFunc, Linkage: btf.StaticFunc, Type: &btf.FuncProto{
			Return: long, Params: []btf.FuncParam{{Name: "index", Type: u32}, {Name: "ctx", Type: void}},
		}},
	}
	insns[0] = btf.WithFuncMetadata(insns[0], &btf.Func{Name: ProgramName, Linkage: btf.GlobalFunc, Type: &btf.FuncProto{
		Return: i32, Params: []btf.FuncParam{{Name: "skb", Type: void}},
	}})
	for i := range insns {
		if fn := funcs[insns[i].Symbol()]; fn != nil {
			insns[i] = btf.WithFuncMetadata(insns[i], fn)
		}
	}
}
