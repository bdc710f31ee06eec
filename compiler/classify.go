package compiler

import (
	"encoding/binary"
	"iter"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"

	"github.com/sfunnel/sfunnel/grammar"
)

// The classifier pass: rules → segments of shapes with table entries.
//
// Tuple-space classification. A rule's *shape* is the rule with the values
// of its key fields blanked: positive address prefixes (their length stays
// in the shape), positive ports (lists and bounded ranges are expanded) and
// positive mark values (the mask stays). Everything else — family,
// protocol, TCP flags, negations, named sets, ranges too wide to expand —
// stays in the shape as written and is checked inline once per shape
// (residual checks). The shape key is the canonical printer's text of that
// blanked rule, so a match the printer knows is never silently merged.
//
// Rules of one shape share a hash table from key to {priority, counter
// slot, body}; per packet the program looks up each shape once and keeps
// the lowest priority (rule position): the first matching rule. Cost per
// packet grows with the number of shapes, not rules.
//
// A segment is a run of rules classified together. A rule without a
// terminal action (counter, mark set: evaluation goes on with the next
// rules, which see the new mark) shares its segment only with rules of its
// own shape (distinct keys of one shape never match the same packet). A
// segment also ends before a rule whose key its shape already holds
// (unless the holder ends evaluation: then the later rule can't match by
// that key and its entry is dropped), and when its bodies or shapes
// outgrow the jump range. Small segments are emitted rule by
// rule, as before.
//
// In a large hook only a few shapes are code (shapescan.go: the code
// budget); the rules of the others go to the record scan (linear.go),
// those that share a shape as one shape record per shape.

// Limits of the classifier.
const (
	// inlineRules: segments of at most this many rules are emitted rule by
	// rule (cheaper than a lookup for a few rules).
	inlineRules = 16
	// maxExpandPorts: a positive port match with at most this many ports
	// is keyed (one entry per port); wider ones stay in the shape.
	maxExpandPorts = 1024
	// maxRuleEntries bounds the entries one rule expands to (the product
	// of its keyed lists); past it the widest list stays in the shape.
	maxRuleEntries = 1 << 16
	// maxSegmentShapes bounds the shapes of one segment, so its lookups
	// stay within jump range of the exits.
	maxSegmentShapes = 256
)

// keyField names a field a shape keys on, in key order.
type keyField uint8

const (
	keySaddr keyField = iota
	keyDaddr
	keySport
	keyDport
	keyMeta
	keyCt
	numKeyFields
)

var keyFieldNames = [numKeyFields]string{"saddr", "daddr", "sport", "dport", "meta mark", "ct mark"}

// shape is one rule shape of a segment: its residual checks (the template
// rule with the keyed matches skipped), its key layout and its table.
type shape struct {
	key   string        // canonical text of the blanked rule, with the keyed fields
	tmpl  *grammar.Rule // first rule of the shape: its unkeyed matches are the shape's
	keyed [numKeyFields]bool
	bits  [2]int     // prefix length of keyed saddr, daddr
	fam   int        // 4 or 6 when an address is keyed, else 0
	mask  [2]uint32  // skb->mark mask of keyed meta mark, ct mark
	id    uint32     // unique in the program: the first key word is id<<1 | generation
	table string     // map holding the entries (one per key size)
	words int        // key words after the first
	ents  []tabEntry // entries, in rule order
	array bool       // one port keyed: an ARRAY indexed by generation<<16 | port
	// perfect: the shape's perfect-hash table (perfect.go), nil when it
	// has an array or a hash table.
	perfect *perfectTable
	// shadowed: a key of two rules, the later one's entry dropped (Layout).
	shadowed bool
	// first: the shape's first rule (a shape record sits where it is).
	first int
}

// portOnly reports whether the shape keys on one port and nothing else.
func (sh *shape) portOnly() bool {
	n := 0
	for _, k := range sh.keyed {
		if k {
			n++
		}
	}
	return n == 1 && (sh.keyed[keySport] || sh.keyed[keyDport])
}

// maxPortArrays bounds the port arrays of a program (1.5 MiB each).
const maxPortArrays = 4

