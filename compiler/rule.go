package compiler

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Inline at most this many prefixes or port ranges; larger anonymous sets
// become maps so their cost does not grow with their size.
const (
	maxInlinePrefixes = 4
	maxInlineRanges   = 6
)

func (c *compiler) rule(i int, r *grammar.Rule) error {
	e := &c.e
	fail := fmt.Sprintf("rule%d_end", i)
	e.owner = i + 1
	defer func() { e.owner = 0 }()
	e.comment("rule %d handle %d: %s", i, r.Handle, Describe(r))
	if err := c.matchesExcept(r, fail, [numKeyFields]bool{}); err != nil {
		return err
	}
	if err := c.body(i, r, fail); err != nil {
		return err
	}
	e.label(fail)
	return nil
}

// matchesExcept emits the rule's matches, cheapest first, jumping to fail
// when one does not hold; a table segment's shape tests the keyed fields
// with its lookup instead.
func (c *compiler) matchesExcept(r *grammar.Rule, fail string, keyed [numKeyFields]bool) error {
	e := &c.e
	// The parse guard lets only families some rule wants through.
	// A table segment's shapes come grouped by family and protocol
	// (lookups): those tests are done.
	switch {
	case r.Family == grammar.FamilyIPv4 && c.ruleNeeds.v6 && c.knownFam != 4:
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, 4, fail))
	case r.Family == grammar.FamilyIPv6 && c.ruleNeeds.v4 && c.knownFam != 6:
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, 6, fail))
	}
	if r.Proto != grammar.ProtoAny && c.knownProto != int(r.Proto.Number()) {
		e.emit(ldx(asm.R1, asm.R10, slotProto, asm.DWord), asm.JNE.Imm(asm.R1, int32(r.Proto.Number()), fail))
	}
	if r.Dport != nil && !keyed[keyDport] {
		if err := c.portMatch(r.Dport, slotDport, fail); err != nil {
			return err
		}
	}
	if r.Sport != nil && !keyed[keySport] {
		if err := c.portMatch(r.Sport, slotSport, fail); err != nil {
			return err
		}
	}
	if f := r.TCPFlags; f != nil {
		e.emit(ldx(asm.R1, asm.R10, slotFlags, asm.DWord))
		c.unlink(asm.R1)
		e.emit(asm.JGT.Imm(asm.R1, 0xff, fail))
		switch f.Form {
		case grammar.FlagsAny:
			e.emit(asm.And.Imm(asm.R1, int32(f.Flags)), asm.JEq.Imm(asm.R1, 0, fail))
		case grammar.FlagsNone:
			e.emit(asm.And.Imm(asm.R1, int32(f.Flags)), asm.JNE.Imm(asm.R1, 0, fail))
		case grammar.FlagsExact:
			e.emit(asm.JNE.Imm(asm.R1, int32(f.Flags), fail))
		default:
			e.emit(asm.And.Imm(asm.R1, int32(f.Mask)), asm.JNE.Imm(asm.R1, int32(f.Flags), fail))
		}
	}
	if m := r.MetaMark; m != nil && !keyed[keyMeta] {
		c.markMatch(m.Mask, m.Value&m.Mask, m.Neg, fail)
	}
	if m := r.CtMark; m != nil && !keyed[keyCt] {
		mask, value, err := c.ct.MatchBits(m)
		if err != nil {
			return &Error{Span: m.Span, Msg: err.Error()}
		}
		c.markMatch(mask, value, m.Neg, fail)
	}
	if r.Saddr != nil && !keyed[keySaddr] {
		if err := c.addrMatch(r, r.Saddr, slotSaddr, fail); err != nil {
			return err
		}
	}
	if r.Daddr != nil && !keyed[keyDaddr] {
		if err := c.addrMatch(r, r.Daddr, slotDaddr, fail); err != nil {
			return err
		}
	}
	return nil
}

