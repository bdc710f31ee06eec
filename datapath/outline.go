package datapath

import (
	"fmt"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Rule changes without reading every rule.
//
// `add/insert/replace/delete rule` on a large hook changes a rule or two,
// and the incremental path (patch.go) writes only their table entries. Yet
// parsing the stored text of every rule of the hook to build the working
// copy was most of such a command. So a batch of rule changes loads the
// ruleset in outline (ruleset.Outliner): sets parsed, every rule a
// placeholder holding only its handle, its stored record remembered.
// Commit then parses what it needs, before it needs it:
//   - the stored rules the batch removes or replaces, whose table entries
//     the incremental path deletes (patchHook's ruleOf);
//   - every rule of an egress hook (patchHook asks whether any of them
//     needs the segmentation device);
//   - every rule of a hook that is compiled after all (a new shape or
//     body, a contested key, no priority left: compile).
// A placeholder never reaches the compiler, the state record (which takes
// a kept rule's stored record) or the printer.

// outlineRules are the placeholders of an outline load: rules[k][i] is
// the placeholder of st's hook k's rule i (rules[k] is nil for a hook not
// loaded: its program is not attached). A placeholder knows its place (its
// Pos: file placeholderFile, line k, offset i), so finding its record
// takes no map of ten thousand rules; the place counts only when the rule
// at that place is the very same rule.
type outlineRules struct {
	st    *liveState
	hooks []*hookState
	rules [][]grammar.Rule
}

const placeholderFile = "\x00stored rule"

// record returns the stored record of placeholder r; false if r is not
// one of o's placeholders (o may be nil).
func (o *outlineRules) record(r *grammar.Rule) (ruleRecord, bool) {
	if o == nil || r.Pos.Filename != placeholderFile {
		return ruleRecord{}, false
	}
	k, i := r.Pos.Line, r.Pos.Offset
	if k < 0 || k >= len(o.rules) || i < 0 || i >= len(o.rules[k]) || &o.rules[k][i] != r {
		return ruleRecord{}, false
	}
	return o.hooks[k].Rules[i], true
}

// recordOf returns the stored record of r: a rule the last Load returned
// or parsed since, or a placeholder.
func (b *Backend) recordOf(r *grammar.Rule) (ruleRecord, bool) {
	if rec, ok := b.known[r]; ok {
		return rec, true
	}
	return b.outline.record(r)
}

// LoadOutline returns the live ruleset with placeholder rules (see above).
func (b *Backend) LoadOutline() (*ruleset.Ruleset, error) {
	b.outline = nil
	s, _, st, err := b.snapshot()
	if err != nil || st == nil {
		return &ruleset.Ruleset{NextHandle: 1}, err
	}
	sets, err := st.parseSets()
	if err != nil {
		return nil, err
	}
	rs := &ruleset.Ruleset{NextHandle: st.NextHandle, Sets: sets}
	o := &outlineRules{st: st, hooks: st.hooks()}
	o.rules = make([][]grammar.Rule, len(o.hooks))
	b.known = map[*grammar.Rule]ruleRecord{}
	b.byHandle = map[uint64]*grammar.Rule{}
	for k, h := range o.hooks {
		if !b.attached(s, h.id()) {
			continue
		}
		ifc := rs.Interface(h.ifname)
		if ifc == nil {
			ifc = &ruleset.Interface{Name: h.ifname}
			rs.Interfaces = append(rs.Interfaces, ifc)
		}
		placeholders := make([]grammar.Rule, len(h.Rules))
		rules := make([]*grammar.Rule, len(h.Rules))
		for i, rec := range h.Rules {
			r := &placeholders[i]
			r.Handle = rec.Handle
			r.Pos = grammar.Pos{Filename: placeholderFile, Line: k, Offset: i}
			rules[i] = r
		}
		o.rules[k] = placeholders
		if h.hook == grammar.HookEgress {
			ifc.Egress = rules
		} else {
			ifc.Ingress = rules
		}
	}
	b.outline = o
	return rs, nil
}

// hasPlaceholders reports whether rules holds a placeholder.
func (b *Backend) hasPlaceholders(rules []*grammar.Rule) bool {
	if b.outline == nil {
		return false
	}
	for _, r := range rules {
		if _, ok := b.outline.record(r); ok {
			return true
		}
	}
	return false
}

// outlineBefore parses, before the incremental path runs, the stored rules
// rs no longer has as they were (removed or replaced: never a placeholder
// reaches patchHook's ruleOf) and every rule of egress hooks with
// placeholders. old is the state Commit works from: it
// must be the one the outline was read from.
func (b *Backend) outlineBefore(rs *ruleset.Ruleset, old *liveState) error {
	o := b.outline
	if o == nil {
		return nil
	}
	if old == nil || old.Generation != o.st.Generation {
		return fmt.Errorf("the ruleset changed while this command ran; run it again")
	}
	for k, oh := range o.hooks {
		if o.rules[k] == nil {
			continue // not loaded (its program is not attached)
		}
		var rules []*grammar.Rule
		if ifc := rs.Interface(oh.ifname); ifc != nil {
			rules = ifc.Rules(oh.hook)
		}
		still := make([]bool, len(oh.Rules)) // placeholder i is still in rules
		placeholders := false
		for _, r := range rules {
			if r.Pos.Filename == placeholderFile && r.Pos.Line == k {
				if _, ok := o.record(r); ok {
					still[r.Pos.Offset], placeholders = true, true
				}
			}
		}
		for i, rec := range oh.Rules {
			if still[i] {
				continue
			}
			// Removed or replaced: parsed for its table entries.
			r, err := parseStoredRule(rec, rs)
			if err != nil {
				return err
			}
			b.known[r], b.byHandle[rec.Handle] = rec, r
		}
		if oh.hook == grammar.HookEgress && placeholders {
			if err := b.materialize(rs, oh.id()); err != nil {
				return err
			}
		}
	}
	return nil
}

// outlineCompiled replaces the placeholders of every hook that is compiled
// (not in patches) by the parsed rules.
func (b *Backend) outlineCompiled(rs *ruleset.Ruleset, patches map[bpf.HookID]*hookPatch) error {
	for _, ifc := range rs.Interfaces {
		for _, hk := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			id := bpf.HookID{Ifname: ifc.Name, Hook: hk}
			if patches[id] == nil && b.hasPlaceholders(ifc.Rules(hk)) {
				if err := b.materialize(rs, id); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// materialize replaces the placeholders of hook id of rs by the rules
// parsed from the outline's state record.
func (b *Backend) materialize(rs *ruleset.Ruleset, id bpf.HookID) error {
	parsed, err := b.outline.st.ruleset(func(h *hookState) bool { return h.id() == id })
	if err != nil {
		return err
	}
	byHandle := map[uint64]*grammar.Rule{}
	if pi := parsed.Interface(id.Ifname); pi != nil {
		for _, r := range pi.Rules(id.Hook) {
			byHandle[r.Handle] = r
		}
	}
	ifc := rs.Interface(id.Ifname)
	rules := ifc.Rules(id.Hook)
	for i, r := range rules {
		rec, ok := b.outline.record(r)
		if !ok {
			continue
		}
		p := byHandle[r.Handle]
		if p == nil {
			return fmt.Errorf("stored rule %d of %s did not parse back", r.Handle, id)
		}
		rules[i] = p
		b.known[p], b.byHandle[r.Handle] = rec, p
	}
	return nil
}

// parseStoredRule parses one stored rule, with the set types of rs.
func parseStoredRule(rec ruleRecord, rs *ruleset.Ruleset) (*grammar.Rule, error) {
	r, err := grammar.ParseRule("<stored rule>", rec.Text, &grammar.Options{LookupSet: rs.SetType})
	if err != nil {
		return nil, fmt.Errorf("stored rule %d does not parse: %w", rec.Handle, err)
	}
	r.Handle = rec.Handle
	return r, nil
}