// tabEntry is one key of one rule.
type tabEntry struct {
	rule int
	key  []byte // key words after the first (shape id and generation)
}

// segment is a run of rules classified together.
type segment struct {
	first, n int
	inline   bool
	shapes   []*shape // looked up
	members  []int    // rules tested inline after the lookups, in order
	linear   []int    // rules matched by the record scan (linear.go), in order
	scanFx   bool     // the scan does the linear rules' counter and mark set
	// scanShapes: shapes of linear rules over the code budget, one shape
	// record each (shapescan.go), in the order of their first rules.
	scanShapes []*shape
}

// ruleVariant is one (shape, keys) part of a rule: an address list with
// prefixes of several lengths makes one variant per length.
type ruleVariant struct {
	sh   *shape // key, keyed, bits, fam, mask filled; not yet placed
	keys keyList
}

// keyList is n keys of w bytes each, back to back (a 101-port range is
// 404 bytes, not 101 slices).
type keyList struct {
	b    []byte
	w, n int
}

// all yields the keys in order; each is a slice of the list's buffer
// (appending to it copies).
func (l keyList) all() iter.Seq2[int, []byte] {
	return func(yield func(int, []byte) bool) {
		for i := range l.n {
			if !yield(i, l.b[i*l.w:(i+1)*l.w:(i+1)*l.w]) {
				return
			}
		}
	}
}

// classify cuts the rules into segments. In a large hook the shapes
// emitted as code are kept within a budget (shapescan.go): rules of the
// other shapes go to the record scan, and each pass that finds the budget
// exceeded sends more of them there.
func (c *compiler) classify(rules []*grammar.Rule) ([]segment, error) {
	variants, err := c.allVariants(rules)
	if err != nil {
		return nil, err
	}
	c.chooseBodies(rules) // body keys by kind in hooks of many bodies (params.go)
	// Rules of shapes no table would hold go to the record scan
	// (linear.go): they bring no shape into a segment.
	scan := c.scanned(rules, variants)
	b := c.newBudget(rules, variants, scan)
	keys := slices.Clone(c.bodyKeys)
	for {
		copy(c.bodyKeys, keys) // placeRest rewrites some
		segs := c.classifyWith(rules, variants, scan)
		if !b.demote(segs) {
			return segs, nil
		}
	}
}

