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

// LoadOutline returns the live ruleset with placeholder rules (see above).
func (b *Backend) LoadOutline() (*ruleset.Ruleset, error) {
	b.outline, b.outlineState = nil, nil
	s, _, st, err := b.snapshot()
	if err != nil || st == nil {
		return &ruleset.Ruleset{NextHandle: 1}, err
	}
	sets, err := st.parseSets()
	if err != nil {
		return nil, err
	}
	rs := &ruleset.Ruleset{NextHandle: st.NextHandle, Sets: sets}
	n := 0
	for _, h := range st.hooks() {
		n += len(h.Rules)
	}
	b.known = make(map[*grammar.Rule]ruleRecord, n)
	b.byHandle = make(map[uint64]*grammar.Rule, n)
	b.outline = make(map[*grammar.Rule]ruleRecord, n)
	for _, h := range st.hooks() {
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
			rules[i] = r
			b.known[r], b.byHandle[rec.Handle], b.outline[r] = rec, r, rec
		}
		if h.hook == grammar.HookEgress {
			ifc.Egress = rules
		} else {
			ifc.Ingress = rules
		}
	}
	b.outlineState = st
	return rs, nil
}

// hasPlaceholders reports whether rules holds a placeholder.
func (b *Backend) hasPlaceholders(rules []*grammar.Rule) bool {
	if b.outline == nil {
		return false
	}
	for _, r := range rules {
		if _, ok := b.outline[r]; ok {
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
	if b.outline == nil {
		return nil
	}
	st := b.outlineState
	if old == nil || st == nil || old.Generation != st.Generation {
		return fmt.Errorf("the ruleset changed while this command ran; run it again")
	}
	for _, oh := range st.hooks() {
		if len(oh.Rules) == 0 || b.byHandle[oh.Rules[0].Handle] == nil {
			continue // not loaded (its program is not attached)
		}
		var rules []*grammar.Rule
		if ifc := rs.Interface(oh.ifname); ifc != nil {
			rules = ifc.Rules(oh.hook)
		}
		still := make(map[*grammar.Rule]bool, len(rules))
		for _, r := range rules {
			still[r] = true
		}
		for _, rec := range oh.Rules {
			if p := b.byHandle[rec.Handle]; p != nil && still[p] {
				continue
			}
			// Removed or replaced: parsed for its table entries.
			r, err := parseStoredRule(rec, rs)
			if err != nil {
				return err
			}
			b.known[r], b.byHandle[rec.Handle] = rec, r
		}
		if oh.hook == grammar.HookEgress && b.hasPlaceholders(rules) {
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
	parsed, err := b.outlineState.ruleset(func(h *hookState) bool { return h.id() == id })
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
		rec, ok := b.outline[r]
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
