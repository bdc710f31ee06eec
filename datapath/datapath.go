// Package datapath is the ruleset.Backend that makes a ruleset live in the
// kernel: it compiles every hook's rules to eBPF, loads them through the
// verifier, swaps them in atomically, keeps named sets in shared maps that
// change without reloading programs, and reads back what is really attached.
//
// It works in the network namespace of the calling thread: a caller that
// wants another namespace switches to it (on a locked OS thread) first.
package datapath

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/ctmark"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Options configure the backend.
type Options struct {
	// Root is the bpffs state root ("" = bpf.DefaultRoot).
	Root string
	// ForceClsact attaches with clsact + cls_bpf even where tcx works.
	ForceClsact bool
	// Verbose puts full verifier logs into verifier errors.
	Verbose bool
	// CtMarkMask is the mark bits that carry `ct mark` values. 0 keeps the
	// mask of the live ruleset, or compiler.DefaultCtMarkMask when nothing
	// is live.
	CtMarkMask uint32
	// NftTable overrides the name of the nftables table (tests); "" = "sfunnel".
	NftTable string
}

// Backend implements ruleset.Backend on the kernel.
type Backend struct {
	opts Options
	held bool // the writer lock is held (Lock), Commit must not take it again
	// known maps the rules the last Load returned to their stored records.
	known    map[*grammar.Rule]ruleRecord
	byHandle map[uint64]*grammar.Rule // the rules of known by handle
	// read is the state record the last snapshot read (Commit under the
	// same lock does not decode it again).
	read *liveState
	// patched counts the hooks changed by table entries alone (patch.go),
	// without compiling: tests tell the incremental path by it.
	patched int
	// outline holds the placeholder rules of the last LoadOutline (the
	// rules it did not parse) and the state record it read them from.
	outline *outlineRules
	// pre is the state record being read ahead (Prefetch).
	pre *statePrefetch
}

var _ ruleset.Backend = (*Backend)(nil)

// New returns the kernel backend.
func New(opts Options) *Backend {
	return &Backend{opts: opts}
}

// ctMarkMask resolves the mask for a transaction over live state st.
func (b *Backend) ctMarkMask(st *liveState) uint32 {
	switch {
	case b.opts.CtMarkMask != 0:
		return b.opts.CtMarkMask
	case st != nil && st.CtMarkMask != 0:
		return st.CtMarkMask
	}
	return compiler.DefaultCtMarkMask
}

// InterfaceError is a ruleset naming an interface that does not exist in
// the namespace.
type InterfaceError struct {
	Name string
}

func (e *InterfaceError) Error() string { return fmt.Sprintf("interface %s does not exist", e.Name) }

// HookError is a compile or verifier error of one hook's program. Rule is
// the rule the error is about when known (for locating the message), else nil.
type HookError struct {
	Hook bpf.HookID
	Rule *grammar.Rule
	Err  error
}

func (e *HookError) Error() string {
	msg := e.Err.Error()
	if strings.Contains(msg, e.Hook.String()) {
		return msg // verifier and load errors name the hook already
	}
	return fmt.Sprintf("%s: %s", e.Hook, msg)
}
func (e *HookError) Unwrap() error { return e.Err }

func (b *Backend) store() (*bpf.Store, error) {
	return bpf.Open(bpf.Options{Root: b.opts.Root, ForceClsact: b.opts.ForceClsact})
}

// existing opens the namespace's state for reading; nil when there is none.
func (b *Backend) existing() (*bpf.Store, error) {
	return bpf.OpenExisting(bpf.Options{Root: b.opts.Root, ForceClsact: b.opts.ForceClsact})
}

func (b *Backend) table(mask uint32) *ctmark.Table {
	return &ctmark.Table{Name: b.opts.NftTable, Mask: mask}
}

// hookPlan is one hook with rules, compiled.
type hookPlan struct {
	id           bpf.HookID
	ifc          bpf.Interface
	rules        []*grammar.Rule
	prios, slots []uint32
	prog         *compiler.Program
	digest       string
	// spareKnown: the program was loaded with both table generations
	// equal.
	spareKnown bool
}