// classifyWith cuts the rules into segments, the rules marked in scan (and
// those over the code budget, c.over) going to the record scan.
func (c *compiler) classifyWith(rules []*grammar.Rule, all [][]ruleVariant, scan []bool) []segment {
	var segs []segment
	over := c.over
	scan = slices.Clone(scan)
	own := make([][]ruleVariant, len(rules))
	for i := range rules {
		scan[i] = scan[i] || over.demoted[i]
		if !scan[i] {
			own[i] = all[i]
		}
	}
	variants := own
	owner := newKeyOwners() // the rule of each key of each shape of a segment
	start := 0
	for start < len(rules) {
		seg := segment{first: start}
		byKey := map[string]int32{} // index in seg.shapes
		owner.reset()
		bodies := map[string]bool{}
		bodyInsns := 0
		nonTerminal := false
		scanNonTerminal, others, hasScan := false, false, false // (linear.go)
		i := start
	rules:
		for ; i < len(rules); i++ {
			r := rules[i]
			// Scanned rules (linear.go) and rules that don't end evaluation:
			// the scan does a scanned rule's counter and mark set, which
			// must not come after a lookup or an inline rule of its segment,
			// and a rule that doesn't end evaluation must not keep a later
			// rule of its segment from being tested. So a scanned rule that
			// doesn't end evaluation shares a segment only with scanned
			// rules, and a rule outside the tables (no variants) never
			// follows one that doesn't end evaluation.
			if i > start {
				nt := !terminal(r)
				switch {
				case scan[i] && nt && !c.tracing && others, scan[i] && nonTerminal:
					break rules
				case !scan[i] && (scanNonTerminal || nt && hasScan):
					break rules
				case !scan[i] && (nonTerminal || nt) && len(variants[i]) == 0:
					break rules
				}
			}
			// A key an earlier rule of the segment holds in the same shape:
			// dead when that rule ends evaluation, else a new segment.
			newShapes := 0
			for _, v := range variants[i] {
				sh, ok := byKey[v.sh.key]
				if !ok {
					newShapes++
					continue
				}
				for _, k := range v.keys.all() {
					if owner.open(sh, k) {
						break rules
					}
				}
			}
			if len(byKey)+newShapes > maxSegmentShapes && i > start {
				break
			}
			// Rules that don't end evaluation share a segment only with
			// rules of their own shape: distinct keys of one shape never
			// match the same packet, so the rules after the one that ran
			// can't match either.
			if (nonTerminal || !terminal(r)) && i > start && (newShapes > 0 || len(variants[i]) > 1) {
				break
			}
			bk := c.bodyKeys[i]
			if !bodies[bk] && (scan[i] || len(rules) > poolHook) && terminal(r) {
				// Its body is inline (a member) or shared (linscan.go).
				if i > start && len(bodies) == maxGroupBodies {
					break
				}
				bodies[bk] = true
			} else if !bodies[bk] {
				size := c.bodySize(i, r)
				if i > start && (len(bodies) == maxGroupBodies || bodyInsns+size > maxGroupBodyInsns) {
					break
				}
				bodies[bk] = true
				bodyInsns += size
			}
			for _, v := range variants[i] {
				n, ok := byKey[v.sh.key]
				if !ok {
					cp := *v.sh // the variants serve every pass (classify)
					cp.tmpl = r
					n = int32(len(seg.shapes))
					byKey[cp.key] = n
					seg.shapes = append(seg.shapes, &cp)
					owner.addShape(&cp)
				}
				sh := seg.shapes[n]
				for _, k := range v.keys.all() {
					if !owner.claim(n, k, !terminal(r)) {
						sh.shadowed = true
						continue // an earlier rule that ends evaluation has it
					}
					sh.ents = append(sh.ents, tabEntry{rule: i, key: k})
				}
			}
			if scan[i] {
				hasScan = true
				if !terminal(r) && c.tracing {
					// The scan stops at it and its body runs (it traces):
					// it ends its segment.
					i++
					break
				}
				scanNonTerminal = scanNonTerminal || !terminal(r)
			} else {
				others = true
				nonTerminal = nonTerminal || !terminal(r)
			}
			if nonTerminal && len(byKey) > 1 {
				i++
				break
			}
		}
		seg.n = i - start
		seg.inline = seg.n <= inlineRules && !c.scanSmall(rules, seg, scan) && !over.any(seg)
		if !seg.inline {
			seg.split(variants)
			c.placeRest(rules, &seg, scan)
			c.scanShapesOf(rules, &seg)
			seg.inline = len(seg.shapes) == 0 && len(seg.linear) == 0
		}
		if seg.inline {
			seg.shapes, seg.members, seg.linear, seg.scanShapes = nil, nil, nil, nil
		}
		segs = append(segs, seg)
		start = i
	}
	return segs
}

// split keeps in tables the shapes that several rules share: a lookup per
// shape pays against a test per rule only then. A rule with a shape of its
// own is a member tested inline, in rule order, after the lookups (see
// segment).
func (seg *segment) split(variants [][]ruleVariant) {
	inline := make([]bool, seg.n) // by rule, from seg.first
	for _, sh := range seg.shapes {
		// Its entries are in rule order: count the rules it holds keys of.
		rules, last := 0, -1
		for _, en := range sh.ents {
			if en.rule != last {
				rules, last = rules+1, en.rule
			}
		}
		if rules < minTableRules {
			for _, en := range sh.ents {
				inline[en.rule-seg.first] = true
			}
		}
	}
	for i := seg.first; i < seg.first+seg.n; i++ {
		if len(variants[i]) == 0 {
			inline[i-seg.first] = true
		}
	}
	var kept []*shape
	for _, sh := range seg.shapes {
		ents := sh.ents[:0]
		for _, en := range sh.ents {
			if !inline[en.rule-seg.first] {
				ents = append(ents, en)
			}
		}
		sh.ents = ents
		if len(ents) > 0 {
			kept = append(kept, sh)
		}
	}
	seg.shapes = kept
	for i := seg.first; i < seg.first+seg.n; i++ {
		if inline[i-seg.first] {
			seg.members = append(seg.members, i)
		}
	}
}