// body emits the statements and actions of rule i; a rule without actions
// continues at next.
func (c *compiler) body(i int, r *grammar.Rule, next string) error {
	e := &c.e
	// A parametric body (params.go) is emitted from the rule's kind: whether
	// it counts and its mark set are in its parameters.
	par := c.parametric()
	c.curRule, c.curCounted, c.paramCounted = i, r.Counter, par
	defer func() { c.paramCounted = false }()
	if par {
		c.loadParams()
	}
	c.traceRule(i, r)
	c.segmentFirst(r)
	if (r.Counter || par) && !c.fxDone {
		e.comment("counter")
		done := e.newLabel("counted")
		if par {
			c.param(asm.R1, parFlags, asm.Word)
			e.emit(asm.And.Imm(asm.R1, parCount), asm.JEq.Imm(asm.R1, 0, done))
		}
		c.lookup(CountersMap, c.ruleKey(i))
		e.emit(countPacket(done, asm.R6, skbLen)...)
		e.label(done)
	}
	switch {
	case c.fxDone:
	case par:
		c.markSetParams()
	case r.SetMetaMark == nil && r.SetCtMark == nil:
	default:
		if s := r.SetMetaMark; s != nil {
			e.comment("meta mark set")
			c.markSet(s.Mask, s.Value&s.Mask)
		}
		if s := r.SetCtMark; s != nil {
			mask, value, err := c.ct.SetBits(s)
			if err != nil {
				return &Error{Span: s.Span, Msg: err.Error()}
			}
			e.comment("ct mark set")
			c.markSet(mask, value)
		}
	}

	known := r.Proto // the transport protocol as actions change it
	// Nothing since the parse guard moved the packet: the first action
	// can use its pointers.
	c.fresh = true
	defer func() { c.lastAction = false }()
	for j, a := range r.Actions {
		c.lastAction = j == len(r.Actions)-1
		e.comment("%s", describeAction(a))
		switch a.Kind {
		case grammar.ActAccept:
			e.emit(asm.Ja.Label(c.exit("pass")))
		case grammar.ActDrop:
			e.emit(asm.Ja.Label(c.exit("drop")))
		case grammar.ActFunnel:
			c.perFamily(r, func(fam int) { c.funnel(i, fam, known, a) })
			known = a.Proto
		case grammar.ActUnfunnel:
			c.perFamily(r, func(fam int) { c.unfunnel(fam, known, a.Proto) })
			known = a.Proto
		case grammar.ActRewrite:
			c.perFamily(r, func(fam int) { c.rewrite(fam, a.Proto) })
			known = a.Proto
		case grammar.ActDNAT:
			c.dnat(r, a)
		}
		if a.Kind == grammar.ActAccept || a.Kind == grammar.ActDrop {
			break
		}
	}
	if len(r.Actions) > 0 {
		e.emit(asm.Ja.Label(c.exit("pass")))
	} else {
		e.emit(asm.Ja.Label(next))
	}
	return nil
}

// perFamily emits gen for each family the rule can see, dispatching on the
// family slot when both.
func (c *compiler) perFamily(r *grammar.Rule, gen func(fam int)) {
	switch r.Family {
	case grammar.FamilyIPv4:
		gen(4)
	case grammar.FamilyIPv6:
		gen(6)
	default:
		if c.fast { // IPv4 only
			gen(4)
			return
		}
		e := &c.e
		v6, done := e.newLabel("v6"), e.newLabel("fam_done")
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JEq.Imm(asm.R1, 6, v6))
		gen(4)
		e.emit(asm.Ja.Label(done))
		e.label(v6)
		gen(6)
		e.label(done)
	}
}

func (c *compiler) markMatch(mask, value uint32, neg bool, fail string) {
	e := &c.e
	e.emit(ldx(asm.R1, asm.R6, skbMark, asm.Word))
	if mask != 0xffffffff {
		e.emit(asm.And.Imm32(asm.R1, int32(mask)))
	}
	if neg {
		e.emit(asm.JEq.Imm32(asm.R1, int32(value), fail))
	} else {
		e.emit(asm.JNE.Imm32(asm.R1, int32(value), fail))
	}
}

func (c *compiler) markSet(mask, value uint32) {
	e := &c.e
	if mask == 0xffffffff {
		e.emit(asm.Mov.Imm32(asm.R1, int32(value)), stx(asm.R6, skbMark, asm.R1, asm.Word))
		return
	}
	e.emit(
		ldx(asm.R1, asm.R6, skbMark, asm.Word),
		asm.And.Imm32(asm.R1, int32(^mask)),
		asm.Or.Imm32(asm.R1, int32(value)),
		stx(asm.R6, skbMark, asm.R1, asm.Word),
	)
}

