package ruleset

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/nftjson"
)

// Session runs batches of commands against a Backend: every batch is one
// transaction (all its changes are committed together, or none).
type Session struct {
	Backend Backend
	Out     io.Writer
	// Err gets the warnings of -j listings (text listings carry them as
	// comments); nil drops them.
	Err io.Writer

	JSON bool // -j
	// Version is sfunnel's version, for JSON metainfo.
	Version string
	Handles bool // -a
	Echo    bool // -e
	Check   bool // -c: verify, change nothing

	// Bare says where rules outside interface blocks go (sfunnel's own
	// ruleset files): `-f FILE --interface IF --hook ingress|egress|both`.
	Bare *BareTarget

	// Monitor streams live events until interrupted (the monitor command;
	// trace for `monitor trace`, the records of traced packets);
	// nil when the backend has none.
	Monitor func(out io.Writer, trace bool) error

	// InterfaceExists reports whether a network interface exists, so rules
	// for a missing one are reported at the name. Nil skips the check.
	InterfaceExists func(name string) bool
}

// BareTarget lists the interfaces and hooks bare rules are added to.
type BareTarget struct {
	Interfaces []string
	Hooks      []grammar.Hook
}

// Run executes cmds as one transaction. Changes are applied to a copy of the
// live ruleset, checked, then committed once; read-only commands (list, …)
// print after the commit, so they show the state the batch produced.
func (s *Session) Run(cmds []*grammar.Command) error {
	if l, ok := s.Backend.(Lister); ok && s.isTextList(cmds) {
		listing, err := l.Listing()
		if err != nil {
			return err
		}
		for _, c := range cmds {
			if err := s.listText(listing, c); err != nil {
				return err
			}
		}
		return nil
	}
	if l, ok := s.Backend.(Locker); ok && !s.Check && hasChanges(cmds) {
		unlock, err := l.Lock()
		if err != nil {
			return err
		}
		defer unlock()
	}
	var live *Ruleset
	var err error
	if f, ok := s.Backend.(Flusher); ok && flushesFirst(cmds) {
		nh, err := f.NextHandle()
		if err != nil {
			return err
		}
		live = &Ruleset{NextHandle: nh}
	} else if o, ok := s.Backend.(Outliner); ok && s.outlineDoes(cmds) {
		if live, err = o.LoadOutline(); err != nil {
			return err
		}
	} else if live, err = s.Backend.Load(); err != nil {
		return err
	}
	work := live.Clone()
	var reads []*grammar.Command
	var added []echoed
	changed := false
	ifaceSpans := map[string]grammar.Span{}
	if s.Bare != nil && hasBare(cmds) {
		// Like sfunnel, which attaches a fresh program on every start, a bare
		// ruleset file replaces the rules of the hooks it is applied to.
		for _, name := range s.Bare.Interfaces {
			if i := work.Interface(name); i != nil {
				for _, h := range s.Bare.Hooks {
					i.setRules(h, nil)
				}
				changed = true
			}
		}
	}
	for _, c := range expandBare(cmds, s.Bare) {
		if c.Kind == grammar.CmdBareRule {
			return errAt(c.Span, "rule outside an interface block: write interface NAME { HOOK { … } }, or apply the file with --interface IF --hook HOOK")
		}
		if isRead(c.Kind) {
			reads = append(reads, c)
			continue
		}
		if c.Kind == grammar.CmdAddRule || c.Kind == grammar.CmdInsertRule || c.Kind == grammar.CmdReplaceRule {
			if _, seen := ifaceSpans[c.Interface]; !seen {
				ifaceSpans[c.Interface] = c.InterfaceSpan
			}
		}
		r, err := work.apply(c)
		if err != nil {
			return err
		}
		changed = true
		if r != nil {
			added = append(added, echoed{c, r})
		}
	}
	if changed {
		work.prune()
		if err := work.validate(); err != nil {
			return err
		}
		if s.InterfaceExists != nil {
			var errs grammar.ErrorList
			for _, i := range work.Interfaces {
				if span, touched := ifaceSpans[i.Name]; touched && !s.InterfaceExists(i.Name) {
					errs = append(errs, errAt(span, "unknown interface %s", i.Name))
				}
			}
			if len(errs) > 0 {
				return errs
			}
		}
		if s.Check {
			if err := s.Backend.Check(work); err != nil {
				return err
			}
		} else if err := s.Backend.Commit(work); err != nil {
			return err
		}
		if s.Echo && !s.Check {
			s.echo(added)
		}
	}
	for _, c := range reads {
		if err := s.read(work, c); err != nil {
			return err
		}
	}
	return nil
}

