// Fast matcher: small rulesets that test only the transport protocol and
// ports (sfunnel's default ruleset and its like) are matched, for IPv4
// packets without options, on the packet's own bytes with immediates, and
// each rule's body is emitted a second time for what is known there.

package compiler

import (
	"fmt"
	"math/bits"
	"slices"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// maxFastRules bounds the rulesets the fast matcher takes: their bodies are
// emitted twice (fast and general path).
const maxFastRules = 8

// fastRules reports whether the fast matcher can decide every rule: TCP or
// UDP with positive inline port lists at most, a terminal action, no
// tracing. IPv6-only rules are allowed (the fast path skips them).
func (c *compiler) fastRules(rules []*grammar.Rule) bool {
	if c.tracing || len(rules) == 0 || len(rules) > maxFastRules {
		return false
	}
	for _, r := range rules {
		if r.Proto != grammar.ProtoTCP && r.Proto != grammar.ProtoUDP {
			return false
		}
		if r.Saddr != nil || r.Daddr != nil || r.TCPFlags != nil || r.MetaMark != nil || r.CtMark != nil || r.Trace || len(r.Actions) == 0 {
			return false
		}
		for _, m := range []*grammar.PortMatch{r.Sport, r.Dport} {
			if m != nil && (m.Neg || m.Set != "" || len(m.Ranges) > maxInlineRanges) {
				return false
			}
		}
	}
	return true
}

// fastMatch emits the fast path of a ruleset fastRules accepts:
//
//   - one bounds check covering the IPv4 header and the largest transport
//     header a rule wants, and one test of EtherType, version and IHL;
//   - when every rule wants a few destination ports, a bitmap test of the
//     port folded into the same branch as the header test, so that a
//     packet no rule wants leaves after two branches;
//   - one branch on the protocol per protocol the rules name, then that
//     protocol's rules in order, each testing destination and source port
//     against immediates;
//   - after each rule's tests, the check that the packet is not a
//     fragment, the stack slots its body reads, and its body, emitted
//     knowing the family (4), that there are no options and the protocol;
//     what a common packet does not run (other ip_summed cases, an MTU
//     overrun) comes after the body.
//
// Packets it can't decide (other families, options, fragments, short or
// non-linear headers) take the general parse at "parse".
func (c *compiler) fastMatch(rules []*grammar.Rule) {
	e := &c.e
	l3 := c.l3
	hdr := int32(8)
	var dport bool
	for _, r := range rules {
		if r.Family == grammar.FamilyIPv6 {
			continue
		}
		if r.Proto == grammar.ProtoTCP {
			hdr = 20
		}
		dport = dport || r.Dport != nil
	}
	c.fastBound = l3 + 20 + int16(hdr)
	e.comment("fast path: IPv4 without options, rules on protocol and ports")
	// R7, R8: the packet pointers the bodies start with; R1 stays the
	// context for the general path.
	e.emit(
		ldx(asm.R7, asm.R1, skbData, asm.Word),
		ldx(asm.R8, asm.R1, skbDataEnd, asm.Word),
		mov(asm.R4, asm.R7),
		asm.Add.Imm(asm.R4, int32(c.fastBound)),
		asm.JGT.Reg(asm.R4, asm.R8, "parse"),
	)
	// R3 = 0 for IPv4 without options.
	if c.opts.L3 {
		e.emit(ldx(asm.R3, asm.R7, 0, asm.Byte), asm.Xor.Imm32(asm.R3, 0x45))
	} else {
		e.emit(
			ldx(asm.R3, asm.R7, 12, asm.Word),
			asm.And.Imm32(asm.R3, 0x00ffffff),
			netImm(asm.Xor.Imm32(asm.R3, 0x00450008)),
		)
	}
	shift, mask, filter := c.portFilter(rules)
	if filter {
		// R4: the destination port, kept for the rules' tests.
		e.comment("destination port in no rule's bitmap (bits %d-%d of the port as loaded): no match", shift, shift+5)
		e.emit(
			ldx(asm.R4, asm.R7, l3+22, asm.Half),
			mov(asm.R5, asm.R4),
			asm.RSh.Imm(asm.R5, int32(shift)),
		)
		if shift < 10 {
			e.emit(asm.And.Imm(asm.R5, 63))
		}
		e.emit(
			asm.LoadImm(asm.R0, int64(mask), asm.DWord),
			asm.RSh.Reg(asm.R0, asm.R5),
			asm.And.Imm(asm.R0, 1),
			asm.Or.Reg(asm.R0, asm.R3),
			asm.JNE.Imm(asm.R0, 0, "fast_v4"),
			movi(asm.R0, VerdictNext),
			asm.Return(),
		)
		e.label("fast_v4")
	}
	e.emit(
		asm.JNE.Imm(asm.R3, 0, "parse"),
		mov(asm.R6, asm.R1),
		ldx(asm.R9, asm.R7, l3+9, asm.Byte),
	)
	if dport && !filter {
		e.emit(ldx(asm.R4, asm.R7, l3+22, asm.Half))
	}
	// Rules of different protocols never match the same packet, so each
	// protocol's rules are tested apart, in rule order: one branch on the
	// protocol, then only ports. Each rule's body follows its tests: a
	// matching packet runs on into it without a taken jump; the others
	// jump over it to the next rule.
	groups := fastGroups(rules)
	other := ""
	for g, group := range groups {
		if other != "" {
			e.label(other)
		}
		proto := rules[group[0]].Proto.Number()
		e.comment("%s rules", rules[group[0]].Proto)
		if g+1 < len(groups) {
			other = e.newLabel("fast_proto")
			e.emit(asm.JNE.Imm(asm.R9, int32(proto), other))
		} else {
			e.emit(asm.JNE.Imm(asm.R9, int32(proto), c.exit("next")))
		}
		if slices.ContainsFunc(group, func(i int) bool { return rules[i].Sport != nil }) {
			e.emit(ldx(asm.R5, asm.R7, l3+20, asm.Half))
		}
		for _, i := range group {
			r := rules[i]
			e.owner = i + 1
			miss := e.newLabel("fast_miss")
			e.comment("rule %d handle %d", i, r.Handle)
			c.fastPortTest(r.Dport, asm.R4, miss)
			c.fastPortTest(r.Sport, asm.R5, miss)
			e.owner = 0
			c.fastBody(i, r)
			e.label(miss)
		}
		e.emit(movi(asm.R0, VerdictNext), asm.Return())
	}
}

// fastGroups returns the indexes of the IPv4 rules by protocol, in rule
// order, the groups in the order their first rules come.
func fastGroups(rules []*grammar.Rule) [][]int {
	var groups [][]int
	at := map[grammar.Proto]int{}
	for i, r := range rules {
		if r.Family == grammar.FamilyIPv6 {
			continue
		}
		g, ok := at[r.Proto]
		if !ok {
			g = len(groups)
			at[r.Proto] = g
			groups = append(groups, nil)
		}
		groups[g] = append(groups[g], i)
	}
	return groups
}

func fastHit(i int) string { return fmt.Sprintf("fast_rule%d", i) }

// fastBody emits rule i's body for the fast path. R9 holds no transport
// offset there: guards() sets it, the rest loads slotL4Off.
func (c *compiler) fastBody(i int, r *grammar.Rule) {
	e := &c.e
	l3 := c.l3
	e.label(fastHit(i))
	e.owner = i + 1
	defer func() { e.owner = 0 }()
	e.comment("rule %d matched on the fast path: %s", i, Describe(r))
	e.emit(
		ldx(asm.R0, asm.R7, l3+6, asm.Half),
		netImm(asm.JSet.Imm(asm.R0, int32(n16(0x3fff)), "parse")),
	)
	// The slots the general parse fills, for the body's code that reads
	// them (those it doesn't are dropped below).
	start := len(e.insns)
	e.emit(
		sti(asm.R10, slotFam, 4, asm.DWord),
		sti(asm.R10, slotInfo, 0, asm.DWord),
		sti(asm.R10, slotProto, int64(r.Proto.Number()), asm.DWord),
		sti(asm.R10, slotL4Off, int64(l3)+20, asm.DWord),
		sti(asm.R10, slotNHOff, int64(l3)+9, asm.DWord),
	)
	end := len(e.insns)
	c.fast, c.fastPtrs, e.inlineExits = true, true, true
	// fastRules admits only rules with actions: the body never falls
	// through to a next rule, and what it jumps to (exits, its blocks out
	// of line) reads none of these slots.
	_ = c.body(i, r, c.exit("next"))
	c.flushCold()
	c.fast, e.inlineExits = false, false
	c.dropUnreadStores(start, end)
}

// dropUnreadStores removes the stack stores insns[start:end] whose slot no
// instruction reachable after them loads or takes the address of (an
// immediate equal to the slot's offset counts as taking it). Code after
// end jumps only within itself or to exits, which read none of them.
func (c *compiler) dropUnreadStores(start, end int) {
	e := &c.e
	later := e.insns[end:]
	at := map[string]int{}
	for i, ins := range later {
		if s := ins.Symbol(); s != "" {
			at[s] = i
		}
	}
	target := func(ref string) (int, bool) {
		for {
			if i, ok := at[ref]; ok {
				return i, true
			}
			to, ok := e.alias[ref]
			if !ok {
				return 0, false
			}
			ref = to
		}
	}
	type span struct{ off, size int16 }
	var read []span
	seen := make([]bool, len(later))
	work := []int{0}
	for len(work) > 0 {
		i := work[len(work)-1]
		work = work[:len(work)-1]
		if i >= len(later) || seen[i] {
			continue
		}
		seen[i] = true
		ins := later[i]
		cls := ins.OpCode.Class()
		switch {
		case cls == asm.LdXClass && ins.Src == asm.R10:
			read = append(read, span{ins.Offset, int16(ins.OpCode.Size().Sizeof())})
		case cls.IsALU() && ins.OpCode.Source() == asm.ImmSource && ins.Constant >= -512 && ins.Constant < 0:
			read = append(read, span{int16(ins.Constant), 1})
		case cls.IsJump() && ins.OpCode.JumpOp() != asm.Call:
			if ins.OpCode.JumpOp() == asm.Exit {
				continue
			}
			if t, ok := target(ins.Reference()); ok {
				work = append(work, t)
			}
			if ins.OpCode.JumpOp() == asm.Ja {
				continue
			}
		}
		work = append(work, i+1)
	}
	out := slices.Clone(e.insns[:start])
	for _, st := range e.insns[start:end] {
		size := int16(st.OpCode.Size().Sizeof())
		if slices.ContainsFunc(read, func(r span) bool { return r.off < st.Offset+size && st.Offset < r.off+r.size }) {
			out = append(out, st)
		}
	}
	e.insns = append(out, later...)
}

// fastPortTest jumps to miss unless the port in reg (network order, as
// loaded) is in m (nil: any). R0 is scratch.
func (c *compiler) fastPortTest(m *grammar.PortMatch, reg asm.Register, miss string) {
	if m == nil {
		return
	}
	e := &c.e
	if len(m.Ranges) == 1 && m.Ranges[0].Lo == m.Ranges[0].Hi {
		e.emit(netImm(asm.JNE.Imm(reg, int32(n16(m.Ranges[0].Lo)), miss)))
		return
	}
	hit := e.newLabel("port_hit")
	host := false
	for _, r := range m.Ranges {
		if r.Lo == r.Hi {
			e.emit(netImm(asm.JEq.Imm(reg, int32(n16(r.Lo)), hit)))
			continue
		}
		if !host {
			e.emit(mov(asm.R0, reg), asm.HostTo(asm.BE, asm.R0, asm.Half))
			host = true
		}
		skip := e.newLabel("range")
		e.emit(asm.JLT.Imm(asm.R0, int32(r.Lo), skip), asm.JLE.Imm(asm.R0, int32(r.Hi), hit))
		e.label(skip)
	}
	e.emit(asm.Ja.Label(miss))
	e.label(hit)
}

// maxFilterPorts bounds the destination ports a port filter holds: more
// would set most of its 64 bits.
const maxFilterPorts = 16

// commonPorts are well-known service ports; the port filter's hash is
// chosen so that they miss it if it can be, since unmatched traffic is
// mostly theirs.
var commonPorts = []uint16{20, 21, 22, 23, 25, 53, 67, 68, 80, 110, 123, 143, 161, 443, 465, 514, 587, 853, 993, 995, 1194, 3306, 3478, 5060, 5353, 5432, 8080, 8443}

// portFilter returns a 64-bit bitmap of the destination ports the IPv4
// rules want, indexed by bits shift..shift+5 of the port as a little-endian
// load sees it, when every such rule wants a few destination ports. A
// packet whose bit is clear matches no rule.
func (c *compiler) portFilter(rules []*grammar.Rule) (shift int, mask uint64, ok bool) {
	var ports []uint16
	for _, r := range rules {
		if r.Family == grammar.FamilyIPv6 {
			continue
		}
		if r.Dport == nil {
			return 0, 0, false
		}
		for _, pr := range r.Dport.Ranges {
			if int(pr.Hi)-int(pr.Lo)+len(ports) >= maxFilterPorts {
				return 0, 0, false
			}
			for p := int(pr.Lo); p <= int(pr.Hi); p++ {
				ports = append(ports, n16(uint16(p)))
			}
		}
	}
	if len(ports) == 0 {
		return 0, 0, false
	}
	best := -1
	for k := 0; k <= 10; k++ {
		var m uint64
		for _, p := range ports {
			m |= 1 << (p >> k & 63)
		}
		cost := bits.OnesCount64(m) // false positives of a random port
		if k < 10 {
			cost++ // needs the AND that x >> 10 (< 64) does without
		}
		for _, p := range commonPorts {
			if m&(1<<(n16(p)>>k&63)) != 0 {
				cost += 64
			}
		}
		if best < 0 || cost < best {
			best, shift, mask = cost, k, m
		}
	}
	return shift, mask, true
}

// inBounds emits the check that the first n bytes of the packet are there
// (R7 = data, R8 = data_end; R1 scratch), unless the fast path proved it
// for the pointers R7 and R8 still hold.
func (c *compiler) inBounds(n int16, fail string) {
	if c.fast && c.fastPtrs && n <= c.fastBound {
		return
	}
	c.e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(n)),
		asm.JGT.Reg(asm.R1, asm.R8, fail),
	)
}