// portMatch tests the port in slot; an absent port never matches, negated
// or not.
func (c *compiler) portMatch(m *grammar.PortMatch, slot int16, fail string) error {
	e := &c.e
	ranges := m.Ranges
	mapName, listID := "", uint32(0)
	if m.Set != "" {
		s, err := c.namedSet(m.Set, m.Span, grammar.SetInetService)
		if err != nil {
			return err
		}
		_ = s
		mapName = SetMapPrefix + m.Set
	} else if len(ranges) > maxInlineRanges {
		mapName, listID = anonPortsMap, c.portList(ranges)
	}
	e.emit(ldx(asm.R1, asm.R10, slot, asm.DWord))
	c.unlink(asm.R1)
	if mapName != "" {
		e.emit(asm.JGT.Imm(asm.R1, 0xffff, fail))
		if m.Set != "" {
			c.setLookup(mapName, slotKey) // key 0, also the bitmap's
		} else {
			e.emit(sti(asm.R10, slotKey, int64(listID), asm.Word))
			c.lookup(mapName, slotKey)
		}
		e.emit(
			asm.JEq.Imm(asm.R0, 0, fail),
			ldx(asm.R1, asm.R10, slot, asm.DWord),
			mov(asm.R2, asm.R1),
			asm.RSh.Imm(asm.R2, 3),
			asm.Add.Reg(asm.R0, asm.R2),
			ldx(asm.R2, asm.R0, 0, asm.Byte),
			asm.And.Imm(asm.R1, 7),
			asm.RSh.Reg(asm.R2, asm.R1),
			asm.And.Imm(asm.R2, 1),
		)
		if m.Neg {
			e.emit(asm.JNE.Imm(asm.R2, 0, fail))
		} else {
			e.emit(asm.JEq.Imm(asm.R2, 0, fail))
		}
		return nil
	}
	if m.Neg {
		e.emit(asm.JGT.Imm(asm.R1, 0xffff, fail))
		for _, r := range ranges {
			if r.Lo == r.Hi {
				e.emit(asm.JEq.Imm(asm.R1, int32(r.Lo), fail))
				continue
			}
			skip := e.newLabel("range")
			e.emit(asm.JLT.Imm(asm.R1, int32(r.Lo), skip), asm.JLE.Imm(asm.R1, int32(r.Hi), fail))
			e.label(skip)
		}
		return nil
	}
	ok := e.newLabel("port_ok")
	for j, r := range ranges {
		last := j == len(ranges)-1
		if r.Lo == r.Hi {
			if last {
				e.emit(asm.JNE.Imm(asm.R1, int32(r.Lo), fail))
			} else {
				e.emit(asm.JEq.Imm(asm.R1, int32(r.Lo), ok))
			}
			continue
		}
		if last {
			e.emit(asm.JLT.Imm(asm.R1, int32(r.Lo), fail), asm.JGT.Imm(asm.R1, int32(r.Hi), fail))
			continue
		}
		skip := e.newLabel("range")
		e.emit(asm.JLT.Imm(asm.R1, int32(r.Lo), skip), asm.JLE.Imm(asm.R1, int32(r.Hi), ok))
		e.label(skip)
	}
	if len(ranges) == 0 {
		e.emit(asm.Ja.Label(fail))
	}
	e.label(ok)
	return nil
}