// flushesFirst reports whether a batch's first command is `flush ruleset`
// (so the live rules are not needed).
func flushesFirst(cmds []*grammar.Command) bool {
	return len(cmds) > 0 && cmds[0].Kind == grammar.CmdFlushRuleset
}

// outlineDoes reports whether the batch needs of the live rules only their
// handles and places (Outliner): rule changes only, nothing that reads or
// prints the rules, nothing checked without committing.
func (s *Session) outlineDoes(cmds []*grammar.Command) bool {
	if s.Check || s.Bare != nil || len(cmds) == 0 {
		return false
	}
	for _, c := range cmds {
		switch c.Kind {
		case grammar.CmdAddRule, grammar.CmdInsertRule, grammar.CmdReplaceRule, grammar.CmdDeleteRule:
		default:
			return false
		}
	}
	return true
}

// hasChanges reports whether a batch changes the ruleset.
func hasChanges(cmds []*grammar.Command) bool {
	for _, c := range cmds {
		if !isRead(c.Kind) {
			return true
		}
	}
	return false
}

func isRead(k grammar.CmdKind) bool {
	switch k {
	case grammar.CmdListRuleset, grammar.CmdListInterface, grammar.CmdListSets, grammar.CmdListSet,
		grammar.CmdResetCounters, grammar.CmdMonitor:
		return true
	}
	return false
}

func hasBare(cmds []*grammar.Command) bool {
	for _, c := range cmds {
		if c.Kind == grammar.CmdBareRule {
			return true
		}
	}
	return false
}

// expandBare turns bare rules into add rule commands for each target.
func expandBare(cmds []*grammar.Command, t *BareTarget) []*grammar.Command {
	if t == nil {
		return cmds
	}
	var out []*grammar.Command
	for _, c := range cmds {
		if c.Kind != grammar.CmdBareRule {
			out = append(out, c)
			continue
		}
		for _, ifc := range t.Interfaces {
			for _, h := range t.Hooks {
				out = append(out, &grammar.Command{Span: c.Span, Kind: grammar.CmdAddRule, Interface: ifc, InterfaceSpan: c.Span, Hook: h, HasHook: true, Rule: c.Rule})
			}
		}
	}
	return out
}

type echoed struct {
	cmd  *grammar.Command
	rule *grammar.Rule
}

// echo prints what the batch added, with the handles it got (-e).
func (s *Session) echo(added []echoed) {
	verbs := map[grammar.CmdKind]string{grammar.CmdAddRule: "add", grammar.CmdInsertRule: "insert", grammar.CmdReplaceRule: "replace"}
	if s.JSON {
		// nft -e -j: one document with a command object per change.
		doc := &nftjson.Document{}
		for _, a := range added {
			doc.Nftables = append(doc.Nftables, nftjson.Object{verbs[a.cmd.Kind]: map[string]any{
				"rule": nftjson.RuleObject(a.cmd.Interface, a.cmd.Hook, a.rule, nil, nil)}})
		}
		if len(doc.Nftables) > 0 {
			data, _ := nftjson.Marshal(doc)
			s.Out.Write(data)
		}
		return
	}
	for _, a := range added {
		if a.cmd.Kind == grammar.CmdReplaceRule {
			fmt.Fprintf(s.Out, "replace rule %s %s handle %d %s\n", a.cmd.Interface, a.cmd.Hook, a.rule.Handle, grammar.FormatRule(a.rule, nil))
			continue
		}
		fmt.Fprintf(s.Out, "%s rule %s %s %s # handle %d\n", verbs[a.cmd.Kind], a.cmd.Interface, a.cmd.Hook, grammar.FormatRule(a.rule, nil), a.rule.Handle)
	}
}

func (s *Session) listOptions() (*ListOptions, error) {
	o := &ListOptions{Handles: s.Handles, Version: s.Version}
	if s.Check {
		return o, nil
	}
	c, err := s.Backend.Counters()
	if err != nil {
		return nil, err
	}
	o.Counters = c
	if la, ok := s.Backend.(LeftAloner); ok {
		if o.LeftAlone, err = la.LeftAlone(); err != nil {
			return nil, err
		}
	}
	return o, nil
}

// warn prints the backend's warnings: as comment lines before a text
// listing, on Err before a JSON one (which has no place for them).
func (s *Session) warn() error {
	w, ok := s.Backend.(Warner)
	if !ok || s.Check {
		return nil
	}
	msgs, err := w.Warnings()
	if err != nil {
		return err
	}
	if n, ok := s.Backend.(Noter); ok && !s.JSON {
		notes, err := n.Notes()
		if err != nil {
			return err
		}
		for _, m := range notes {
			if _, err := fmt.Fprintf(s.Out, "# %s\n", m); err != nil {
				return err
			}
		}
	}
	for _, m := range msgs {
		switch {
		case !s.JSON:
			if _, err := fmt.Fprintf(s.Out, "# warning: %s\n", m); err != nil {
				return err
			}
		case s.Err != nil:
			fmt.Fprintf(s.Err, "Warning: %s\n", m)
		}
	}
	return nil
}

