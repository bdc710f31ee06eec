package compiler

import (
	"fmt"
	"net/netip"
	"slices"

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
	if best < minGroup {
		return 0, ""
	}
	return best, field
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
	if isPortField(field) {
		vp = varyingPort(r, field)
		if vp == nil || vp.Neg || vp.Set != "" || len(groupPorts(vp)) == 0 {
			return "", false
		}
	} else {
		v = varying(r, field)
		if v == nil || v.Neg || v.Set != "" || len(v.Prefixes) == 0 {
			return "", false
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
	if !isPortField(field) && varying(lead, field).Prefixes[0].Addr().Is6() {
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
	if isPortField(field) {
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
	if isPortField(field) {
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