// ownerKey is a key of a shape of a segment.
type ownerKey struct {
	sh  *shape
	key string
}

// allVariants computes every rule's body key (c.bodyKeys) and variants;
// large rulesets on every CPU (both depend on the rule alone).
func (c *compiler) allVariants(rules []*grammar.Rule) ([][]ruleVariant, error) {
	variants := make([][]ruleVariant, len(rules))
	c.bodyKeys = make([]string, len(rules))
	errs := make([]error, len(rules))
	work := func(lo, hi int) {
		memo := newShapeMemo()
		for i := lo; i < hi; i++ {
			c.bodyKeys[i] = memo.bodyKey(rules[i])
			variants[i], errs[i] = c.variantsMemo(rules[i], memo)
		}
	}
	workers := runtime.GOMAXPROCS(0)
	if len(rules) < 2048 || workers == 1 {
		work(0, len(rules))
	} else {
		var wg sync.WaitGroup
		per := (len(rules) + workers - 1) / workers
		for lo := 0; lo < len(rules); lo += per {
			wg.Add(1)
			go func(lo, hi int) {
				defer wg.Done()
				work(lo, hi)
			}(lo, min(lo+per, len(rules)))
		}
		wg.Wait()
	}
	for _, err := range errs {
		if err != nil {
			return nil, err // the first rule's error, as before
		}
	}
	return variants, nil
}

// minTableRules is the fewest rules a shape needs to get a table.
const minTableRules = 3

// terminal reports whether a matching rule ends evaluation.
func terminal(r *grammar.Rule) bool { return len(r.Actions) > 0 }

// variants splits a rule into its shapes and keys.
func (c *compiler) variants(r *grammar.Rule) ([]ruleVariant, error) { return c.variantsMemo(r, nil) }

