package ruleset

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/sfunnel/sfunnel/grammar"
)

// Clone returns a deep enough copy of rs for a transaction: slices and sets
// are copied; rules are shared (they are never mutated in place).
func (rs *Ruleset) Clone() *Ruleset {
	c := &Ruleset{NextHandle: rs.NextHandle}
	for _, i := range rs.Interfaces {
		c.Interfaces = append(c.Interfaces, &Interface{
			Name:    i.Name,
			Ingress: slices.Clone(i.Ingress),
			Egress:  slices.Clone(i.Egress),
		})
	}
	for _, s := range rs.Sets {
		sc := *s
		sc.Prefixes = slices.Clone(s.Prefixes)
		sc.Ports = slices.Clone(s.Ports)
		c.Sets = append(c.Sets, &sc)
	}
	if c.NextHandle == 0 {
		c.NextHandle = 1
	}
	return c
}

// Interface returns the named interface, or nil.
func (rs *Ruleset) Interface(name string) *Interface {
	for _, i := range rs.Interfaces {
		if i.Name == name {
			return i
		}
	}
	return nil
}

// Set returns the named set, or nil.
func (rs *Ruleset) Set(name string) *grammar.Set {
	for _, s := range rs.Sets {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// SetType looks a set's type up, for the parser's @name references.
func (rs *Ruleset) SetType(name string) (grammar.SetType, bool) {
	if s := rs.Set(name); s != nil {
		return s.Type, true
	}
	return 0, false
}

// SetsByName indexes the sets, as the compiler takes them.
func (rs *Ruleset) SetsByName() map[string]*grammar.Set {
	m := make(map[string]*grammar.Set, len(rs.Sets))
	for _, s := range rs.Sets {
		m[s.Name] = s
	}
	return m
}

// Rule finds a rule by handle.
func (rs *Ruleset) Rule(handle uint64) (*Interface, grammar.Hook, int) {
	for _, i := range rs.Interfaces {
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			for n, r := range i.Rules(h) {
				if r.Handle == handle {
					return i, h, n
				}
			}
		}
	}
	return nil, 0, -1
}

func (i *Interface) setRules(h grammar.Hook, rules []*grammar.Rule) {
	if h == grammar.HookEgress {
		i.Egress = rules
	} else {
		i.Ingress = rules
	}
}

func (rs *Ruleset) ensureInterface(name string) *Interface {
	if i := rs.Interface(name); i != nil {
		return i
	}
	i := &Interface{Name: name}
	rs.Interfaces = append(rs.Interfaces, i)
	return i
}

// prune drops interfaces left without rules: an interface exists in the
// ruleset while one of its hooks has a rule.
func (rs *Ruleset) prune() {
	rs.Interfaces = slices.DeleteFunc(rs.Interfaces, func(i *Interface) bool {
		return len(i.Ingress) == 0 && len(i.Egress) == 0
	})
}

func errAt(s grammar.Span, format string, args ...any) *grammar.Error {
	return &grammar.Error{Span: s, Msg: fmt.Sprintf(format, args...)}
}

// apply performs one mutating command on rs and returns the rule it added or
// replaced (with its handle), if any. Read-only commands are not passed in.
func (rs *Ruleset) apply(c *grammar.Command) (*grammar.Rule, error) {
	var out *grammar.Rule
	err := rs.applyTo(c, &out)
	return out, err
}

func (rs *Ruleset) applyTo(c *grammar.Command, out **grammar.Rule) error {
	switch c.Kind {
	case grammar.CmdFlushRuleset:
		*rs = Ruleset{NextHandle: rs.NextHandle}
	case grammar.CmdFlushInterface:
		i := rs.Interface(c.Interface)
		if i == nil {
			return errAt(c.InterfaceSpan, "interface %s has no rules", c.Interface)
		}
		if c.HasHook {
			i.setRules(c.Hook, nil)
		} else {
			i.Ingress, i.Egress = nil, nil
		}
	case grammar.CmdDeleteInterface:
		if rs.Interface(c.Interface) == nil {
			return errAt(c.InterfaceSpan, "interface %s has no rules", c.Interface)
		}
		rs.Interfaces = slices.DeleteFunc(rs.Interfaces, func(i *Interface) bool { return i.Name == c.Interface })
	case grammar.CmdAddRule, grammar.CmdInsertRule:
		i := rs.ensureInterface(c.Interface)
		rules := i.Rules(c.Hook)
		at := len(rules)
		if c.Kind == grammar.CmdInsertRule {
			at = 0
		}
		if c.HandleSpan != (grammar.Span{}) {
			n := slices.IndexFunc(rules, func(r *grammar.Rule) bool { return r.Handle == c.Handle })
			if n < 0 {
				return errAt(c.HandleSpan, "no rule with handle %d in %s %s", c.Handle, c.Interface, c.Hook)
			}
			// nft: add goes after the positioned rule, insert before it.
			at = n
			if c.Kind == grammar.CmdAddRule {
				at = n + 1
			}
		}
		r := *c.Rule
		r.Handle = rs.NextHandle
		rs.NextHandle++
		i.setRules(c.Hook, slices.Insert(rules, at, &r))
		*out = &r
	case grammar.CmdReplaceRule, grammar.CmdDeleteRule:
		i := rs.Interface(c.Interface)
		n := -1
		if i != nil {
			n = slices.IndexFunc(i.Rules(c.Hook), func(r *grammar.Rule) bool { return r.Handle == c.Handle })
		}
		if n < 0 {
			return errAt(c.HandleSpan, "no rule with handle %d in %s %s", c.Handle, c.Interface, c.Hook)
		}
		rules := slices.Clone(i.Rules(c.Hook))
		if c.Kind == grammar.CmdDeleteRule {
			rules = slices.Delete(rules, n, n+1)
		} else {
			r := *c.Rule
			r.Handle = c.Handle
			rules[n] = &r
			*out = &r
		}
		i.setRules(c.Hook, rules)
	case grammar.CmdDefineSet:
		if old := rs.Set(c.Set.Name); old != nil {
			if old.Type != c.Set.Type {
				return errAt(c.Set.Span, "set %s exists with type %s", c.Set.Name, old.Type)
			}
			// Declaring an existing set again replaces its elements.
			*old = *c.Set
			return nil
		}
		s := *c.Set
		rs.Sets = append(rs.Sets, &s)
	case grammar.CmdDeleteSet:
		if rs.Set(c.Set.Name) == nil {
			return errAt(c.Set.Span, "undefined set %s", c.Set.Name)
		}
		if users := rs.setUsers(c.Set.Name); len(users) > 0 {
			return errAt(c.Set.Span, "set %s is used by rule handle %d (delete or replace that rule first)", c.Set.Name, users[0])
		}
		rs.Sets = slices.DeleteFunc(rs.Sets, func(s *grammar.Set) bool { return s.Name == c.Set.Name })
	case grammar.CmdAddElement, grammar.CmdDeleteElement:
		s := rs.Set(c.Set.Name)
		if s == nil {
			return errAt(c.Set.Span, "undefined set %s", c.Set.Name)
		}
		add := c.Kind == grammar.CmdAddElement
		delta, err := grammar.CheckElements(s, c.Elements, add)
		if err != nil {
			return err
		}
		if add {
			s.Prefixes = append(s.Prefixes, delta.Prefixes...)
			s.Ports = append(s.Ports, delta.Ports...)
			return nil
		}
		for n, p := range delta.Prefixes {
			k := slices.Index(s.Prefixes, p)
			if k < 0 {
				return errAt(elemSpan(c, n), "%s is not in set %s", grammar.FormatPrefixes([]netip.Prefix{p}), s.Name)
			}
			s.Prefixes = slices.Delete(s.Prefixes, k, k+1)
		}
		for n, r := range delta.Ports {
			k := slices.Index(s.Ports, r)
			if k < 0 {
				return errAt(elemSpan(c, n), "%s is not in set %s", grammar.FormatRanges([]grammar.PortRange{r}), s.Name)
			}
			s.Ports = slices.Delete(s.Ports, k, k+1)
		}
	default:
		return fmt.Errorf("internal: command %d is not a change", c.Kind)
	}
	return nil
}

// setUsers lists the handles of the rules that reference a named set.
func (rs *Ruleset) setUsers(name string) []uint64 {
	var out []uint64
	for _, i := range rs.Interfaces {
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			for _, r := range i.Rules(h) {
				for _, set := range []string{setName(r.Saddr), setName(r.Daddr), portSetName(r.Sport), portSetName(r.Dport)} {
					if set == name {
						out = append(out, r.Handle)
						break
					}
				}
			}
		}
	}
	return out
}

