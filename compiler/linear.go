package compiler

import (
	"cmp"
	"encoding/binary"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// The record scan: rules whose shape no table would hold (a shape of their
// own: negations, named sets, TCP flags, wide ranges, or a combination no
// other rule has) are not compiled into code one by one — a few hundred
// complex ones would exceed the verifier's budget — but into records, one
// per rule, in an ARRAY map. One callback of bpf_loop, emitted once per
// program, tests the packet against a record: code size and the verifier's
// work depend on which match kinds the hook uses, not on how many rules.
//
// Per packet a segment's scan walks its records in rule order and stops at
// the first that matches, or at a record whose priority is not below the
// best table hit so far (slotBest), or at the end of the list. A terminal
// rule's record only names the winner (slotBest, slotRule, slotBody): its
// body runs after the scan, from the segment's dispatch, like a table
// hit's. A record of a rule that doesn't end evaluation (counter, mark set)
// does its counter and mark set in the scan and the scan goes on; such
// records share a segment only with records (classify), so nothing else of
// the segment runs between them. Where the scan decides the winner alone
// (no inline members after it), terminal records' counter and mark set are
// done in the scan too, so rules that differ only in them share a body.
//
// Lists: a segment keeps its records that end the scan (recTerminal) in
// linGroups lists by the family and protocol they need (any, IPv4, IPv6 ×
// any, TCP, UDP), each in rule order; in a segment of many records, one
// that a field pins to one bucket (a positive port match of one bucket,
// a positive host) goes instead to that bucket's list (recordBucket). A
// packet reads the at most four lists its family and protocol can match
// and the bucket list of each of its fields' values, one after the
// other, each until a record's priority is not below the best so far, so
// the winner is still the first matching rule. Records that don't end
// the scan (a counter) go to list 0 (any/any), which is read last: they
// count when they are below the winner of the other lists, as in rule
// order. A segment with a record that doesn't end the scan and sets the
// mark (which later records may test) keeps every record in list 0, in
// rule order. A winning record's own counter and mark set run once,
// after all lists.
//
// Map layout (linearMap, ARRAY of linCap*2 records, generation g at
// g*linCap): the first entries are a directory, ScanLists entries per
// linear segment (dirAt), entry dirAt[s] + l holding in its prio field the
// index of the first record of segment s's list l (RecordList); then a
// zero record that empty lists point at; then the lists' records, each
// list ended by a zero record. So every directory entry is the absolute
// index of a list ended by a zero record, which incremental changes
// (datapath/scanpatch.go) copy between generations as they are. The
// program reads directory entries from gen*linCap + dirAt[s], then the
// records from there: a commit writes the other generation whole and
// flips abi.ControlMap.
//
// Per packet the scan costs a few tens of instructions per record it
// reads: it is for rules that share no shape, as the tables are for rules
// that do.

// linearMap is the record map's name (abi.TablePrefix: Program.Tables lists
// it, TableContents fills it).
const linearMap = abi.TablePrefix + "lin"

// linMin: a segment's scanned rules go to the scan past this many (fewer
// are tested inline, as before: cheaper per packet).
const linMin = inlineRules

// Record layout (native byte order).
const (
	recPrio     = 0  // u32 rule position + 1; 0 ends the list
	recSlot     = 4  // u32 counter slot
	recBody     = 8  // u32 body class in the segment's dispatch
	recFlags    = 12 // u32 rec* bits
	recFam      = 16 // u8 0 any, 4, 6, 0xff none
	recProto    = 17 // u8 0 any
	recTCPMask  = 18 // u8
	recTCPValue = 19 // u8
	recMetaMask = 20 // u32: (mark & mask) == value, or != with recMetaNeg
	recMetaVal  = 24
	recCtMask   = 28
	recCtVal    = 32
	recSetMask  = 36 // u32: mark = mark &^ mask | value (meta then ct mark set)
	recSetVal   = 40
	recSport    = 44 // recRanges {u16 lo, u16 hi} (unused ones repeat the first), or a u32 list / set index
	recDport    = 60
	recSaddr    = 76 // u32 prefix length (or list / set index), 4 u32 host-order address words
	recDaddr    = 96
	recSize     = 116
)

// Record flags. A port or address match has a kind: a range / prefix, a
// list in the shared anonymous maps (anon.go), or a named set.
const (
	recTerminal = 1 << iota
	recCount
	recSetMark
	recMeta
	recMetaNeg
	recCt
	recCtNeg
	recTCP
	recTCPNeg
	recSportNeg
	recDportNeg
	recSaddrNeg
	recDaddrNeg
	recKindShift = 16 // 3 bits each: sport, dport, saddr, daddr
)

// recRanges: port ranges kept in the record; listRanges: in a range list
// (linRangesMap); more: a port bitmap (anon.go).
const (
	recRanges  = 4
	listRanges = 32
)

const (
	kindNone  = iota
	kindRange // ports: up to recRanges ranges in the record; addresses: one prefix
	kindList  // ports: a range list; addresses: a list in the shared tries
	kindSet   // a named set
	kindBitmap
	numKinds
)

// linearTable is the program's record map.
type linearTable struct {
	segs    [][][]byte // each segment's lists of records, in order, without the ends
	dirAt   []int      // by segment: its first directory entry
	buckets []int      // by segment: buckets per indexed field (0: none)
	marks   []bool     // by segment: a record sets the mark (written back)
	grouped []bool     // by segment: its records are in lists by family and protocol
	sets    []string   // named sets the records use, by index
	kinds   [4][numKinds]bool
	ranges  [][]byte          // range lists (linRangesMap), by id
	rangeID map[string]uint32 // by content
	uses    struct{ meta, ct, tcp, count, setMark, fam, proto, shape bool }
	cap     int   // records per generation
	maxScan int   // longest list
	capRefs []int // instructions that hold linCapSymbol until linearFinish
	used    int   // entries of a generation before the zero tail
}

// scanned marks the rules whose every shape fewer than minTableRules rules
// of the hook have (or that have no keyed field): no table would hold
// them. A rule that doesn't end evaluation goes to the scan only when the
// program doesn't trace (a traced packet records every rule that matches,
// from its body).
func (c *compiler) scanned(rules []*grammar.Rule, variants [][]ruleVariant) []bool {
	count := map[string]int{}
	for i := range rules {
		seen := map[string]bool{}
		for _, v := range variants[i] {
			if !seen[v.sh.key] {
				seen[v.sh.key] = true
				count[v.sh.key]++
			}
		}
	}
	out := make([]bool, len(rules))
	for i := range rules {
		out[i] = true
		for _, v := range variants[i] {
			if count[v.sh.key] >= minTableRules {
				out[i] = false
			}
		}
	}
	return out
}

// smallHook: hooks of at most this many rules keep their small segments
// inline (the code of a few rules costs the verifier little); in larger
// hooks a small segment of scanned rules (cut by rules without a terminal
// action in a hook that traces) is scanned too, so that many of them
// can't add up.
const smallHook = 2 * inlineRules

// scanSmall reports whether a segment of at most inlineRules rules is
// scanned rather than inline: in a large hook, when all its rules are
// scanned rules.
func (c *compiler) scanSmall(rules []*grammar.Rule, seg segment, scan []bool) bool {
	if len(rules) <= smallHook {
		return false
	}
	for i := seg.first; i < seg.first+seg.n; i++ {
		if !scan[i] {
			return false
		}
	}
	return true
}

// placeRest moves a segment's scanned members to the scan when there are
// more than linMin of them, or when they are all its rules and the hook is
// large (scanSmall).
func (c *compiler) placeRest(rules []*grammar.Rule, seg *segment, scan []bool) {
	n := 0
	for _, i := range seg.members {
		if scan[i] {
			n++
		}
	}
	if n <= linMin && !(n == seg.n && c.scanSmall(rules, *seg, scan)) && !c.over.any(*seg) {
		return
	}
	var members []int
	for _, i := range seg.members {
		if scan[i] {
			seg.linear = append(seg.linear, i)
		} else {
			members = append(members, i)
		}
	}
	seg.members = members
	seg.scanFx = len(members) == 0
	if seg.scanFx {
		for _, i := range seg.linear {
			if c.fxInScan(rules[i]) && !c.over.byShape[i] {
				c.bodyKeys[i] = c.scanBodyKey(rules[i])
			}
		}
	}
}

// fxInScan reports whether the scan may do rule r's counter and mark set:
// not when its body first sends TCP segments through the segmentation
// device (they come back and are counted then).
func (c *compiler) fxInScan(r *grammar.Rule) bool {
	if !terminal(r) && c.tracing {
		return false // its body runs: it traces
	}
	return !(segments(r) && c.segDev())
}

// segDev reports whether bodies that segment send packets through the
// segmentation device.
func (c *compiler) segDev() bool {
	return c.opts.SegIfindex != 0 && c.opts.SegReturnIfindex != 0 && c.opts.Hook == grammar.HookEgress && !c.opts.L3
}

// scanBodyKey is the body key of a rule whose counter and mark set the scan
// does: its body has only the actions (the counter flag stays in the key:
// the body's exits take a packet they leave alone back out of the counter).
//
// The family is left out: the body is emitted as for a rule of either
// family (bodyRule), which a packet of the record's family runs the same
// way, so rules that differ in family only share one body.
func (c *compiler) scanBodyKey(r *grammar.Rule) string {
	b := *r
	b.SetMetaMark, b.SetCtMark, b.Family = nil, nil, grammar.FamilyAny
	return "scan: " + c.bodyKeyOf(&b)
}

// bodyRule is the rule a body of class key is emitted from: for a key of
// scanBodyKey or a kind (params.go), rule r with either family, and
// whether the scan did its counter and mark set.
func bodyRule(r *grammar.Rule, key string) (*grammar.Rule, bool) {
	scan := strings.HasPrefix(key, "scan: ")
	switch {
	case strings.HasPrefix(strings.TrimPrefix(key, "scan: "), kindPrefix):
		return kindRule(r), scan
	case scan:
		b := *r
		b.Family = grammar.FamilyAny
		return &b, true
	}
	return r, false
}

// record encodes rule i.
func (c *compiler) record(r *grammar.Rule, i int, fx bool) ([]byte, error) {
	t := c.lin
	b := make([]byte, recSize)
	put := func(off int, v uint32) { binary.NativeEndian.PutUint32(b[off:], v) }
	put(recPrio, c.prio(i))
	put(recSlot, c.slot(i))
	put(recBody, c.bodyOf[i])
	var flags uint32
	if terminal(r) || c.tracing {
		// The scan stops here. A rule without a terminal action in a hook
		// that traces ends its segment: its body runs, then the next
		// segment's rules.
		flags |= recTerminal
	}
	fam := 0
	switch r.Family {
	case grammar.FamilyIPv4:
		fam = 4
	case grammar.FamilyIPv6:
		fam = 6
	}
	if r.Proto != grammar.ProtoAny {
		b[recProto] = r.Proto.Number()
		t.uses.proto = true
	}
	// Addresses: a prefix, a list in the shared tries, or a named set.
	for j, m := range []*grammar.AddrMatch{r.Saddr, r.Daddr} {
		if m == nil {
			continue
		}
		off, shift, neg := recSaddr+20*j, recKindShift+6+3*j, uint32(recSaddrNeg<<j)
		kind, mfam := 0, 0
		if m.Set != "" {
			s, err := c.namedSet(m.Set, m.Span, grammar.SetIPv4Addr, grammar.SetIPv6Addr)
			if err != nil {
				return nil, err
			}
			mfam = 4
			if s.Type == grammar.SetIPv6Addr {
				mfam = 6
			}
			kind = kindSet
			put(off, c.linSet(m.Set))
		} else {
			if len(m.Prefixes) == 0 {
				return nil, errorf(m.Span, "empty address list")
			}
			mfam = 4
			if m.Prefixes[0].Addr().Is6() {
				mfam = 6
			}
			for _, p := range m.Prefixes {
				if p.Addr().Is4() != (mfam == 4) {
					return nil, errorf(m.Span, "IPv4 and IPv6 addresses mixed in one match")
				}
			}
			if len(m.Prefixes) == 1 {
				kind = kindRange
				p := m.Prefixes[0].Masked()
				put(off, uint32(p.Bits()))
				a := p.Addr().AsSlice()
				for w := 0; w*4 < len(a); w++ {
					put(off+4+4*w, binary.BigEndian.Uint32(a[4*w:]))
				}
			} else {
				kind = kindList
				put(off, c.prefixList(mfam, m.Prefixes))
			}
		}
		if (r.Family == grammar.FamilyIPv4 && mfam == 6) || (r.Family == grammar.FamilyIPv6 && mfam == 4) {
			return nil, errorf(m.Span, "address family conflicts with the rule's family")
		}
		if fam != 0 && fam != mfam {
			fam = 0xff // an IPv4 and an IPv6 address: no packet has both
		} else {
			fam = mfam
		}
		flags |= uint32(kind) << shift
		if m.Neg {
			flags |= neg
		}
		t.kinds[2+j][kind] = true
		t.kinds[2+j][kindNone] = true
	}
	if fam != 0 {
		t.uses.fam = true
	}
	b[recFam] = byte(fam)
	// Ports: a range, a list in the shared bitmaps, or a named set.
	for j, m := range []*grammar.PortMatch{r.Sport, r.Dport} {
		if m == nil {
			continue
		}
		off, shift, neg := recSport+16*j, recKindShift+3*j, uint32(recSportNeg<<j)
		kind := kindRange
		switch {
		case m.Set != "":
			if _, err := c.namedSet(m.Set, m.Span, grammar.SetInetService); err != nil {
				return nil, err
			}
			kind = kindSet
			put(off, c.linSet(m.Set))
		case len(m.Ranges) <= recRanges:
			copy(b[off:], packRanges(m.Ranges, recRanges))
		case len(m.Ranges) <= listRanges:
			kind = kindList
			put(off, c.rangeList(m.Ranges))
		default:
			kind = kindBitmap
			put(off, c.portList(m.Ranges))
		}
		flags |= uint32(kind) << shift
		if m.Neg {
			flags |= neg
		}
		t.kinds[j][kind] = true
		t.kinds[j][kindNone] = true
	}
	if f := r.TCPFlags; f != nil {
		flags |= recTCP
		t.uses.tcp = true
		mask, value, ne := f.Flags, uint8(0), false
		switch f.Form {
		case grammar.FlagsAny:
			ne = true
		case grammar.FlagsNone:
		case grammar.FlagsExact:
			mask, value = 0xff, f.Flags
		default:
			mask, value = f.Mask, f.Flags
		}
		b[recTCPMask], b[recTCPValue] = mask, value
		if ne {
			flags |= recTCPNeg
		}
	}
	if m := r.MetaMark; m != nil {
		flags |= recMeta
		t.uses.meta = true
		put(recMetaMask, m.Mask)
		put(recMetaVal, m.Value&m.Mask)
		if m.Neg {
			flags |= recMetaNeg
		}
	}
	if m := r.CtMark; m != nil {
		mask, value, err := c.ct.MatchBits(m)
		if err != nil {
			return nil, &Error{Span: m.Span, Msg: err.Error()}
		}
		flags |= recCt
		t.uses.ct = true
		put(recCtMask, mask)
		put(recCtVal, value)
		if m.Neg {
			flags |= recCtNeg
		}
	}
	// Statements the scan does: always for rules that don't end
	// evaluation (their bodies never run), else when fx.
	if fx || !terminal(r) && !c.tracing {
		if r.Counter {
			flags |= recCount
			t.uses.count = true
		}
		var mask, value uint32
		if s := r.SetMetaMark; s != nil {
			mask, value = s.Mask, s.Value&s.Mask
		}
		if s := r.SetCtMark; s != nil {
			m2, v2, err := c.ct.SetBits(s)
			if err != nil {
				return nil, &Error{Span: s.Span, Msg: err.Error()}
			}
			mask, value = mask|m2, value&^m2|v2
		}
		if r.SetMetaMark != nil || r.SetCtMark != nil {
			flags |= recSetMark
			t.uses.setMark = true
			put(recSetMask, mask)
			put(recSetVal, value)
		}
	}
	put(recFlags, flags)
	return b, nil
}

// packRanges lays out port ranges as n {u16 lo, u16 hi} sorted by lo,
// the unused ones {65535, 0} (no port is in them): the callback stops at
// the first range that starts above the port (linPort), so a port below
// a list's ranges, or past its last, costs one compare, not n.
func packRanges(rs []grammar.PortRange, n int) []byte {
	sorted := slices.SortedFunc(slices.Values(rs), func(a, b grammar.PortRange) int {
		return cmp.Or(cmp.Compare(a.Lo, b.Lo), cmp.Compare(a.Hi, b.Hi))
	})
	b := make([]byte, 4*n)
	for k := 0; k < n; k++ {
		r := grammar.PortRange{Lo: 0xffff, Hi: 0}
		if k < len(sorted) {
			r = sorted[k]
		}
		binary.NativeEndian.PutUint16(b[4*k:], r.Lo)
		binary.NativeEndian.PutUint16(b[4*k+2:], r.Hi)
	}
	return b
}

// rangeList returns the id of a port range list in linRangesMap.
func (c *compiler) rangeList(rs []grammar.PortRange) uint32 {
	t := c.lin
	v := packRanges(rs, listRanges)
	if id, ok := t.rangeID[string(v)]; ok {
		return id
	}
	if t.rangeID == nil {
		t.rangeID = map[string]uint32{}
	}
	id := uint32(len(t.ranges))
	t.rangeID[string(v)] = id
	t.ranges = append(t.ranges, v)
	return id
}

// linSet returns the index of a named set in the callback's switch.
func (c *compiler) linSet(name string) uint32 {
	for i, s := range c.lin.sets {
		if s == name {
			return uint32(i)
		}
	}
	c.lin.sets = append(c.lin.sets, name)
	return uint32(len(c.lin.sets) - 1)
}

// linRangesMap holds the scan's port range lists (ARRAY, value listRanges
// {u16 lo, u16 hi}), part of the program like the other anonymous lists.
const linRangesMap = anonPrefix + "ranges"

// linearMapSpecs adds the record map with generation 0, and the range lists.
func (c *compiler) linearMapSpecs() {
	t := c.lin
	if len(t.ranges) > 0 {
		// Headroom: a record added with a range list of its own takes a
		// free id (Layout.PlaceRecordLists).
		m := &ebpf.MapSpec{Name: linRangesMap, Type: ebpf.Array, KeySize: 4, ValueSize: 4 * listRanges, MaxEntries: uint32(capacity(len(t.ranges)+len(t.ranges)/4, 16))}
		for i, v := range t.ranges {
			m.Contents = append(m.Contents, ebpf.MapKV{Key: uint32(i), Value: v})
		}
		c.spec.Maps[linRangesMap] = m
	}
	c.shapeKeySpec()
	c.spec.Maps[linearMap] = &ebpf.MapSpec{
		Name: linearMap, Type: ebpf.Array, KeySize: 4, ValueSize: recSize, MaxEntries: uint32(2 * t.cap),
		Contents: t.contents(0)[:t.used], // a new array is zeros already
	}
}

// linGroups: record lists per segment, by family (any, 4, 6) × protocol
// (any, TCP, UDP).
const linGroups = 9

// Buckets. In a segment of many records, a terminal record that a
// field's value pins to one bucket goes to that bucket's list instead of
// its family/protocol list: the fields, in this order, are the
// destination port, the source port (a positive match of ports that all
// fall into one bucket), the source and the destination address (a
// positive host: IPv4 /32, IPv6 /128). A packet reads its group lists and,
// per field, the one bucket list of its value: records of other buckets
// need a value it does not have. Directory entries 9+f*B+b are the
// segment's bucket lists, f the field, b the bucket; B (the segment's
// buckets) is fixed when the hook is compiled.
const (
	// linIndexFields: dport, sport, saddr, daddr (fields added later go
	// last: stored layouts, whose ScanLists say how many they have, keep
	// their meaning).
	linIndexFields = 4
	linBucketMin   = 16 // fewer indexable records: no buckets
	linBucketMax   = 4096
	linBucketPorts = 64         // a port match of more ports is not indexed
	portHashMul    = 40503      // 2^16 / golden ratio: the port's bits spread over the 16-bit hash
	addrHashMul    = 0x9E3779B1 // 2^32 / golden ratio
)

// portBucket is the bucket of port p among n: the port's multiplicative
// hash scaled to n (no power of two needed). linScan computes the same.
func portBucket(p uint16, n int) int {
	return int(uint32(p)*portHashMul&0xffff) * n >> 16
}

// addrBucket is the bucket among n of an address whose four host-order
// words XOR to key (an IPv4 address is its first word).
func addrBucket(key uint32, n int) int {
	return int(key*addrHashMul>>16) * n >> 16
}

// linGroup is the list of a record in a segment whose records all end the
// scan.
func linGroup(rec []byte) int {
	fam := map[byte]int{4: 1, 6: 2}[rec[recFam]] // 0xff (no packet): any, the family test fails it
	proto := map[byte]int{6: 1, 17: 2}[rec[recProto]]
	return 3*fam + proto
}

// recordBucket returns the index field (0 dport, 1 sport, 2 saddr, 3
// daddr) and bucket of a record among buckets, when one of its first
// fields pins it to one bucket.
func recordBucket(rec []byte, fields, buckets int) (field, bucket int, ok bool) {
	flags := nativeU32(rec[recFlags:])
	if buckets <= 0 || flags&recTerminal == 0 || flags&recShape != 0 {
		return 0, 0, false
	}
	for f := 0; f < fields && f < linIndexFields; f++ {
		if f >= 2 {
			if b, ok := hostBucket(rec, flags, f-2, buckets); ok {
				return f, b, true
			}
			continue
		}
		j := 1 - f // record field: 0 sport, 1 dport
		if flags>>(recKindShift+3*j)&7 != kindRange || flags&(recSportNeg<<j) != 0 {
			continue
		}
		b, n := -1, 0
		for r := 0; r < recRanges && b != -2; r++ {
			at := recSport + 16*j + 4*r
			lo, hi := binary.NativeEndian.Uint16(rec[at:]), binary.NativeEndian.Uint16(rec[at+2:])
			if hi < lo {
				continue // unused (packRanges)
			}
			if n += int(hi) - int(lo) + 1; n > linBucketPorts {
				b = -2 // too many ports
				break
			}
			for p := int(lo); p <= int(hi); p++ {
				if q := portBucket(uint16(p), buckets); b == -1 {
					b = q
				} else if q != b {
					b = -2
					break
				}
			}
		}
		if b >= 0 {
			return f, b, true
		}
	}
	return 0, 0, false
}

// hostBucket returns the bucket of a record's address j (0 saddr, 1
// daddr) when it is a positive host of the record's family.
func hostBucket(rec []byte, flags uint32, j, buckets int) (int, bool) {
	off := recSaddr + 20*j
	if flags>>(recKindShift+6+3*j)&7 != kindRange || flags&(recSaddrNeg<<j) != 0 {
		return 0, false
	}
	if bits := nativeU32(rec[off:]); !(rec[recFam] == 4 && bits == 32 || rec[recFam] == 6 && bits == 128) {
		return 0, false
	}
	var key uint32
	for w := 0; w < 4; w++ {
		key ^= nativeU32(rec[off+4+4*w:])
	}
	return addrBucket(key, buckets), true
}

// RecordList is the list (directory entry Scan-1+RecordList) a record
// belongs to in a segment of lists entries and buckets buckets per field
// (SegmentLayout.ScanLists, ScanBuckets): 0 in a segment of one list;
// records that don't end the scan are in list 0.
func RecordList(rec []byte, lists, buckets int) int {
	if lists <= 1 || nativeU32(rec[recFlags:])&recTerminal == 0 {
		return 0
	}
	if buckets > 0 {
		if f, b, ok := recordBucket(rec, (lists-linGroups)/buckets, buckets); ok {
			return linGroups + f*buckets + b
		}
	}
	return linGroup(rec)
}

// segBuckets is how many buckets per field a segment of these records gets:
// about one per two records an index would hold, none for few.
func segBuckets(recs [][]byte) int {
	n := 0
	for _, rec := range recs {
		if _, _, ok := recordBucket(rec, linIndexFields, linBucketMax); ok {
			n++
		}
	}
	if n < linBucketMin {
		return 0
	}
	return min(linBucketMax, n/2)
}

// entries counts a generation's entries: the directory, the empty list,
// then the lists and their ends.
func (t *linearTable) entries() int {
	n := t.dirEntries() + 1
	for _, lists := range t.segs {
		for _, recs := range lists {
			if len(recs) > 0 {
				n += len(recs)/recSize + 1
			}
		}
	}
	return n
}

// dirEntries is the directory's size.
func (t *linearTable) dirEntries() int {
	n := 0
	for _, lists := range t.segs {
		n += len(lists)
	}
	return n
}

// contents are every entry of generation gen (an array has no deletes).
func (t *linearTable) contents(gen uint32) []ebpf.MapKV {
	base := int(gen) * t.cap
	out := make([]ebpf.MapKV, 0, t.cap)
	key := func(i int) []byte { return binary.NativeEndian.AppendUint32(nil, uint32(base+i)) }
	empty := t.dirEntries()
	next := empty + 1
	for s, lists := range t.segs {
		for l, recs := range lists {
			first := empty
			if len(recs) > 0 {
				first = next
				next += len(recs)/recSize + 1
			}
			dir := make([]byte, recSize)
			binary.NativeEndian.PutUint32(dir[recPrio:], uint32(base+first))
			out = append(out, ebpf.MapKV{Key: key(t.dirAt[s] + l), Value: dir})
		}
	}
	out = append(out, ebpf.MapKV{Key: key(empty), Value: make([]byte, recSize)})
	at := empty + 1
	for _, lists := range t.segs {
		for _, recs := range lists {
			if len(recs) == 0 {
				continue
			}
			for k := 0; k < len(recs); k += recSize {
				out = append(out, ebpf.MapKV{Key: key(at), Value: recs[k : k+recSize]})
				at++
			}
			out = append(out, ebpf.MapKV{Key: key(at), Value: make([]byte, recSize)})
			at++
		}
	}
	t.used = at
	zero := make([]byte, recSize)
	for ; at < t.cap; at++ {
		out = append(out, ebpf.MapKV{Key: key(at), Value: zero})
	}
	return out
}

func nativeU32(b []byte) uint32 { return binary.NativeEndian.Uint32(b) }