// variantsMemo is variants with a memo of shape keys (see shapeKey).
func (c *compiler) variantsMemo(r *grammar.Rule, memo *shapeMemo) ([]ruleVariant, error) {
	if err := c.checkAddrs(r); err != nil {
		return nil, err
	}
	var scratch variantScratch
	if memo != nil {
		scratch = memo.scratch
		defer func() { memo.scratch = scratch }() // the buffers, grown
	}
	// Which fields are keyed, and their values (ports: 4 bytes each).
	var portVals [2][]byte // sport, dport
	var nPorts [2]int
	keyPorts := [2]bool{}
	for j, m := range []*grammar.PortMatch{r.Sport, r.Dport} {
		if m == nil || m.Neg || m.Set != "" {
			continue
		}
		n := 0
		for _, rg := range m.Ranges {
			n += int(rg.Hi) - int(rg.Lo) + 1
		}
		if n == 0 || n > maxExpandPorts {
			continue
		}
		keyPorts[j] = true
		b := scratch.ports[j][:0]
		if len(m.Ranges) == 1 { // no duplicates
			for p := uint32(m.Ranges[0].Lo); p <= uint32(m.Ranges[0].Hi); p++ {
				b = binary.NativeEndian.AppendUint32(b, p)
			}
		} else {
			seen := map[uint32]bool{}
			for _, rg := range m.Ranges {
				for p := uint32(rg.Lo); p <= uint32(rg.Hi); p++ {
					if !seen[p] {
						seen[p] = true
						b = binary.NativeEndian.AppendUint32(b, p)
					}
				}
			}
		}
		scratch.ports[j], portVals[j], nPorts[j] = b, b, len(b)/4
	}
	keyAddr := [2]bool{}
	for j, m := range []*grammar.AddrMatch{r.Saddr, r.Daddr} {
		keyAddr[j] = m != nil && !m.Neg && m.Set == "" && len(m.Prefixes) > 0
	}
	var markMask, markVal [2]uint32
	keyMark := [2]bool{}
	if m := r.MetaMark; m != nil && !m.Neg {
		keyMark[0], markMask[0], markVal[0] = true, m.Mask, m.Value&m.Mask
	}
	if m := r.CtMark; m != nil {
		mask, value, err := c.ct.MatchBits(m)
		if err != nil {
			return nil, &Error{Span: m.Span, Msg: err.Error()}
		}
		if !m.Neg {
			keyMark[1], markMask[1], markVal[1] = true, mask, value
		}
	}
	// Keep the product of the keyed lists bounded: unkey the widest.
	for {
		n := 1
		widest, wide := -1, 0
		for j := 0; j < 2; j++ {
			if keyAddr[j] {
				l := len(addrOf(r, j).Prefixes)
				n *= l
				if l > wide {
					widest, wide = j, l
				}
			}
			if keyPorts[j] {
				n *= nPorts[j]
				if nPorts[j] > wide {
					widest, wide = 2+j, nPorts[j]
				}
			}
		}
		if n <= maxRuleEntries || widest < 0 {
			break
		}
		if widest < 2 {
			keyAddr[widest] = false
		} else {
			keyPorts[widest-2] = false
		}
	}
	// One variant per combination of prefix lengths of the keyed addresses.
	lengths := [2][]int{{-1}, {-1}}
	for j := 0; j < 2; j++ {
		if keyAddr[j] {
			lengths[j] = nil
			for _, p := range addrOf(r, j).Prefixes {
				if !slices.Contains(lengths[j], p.Bits()) {
					lengths[j] = append(lengths[j], p.Bits())
				}
			}
		}
	}
	var blk *blocks
	if memo != nil {
		blk = &memo.blocks
	}
	out := cut(blk.variantsOf(), len(lengths[0])*len(lengths[1]), blockLen)
	for x, sl := range lengths[0] {
		for y, dl := range lengths[1] {
			sh := &cut(blk.shapesOf(), 1, blockLen)[0]
			sh.keyed[keySport], sh.keyed[keyDport] = keyPorts[0], keyPorts[1]
			sh.keyed[keyMeta], sh.keyed[keyCt] = keyMark[0], keyMark[1]
			sh.mask = markMask
			// The keyed values, each field's values as bytes, back to
			// back, in key order.
			var fields [numKeyFields][]byte
			var widths [numKeyFields]int
			nf := 0
			for j, l := range []int{sl, dl} {
				if l < 0 {
					continue
				}
				sh.keyed[keySaddr+keyField(j)] = true
				sh.bits[j] = l
				b := scratch.addrs[j][:0]
				for _, p := range addrOf(r, j).Prefixes {
					if p.Bits() == l {
						if len(b) == 0 {
							sh.fam = 4
							if p.Addr().Is6() {
								sh.fam = 6
							}
						}
						b = appendAddr(b, p.Masked().Addr())
					}
				}
				scratch.addrs[j] = b
				fields[nf] = b
				nf++
			}
			for f := range nf { // the last family keyed
				widths[f] = 4
				if sh.fam == 6 {
					widths[f] = 16
				}
			}
			sh.key = shapeKey(r, sh, memo)
			sh.words = keyWords(sh)
			for j := 0; j < 2; j++ {
				if keyPorts[j] {
					fields[nf], widths[nf] = portVals[j], 4
					nf++
				}
			}
			var marks [2][4]byte
			for j := 0; j < 2; j++ {
				if keyMark[j] {
					binary.NativeEndian.PutUint32(marks[j][:], markVal[j])
					fields[nf], widths[nf] = marks[j][:], 4
					nf++
				}
			}
			out[x*len(lengths[1])+y] = ruleVariant{sh: sh, keys: crossKeys(fields[:nf], widths[:nf], blk)}
		}
	}
	return out, nil
}

// appendAddr appends a's bytes (AsSlice's, without its allocation).
func appendAddr(b []byte, a netip.Addr) []byte {
	if a.Is4() {
		x := a.As4()
		return append(b, x[:]...)
	}
	x := a.As16()
	return append(b, x[:]...)
}

// variantScratch holds the buffers of a rule's keyed values, reused from
// rule to rule (crossKeys copies the values out).
type variantScratch struct {
	ports, addrs [2][]byte
}

// blocks hands out the shapes, variants and keys of many rules from
// shared blocks (per rule they were half a dozen small objects to
// allocate and for the collector to scan). A nil *blocks allocates each
// on its own.
type blocks struct {
	shapes   []shape
	variants []ruleVariant
	bytes    []byte
}