func setName(m *grammar.AddrMatch) string {
	if m == nil {
		return ""
	}
	return m.Set
}

func portSetName(m *grammar.PortMatch) string {
	if m == nil {
		return ""
	}
	return m.Set
}

func elemSpan(c *grammar.Command, n int) grammar.Span {
	if n < len(c.Elements) {
		return c.Elements[n].Span
	}
	return c.Span
}

// validate checks what only the whole ruleset can tell: every @set a rule
// uses exists with the right type.
func (rs *Ruleset) validate() error {
	var errs grammar.ErrorList
	for _, i := range rs.Interfaces {
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			for _, r := range i.Rules(h) {
				for _, m := range []*grammar.AddrMatch{r.Saddr, r.Daddr} {
					if m != nil && m.Set != "" {
						s := rs.Set(m.Set)
						if s == nil || s.Type == grammar.SetInetService {
							errs = append(errs, errAt(m.Span, "set @%s no longer exists as an address set", m.Set))
						}
					}
				}
				for _, m := range []*grammar.PortMatch{r.Sport, r.Dport} {
					if m != nil && m.Set != "" {
						s := rs.Set(m.Set)
						if s == nil || s.Type != grammar.SetInetService {
							errs = append(errs, errAt(m.Span, "set @%s no longer exists as a port set", m.Set))
						}
					}
				}
			}
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}