// compile resolves interfaces and compiles every hook that has rules. seg
// gives the segmentation device of an interface whose egress rules need
// one (wantsSegdev).
//
// Hooks in skip are not compiled (incremental changes, patch.go); old is
// the live state, whose priorities and counter slots rules keep.
func (b *Backend) compile(rs *ruleset.Ruleset, ctMask uint32, seg func(bpf.Interface) (tx, rx int, err error), old *liveState, skip map[bpf.HookID]*hookPatch) ([]*hookPlan, error) {
	sets := make(map[string]*grammar.Set, len(rs.Sets))
	for _, s := range rs.Sets {
		sets[s.Name] = s
	}
	var plans []*hookPlan
	for _, ifc := range rs.Interfaces {
		var info bpf.Interface
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			rules := ifc.Rules(h)
			if len(rules) == 0 {
				continue
			}
			if info.Name == "" {
				var err error
				if info, err = bpf.LookupInterface(ifc.Name); err != nil {
					return nil, err
				}
				if info.Missing {
					return nil, &InterfaceError{Name: ifc.Name}
				}
			}
			id := bpf.HookID{Ifname: ifc.Name, Hook: h}
			if skip[id] != nil {
				continue
			}
			prios, slots := assignSlots(old.hook(id), rules)
			copts := compiler.Options{L3: info.L3, Hook: h, CtMarkMask: ctMask, Prios: prios, Slots: slots}
			if wantsSegdev(info, h, rules) {
				tx, rx, err := seg(info)
				if err != nil {
					return nil, &HookError{Hook: id, Err: err}
				}
				copts.SegIfindex, copts.SegReturnIfindex = tx, rx
			}
			prog, err := compiler.Compile(rules, sets, copts)
			if err != nil {
				return nil, &HookError{Hook: id, Rule: blameCompile(rules, sets, copts), Err: err}
			}
			if len(prog.Handles) > 0 && (prog.Spec.Maps["counters"] == nil ||
				int(prog.Spec.Maps["counters"].MaxEntries) < len(prog.Handles)) {
				return nil, &HookError{Hook: id, Err: errors.New("compiler: counters map smaller than the rule count")}
			}
			plans = append(plans, &hookPlan{id: id, ifc: info, rules: rules, prios: prios, slots: slots, prog: prog, digest: digest(prog.Spec, prog.Handles)})
		}
	}
	return plans, nil
}

// usesCtMark reports whether any rule matches or sets the connection mark.
// Placeholder rules (LoadOutline; outline holds their records) are judged
// by their stored text.
func usesCtMark(rs *ruleset.Ruleset, outline *outlineRules) bool {
	if outline != nil && !outline.st.CtMarkUsed {
		outline = nil // no stored rule uses the mark: no placeholder's text to read
	}
	for _, ifc := range rs.Interfaces {
		for _, rules := range [][]*grammar.Rule{ifc.Ingress, ifc.Egress} {
			for _, r := range rules {
				if r.CtMark != nil || r.SetCtMark != nil {
					return true
				}
				if rec, ok := outline.record(r); ok && strings.Contains(rec.Text, "ct mark") {
					return true
				}
			}
		}
	}
	return false
}

// Check compiles rs and loads every program through the verifier, with
// fresh set maps; nothing is attached, pinned or changed.
func (b *Backend) Check(rs *ruleset.Ruleset) error {
	var live *liveState
	if b.opts.CtMarkMask == 0 {
		// The live mask, if one can be read; Check must not create state.
		_, _, live, _ = b.snapshot()
	}
	plans, err := b.compile(rs, b.ctMarkMask(live), checkSegdev, nil, nil)
	if err != nil {
		return err
	}
	for _, p := range plans {
		coll, err := bpf.LoadCollection(p.prog.Spec, bpf.LoadOptions{What: p.id.String(), Verbose: b.opts.Verbose})
		if err != nil {
			return p.loadError(err)
		}
		coll.Close()
	}
	return nil
}

func setsByName(rs *ruleset.Ruleset) map[string]*grammar.Set {
	m := make(map[string]*grammar.Set, len(rs.Sets))
	for _, s := range rs.Sets {
		m[s.Name] = s
	}
	return m
}

// loadError wraps an error loading p's program, naming the rule the
// verifier stopped in when it can tell.
func (p *hookPlan) loadError(err error) error {
	var insns asm.Instructions
	if ps := p.prog.Spec.Programs[bpf.ProgramName]; ps != nil {
		insns = ps.Instructions
	}
	return &HookError{Hook: p.id, Rule: ruleOf(err, p.rules, insns), Err: err}
}