// Lengths of the blocks (key bytes: 16 per element); lists longer than a
// quarter of a block get their own.
const (
	blockLen     = 512
	byteBlockLen = 16 * blockLen
)

func (b *blocks) shapesOf() *[]shape {
	if b == nil {
		return nil
	}
	return &b.shapes
}

func (b *blocks) variantsOf() *[]ruleVariant {
	if b == nil {
		return nil
	}
	return &b.variants
}

// cut returns n zero values from the block free (a new one of block
// values when it has too few), or their own slice when free is nil or n is large; appending
// to the result copies.
func cut[T any](free *[]T, n, block int) []T {
	if free == nil || n > block/4 {
		return make([]T, n)
	}
	if len(*free) < n {
		*free = make([]T, block)
	}
	out := (*free)[:n:n]
	*free = (*free)[n:]
	return out
}

// crossKeys returns every combination of one value of each field (field
// f's values are widths[f] bytes each, back to back), the last field
// varying fastest.
func crossKeys(fields [][]byte, widths []int, blk *blocks) keyList {
	n, size := 1, 0
	var offs [numKeyFields]int
	for f, b := range fields {
		n *= len(b) / widths[f]
		offs[f] = size
		size += widths[f]
	}
	var buf []byte
	if blk == nil {
		buf = make([]byte, n*size)
	} else {
		buf = cut(&blk.bytes, n*size, byteBlockLen)
	}
	if len(fields) == 1 { // the values are the keys
		copy(buf, fields[0])
		return keyList{b: buf, w: size, n: n}
	}
	for i := range n {
		k := buf[i*size : (i+1)*size]
		rest := i
		for f := len(fields) - 1; f >= 0; f-- {
			w := widths[f]
			m := len(fields[f]) / w
			x := rest % m
			rest /= m
			copy(k[offs[f]:], fields[f][x*w:(x+1)*w])
		}
	}
	return keyList{b: buf, w: size, n: n}
}

func addrOf(r *grammar.Rule, j int) *grammar.AddrMatch {
	if j == 0 {
		return r.Saddr
	}
	return r.Daddr
}

// checkAddrs reports the address errors addrMatch would, for keyed
// addresses that never reach it.
func (c *compiler) checkAddrs(r *grammar.Rule) error {
	for _, m := range []*grammar.AddrMatch{r.Saddr, r.Daddr} {
		if m == nil || m.Set != "" {
			continue
		}
		if len(m.Prefixes) == 0 {
			return errorf(m.Span, "empty address list")
		}
		is6 := m.Prefixes[0].Addr().Is6()
		for _, p := range m.Prefixes {
			if p.Addr().Is4() == is6 {
				return errorf(m.Span, "IPv4 and IPv6 addresses mixed in one match")
			}
		}
		if (r.Family == grammar.FamilyIPv4 && is6) || (r.Family == grammar.FamilyIPv6 && !is6) {
			return errorf(m.Span, "address family conflicts with the rule's family")
		}
	}
	return nil
}

// keyWords is the number of 32-bit words of a shape's key after the first.
func keyWords(sh *shape) int {
	n := 0
	for f := keyField(0); f < numKeyFields; f++ {
		if !sh.keyed[f] {
			continue
		}
		if (f == keySaddr || f == keyDaddr) && sh.fam == 6 {
			n += 4
		} else {
			n++
		}
	}
	return n
}

// shapeKey renders the rule's matches with the keyed values blanked,
// through the canonical printer, prefixed with the keyed fields (so that a
// keyed field never reads like an unkeyed one with the blank value).
// memo, when not nil, keeps the keys by matchesSig of the blanked rule (the
// printer is most of the classifier's time on large rulesets).
func shapeKey(r *grammar.Rule, sh *shape, memo *shapeMemo) string {
	if memo == nil {
		return printShapeKey(blanked(r, sh, &grammar.Rule{}, new([2]grammar.MarkMatch)), sh)
	}
	b := blanked(r, sh, &memo.rule, &memo.marks)
	memo.sig = matchesSig(memo.sig[:0], b, sh.keyed)
	if k, ok := memo.keys[string(memo.sig)]; ok {
		return k
	}
	k := printShapeKey(b, sh)
	memo.keys[string(memo.sig)] = k
	return k
}