// addrMatch tests the address in slot.
func (c *compiler) addrMatch(r *grammar.Rule, m *grammar.AddrMatch, slot int16, fail string) error {
	e := &c.e
	fam := 0
	var prefixes []netip.Prefix
	mapName := ""
	if m.Set != "" {
		s, err := c.namedSet(m.Set, m.Span, grammar.SetIPv4Addr, grammar.SetIPv6Addr)
		if err != nil {
			return err
		}
		fam = 4
		if s.Type == grammar.SetIPv6Addr {
			fam = 6
		}
		mapName = SetMapPrefix + m.Set
	} else {
		prefixes = m.Prefixes
		if len(prefixes) == 0 {
			return errorf(m.Span, "empty address list")
		}
		fam = 4
		if prefixes[0].Addr().Is6() {
			fam = 6
		}
		for _, p := range prefixes {
			if p.Addr().Is4() != (fam == 4) {
				return errorf(m.Span, "IPv4 and IPv6 addresses mixed in one match")
			}
		}
		if len(prefixes) > maxInlinePrefixes {
			if c.anonSets.hosts < maxHostTables {
				if t := hostTableOf(prefixes, nil); t != nil {
					c.anonSets.hosts++
					return c.hostMatch(r, m, t, slot, fail)
				}
			}
			mapName = anonV4Map
			if fam == 6 {
				mapName = anonV6Map
			}
		}
	}
	if (r.Family == grammar.FamilyIPv4 && fam == 6) || (r.Family == grammar.FamilyIPv6 && fam == 4) {
		return errorf(m.Span, "address family conflicts with the rule's family")
	}
	if r.Family == grammar.FamilyAny {
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, int32(fam), fail))
	}
	if mapName != "" {
		if m.Set != "" {
			c.addrLookup(mapName, fam, slot)
		} else {
			c.prefixLookup(fam, c.prefixList(fam, prefixes), slot)
		}
		if m.Neg {
			e.emit(asm.JNE.Imm(asm.R0, 0, fail))
		} else {
			e.emit(asm.JEq.Imm(asm.R0, 0, fail))
		}
		return nil
	}
	// Inline: for each prefix compare the covered 32-bit words.
	hit := fail
	miss := e.newLabel("addr_miss")
	if !m.Neg {
		hit = e.newLabel("addr_ok")
	}
	for j, p := range prefixes {
		next := miss
		if j < len(prefixes)-1 {
			next = e.newLabel("prefix")
		}
		b := p.Addr().AsSlice()
		bitsLeft := p.Bits()
		for w := 0; w*32 < len(b)*8; w++ {
			if bitsLeft <= 0 && w > 0 {
				break
			}
			n := min(bitsLeft, 32)
			bitsLeft -= 32
			var mask [4]byte
			for k := 0; k < n; k++ {
				mask[k/8] |= 0x80 >> (k % 8)
			}
			mword := uint32(mask[0]) | uint32(mask[1])<<8 | uint32(mask[2])<<16 | uint32(mask[3])<<24
			vword := (uint32(b[w*4]) | uint32(b[w*4+1])<<8 | uint32(b[w*4+2])<<16 | uint32(b[w*4+3])<<24) & mword
			if mword == 0 {
				continue // /0 matches everything of the family
			}
			e.emit(ldx(asm.R1, asm.R10, slot+4+int16(4*w), asm.Word))
			c.unlink(asm.R1)
			if mword != 0xffffffff {
				e.emit(netImm(asm.And.Imm32(asm.R1, int32(mword))))
			}
			e.emit(netImm(asm.JNE.Imm32(asm.R1, int32(vword), next)))
		}
		e.emit(asm.Ja.Label(hit))
		if next != miss {
			e.label(next)
		}
	}
	e.label(miss)
	if !m.Neg {
		e.emit(asm.Ja.Label(fail))
		e.label(hit)
	}
	return nil
}

