package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// monitorInterval is how often the kernel's state and event counters are read.
const monitorInterval = 250 * time.Millisecond

// monitorEvent is one line of `sfunnel monitor` (and its -j form).
type monitorEvent struct {
	// Event is a datapath event name (stats), "program", "add"/"delete"
	// (a rule appeared in or left the ruleset), "add set"/"delete set",
	// "add element"/"delete element", or "warning"/"resolved" (the kernel
	// no longer holds what was committed, or holds it again).
	Event     string   `json:"event"`
	Interface string   `json:"interface,omitempty"`
	Hook      string   `json:"hook,omitempty"`
	Count     uint64   `json:"count,omitempty"`  // new events since the last line
	Handle    uint64   `json:"handle,omitempty"` // the rule, for per-rule events
	Program   uint32   `json:"program,omitempty"`
	Mode      string   `json:"mode,omitempty"`
	Rule      string   `json:"rule,omitempty"`     // add: the rule's text
	Message   string   `json:"message,omitempty"`  // warning, resolved
	Set       string   `json:"set,omitempty"`      // add/delete set/element
	Elements  []string `json:"elements,omitempty"` // add/delete element
}

func (e monitorEvent) String() string {
	switch e.Event {
	case "add":
		return fmt.Sprintf("add rule %s %s %s # handle %d", e.Interface, e.Hook, e.Rule, e.Handle)
	case "delete":
		return fmt.Sprintf("delete rule %s %s handle %d", e.Interface, e.Hook, e.Handle)
	case "warning", "resolved":
		return fmt.Sprintf("# %s: %s", e.Event, e.Message)
	case "add set", "delete set":
		return e.Event + " " + e.Set
	case "add element", "delete element":
		return fmt.Sprintf("%s %s { %s }", e.Event, e.Set, strings.Join(e.Elements, ", "))
	}
	s := fmt.Sprintf("%s %s %s", e.Interface, e.Hook, e.Event)
	if e.Event == "program" {
		return s + fmt.Sprintf(" %d (%s)", e.Program, e.Mode)
	}
	s += fmt.Sprintf(" +%d", e.Count)
	if e.Handle != 0 {
		s += fmt.Sprintf(" # handle %d", e.Handle)
	}
	return s
}

// monitor prints what changes in the kernel until SIGINT/SIGTERM, as
// `nft monitor` does: rules added and deleted (by anyone), hooks detached
// from outside and sfunnel's nftables table flushed (as warnings, and when
// they are repaired), programs attached or replaced, and growth of the
// event counters (MTU exceeded per rule, invalid unfunnels, fragments
// passed, …).
func (a *app) monitor(b *datapath.Backend) func(out io.Writer, trace bool) error {
	return func(out io.Writer, trace bool) error {
		// The lock is for transactions; monitoring must not hold off others.
		a.release()
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		if trace {
			return a.monitorTrace(ctx, b, out)
		}
		p := &poller{b: b}
		if _, err := p.poll(); err != nil { // the baseline
			return err
		}
		tick := time.NewTicker(monitorInterval)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-tick.C:
			}
			events, err := p.poll()
			if err != nil {
				return err
			}
			for _, e := range events {
				a.printEvent(out, e)
			}
		}
	}
}

// printEvent prints one line of monitor: e's text, or its JSON with -j,
// flushed at once (monitor output is read as it comes).
func (a *app) printEvent(out io.Writer, e fmt.Stringer) {
	if a.opts.json {
		data, _ := json.Marshal(e)
		fmt.Fprintf(out, "%s\n", data)
	} else {
		fmt.Fprintln(out, e)
	}
	if f, ok := out.(interface{ Sync() error }); ok {
		f.Sync()
	}
}

// poller remembers what the kernel held at the last poll.
type poller struct {
	b        *datapath.Backend
	started  bool
	gen      uint64              // commit generation of rules and sets
	hooks    int                 // live hooks
	sets     map[string][]string // set → its elements, as printed
	counts   map[string]uint64   // "IF HOOK event" and "IF HOOK mtu HANDLE" → count
	progs    map[string]uint32   // "IF HOOK" → program id
	rules    map[ruleKey]string  // live rules → their text
	warnings map[string]struct{} // current warnings
}

type ruleKey struct {
	ifname string
	hook   grammar.Hook
	handle uint64
}

