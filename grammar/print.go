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
	text, _ := formatRule(r, o)
	return text
}

// FormatRuleCounterAt is FormatRule(r, nil) and the byte offset in it
// where a listing puts " packets P bytes B": right after `counter` (0
// when the rule has none), so listings need not print the rule twice.
func FormatRuleCounterAt(r *Rule) (text string, counterAt int) {
	return formatRule(r, nil)
}

func formatRule(r *Rule, o *PrintOptions) (string, int) {
	if o == nil {
		o = &PrintOptions{}
	}
	counterAt := 0
	// The compiler prints every rule for its shape keys and the state
	// keeps the text of every rule, so the words are appended into one
	// buffer rather than joined.
	w := words{b: make([]byte, 0, 128)}
	fam := familyName(r.Family)
	if r.Family != FamilyAny && r.Saddr == nil && r.Daddr == nil {
		w.word(fam)
	}
	if r.Saddr != nil {
		w.word(fam)
		w.word("saddr")
		w.b = appendAddrMatch(w.next(), r.Saddr)
	}
	if r.Daddr != nil {
		w.word(fam)
		w.word("daddr")
		w.b = appendAddrMatch(w.next(), r.Daddr)
	}
	if r.Proto != ProtoAny {
		w.word(r.Proto.String())
		if r.Dport != nil {
			w.word("dport")
			w.b = appendPortMatch(w.next(), r.Dport)
		}
		if r.Sport != nil {
			w.word("sport")
			w.b = appendPortMatch(w.next(), r.Sport)
		}
		if r.TCPFlags != nil {
			w.word("flags")
			w.b = appendFlagsMatch(w.next(), r.TCPFlags)
		}
	}
	if r.MetaMark != nil {
		w.word("meta")
		w.word("mark")
		w.b = appendMarkMatch(w.next(), r.MetaMark)
	}
	if r.CtMark != nil {
		w.word("ct")
		w.word("mark")
		w.b = appendMarkMatch(w.next(), r.CtMark)
	}
	if r.Counter {
		w.word("counter")
		counterAt = len(w.b)
		if o.Counter != nil {
			if p, b, ok := o.Counter(r.Handle); ok {
				w.word("packets")
				w.b = strconv.AppendUint(w.next(), p, 10)
				w.word("bytes")
				w.b = strconv.AppendUint(w.next(), b, 10)
			}
		}
	}
	if r.SetMetaMark != nil {
		w.word("meta")
		w.word("mark")
		w.word("set")
		w.b = appendMark(w.next(), r.SetMetaMark.Value, r.SetMetaMark.Mask, r.SetMetaMark.HasMask)
	}
	if r.SetCtMark != nil {
		w.word("ct")
		w.word("mark")
		w.word("set")
		w.b = appendMark(w.next(), r.SetCtMark.Value, r.SetCtMark.Mask, r.SetCtMark.HasMask)
	}
	if r.Trace {
		w.word("meta")
		w.word("nftrace")
		w.word("set")
		w.word("1")
	}
	if len(r.Actions) > 0 {
		w.word("actions")
		w.next()
		for i, a := range r.Actions {
			if i > 0 {
				w.b = append(w.b, ", "...)
			}
			w.b = appendAction(w.b, a)
		}
	}
	if r.Comment != "" {
		w.word("comment")
		w.b = strconv.AppendQuote(w.next(), r.Comment)
	}
	if o.Handles && r.Handle != 0 {
		w.b = append(w.b, " # handle "...)
		w.b = strconv.AppendUint(w.b, r.Handle, 10)
	}
	return string(w.b), counterAt
}

// words builds text of words separated by single spaces.
type words struct {
	b []byte
	n int
}

// next starts a word and returns the buffer to append it to.
func (w *words) next() []byte {
	if w.n > 0 {
		w.b = append(w.b, ' ')
	}
	w.n++
	return w.b
}

func (w *words) word(s string) { w.b = append(w.next(), s...) }

// FormatAction prints one action in canonical form.
func FormatAction(a *Action) string {
	return string(appendAction(nil, a))
}

func appendAction(b []byte, a *Action) []byte {
	switch a.Kind {
	case ActFunnel:
		b = append(b, "funnel "...)
		b = append(b, a.Proto.String()...)
		h := a.Funnel
		if h == nil {
			return b
		}
		if h.HasDport {
			b = strconv.AppendUint(append(b, " dport "...), uint64(h.Dport), 10)
		}
		if h.HasSport {
			b = strconv.AppendUint(append(b, " sport "...), uint64(h.Sport), 10)
		}
		if h.HasFlags {
			b = appendFlags(append(b, " flags "...), h.Flags, '|')
		}
		if h.HasSeq {
			b = appendHex32(append(b, " seq "...), h.Seq)
		}
		if h.HasAck {
			b = appendHex32(append(b, " ack "...), h.Ack)
		}
		if h.HasWindow {
			b = strconv.AppendUint(append(b, " window "...), uint64(h.Window), 10)
		}
		if h.MSSOff {
			b = append(b, " mss off"...)
		} else if h.HasMSS {
			b = strconv.AppendUint(append(b, " mss "...), uint64(h.MSS), 10)
		}
		return b
	case ActUnfunnel, ActRewrite:
		b = append(b, a.Kind.String()...)
		b = append(b, ' ')
		return append(b, a.Proto.String()...)
	case ActDNAT:
		b = append(b, "dnat to "...)
		if a.DNATPort == 0 {
			return a.DNATAddr.AppendTo(b)
		}
		if a.DNATAddr.Is6() {
			b = append(a.DNATAddr.AppendTo(append(b, '[')), ']')
		} else {
			b = a.DNATAddr.AppendTo(b)
		}
		return strconv.AppendUint(append(b, ':'), uint64(a.DNATPort), 10)
	}
	return append(b, a.Kind.String()...)
}