// Describe renders a rule compactly for listings (not the canonical printer).
func Describe(r *grammar.Rule) string {
	var b []string
	switch r.Family {
	case grammar.FamilyIPv4:
		b = append(b, "ip")
	case grammar.FamilyIPv6:
		b = append(b, "ip6")
	}
	// match renders one match: name, != when negated, the set or elements.
	match := func(name string, neg bool, set string, elems func() []string) {
		if neg {
			name += " !="
		}
		b = append(b, name+" "+listOf(set, elems))
	}
	addr := func(name string, m *grammar.AddrMatch) {
		if m == nil {
			return
		}
		match(name, m.Neg, m.Set, func() []string {
			var out []string
			for _, p := range m.Prefixes {
				if p.Bits() == p.Addr().BitLen() {
					out = append(out, p.Addr().String())
				} else {
					out = append(out, p.String())
				}
			}
			return out
		})
	}
	addr("saddr", r.Saddr)
	addr("daddr", r.Daddr)
	if r.Proto != grammar.ProtoAny {
		b = append(b, r.Proto.String())
	}
	port := func(name string, m *grammar.PortMatch) {
		if m == nil {
			return
		}
		match(name, m.Neg, m.Set, func() []string {
			var out []string
			for _, r := range m.Ranges {
				if r.Lo == r.Hi {
					out = append(out, fmt.Sprint(r.Lo))
				} else {
					out = append(out, fmt.Sprintf("%d-%d", r.Lo, r.Hi))
				}
			}
			return out
		})
	}
	port("sport", r.Sport)
	port("dport", r.Dport)
	if f := r.TCPFlags; f != nil {
		b = append(b, fmt.Sprintf("flags(form %d) %#02x/%#02x", f.Form, f.Flags, f.Mask))
	}
	mark := func(name string, m *grammar.MarkMatch) {
		if m != nil {
			neg := ""
			if m.Neg {
				neg = "!= "
			}
			b = append(b, fmt.Sprintf("%s mark %s%#x/%#x", name, neg, m.Value, m.Mask))
		}
	}
	mark("meta", r.MetaMark)
	mark("ct", r.CtMark)
	if r.Counter {
		b = append(b, "counter")
	}
	if s := r.SetMetaMark; s != nil {
		b = append(b, fmt.Sprintf("meta mark set %#x/%#x", s.Value, s.Mask))
	}
	if s := r.SetCtMark; s != nil {
		b = append(b, fmt.Sprintf("ct mark set %#x/%#x", s.Value, s.Mask))
	}
	if len(r.Actions) > 0 {
		var as []string
		for _, a := range r.Actions {
			as = append(as, describeAction(a))
		}
		b = append(b, "actions "+strings.Join(as, ", "))
	}
	return strings.Join(b, " ")
}

func listOf(set string, items func() []string) string {
	if set != "" {
		return "@" + set
	}
	it := items()
	if len(it) == 1 {
		return it[0]
	}
	return "{ " + strings.Join(it, ", ") + " }"
}

func describeAction(a *grammar.Action) string {
	switch a.Kind {
	case grammar.ActFunnel:
		s := "funnel " + a.Proto.String()
		if f := a.Funnel; f != nil {
			if f.HasSport {
				s += fmt.Sprintf(" sport %d", f.Sport)
			}
			if f.HasDport {
				s += fmt.Sprintf(" dport %d", f.Dport)
			}
			if a.Proto == grammar.ProtoTCP {
				s += fmt.Sprintf(" flags %#02x seq %#x ack %#x window %d", f.Flags, f.Seq, f.Ack, f.Window)
			}
		}
		return s
	case grammar.ActUnfunnel, grammar.ActRewrite:
		return a.Kind.String() + " " + a.Proto.String()
	case grammar.ActDNAT:
		if a.DNATPort != 0 {
			return fmt.Sprintf("dnat to %s", netip.AddrPortFrom(a.DNATAddr, a.DNATPort))
		}
		return "dnat to " + a.DNATAddr.String()
	}
	return a.Kind.String()
}

// lowWord is where a DWord stack slot keeps its low 32 bits: a slot that
// holds a zero-extended u32 can be read as a u32 map key there.
var lowWord = func() int16 {
	if binary.NativeEndian.Uint16([]byte{1, 0}) == 1 {
		return 0
	}
	return 4
}()

// ruleKey returns the stack slot holding rule i's counter slot as a u32
// map key: in a group body the matched rule's, read where the match left
// it (slotRule's low word: no copy, whose store and reload would sit on
// the path from the table hit to the counter), else slotKey, set here.
func (c *compiler) ruleKey(i int) int16 {
	if c.dynRule {
		return slotRule + lowWord
	}
	c.e.emit(sti(asm.R10, slotKey, int64(c.slot(i)), asm.Word))
	return slotKey
}

// unlink, in a shape's residual checks, makes r a copy the verifier does not
// tie to the stack slot it was loaded from: a check then narrows r only,
// not the slot, so the paths through the shapes of a segment reach its
// bodies in one state instead of one per combination of outcomes.
func (c *compiler) unlink(r asm.Register) {
	if c.inShape {
		c.e.emit(asm.Xor.Imm(r, 0))
	}
}
