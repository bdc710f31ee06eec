package grammar

import (
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

var flagBits = map[string]uint8{
	"fin": TCPFin, "syn": TCPSyn, "rst": TCPRst, "psh": TCPPsh,
	"ack": TCPAck, "urg": TCPUrg, "ecn": TCPEce, "ece": TCPEce, "cwr": TCPCwr,
}

// flagNames in print order (nft's).
var flagNames = []struct {
	bit  uint8
	name string
}{{TCPFin, "fin"}, {TCPSyn, "syn"}, {TCPRst, "rst"}, {TCPPsh, "psh"}, {TCPAck, "ack"}, {TCPUrg, "urg"}, {TCPEce, "ecn"}, {TCPCwr, "cwr"}}

// ruleState tracks where each part of a rule came from, for errors.
type ruleState struct {
	famSpan   Span
	protoSpan Span
	ports     []*portSyntax
	portSpans []Span
	flags     *flagsSyntax
}

// rule lowers a rule in lenient order to the canonical Rule, reporting every
// contradiction at its token. It returns nil when the rule has errors.
func (l *lowerer) rule(rs *ruleSyntax) *Rule {
	before := len(l.errs)
	r := &Rule{Span: spanOf(rs.Tokens)}
	st := &ruleState{}
	for _, it := range rs.Items {
		span := spanOf(it.Tokens)
		switch {
		case it.Family != "":
			f := FamilyIPv4
			if it.Family == "ip6" {
				f = FamilyIPv6
			}
			l.setFamily(r, st, f, span, it.Family)
		case it.Addr != nil:
			l.addrItem(r, st, it.Addr, span)
		case it.Proto != "":
			l.setProto(r, st, protoOf(it.Proto), span)
		case it.IPProto != nil, it.IP6Proto != nil, it.L4Proto != nil:
			l.protoItem(r, st, it, span)
		case it.NFProto != nil:
			switch it.NFProto.Word {
			case "ipv4":
				l.setFamily(r, st, FamilyIPv4, span, "meta nfproto ipv4")
			case "ipv6":
				l.setFamily(r, st, FamilyIPv6, span, "meta nfproto ipv6")
			default:
				l.errorf(spanOf(it.NFProto.Tokens), "meta nfproto %s: sfunnel hooks see ipv4 or ipv6", it.NFProto.Word)
			}
		case it.Trace != nil:
			v, ok := l.number(it.Trace, 0xffffffff)
			switch {
			case !ok:
			case v != 1:
				l.errorf(spanOf(it.Trace.Tokens), "meta nftrace set takes 1 (trace the packet); leave the statement out not to trace")
			case r.Trace:
				l.errorf(span, "meta nftrace set given twice in one rule")
			default:
				r.Trace = true
			}
		case it.Port != nil:
			st.ports = append(st.ports, it.Port)
			st.portSpans = append(st.portSpans, span)
		case it.Flags != nil:
			if st.flags != nil {
				l.errorf(span, "tcp flags given twice in one rule")
				continue
			}
			st.flags = it.Flags
		case it.Mark != nil:
			l.markItem(r, it.Mark, span)
		case it.Counter != nil:
			if r.Counter {
				l.errorf(span, "counter given twice in one rule")
			}
			r.Counter = true
		}
	}
	// Ports and flags need the protocol, which may come later in sfunnel's
	// lenient order, so they are lowered once every item has been seen.
	for i, p := range st.ports {
		l.portItem(r, p, st.portSpans[i])
	}
	if st.flags != nil {
		span := spanOf(st.flags.Tokens)
		if r.Proto != ProtoTCP {
			l.errorf(span, "tcp flags need a tcp match (add tcp before flags)")
		} else {
			r.TCPFlags = l.flagsMatch(st.flags, span)
		}
	}
	acts := rs.Actions
	if rs.ActionsKw != nil && len(acts) == 0 {
		l.errorf(spanOf(rs.ActionsKw.Tokens), "actions needs an action after it: %s", actionWords)
	}
	acts = append(acts, rs.NftForm...)
	if len(acts) > 0 {
		r.Actions = make([]*Action, 0, len(acts))
	}
	for _, a := range acts {
		if act := l.action(r, a); act != nil {
			r.Actions = append(r.Actions, act)
		}
	}
	l.checkActions(r)
	if rs.Comment != nil {
		c, err := strconv.Unquote(rs.Comment.Value)
		if err != nil {
			l.errorf(spanOf(rs.Comment.Tokens), "bad comment string")
		}
		r.Comment = c
	}
	if len(l.errs) > before {
		return nil
	}
	return r
}

// actionWords lists the actions, for messages.
var actionWords = orList(ActionWords)

// orList joins words as "a, b or c".
func orList(w []string) string {
	if len(w) < 2 {
		return strings.Join(w, "")
	}
	return strings.Join(w[:len(w)-1], ", ") + " or " + w[len(w)-1]
}

// nftOnly are nft verdicts and statements sfunnel has no counterpart for.
var nftOnly = map[string]string{
	"reject": "drop", "log": "counter (and monitor)", "jump": "", "goto": "", "return": "accept",
	"continue": "", "queue": "", "masquerade": "", "snat": "", "redirect": "dnat to ADDR:PORT",
	"notrack": "", "limit": "", "quota": "",
}

func (l *lowerer) setProto(r *Rule, st *ruleState, p Proto, span Span) {
	if r.Proto != ProtoAny && r.Proto != p {
		l.errorf(span, "%s and %s in one rule: a packet has one L4 protocol (write two rules)", r.Proto, p)
		return
	}
	r.Proto, st.protoSpan = p, span
}

// protoItem lowers nft's `ip protocol P`, `ip6 nexthdr P` and
// `meta l4proto P`: the same as sfunnel's bare `ip P`, `ip6 P` and `P`.
func (l *lowerer) protoItem(r *Rule, st *ruleState, it *itemSyntax, span Span) {
	w, what, fam := it.L4Proto, "meta l4proto", FamilyAny
	switch {
	case it.IPProto != nil:
		w, what, fam = it.IPProto, "ip protocol", FamilyIPv4
	case it.IP6Proto != nil:
		w, what, fam = it.IP6Proto, "ip6 nexthdr", FamilyIPv6
	}
	var p Proto
	switch w.Word {
	case "tcp", "6":
		p = ProtoTCP
	case "udp", "17":
		p = ProtoUDP
	default:
		l.errorf(spanOf(w.Tokens), "%s %s: sfunnel rules match tcp or udp only", what, w.Word)
		return
	}
	if fam != FamilyAny {
		l.setFamily(r, st, fam, span, what)
	}
	l.setProto(r, st, p, span)
}

func (l *lowerer) setFamily(r *Rule, st *ruleState, f Family, span Span, what string) {
	if r.Family != FamilyAny && r.Family != f {
		l.errorf(span, "%s conflicts with %s earlier in the rule: a packet is either IPv4 or IPv6", what, familyName(r.Family))
		return
	}
	if r.Family == FamilyAny {
		st.famSpan = span
	}
	r.Family = f
}

func (l *lowerer) addrItem(r *Rule, st *ruleState, a *addrSyntax, span Span) {
	m := &AddrMatch{Span: span, Neg: a.Neg}
	target := &r.Saddr
	if a.Field == "daddr" {
		target = &r.Daddr
	}
	if *target != nil {
		l.errorf(span, "%s given twice in one rule (use a set: %s { a, b })", a.Field, a.Field)
		return
	}
	if a.Value.SetRef != "" {
		name := strings.TrimPrefix(a.Value.SetRef, "@")
		t, ok := l.setType(name)
		vspan := spanOf(a.Value.Tokens)
		if !ok {
			l.errorf(vspan, "undefined set @%s", name)
			return
		}
		if t == SetInetService {
			l.errorf(vspan, "set @%s holds ports (inet_service), not addresses", name)
			return
		}
		f := FamilyIPv4
		if t == SetIPv6Addr {
			f = FamilyIPv6
		}
		l.setFamily(r, st, f, vspan, "set @"+name+" ("+t.String()+")")
		m.Set = name
		*target = m
		return
	}
	var one [1]Value
	vals := l.matchValues(a.Value, &one)
	seen := newDupSet[netip.Prefix](len(vals))
	for _, v := range vals {
		p, ok := l.prefix(v)
		if !ok {
			continue
		}
		f := familyOf(p.Addr())
		if r.Family != FamilyAny && r.Family != f {
			l.errorf(v.Span, "%s is an %s address but the rule matches %s", v.Addr, map[Family]string{FamilyIPv4: "IPv4", FamilyIPv6: "IPv6"}[f], familyName(r.Family))
			continue
		}
		l.setFamily(r, st, f, v.Span, v.Addr)
		if seen.has(m.Prefixes, p) {
			l.errorf(v.Span, "duplicate element %s", formatPrefix(p))
			continue
		}
		seen.add(p)
		if m.Prefixes == nil {
			m.Prefixes = make([]netip.Prefix, 0, len(vals))
		}
		m.Prefixes = append(m.Prefixes, p)
	}
	if len(m.Prefixes) == 0 {
		return
	}
	*target = m
}

func (l *lowerer) setType(name string) (SetType, bool) {
	if t, ok := l.sets[name]; ok {
		return t, true
	}
	if l.opts.LookupSet != nil {
		return l.opts.LookupSet(name)
	}
	return 0, false
}

func (l *lowerer) portItem(r *Rule, p *portSyntax, span Span) {
	if r.Proto == ProtoAny {
		l.errorf(span, "%s needs a tcp or udp match (e.g. udp %s …)", p.Field, p.Field)
		return
	}
	m := &PortMatch{Span: span, Neg: p.Neg}
	target := &r.Sport
	if p.Field == "dport" {
		target = &r.Dport
	}
	if *target != nil {
		l.errorf(span, "%s given twice in one rule (use a set: %s { a, b })", p.Field, p.Field)
		return
	}
	if p.Value.SetRef != "" {
		name := strings.TrimPrefix(p.Value.SetRef, "@")
		vspan := spanOf(p.Value.Tokens)
		t, ok := l.setType(name)
		if !ok {
			l.errorf(vspan, "undefined set @%s", name)
			return
		}
		if t != SetInetService {
			l.errorf(vspan, "set @%s holds addresses (%s), not ports", name, t)
			return
		}
		m.Set = name
		*target = m
		return
	}
	var one [1]Value
	vals := l.matchValues(p.Value, &one)
	seen := newDupSet[PortRange](len(vals))
	for _, v := range vals {
		pr, ok := l.portRange(v)
		if !ok {
			continue
		}
		if seen.has(m.Ranges, pr) {
			l.errorf(v.Span, "duplicate element %s", formatRange(pr))
			continue
		}
		seen.add(pr)
		if m.Ranges == nil {
			m.Ranges = make([]PortRange, 0, len(vals))
		}
		m.Ranges = append(m.Ranges, pr)
	}
	if len(m.Ranges) > 0 {
		*target = m
	}
}

// dupSet finds duplicates among the elements kept so far: by a linear
// search of a short list, which most are, and a map for long ones.
type dupSet[T comparable] map[T]bool

func newDupSet[T comparable](n int) dupSet[T] {
	if n <= 8 {
		return nil
	}
	return make(dupSet[T], n)
}

func (d dupSet[T]) has(kept []T, v T) bool {
	if d == nil {
		return slices.Contains(kept, v)
	}
	return d[v]
}

func (d dupSet[T]) add(v T) {
	if d != nil {
		d[v] = true
	}
}

func (l *lowerer) flagBits(names []string, span Span) (uint8, bool) {
	var bits uint8
	for _, n := range names {
		b, ok := flagBits[n]
		if !ok {
			l.errorf(span, "unknown tcp flag %q (fin, syn, rst, psh, ack, urg, ecn, cwr)", n)
			return 0, false
		}
		bits |= b
	}
	return bits, true
}

func (l *lowerer) flagsMatch(f *flagsSyntax, span Span) *FlagsMatch {
	bits, ok := l.flagBits(f.Flags, span)
	if !ok {
		return nil
	}
	m := &FlagsMatch{Span: span, Flags: bits}
	switch {
	case len(f.Mask) > 0:
		if f.Op != "" {
			l.errorf(span, "tcp flags with a mask take no %s", f.Op)
			return nil
		}
		mask, ok := l.flagBits(f.Mask, span)
		if !ok {
			return nil
		}
		if bits&^mask != 0 {
			l.errorf(span, "tcp flags outside the mask can never match")
			return nil
		}
		m.Form, m.Mask = FlagsMasked, mask
	case f.Op == "==":
		m.Form = FlagsExact
	case f.Op == "!=":
		m.Form = FlagsNone
	default:
		m.Form = FlagsAny
	}
	return m
}

func (l *lowerer) markItem(r *Rule, m *markSyntax, span Span) {
	v, ok := l.number(m.Value, 0xffffffff)
	if !ok {
		return
	}
	mask, hasMask := uint64(0xffffffff), m.Mask != nil
	if hasMask {
		if mask, ok = l.number(m.Mask, 0xffffffff); !ok {
			return
		}
	}
	what := "meta mark"
	if m.Kind == "ct" {
		what = "ct mark"
	}
	if m.Set {
		if m.Neg {
			l.errorf(span, "%s set takes no !=", what)
			return
		}
		if uint32(v)&^uint32(mask) != 0 {
			l.errorf(span, "%s set 0x%x has bits outside the mask 0x%x", what, v, mask)
			return
		}
		target := &r.SetMetaMark
		if m.Kind == "ct" {
			target = &r.SetCtMark
		}
		if *target != nil {
			l.errorf(span, "%s set given twice in one rule", what)
			return
		}
		*target = &MarkSet{Span: span, Value: uint32(v), Mask: uint32(mask), HasMask: hasMask}
		return
	}
	if uint32(v)&^uint32(mask) != 0 {
		l.errorf(span, "%s 0x%x has bits outside the mask 0x%x: it can never match", what, v, mask)
		return
	}
	target := &r.MetaMark
	if m.Kind == "ct" {
		target = &r.CtMark
	}
	if *target != nil {
		l.errorf(span, "%s given twice in one rule", what)
		return
	}
	*target = &MarkMatch{Span: span, Neg: m.Neg, Value: uint32(v), Mask: uint32(mask), HasMask: hasMask}
}

func protoOf(s string) Proto {
	if s == "udp" {
		return ProtoUDP
	}
	return ProtoTCP
}

func (l *lowerer) action(r *Rule, a *actionSyntax) *Action {
	span := spanOf(a.Tokens)
	act := &Action{Span: span}
	switch {
	case a.Accept:
		act.Kind = ActAccept
	case a.Drop:
		act.Kind = ActDrop
	case a.Unfunnel != nil:
		act.Kind, act.Proto = ActUnfunnel, protoOf(a.Unfunnel.Proto)
	case a.Rewrite != nil:
		act.Kind, act.Proto = ActRewrite, protoOf(a.Rewrite.Proto)
	case a.Funnel != nil:
		act.Kind, act.Proto = ActFunnel, protoOf(a.Funnel.Proto.Proto)
		if !l.funnelFields(act, a.Funnel) {
			return nil
		}
	case a.DNAT != nil:
		act.Kind = ActDNAT
		if !l.dnat(r, act, a.DNAT) {
			return nil
		}
	default:
		if alt, ok := nftOnly[a.Unknown]; ok {
			msg := "nft's " + a.Unknown + " has no sfunnel counterpart; the actions are " + actionWords
			if alt != "" {
				msg += " (see " + alt + ")"
			}
			l.errorf(span, "%s", msg)
		} else {
			l.errorf(span, "syntax error, unexpected token %q, expected an action: %s", a.Unknown, actionWords)
		}
		return nil
	}
	return act
}

func (l *lowerer) funnelFields(act *Action, f *funnelSyntax) bool {
	h := &FunnelHeader{Flags: DefaultFunnelFlags, Seq: DefaultFunnelSeq, Ack: DefaultFunnelAck, Window: DefaultFunnelWindow}
	act.Funnel = h
	ok := true
	for _, fld := range f.Fields {
		span := spanOf(fld.Tokens)
		name := fld.Name
		if name == "" {
			name = "flags"
		}
		if act.Proto == ProtoUDP && name != "sport" && name != "dport" && name != "mss" {
			l.errorf(span, "%s is a TCP header field; funnel udp takes only sport, dport and mss", name)
			ok = false
			continue
		}
		if fld.Off && name != "mss" {
			// The grammar takes `off` after any field name.
			l.errorf(span, "%s off: only mss takes off (to leave the MSS option alone)", name)
			ok = false
			continue
		}
		dup := func(has *bool) bool {
			if *has {
				l.errorf(span, "funnel %s given twice", name)
				ok = false
				return true
			}
			*has = true
			return false
		}
		switch name {
		case "flags":
			if dup(&h.HasFlags) {
				continue
			}
			bits, good := l.flagBits(fld.Flags, span)
			ok = ok && good
			h.Flags = bits
		case "sport", "dport", "window":
			v, good := l.number(fld.Value, 65535)
			if !good {
				ok = false
				continue
			}
			switch name {
			case "sport":
				if !dup(&h.HasSport) {
					h.Sport = uint16(v)
				}
			case "dport":
				if !dup(&h.HasDport) {
					h.Dport = uint16(v)
				}
			default:
				if !dup(&h.HasWindow) {
					h.Window = uint16(v)
				}
			}
		case "mss":
			if dup(&h.HasMSS) {
				continue
			}
			if fld.Off {
				h.MSSOff = true
				continue
			}
			v, good := l.number(fld.Value, 65535)
			if !good || v < MinFunnelMSS {
				if good {
					l.errorf(span, "mss %d is below %d; use mss off to leave the option alone", v, MinFunnelMSS)
				}
				ok = false
				continue
			}
			h.MSS = uint16(v)
		case "seq", "ack":
			v, good := l.number(fld.Value, 0xffffffff)
			if !good {
				ok = false
				continue
			}
			if name == "seq" {
				if !dup(&h.HasSeq) {
					h.Seq = uint32(v)
				}
			} else if !dup(&h.HasAck) {
				h.Ack = uint32(v)
			}
		}
	}
	return ok
}

func (l *lowerer) dnat(r *Rule, act *Action, d *dnatSyntax) bool {
	span := spanOf(d.Tokens)
	text := d.Addr6B
	if text == "" {
		text = d.Addr
	}
	if strings.HasPrefix(text, "$") {
		vals := l.expand(text, span)
		if len(vals) != 1 || vals[0].Addr == "" || vals[0].Len != "" {
			if vals != nil {
				l.errorf(span, "%s does not hold a single address", text)
			}
			return false
		}
		text = vals[0].Addr
	}
	a, err := netip.ParseAddr(text)
	if err != nil {
		l.errorf(span, "bad dnat address %s", text)
		return false
	}
	if d.Addr6B == "" && a.Is6() && d.Port != nil {
		l.errorf(span, "write an IPv6 address with a port as [%s]:PORT", text)
		return false
	}
	f := familyOf(a)
	if r.Family != FamilyAny && r.Family != f {
		l.errorf(span, "dnat to %s in a rule that matches %s", text, familyName(r.Family))
		return false
	}
	r.Family = f
	act.DNATAddr = a
	if d.Port != nil {
		if r.Proto == ProtoAny {
			l.errorf(span, "dnat to a port needs a tcp or udp match")
			return false
		}
		p, ok := l.number(d.Port, 65535)
		if !ok {
			return false
		}
		if p == 0 {
			l.errorf(spanOf(d.Port.Tokens), "dnat port 0 is not a port")
			return false
		}
		act.DNATPort = uint16(p)
	}
	return true
}

// checkActions reports combinations of actions that cannot mean anything,
// the mistakes sfunnel accepted silently.
func (l *lowerer) checkActions(r *Rule) {
	var seen [ActDNAT + 1]*Action
	for _, a := range r.Actions {
		if prev := seen[a.Kind]; prev != nil {
			l.errorf(a.Span, "%s given twice in one rule", a.Kind)
			continue
		}
		seen[a.Kind] = a
		if (a.Kind == ActAccept || a.Kind == ActDrop) && len(r.Actions) > 1 {
			l.errorf(a.Span, "%s cannot be combined with other actions", a.Kind)
			continue
		}
		switch a.Kind {
		case ActFunnel:
			if r.Proto == ProtoAny {
				l.errorf(a.Span, "funnel needs a tcp or udp match: the inner header's checksum is rewritten")
			}
		case ActUnfunnel:
			if r.Proto == ProtoAny {
				l.errorf(a.Span, "unfunnel needs a match on the funnel header's protocol (e.g. tcp dport 179 sport 540 actions unfunnel %s)", a.Proto)
			}
		case ActRewrite:
			want := ProtoTCP
			if a.Proto == ProtoTCP {
				want = ProtoUDP
			}
			if r.Proto != want {
				l.errorf(a.Span, "rewrite %s turns %s into %s: the rule must match %s", a.Proto, want, a.Proto, want)
			}
		}
	}
	if f, u := seen[ActFunnel], seen[ActUnfunnel]; f != nil && u != nil {
		l.errorf(u.Span, "funnel and unfunnel in one rule undo each other")
	}
	if f, w := seen[ActFunnel], seen[ActRewrite]; f != nil && w != nil {
		l.errorf(w.Span, "funnel and rewrite in one rule: pick one encapsulation")
	}
	if u, w := seen[ActUnfunnel], seen[ActRewrite]; u != nil && w != nil {
		l.errorf(w.Span, "unfunnel and rewrite in one rule: pick one")
	}
}