// appendHex32 appends v as 0x and eight hex digits (funnel seq and ack).
func appendHex32(b []byte, v uint32) []byte {
	b = append(b, "0x"...)
	for shift := 28; shift >= 0; shift -= 4 {
		b = append(b, "0123456789abcdef"[v>>shift&0xf])
	}
	return b
}

func neg(n bool) string {
	if n {
		return "!= "
	}
	return ""
}

func appendAddrMatch(b []byte, m *AddrMatch) []byte {
	b = append(b, neg(m.Neg)...)
	if m.Set != "" {
		return append(append(b, '@'), m.Set...)
	}
	return appendPrefixes(b, m.Prefixes)
}

// FormatPrefixes prints one prefix bare, several as { a, b }.
func FormatPrefixes(ps []netip.Prefix) string {
	return string(appendPrefixes(nil, ps))
}

func appendPrefixes(b []byte, ps []netip.Prefix) []byte {
	if len(ps) == 1 {
		return appendPrefix(b, ps[0])
	}
	b = append(b, "{ "...)
	for i, p := range ps {
		if i > 0 {
			b = append(b, ", "...)
		}
		b = appendPrefix(b, p)
	}
	return append(b, " }"...)
}

func formatPrefix(p netip.Prefix) string {
	return string(appendPrefix(nil, p))
}

func appendPrefix(b []byte, p netip.Prefix) []byte {
	if p.IsSingleIP() {
		return p.Addr().AppendTo(b)
	}
	return p.AppendTo(b)
}

func appendPortMatch(b []byte, m *PortMatch) []byte {
	b = append(b, neg(m.Neg)...)
	if m.Set != "" {
		return append(append(b, '@'), m.Set...)
	}
	return appendRanges(b, m.Ranges)
}

// FormatRanges prints one port or range bare, several as { a, b-c }.
func FormatRanges(rs []PortRange) string {
	return string(appendRanges(nil, rs))
}

func appendRanges(b []byte, rs []PortRange) []byte {
	if len(rs) == 1 {
		return appendRange(b, rs[0])
	}
	b = append(b, "{ "...)
	for i, r := range rs {
		if i > 0 {
			b = append(b, ", "...)
		}
		b = appendRange(b, r)
	}
	return append(b, " }"...)
}

func formatRange(r PortRange) string {
	return string(appendRange(nil, r))
}

func appendRange(b []byte, r PortRange) []byte {
	b = strconv.AppendUint(b, uint64(r.Lo), 10)
	if r.Lo == r.Hi {
		return b
	}
	return strconv.AppendUint(append(b, '-'), uint64(r.Hi), 10)
}

func appendFlags(b []byte, bits uint8, sep byte) []byte {
	if bits == 0 {
		return append(b, '0')
	}
	first := true
	for _, f := range flagNames {
		if bits&f.bit != 0 {
			if !first {
				b = append(b, sep)
			}
			first = false
			b = append(b, f.name...)
		}
	}
	return b
}

func appendFlagsMatch(b []byte, m *FlagsMatch) []byte {
	switch m.Form {
	case FlagsExact:
		return appendFlags(append(b, "== "...), m.Flags, '|')
	case FlagsNone:
		return appendFlags(append(b, "!= "...), m.Flags, '|')
	case FlagsMasked:
		return appendFlags(append(appendFlags(b, m.Flags, '|'), " / "...), m.Mask, ',')
	}
	return appendFlags(b, m.Flags, '|')
}

func appendMark(b []byte, v, mask uint32, hasMask bool) []byte {
	b = strconv.AppendUint(append(b, "0x"...), uint64(v), 16)
	// A mask is printed whenever it masks: the compiler's body and shape
	// keys are printed rules, so what the code reads must be printed
	// (the parser sets no mask but all ones when the rule gives none).
	if hasMask || mask != 0xffffffff {
		b = strconv.AppendUint(append(b, "/0x"...), uint64(mask), 16)
	}
	return b
}

func appendMarkMatch(b []byte, m *MarkMatch) []byte {
	return appendMark(append(b, neg(m.Neg)...), m.Value, m.Mask, m.HasMask)
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
