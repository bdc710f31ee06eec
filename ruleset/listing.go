package ruleset

import (
	"io"
	"maps"
	"slices"
	"strconv"
	"strings"

	"github.com/sfunnel/sfunnel/grammar"
)

// Listing is a ruleset as `list ruleset` prints it, rule by rule in
// canonical text: what a backend stores, so that listing needs no parsing.
type Listing struct {
	Sets       []ListedSet
	Interfaces []ListedInterface
}

// ListedSet is a named set's canonical block (grammar.FormatSet).
type ListedSet struct {
	Name string
	Text string
}

// ListedInterface holds the rules of one interface's hooks.
type ListedInterface struct {
	Name            string
	Ingress, Egress []ListedRule
}

// Rules returns the rules of one hook.
func (i *ListedInterface) Rules(h grammar.Hook) []ListedRule {
	if h == grammar.HookEgress {
		return i.Egress
	}
	return i.Ingress
}

// ListedRule is one rule's canonical text (grammar.FormatRule without
// counter values or handle). CounterAt is the byte offset where "packets P
// bytes B" go, after its `counter` statement; 0 when it has none.
type ListedRule struct {
	Handle    uint64
	Text      string
	CounterAt int
}

// ListRule renders a rule for a listing.
func ListRule(r *grammar.Rule) ListedRule {
	text, at := grammar.FormatRuleCounterAt(r)
	return ListedRule{Handle: r.Handle, Text: text, CounterAt: at}
}

// ListingOf renders rs.
func ListingOf(rs *Ruleset) *Listing {
	l := &Listing{}
	for _, s := range rs.Sets {
		l.Sets = append(l.Sets, ListedSet{Name: s.Name, Text: grammar.FormatSet(s, "")})
	}
	for _, i := range rs.Interfaces {
		li := ListedInterface{Name: i.Name}
		for _, r := range i.Ingress {
			li.Ingress = append(li.Ingress, ListRule(r))
		}
		for _, r := range i.Egress {
			li.Egress = append(li.Egress, ListRule(r))
		}
		l.Interfaces = append(l.Interfaces, li)
	}
	return l
}

// Interface returns the named interface, or nil.
func (l *Listing) Interface(name string) *ListedInterface {
	for i := range l.Interfaces {
		if l.Interfaces[i].Name == name {
			return &l.Interfaces[i]
		}
	}
	return nil
}

// Lister is a Backend that gives the committed ruleset as a Listing
// without parsing it (fast `list ruleset` of large rulesets).
type Lister interface {
	Listing() (*Listing, error)
}

// WriteListing prints l (or one interface/hook of it), exactly as
// WriteText prints the ruleset it came from.
func WriteListing(w io.Writer, l *Listing, only *Selector, o *ListOptions) error {
	var b strings.Builder
	if only == nil {
		for _, s := range l.Sets {
			b.WriteString(s.Text)
			b.WriteByte('\n')
		}
	}
	for _, i := range l.Interfaces {
		if only != nil && only.Interface != i.Name {
			continue
		}
		var hooks strings.Builder
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			rules := i.Rules(h)
			if len(rules) == 0 || (only != nil && only.HasHook && only.Hook != h) {
				continue
			}
			hooks.WriteString("\t" + h.String() + " {\n")
			for _, r := range rules {
				hooks.WriteString("\t\t")
				writeListedRule(&hooks, r, o)
				hooks.WriteByte('\n')
			}
			hooks.WriteString("\t}\n")
		}
		// An interface or hook without rules does not exist in the ruleset.
		if hooks.Len() > 0 {
			b.WriteString("interface " + i.Name + " {\n" + hooks.String() + "}\n")
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func writeListedRule(b *strings.Builder, r ListedRule, o *ListOptions) {
	text := r.Text
	if r.CounterAt > 0 && o.Counters != nil {
		if c, ok := o.Counters[r.Handle]; ok {
			b.WriteString(text[:r.CounterAt])
			b.WriteString(" packets ")
			b.WriteString(strconv.FormatUint(c.Packets, 10))
			b.WriteString(" bytes ")
			b.WriteString(strconv.FormatUint(c.Bytes, 10))
			text = text[r.CounterAt:]
		}
	}
	b.WriteString(text)
	comment := " # "
	if o.Handles && r.Handle != 0 {
		b.WriteString(" # handle ")
		b.WriteString(strconv.FormatUint(r.Handle, 10))
		comment = ", "
	}
	if la := o.LeftAlone[r.Handle]; len(la) > 0 {
		b.WriteString(comment + "left alone:")
		for i, reason := range slices.Sorted(maps.Keys(la)) {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(" " + reason + " " + strconv.FormatUint(la[reason], 10))
		}
	}
}