// poll returns what changed since the last poll (nothing the first time).
func (p *poller) poll() ([]monitorEvent, error) {
	var events []monitorEvent
	report := p.started
	emit := func(e monitorEvent) {
		if report {
			events = append(events, e)
		}
	}

	// Rules and sets: the ruleset as the kernel holds it, read again when
	// a commit made a new generation (or a hook went away: Load drops it).
	gen, err := p.b.Generation()
	if err != nil {
		return nil, err
	}
	status, err := p.b.Status()
	if err != nil {
		return nil, err
	}
	if !p.started || gen != p.gen || len(status) != p.hooks {
		p.gen, p.hooks = gen, len(status)
		rs, err := p.b.Load()
		if err != nil {
			return nil, err
		}
		p.diffRuleset(rs, emit)
	}

	// Warnings: detached hooks, a flushed nftables table.
	msgs, err := p.b.Warnings()
	if err != nil {
		return nil, err
	}
	warnings := map[string]struct{}{}
	for _, m := range msgs {
		warnings[m] = struct{}{}
		if _, ok := p.warnings[m]; !ok {
			emit(monitorEvent{Event: "warning", Message: m})
		}
	}
	old := make([]string, 0, len(p.warnings))
	for m := range p.warnings {
		if _, ok := warnings[m]; !ok {
			old = append(old, m)
		}
	}
	sort.Strings(old)
	for _, m := range old {
		emit(monitorEvent{Event: "resolved", Message: m})
	}
	p.warnings = warnings

	// Programs and event counters.
	if p.counts == nil {
		p.counts, p.progs = map[string]uint64{}, map[string]uint32{}
	}
	for _, h := range status {
		id := h.Ifname + " " + h.Hook.String()
		if prev, ok := p.progs[id]; !ok || prev != uint32(h.ProgID) {
			p.progs[id] = uint32(h.ProgID)
			emit(monitorEvent{Event: "program", Interface: h.Ifname, Hook: h.Hook.String(), Program: uint32(h.ProgID), Mode: string(h.Mode)})
		}
		names := make([]string, 0, len(h.Stats))
		for n := range h.Stats {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			k := id + " " + n
			if v := h.Stats[n]; v != p.counts[k] {
				// mtu-exceeded is reported per rule below.
				if v > p.counts[k] && n != "mtu-exceeded" {
					emit(monitorEvent{Event: n, Interface: h.Ifname, Hook: h.Hook.String(), Count: v - p.counts[k]})
				}
				p.counts[k] = v
			}
		}
		handles := make([]uint64, 0, len(h.MTUExceeded))
		for hd := range h.MTUExceeded {
			handles = append(handles, hd)
		}
		sort.Slice(handles, func(i, j int) bool { return handles[i] < handles[j] })
		for _, hd := range handles {
			k := fmt.Sprintf("%s mtu %d", id, hd)
			if v := h.MTUExceeded[hd]; v != p.counts[k] {
				if v > p.counts[k] {
					emit(monitorEvent{Event: "mtu-exceeded", Interface: h.Ifname, Hook: h.Hook.String(), Count: v - p.counts[k], Handle: hd})
				}
				p.counts[k] = v
			}
		}
	}
	p.started = true
	return events, nil
}

// diffRuleset emits the rules and set elements that appeared or went.
func (p *poller) diffRuleset(rs *ruleset.Ruleset, emit func(monitorEvent)) {
	sets := map[string][]string{}
	for _, set := range rs.Sets {
		var elems []string
		for _, pf := range set.Prefixes {
			elems = append(elems, grammar.FormatPrefixes([]netip.Prefix{pf}))
		}
		for _, r := range set.Ports {
			elems = append(elems, grammar.FormatRanges([]grammar.PortRange{r}))
		}
		sets[set.Name] = elems
	}
	names := make([]string, 0, len(sets)+len(p.sets))
	for n := range sets {
		names = append(names, n)
	}
	for n := range p.sets {
		if _, ok := sets[n]; !ok {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for _, n := range names {
		now, ok := sets[n]
		before, had := p.sets[n]
		if !had && ok {
			emit(monitorEvent{Event: "add set", Set: n})
		}
		if added := minus(now, before); len(added) > 0 {
			emit(monitorEvent{Event: "add element", Set: n, Elements: added})
		}
		if gone := minus(before, now); len(gone) > 0 && ok {
			emit(monitorEvent{Event: "delete element", Set: n, Elements: gone})
		}
		if had && !ok {
			emit(monitorEvent{Event: "delete set", Set: n})
		}
	}
	p.sets = sets

	rules := map[ruleKey]string{}
	for _, ifc := range rs.Interfaces {
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			for _, r := range ifc.Rules(h) {
				rules[ruleKey{ifc.Name, h, r.Handle}] = grammar.FormatRule(r, nil)
			}
		}
	}
	for _, k := range sortedKeys(p.rules) {
		if text, ok := rules[k]; !ok || text != p.rules[k] {
			emit(monitorEvent{Event: "delete", Interface: k.ifname, Hook: k.hook.String(), Handle: k.handle})
		}
	}
	for _, k := range sortedKeys(rules) {
		if text, ok := p.rules[k]; !ok || text != rules[k] {
			emit(monitorEvent{Event: "add", Interface: k.ifname, Hook: k.hook.String(), Handle: k.handle, Rule: rules[k]})
		}
	}
	p.rules = rules
}

// minus returns the elements of a not in b, in a's order.
func minus(a, b []string) []string {
	in := make(map[string]bool, len(b))
	for _, x := range b {
		in[x] = true
	}
	var out []string
	for _, x := range a {
		if !in[x] {
			out = append(out, x)
		}
	}
	return out
}

func sortedKeys(m map[ruleKey]string) []ruleKey {
	keys := make([]ruleKey, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		a, b := keys[i], keys[j]
		if a.ifname != b.ifname {
			return a.ifname < b.ifname
		}
		if a.hook != b.hook {
			return a.hook < b.hook
		}
		return a.handle < b.handle
	})
	return keys
}