func (s *Session) read(rs *Ruleset, c *grammar.Command) error {
	switch c.Kind {
	case grammar.CmdListRuleset, grammar.CmdListInterface:
		o, err := s.listOptions()
		if err != nil {
			return err
		}
		var only *Selector
		sets := rs.Sets
		if c.Kind == grammar.CmdListInterface {
			if rs.Interface(c.Interface) == nil {
				return errAt(c.InterfaceSpan, "interface %s has no rules", c.Interface)
			}
			only = &Selector{Interface: c.Interface, Hook: c.Hook, HasHook: c.HasHook}
			sets = nil
		}
		auditJSON(rs, only, sets, o)
		if err := s.warn(); err != nil {
			return err
		}
		if s.JSON {
			return WriteJSON(s.Out, rs, only, sets, o)
		}
		return WriteText(s.Out, rs, only, o)
	case grammar.CmdListSets, grammar.CmdListSet:
		sets := rs.Sets
		if c.Kind == grammar.CmdListSet {
			set := rs.Set(c.Set.Name)
			if set == nil {
				return errAt(c.Set.Span, "undefined set %s", c.Set.Name)
			}
			sets = []*grammar.Set{set}
		}
		auditJSON(&Ruleset{}, nil, sets, &ListOptions{Version: s.Version})
		if s.JSON {
			return WriteJSON(s.Out, &Ruleset{}, nil, sets, &ListOptions{Version: s.Version})
		}
		var b strings.Builder
		for i, set := range sets {
			if i > 0 {
				b.WriteByte('\n')
			}
			b.WriteString(grammar.FormatSet(set, ""))
		}
		_, err := io.WriteString(s.Out, b.String())
		return err
	case grammar.CmdResetCounters:
		if s.Check {
			return nil
		}
		var handles []uint64
		if c.Interface != "" {
			i := rs.Interface(c.Interface)
			if i == nil {
				return errAt(c.InterfaceSpan, "interface %s has no rules", c.Interface)
			}
			for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
				if c.HasHook && c.Hook != h {
					continue
				}
				for _, r := range i.Rules(h) {
					handles = append(handles, r.Handle)
				}
			}
			if len(handles) == 0 {
				return nil
			}
		}
		return s.Backend.ResetCounters(handles)
	case grammar.CmdMonitor:
		if s.Monitor == nil || s.Check {
			return ErrMonitorUnsupported
		}
		return s.Monitor(s.Out, c.Trace)
	}
	return nil
}

// isTextList reports whether a batch only lists, in text: then a Lister
// backend prints it from its stored listing without parsing anything.
func (s *Session) isTextList(cmds []*grammar.Command) bool {
	if s.JSON || len(cmds) == 0 || os.Getenv("SFUNNEL_JSON_AUDIT") != "" {
		return false
	}
	for _, c := range cmds {
		switch c.Kind {
		case grammar.CmdListRuleset, grammar.CmdListInterface, grammar.CmdListSets, grammar.CmdListSet:
		default:
			return false
		}
	}
	return true
}

// listText prints a list command in text from a listing.
func (s *Session) listText(l *Listing, c *grammar.Command) error {
	switch c.Kind {
	case grammar.CmdListRuleset, grammar.CmdListInterface:
		var only *Selector
		if c.Kind == grammar.CmdListInterface {
			if l.Interface(c.Interface) == nil {
				return errAt(c.InterfaceSpan, "interface %s has no rules", c.Interface)
			}
			only = &Selector{Interface: c.Interface, Hook: c.Hook, HasHook: c.HasHook}
		}
		o, err := s.listOptions()
		if err != nil {
			return err
		}
		if err := s.warn(); err != nil {
			return err
		}
		return WriteListing(s.Out, l, only, o)
	default: // list sets, list set NAME
		var b strings.Builder
		found := false
		for _, set := range l.Sets {
			if c.Kind == grammar.CmdListSet && set.Name != c.Set.Name {
				continue
			}
			if found {
				b.WriteByte('\n')
			}
			found = true
			b.WriteString(set.Text)
		}
		if c.Kind == grammar.CmdListSet && !found {
			return errAt(c.Set.Span, "undefined set %s", c.Set.Name)
		}
		_, err := io.WriteString(s.Out, b.String())
		return err
	}
}

// ErrMonitorUnsupported is returned by backends without an event stream.
var ErrMonitorUnsupported = errors.New("monitor needs the eBPF datapath's event stream")
