package grammar

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// The canonical printer. Its output parses back to the same AST and prints
// byte-identically; list ruleset is built from it.

// PrintOptions control how rules print.
type PrintOptions struct {
	// Counter, when set, gives the counter values to print after `counter`
	// (nft's `counter packets N bytes M` form).
	Counter func(handle uint64) (packets, bytes uint64, ok bool)
	// Handles appends ` # handle N` (list -a).
	Handles bool
}

// FormatRule prints a rule in canonical form.
func FormatRule(r *Rule, o *PrintOptions) string {
	if o == nil {
		o = &PrintOptions{}
	}
	var w []string
	add := func(s ...string) { w = append(w, s...) }
	fam := familyName(r.Family)
	if r.Family != FamilyAny && r.Saddr == nil && r.Daddr == nil {
		add(fam)
	}
	if r.Saddr != nil {
		add(fam, "saddr", formatAddrMatch(r.Saddr))
	}
	if r.Daddr != nil {
		add(fam, "daddr", formatAddrMatch(r.Daddr))
	}
	if r.Proto != ProtoAny {
		add(r.Proto.String())
		if r.Dport != nil {
			add("dport", formatPortMatch(r.Dport))
		}
		if r.Sport != nil {
			add("sport", formatPortMatch(r.Sport))
		}
		if r.TCPFlags != nil {
			add("flags", formatFlagsMatch(r.TCPFlags))
		}
	}
	if r.MetaMark != nil {
		add("meta", "mark", formatMarkMatch(r.MetaMark))
	}
	if r.CtMark != nil {
		add("ct", "mark", formatMarkMatch(r.CtMark))
	}
	if r.Counter {
		add("counter")
		if o.Counter != nil {
			if p, b, ok := o.Counter(r.Handle); ok {
				add("packets", strconv.FormatUint(p, 10), "bytes", strconv.FormatUint(b, 10))
			}
		}
	}
	if r.SetMetaMark != nil {
		add("meta", "mark", "set", formatMark(r.SetMetaMark.Value, r.SetMetaMark.Mask, r.SetMetaMark.HasMask))
	}
	if r.SetCtMark != nil {
		add("ct", "mark", "set", formatMark(r.SetCtMark.Value, r.SetCtMark.Mask, r.SetCtMark.HasMask))
	}
	if r.Trace {
		add("meta", "nftrace", "set", "1")
	}
	if len(r.Actions) > 0 {
		acts := make([]string, len(r.Actions))
		for i, a := range r.Actions {
			acts[i] = FormatAction(a)
		}
		add("actions", strings.Join(acts, ", "))
	}
	if r.Comment != "" {
		add("comment", strconv.Quote(r.Comment))
	}
	s := strings.Join(w, " ")
	if o.Handles && r.Handle != 0 {
		s += " # handle " + strconv.FormatUint(r.Handle, 10)
	}
	return s
}

// FormatAction prints one action in canonical form.
func FormatAction(a *Action) string {
	switch a.Kind {
	case ActFunnel:
		w := []string{"funnel", a.Proto.String()}
		h := a.Funnel
		if h == nil {
			return strings.Join(w, " ")
		}
		if h.HasDport {
			w = append(w, "dport", strconv.Itoa(int(h.Dport)))
		}
		if h.HasSport {
			w = append(w, "sport", strconv.Itoa(int(h.Sport)))
		}
		if h.HasFlags {
			w = append(w, "flags", formatFlags(h.Flags, "|"))
		}
		if h.HasSeq {
			w = append(w, "seq", fmt.Sprintf("0x%08x", h.Seq))
		}
		if h.HasAck {
			w = append(w, "ack", fmt.Sprintf("0x%08x", h.Ack))
		}
		if h.HasWindow {
			w = append(w, "window", strconv.Itoa(int(h.Window)))
		}
		if h.MSSOff {
			w = append(w, "mss", "off")
		} else if h.HasMSS {
			w = append(w, "mss", strconv.Itoa(int(h.MSS)))
		}
		return strings.Join(w, " ")
	case ActUnfunnel, ActRewrite:
		return a.Kind.String() + " " + a.Proto.String()
	case ActDNAT:
		addr := a.DNATAddr.String()
		if a.DNATPort != 0 {
			if a.DNATAddr.Is6() {
				addr = "[" + addr + "]"
			}
			addr += ":" + strconv.Itoa(int(a.DNATPort))
		}
		return "dnat to " + addr
	}
	return a.Kind.String()
}