// shapeMemo is shapeKey's memo, and its scratch space (a blanked rule
// built for every rule, printed only when its signature is new).
type shapeMemo struct {
	keys   map[string]string // by matchesSig
	bodies map[string]string // by bodySig
	sig    []byte
	rule   grammar.Rule
	marks  [2]grammar.MarkMatch
	// The variants' allocations and buffers, for variantsMemo.
	blocks  blocks
	scratch variantScratch
}

func newShapeMemo() *shapeMemo {
	return &shapeMemo{keys: map[string]string{}, bodies: map[string]string{}}
}

// blanked fills b with r's matches, the keyed values blanked; marks holds
// the blank mark matches. Blank addresses and ports are shared.
func blanked(r *grammar.Rule, sh *shape, b *grammar.Rule, marks *[2]grammar.MarkMatch) *grammar.Rule {
	*b = grammar.Rule{Family: r.Family, Saddr: r.Saddr, Daddr: r.Daddr, Proto: r.Proto, Sport: r.Sport, Dport: r.Dport,
		TCPFlags: r.TCPFlags, MetaMark: r.MetaMark, CtMark: r.CtMark}
	for j := 0; j < 2; j++ {
		if !sh.keyed[keySaddr+keyField(j)] {
			continue
		}
		m := blankAddr(sh.fam, sh.bits[j])
		if j == 0 {
			b.Saddr = m
		} else {
			b.Daddr = m
		}
	}
	if sh.keyed[keySport] {
		b.Sport = blankPort
	}
	if sh.keyed[keyDport] {
		b.Dport = blankPort
	}
	if sh.keyed[keyMeta] {
		marks[0] = grammar.MarkMatch{Mask: r.MetaMark.Mask, HasMask: true}
		b.MetaMark = &marks[0]
	}
	if sh.keyed[keyCt] {
		marks[1] = grammar.MarkMatch{Mask: r.CtMark.Mask, HasMask: true}
		b.CtMark = &marks[1]
	}
	return b
}

// printShapeKey is the shape key of the blanked rule b.
func printShapeKey(b *grammar.Rule, sh *shape) string {
	var keyed []string
	for f := keyField(0); f < numKeyFields; f++ {
		if sh.keyed[f] {
			keyed = append(keyed, keyFieldNames[f])
		}
	}
	return "key(" + strings.Join(keyed, ",") + ") " + grammar.FormatRule(b, nil)
}

// Blank keyed values, shared by every shape key (only printed, never
// changed): a port, and an address of each family and prefix length.
var (
	blankPort  = &grammar.PortMatch{Ranges: []grammar.PortRange{{}}}
	blankAddrs = func() (t [2][129]*grammar.AddrMatch) {
		for f, zero := range []netip.Addr{netip.IPv4Unspecified(), netip.IPv6Unspecified()} {
			for bits := 0; bits <= zero.BitLen(); bits++ {
				t[f][bits] = &grammar.AddrMatch{Prefixes: []netip.Prefix{netip.PrefixFrom(zero, bits)}}
			}
		}
		return t
	}()
)

func blankAddr(fam, bits int) *grammar.AddrMatch {
	if fam == 6 {
		return blankAddrs[1][bits]
	}
	return blankAddrs[0][bits]
}

