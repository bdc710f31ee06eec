package compiler

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Rule groups: a run of consecutive rules that differ only in one address
// match (saddr or daddr: plain prefixes, not negated) whose prefixes don't
// overlap across rules compiles to one test of the shared matches, one LPM
// lookup that yields the rule, and a binary dispatch to that rule's
// statements and actions. At most one rule of such a run can match a
// packet, so first-match order is kept, and the cost per packet no longer
// grows with the number of rules.
const minGroup = 8

// groupAt returns the length of the group starting at rules[i] and the
// address field it varies in (0 when there is none worth it).
func groupAt(rules []*grammar.Rule, i int) (int, string) {
	best, field := 0, ""
	for _, f := range []string{"saddr", "daddr"} {
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

// shapeKey renders every match of r except the varying one; ok is false
// when the varying match can't be grouped.
func shapeKey(r *grammar.Rule, field string) (string, bool) {
	v := varying(r, field)
	if v == nil || v.Neg || v.Set != "" || len(v.Prefixes) == 0 {
		return "", false
	}
	is6 := v.Prefixes[0].Addr().Is6()
	for _, p := range v.Prefixes {
		if p.Addr().Is6() != is6 {
			return "", false
		}
	}
	addr := func(m *grammar.AddrMatch) string {
		if m == nil || m == v {
			return "-"
		}
		return fmt.Sprint(m.Neg, m.Prefixes, m.Set)
	}
	port := func(m *grammar.PortMatch) string {
		if m == nil {
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

// disjoint reports whether no prefix of one rule overlaps a prefix of
// another.
func disjoint(rules []*grammar.Rule, field string) bool {
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
	v := varying(lead, field)
	fam := 4
	if v.Prefixes[0].Addr().Is6() {
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
	var prefixes []netip.Prefix
	var values []uint32
	for k := 0; k < n; k++ {
		for _, p := range varying(rules[first+k], field).Prefixes {
			prefixes = append(prefixes, p.Masked())
			values = append(values, uint32(classOf[k])<<20|uint32(first+k))
		}
	}
	name := c.anonMap(addrMap(fam, prefixes, values))
	e.comment("rules %d-%d: %d rules that differ only in %s, looked up in %s (%d bodies)", first, first+n-1, n, field, name, len(classes))
	if err := c.matches(lead, end, field); err != nil {
		return err
	}
	if lead.Family == grammar.FamilyAny {
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, int32(fam), end))
	}
	slot := int16(slotSaddr)
	if field == "daddr" {
		slot = slotDaddr
	}
	c.addrLookup(name, fam, slot)
	e.emit(
		asm.JEq.Imm(asm.R0, 0, end),
		ldx(asm.R1, asm.R0, 0, asm.Word),
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