func neg(n bool) string {
	if n {
		return "!= "
	}
	return ""
}

func formatAddrMatch(m *AddrMatch) string {
	if m.Set != "" {
		return neg(m.Neg) + "@" + m.Set
	}
	return neg(m.Neg) + FormatPrefixes(m.Prefixes)
}

// FormatPrefixes prints one prefix bare, several as { a, b }.
func FormatPrefixes(ps []netip.Prefix) string {
	if len(ps) == 1 {
		return formatPrefix(ps[0])
	}
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = formatPrefix(p)
	}
	return "{ " + strings.Join(s, ", ") + " }"
}

func formatPrefix(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

func formatPortMatch(m *PortMatch) string {
	if m.Set != "" {
		return neg(m.Neg) + "@" + m.Set
	}
	return neg(m.Neg) + FormatRanges(m.Ranges)
}

// FormatRanges prints one port or range bare, several as { a, b-c }.
func FormatRanges(rs []PortRange) string {
	if len(rs) == 1 {
		return formatRange(rs[0])
	}
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = formatRange(r)
	}
	return "{ " + strings.Join(s, ", ") + " }"
}

func formatRange(r PortRange) string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return strconv.Itoa(int(r.Lo)) + "-" + strconv.Itoa(int(r.Hi))
}

func formatFlags(bits uint8, sep string) string {
	var s []string
	for _, f := range flagNames {
		if bits&f.bit != 0 {
			s = append(s, f.name)
		}
	}
	if len(s) == 0 {
		return "0"
	}
	return strings.Join(s, sep)
}

func formatFlagsMatch(m *FlagsMatch) string {
	switch m.Form {
	case FlagsExact:
		return "== " + formatFlags(m.Flags, "|")
	case FlagsNone:
		return "!= " + formatFlags(m.Flags, "|")
	case FlagsMasked:
		return formatFlags(m.Flags, "|") + " / " + formatFlags(m.Mask, ",")
	}
	return formatFlags(m.Flags, "|")
}

func formatMark(v, mask uint32, hasMask bool) string {
	s := fmt.Sprintf("0x%x", v)
	if hasMask {
		s += fmt.Sprintf("/0x%x", mask)
	}
	return s
}

func formatMarkMatch(m *MarkMatch) string {
	return neg(m.Neg) + formatMark(m.Value, m.Mask, m.HasMask)
}

// FormatSet prints a set declaration block, indented by indent.
func FormatSet(s *Set, indent string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%sset %s {\n%s\ttype %s\n", indent, s.Name, indent, s.Type)
	if s.Size != 0 {
		fmt.Fprintf(&b, "%s\tsize %d\n", indent, s.Size)
	}
	if elems := FormatElements(s); elems != "" {
		fmt.Fprintf(&b, "%s\telements = %s\n", indent, elems)
	}
	fmt.Fprintf(&b, "%s}\n", indent)
	return b.String()
}

// FormatElements prints a set's elements as { a, b }, "" when empty.
func FormatElements(s *Set) string {
	var e []string
	for _, p := range s.Prefixes {
		e = append(e, formatPrefix(p))
	}
	for _, r := range s.Ports {
		e = append(e, formatRange(r))
	}
	if len(e) == 0 {
		return ""
	}
	return "{ " + strings.Join(e, ", ") + " }"
}