// matchesSig appends to buf the keyed fields and every match field of b
// that the printer reads (all but the spans): equal encodings print alike.
// TestMatchesSigFields fails when a match type gains a field.
func matchesSig(buf []byte, b *grammar.Rule, keyed [numKeyFields]bool) []byte {
	flag := func(v bool) {
		if v {
			buf = append(buf, 1)
		} else {
			buf = append(buf, 0)
		}
	}
	for _, k := range keyed {
		flag(k)
	}
	buf = append(buf, byte(b.Family), byte(b.Proto))
	str := func(s string) { buf = append(binary.AppendUvarint(buf, uint64(len(s))), s...) }
	for _, m := range []*grammar.AddrMatch{b.Saddr, b.Daddr} {
		flag(m != nil)
		if m != nil {
			flag(m.Neg)
			str(m.Set)
			buf = binary.AppendUvarint(buf, uint64(len(m.Prefixes)))
			for _, p := range m.Prefixes {
				a := p.Addr().AsSlice()
				buf = append(append(buf, byte(len(a)), byte(p.Bits())), a...)
			}
		}
	}
	for _, m := range []*grammar.PortMatch{b.Sport, b.Dport} {
		flag(m != nil)
		if m != nil {
			flag(m.Neg)
			str(m.Set)
			buf = binary.AppendUvarint(buf, uint64(len(m.Ranges)))
			for _, rg := range m.Ranges {
				buf = binary.NativeEndian.AppendUint16(binary.NativeEndian.AppendUint16(buf, rg.Lo), rg.Hi)
			}
		}
	}
	flag(b.TCPFlags != nil)
	if f := b.TCPFlags; f != nil {
		buf = append(buf, byte(f.Form), f.Flags, f.Mask)
	}
	for _, m := range []*grammar.MarkMatch{b.MetaMark, b.CtMark} {
		flag(m != nil)
		if m != nil {
			flag(m.Neg)
			flag(m.HasMask)
			buf = binary.NativeEndian.AppendUint32(binary.NativeEndian.AppendUint32(buf, m.Value), m.Mask)
		}
	}
	return buf
}

// bodyKey is bodyKey(r), printed once per distinct bodySig.
func (m *shapeMemo) bodyKey(r *grammar.Rule) string {
	m.sig = bodySig(m.sig[:0], r)
	if k, ok := m.bodies[string(m.sig)]; ok {
		return k
	}
	k := bodyKey(r)
	m.bodies[string(m.sig)] = k
	return k
}

// bodySig appends to buf every field of r that bodyKey prints (spans
// aside): rules with equal encodings print alike. TestBodySigFields fails
// when the rule, its statements or its actions gain a field.
func bodySig(buf []byte, r *grammar.Rule) []byte {
	flag := func(v bool) {
		if v {
			buf = append(buf, 1)
		} else {
			buf = append(buf, 0)
		}
	}
	u16 := func(v uint16) { buf = binary.NativeEndian.AppendUint16(buf, v) }
	u32 := func(v uint32) { buf = binary.NativeEndian.AppendUint32(buf, v) }
	buf = append(buf, byte(r.Family), byte(r.Proto))
	flag(r.Counter)
	flag(r.Trace)
	for _, m := range []*grammar.MarkSet{r.SetMetaMark, r.SetCtMark} {
		flag(m != nil)
		if m != nil {
			u32(m.Value)
			u32(m.Mask)
			flag(m.HasMask)
		}
	}
	buf = binary.AppendUvarint(buf, uint64(len(r.Actions)))
	for _, a := range r.Actions {
		buf = append(buf, byte(a.Kind), byte(a.Proto))
		n := len(buf) // the address's length first: 0, 4, or 16 and a zone
		buf, _ = a.DNATAddr.AppendBinary(append(buf, 0))
		buf[n] = byte(len(buf) - n - 1)
		u16(a.DNATPort)
		f := a.Funnel
		flag(f != nil)
		if f != nil {
			u16(f.Sport)
			u16(f.Dport)
			u32(f.Seq)
			u32(f.Ack)
			u16(f.Window)
			u16(f.MSS)
			buf = append(buf, f.Flags)
			for _, b := range []bool{f.HasSport, f.HasDport, f.HasFlags, f.HasSeq, f.HasAck, f.HasWindow, f.HasMSS, f.MSSOff} {
				flag(b)
			}
		}
	}
	return buf
}

// bodyKey renders what a rule does once it matches: the canonical text of
// its statements and actions, with the family and protocol the action code
// depends on. Rules with the same key share one body.
func bodyKey(r *grammar.Rule) string {
	b := *r
	b.Span, b.Handle, b.Comment = grammar.Span{}, 0, ""
	b.Saddr, b.Daddr, b.Sport, b.Dport, b.TCPFlags, b.MetaMark, b.CtMark = nil, nil, nil, nil, nil, nil, nil
	return grammar.FormatRule(&b, nil)
}
