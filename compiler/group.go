package compiler

import (
	"encoding/binary"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Rule groups: a run of consecutive rules that differ only in one address
// match (saddr or daddr: plain prefixes, not negated) or one port match
// (sport or dport: plain ports and small ranges, not negated), whose
// values don't overlap across rules, compiles to one test of the shared
// matches, one map lookup that yields the rule (an LPM trie for addresses,
// or a host table for IPv4 hosts, a 65536-entry array for ports), and a binary dispatch to that rule's
// statements and actions. At most one rule of such a run can match a
// packet, so first-match order is kept, and the cost per packet no longer
// grows with the number of rules.
const (
	minGroup          = 8
	maxGroupRulePorts = 256 // ports one rule of a port group may list
)

// groupAt returns the length of the group starting at rules[i] and the
// address field it varies in (0 when there is none worth it).
func groupAt(rules []*grammar.Rule, i int) (int, string) {
	best, field := 0, ""
	for _, f := range []string{"saddr", "daddr", "dport", "sport"} {
		key, ok := shapeKey(rules[i], f)
		if !ok {
			continue
		}
		n := 1
		for i+n < len(rules) {
			k, ok := shapeKey(rules[i+n], f)
			if !ok || k != key {
				break
			}
			n++
		}
		for n >= minGroup && !disjoint(rules[i:i+n], f) {
			n = 0 // overlapping prefixes: keep rule by rule
		}
		if n > best {
			best, field = n, f
		}
	}
	// Address and port together: only when that groups a longer run than
	// either alone.
	for _, f := range []string{"saddr+dport", "saddr+sport", "daddr+dport", "daddr+sport"} {
		if n := pairRun(rules[i:], f); n > best {
			best, field = n, f
		}
	}
	if best < minGroup {
		return 0, ""
	}
	return best, field
}

// splitField returns the address and port fields a group varies in ("" for
// none): "saddr" → saddr, ""; "dport" → "", dport; "saddr+dport" → both.
func splitField(field string) (addr, port string) {
	if a, p, ok := strings.Cut(field, "+"); ok {
		return a, p
	}
	if isPortField(field) {
		return "", field
	}
	return field, ""
}

func isPairField(field string) bool { return strings.Contains(field, "+") }

// pairKey is the composite key of a rule of an address+port group: the
// IPv4 address as in the packet, then the port as a native u32.
func pairKey(r *grammar.Rule, field string) [8]byte {
	af, pf := splitField(field)
	var k [8]byte
	a := varying(r, af).Prefixes[0].Addr().As4()
	copy(k[:4], a[:])
	binary.NativeEndian.PutUint32(k[4:], uint32(varyingPort(r, pf).Ranges[0].Lo))
	return k
}

// pairRun returns how many rules from rules[0] on form an address+port
// group. A rule whose key an earlier rule of the run has can never match
// when that rule has actions (it ends evaluation), so the map keeps the
// first; when it has none the scan would go on to the later rule, and the
// run ends before it.
func pairRun(rules []*grammar.Rule, field string) int {
	key, ok := shapeKey(rules[0], field)
	if !ok {
		return 0
	}
	owner := map[[8]byte]*grammar.Rule{}
	n := 0
	for ; n < len(rules); n++ {
		k, ok := shapeKey(rules[n], field)
		if !ok || k != key {
			break
		}
		pk := pairKey(rules[n], field)
		if o, dup := owner[pk]; dup {
			if len(o.Actions) == 0 {
				break
			}
			continue
		}
		owner[pk] = rules[n]
	}
	return n
}

func varying(r *grammar.Rule, field string) *grammar.AddrMatch {
	if field == "saddr" {
		return r.Saddr
	}
	return r.Daddr
}

func varyingPort(r *grammar.Rule, field string) *grammar.PortMatch {
	if field == "sport" {
		return r.Sport
	}
	return r.Dport
}

func isPortField(field string) bool { return field == "sport" || field == "dport" }

// groupPorts lists the ports of a port match, or nil when too many.
func groupPorts(m *grammar.PortMatch) []uint16 {
	var out []uint16
	for _, r := range m.Ranges {
		if int(r.Hi)-int(r.Lo)+len(out) >= maxGroupRulePorts {
			return nil
		}
		for p := int(r.Lo); p <= int(r.Hi); p++ {
			out = append(out, uint16(p))
		}
	}
	return out
}

// shapeKey renders every match of r except the varying one; ok is false
// when the varying match can't be grouped.
func shapeKey(r *grammar.Rule, field string) (string, bool) {
	var v *grammar.AddrMatch
	var vp *grammar.PortMatch
	is6 := false
	af, pf := splitField(field)
	pair := af != "" && pf != ""
	if pf != "" {
		vp = varyingPort(r, pf)
		if vp == nil || vp.Neg || vp.Set != "" || len(groupPorts(vp)) == 0 {
			return "", false
		}
		if pair && (len(vp.Ranges) != 1 || vp.Ranges[0].Lo != vp.Ranges[0].Hi) {
			return "", false // one exact port
		}
	}
	if af != "" {
		v = varying(r, af)
		if v == nil || v.Neg || v.Set != "" || len(v.Prefixes) == 0 {
			return "", false
		}
		if pair && (len(v.Prefixes) != 1 || !v.Prefixes[0].Addr().Is4() || v.Prefixes[0].Bits() != 32) {
			return "", false // one IPv4 host
		}
		is6 = v.Prefixes[0].Addr().Is6()
		for _, p := range v.Prefixes {
			if p.Addr().Is6() != is6 {
				return "", false
			}
		}
	}
	addr := func(m *grammar.AddrMatch) string {
		if m == nil || m == v {
			return "-"
		}
		return fmt.Sprint(m.Neg, m.Prefixes, m.Set)
	}
	port := func(m *grammar.PortMatch) string {
		if m == nil || m == vp {
			return "-"
		}
		return fmt.Sprint(m.Neg, m.Ranges, m.Set)
	}
	mark := func(m *grammar.MarkMatch) string {
		if m == nil {
			return "-"
		}
		return fmt.Sprint(m.Neg, m.Value, m.Mask)
	}
	flags := "-"
	if f := r.TCPFlags; f != nil {
		flags = fmt.Sprint(f.Form, f.Flags, f.Mask)
	}
	return fmt.Sprint(field, is6, r.Family, r.Proto, addr(r.Saddr), addr(r.Daddr), port(r.Sport), port(r.Dport), flags, mark(r.MetaMark), mark(r.CtMark)), true
}

// disjoint reports whether no prefix (port) of one rule overlaps a prefix
// (port) of another.
func disjoint(rules []*grammar.Rule, field string) bool {
	if isPortField(field) {
		owner := map[uint16]int{}
		for i, r := range rules {
			for _, p := range groupPorts(varyingPort(r, field)) {
				if o, ok := owner[p]; ok && o != i {
					return false
				}
				owner[p] = i
			}
		}
		return true
	}
	type entry struct {
		p    netip.Prefix
		rule int
	}
	var all []entry
	for i, r := range rules {
		for _, p := range varying(r, field).Prefixes {
			all = append(all, entry{p.Masked(), i})
		}
	}
	slices.SortFunc(all, func(a, b entry) int {
		if c := a.p.Addr().Compare(b.p.Addr()); c != 0 {
			return c
		}
		return a.p.Bits() - b.p.Bits()
	})
	var open []entry // prefixes containing the current one
	for _, e := range all {
		for len(open) > 0 && !open[len(open)-1].p.Contains(e.p.Addr()) {
			open = open[:len(open)-1]
		}
		for _, o := range open {
			if o.rule != e.rule {
				return false
			}
		}
		open = append(open, e)
	}
	return true
}

// group emits rules[first:first+n] as one group.
func (c *compiler) group(rules []*grammar.Rule, first, n int, field string) error {
	e := &c.e
	end := fmt.Sprintf("group%d_end", first)
	lead := rules[first]
	fam := 4
	if !isPortField(field) && !isPairField(field) && varying(lead, field).Prefixes[0].Addr().Is6() {
		fam = 6
	}
	// Rules whose statements and actions are the same share one body; the
	// map value is class<<20 | rule index, and the body reads the rule
	// index (for counters) from slotRule.
	var classes []int // first rule (group index) of each class
	classOf := make([]int, n)
	keys := map[string]int{}
	for k := 0; k < n; k++ {
		key := bodyKey(rules[first+k])
		cl, ok := keys[key]
		if !ok {
			cl = len(classes)
			keys[key] = cl
			classes = append(classes, k)
		}
		classOf[k] = cl
	}
	var name string
	var host *hostTable
	if isPairField(field) {
		// A hash map from address+port to class<<20 | rule; the first rule
		// of a duplicate key wins (see pairRun).
		m := &ebpf.MapSpec{Type: ebpf.Hash, KeySize: 8, ValueSize: 4}
		seen := map[[8]byte]bool{}
		for k := 0; k < n; k++ {
			key := pairKey(rules[first+k], field)
			if !seen[key] {
				seen[key] = true
				m.Contents = append(m.Contents, ebpf.MapKV{Key: key[:], Value: uint32(classOf[k])<<20 | uint32(first+k)})
			}
		}
		m.MaxEntries = uint32(len(m.Contents))
		name = c.anonMap(m)
	} else if isPortField(field) {
		// An array indexed by port; 0 = no rule, else 1<<31 | class<<20 | rule.
		m := &ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 65536}
		for k := 0; k < n; k++ {
			for _, p := range groupPorts(varyingPort(rules[first+k], field)) {
				m.Contents = append(m.Contents, ebpf.MapKV{Key: uint32(p), Value: uint32(1)<<31 | uint32(classOf[k])<<20 | uint32(first+k)})
			}
		}
		name = c.anonMap(m)
	} else {
		var prefixes []netip.Prefix
		var values []uint32
		for k := 0; k < n; k++ {
			for _, p := range varying(rules[first+k], field).Prefixes {
				prefixes = append(prefixes, p.Masked())
				values = append(values, uint32(classOf[k])<<20|uint32(first+k))
			}
		}
		if host = hostTableOf(prefixes, flagged(values)); host != nil {
			name = c.anonMap(host.mapSpec())
		} else {
			name = c.anonMap(addrMap(fam, prefixes, values))
		}
	}
	e.comment("rules %d-%d: %d rules that differ only in %s, looked up in %s (%d bodies)", first, first+n-1, n, field, name, len(classes))
	if err := c.matches(lead, end, field); err != nil {
		return err
	}
	if isPairField(field) {
		af, pf := splitField(field)
		if lead.Family == grammar.FamilyAny {
			e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, 4, end))
		}
		aslot, pslot := int16(slotSaddr), int16(slotDport)
		if af == "daddr" {
			aslot = slotDaddr
		}
		if pf == "sport" {
			pslot = slotSport
		}
		e.emit(
			ldx(asm.R1, asm.R10, pslot, asm.DWord),
			asm.JGT.Imm(asm.R1, 0xffff, end), // absent
			stx(asm.R10, slotKey+4, asm.R1, asm.Word),
			ldx(asm.R1, asm.R10, aslot+4, asm.Word),
			stx(asm.R10, slotKey, asm.R1, asm.Word),
		)
		c.lookup(name, slotKey)
		e.emit(
			asm.JEq.Imm(asm.R0, 0, end),
			ldx(asm.R1, asm.R0, 0, asm.Word),
		)
	} else if isPortField(field) {
		slot := int16(slotDport)
		if field == "sport" {
			slot = slotSport
		}
		e.emit(
			ldx(asm.R1, asm.R10, slot, asm.DWord),
			asm.JGT.Imm(asm.R1, 0xffff, end), // absent
			stx(asm.R10, slotKey, asm.R1, asm.Word),
		)
		c.lookup(name, slotKey)
		e.emit(
			asm.JEq.Imm(asm.R0, 0, end),
			ldx(asm.R1, asm.R0, 0, asm.Word),
			asm.JEq.Imm(asm.R1, 0, end),
			asm.And.Imm32(asm.R1, 0x7fffffff),
		)
	} else {
		if lead.Family == grammar.FamilyAny {
			e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, int32(fam), end))
		}
		slot := int16(slotSaddr)
		if field == "daddr" {
			slot = slotDaddr
		}
		if host != nil {
			c.hostLookup(name, host, slot, end)
			e.emit(asm.And.Imm32(asm.R1, 0x7fffffff))
		} else {
			c.addrLookup(name, fam, slot)
			e.emit(
				asm.JEq.Imm(asm.R0, 0, end),
				ldx(asm.R1, asm.R0, 0, asm.Word),
			)
		}
	}
	e.emit(
		mov(asm.R2, asm.R1),
		asm.And.Imm(asm.R2, 0xfffff),
		stx(asm.R10, slotRule, asm.R2, asm.DWord),
		asm.RSh.Imm(asm.R1, 20),
	)
	c.dispatch(first, 0, len(classes), end)
	c.dynRule = true
	defer func() { c.dynRule = false }()
	for cl, k := range classes {
		r := rules[first+k]
		e.label(fmt.Sprintf("group%d_rule%d", first, cl))
		e.comment("body %d, as rule %d handle %d: %s", cl, first+k, r.Handle, Describe(r))
		if err := c.body(first+k, r, end); err != nil {
			return err
		}
	}
	e.label(end)
	return nil
}

// Limits of one group: its map values hold the body index in bits 20-30,
// and every jump from the lookup to a body and from a body to the group's
// end or to the exits after the group must stay within 16-bit offsets
// (exits come at most stubDistance instructions apart otherwise).
const (
	maxGroupBodies    = 2048
	maxGroupBodyInsns = 16000
)

// fitGroup returns how many of the n rules from first on one group holds.
// A shorter run is still a group: a part of a run is one too.
func (c *compiler) fitGroup(rules []*grammar.Rule, first, n int) int {
	seen := map[string]bool{}
	total := 0
	for k := 0; k < n; k++ {
		key := bodyKey(rules[first+k])
		if seen[key] {
			continue
		}
		size := c.bodySize(first+k, rules[first+k])
		if len(seen) == maxGroupBodies || (k > 0 && total+size > maxGroupBodyInsns) {
			return k
		}
		seen[key] = true
		total += size
	}
	return n
}

// bodySize emits rule i's body as a group would, to count its
// instructions, and then restores the compiler.
func (c *compiler) bodySize(i int, r *grammar.Rule) int {
	e, stats, fresh, info, dyn := c.e, maps.Clone(c.statLabels), c.fresh, c.infoInR1, c.dynRule
	c.e, c.dynRule = emitter{n: e.n}, true
	err := c.body(i, r, "group_end")
	n := len(c.e.insns)
	c.e, c.statLabels, c.fresh, c.infoInR1, c.dynRule = e, stats, fresh, info, dyn
	if err != nil {
		return 0 // emitting it for real reports the error
	}
	return n
}

// flagged sets bit 31 of every value, so that none is 0 (an empty slot).
func flagged(values []uint32) []uint32 {
	out := make([]uint32, len(values))
	for i, v := range values {
		out[i] = 1<<31 | v
	}
	return out
}

// bodyKey renders what a rule does once it matches.
func bodyKey(r *grammar.Rule) string {
	key := fmt.Sprint(r.Counter)
	if s := r.SetMetaMark; s != nil {
		key += fmt.Sprint(" meta", s.Value, s.Mask)
	}
	if s := r.SetCtMark; s != nil {
		key += fmt.Sprint(" ct", s.Value, s.Mask)
	}
	for _, a := range r.Actions {
		key += " " + describeAction(a) + fmt.Sprint(a.DNATAddr, a.DNATPort)
	}
	if r.Trace {
		key += " nftrace"
	}
	return key
}

// dispatch jumps to the body whose class is in R1.
func (c *compiler) dispatch(first, lo, hi int, end string) {
	e := &c.e
	if hi-lo == 1 {
		e.emit(asm.Ja.Label(fmt.Sprintf("group%d_rule%d", first, lo)))
		return
	}
	mid := (lo + hi) / 2
	upper := e.newLabel("dispatch")
	e.emit(asm.JGE.Imm(asm.R1, int32(mid), upper))
	c.dispatch(first, lo, mid, end)
	e.label(upper)
	c.dispatch(first, mid, hi, end)
}
