package datapath

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// setPlan is a named set's map for a transaction: the pinned one (its
// elements synced in place) or a fresh one (pinned after the swap).
type setPlan struct {
	spec  *ebpf.MapSpec
	m     *ebpf.Map
	fresh bool
}

// Commit makes rs live as one transaction. Everything is compiled and
// loaded through the verifier first; only then are set elements synced and
// programs swapped. Hooks whose program did not change are left alone, so
// `add element` reloads nothing.
func (b *Backend) Commit(rs *ruleset.Ruleset) error {
	s, err := b.store()
	if err != nil {
		return err
	}
	unlock, err := s.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	old, err := readState(s)
	if err != nil {
		old = nil // unreadable: every pinned hook is replaced or detached
	}
	ctMask := b.ctMarkMask(old)
	seg := &segdevs{verbose: b.opts.Verbose}
	committed := false
	defer func() {
		if !committed {
			seg.undo()
		}
	}()
	plans, err := b.compile(rs, ctMask, seg.ensure)
	if err != nil {
		return err
	}

	// Sets.
	sets := map[string]*setPlan{}
	defer func() {
		for _, sp := range sets {
			sp.m.Close()
		}
	}()
	for _, set := range rs.Sets {
		spec := compiler.SetMap(set)
		pinned, err := s.SetMap(set.Name)
		if err != nil {
			return err
		}
		if pinned != nil && bpf.SetMapFits(pinned, spec) {
			sets[set.Name] = &setPlan{spec: spec, m: pinned}
			continue
		}
		if pinned != nil {
			pinned.Close()
		}
		m, err := bpf.NewSetMap(spec)
		if err != nil {
			return err
		}
		sets[set.Name] = &setPlan{spec: spec, m: m, fresh: true}
	}

	// Programs: load every changed one before touching anything live.
	var updates []bpf.Update
	defer func() {
		for _, u := range updates {
			if u.Coll != nil {
				u.Coll.Close()
			}
		}
	}()
	next := &liveState{CtMarkMask: ctMask, Ruleset: rs}
	keep := map[bpf.HookID]bool{}
	for _, p := range plans {
		d := digest(p.prog.Spec, p.prog.Handles)
		oh := old.hook(p.id)
		hs := hookState{
			Ifname: p.id.Ifname, Hook: p.id.Hook, Handles: p.prog.Handles, Digest: d, Sets: p.prog.NamedSets,
		}
		keep[p.id] = true
		if oh != nil && oh.Digest == d && !usesFreshSet(p.prog.NamedSets, sets) && b.isLive(s, p.id) {
			hs.Base = oh.Base
			next.Hooks = append(next.Hooks, hs)
			continue
		}
		next.Hooks = append(next.Hooks, hs)
		spec := p.prog.Spec.Copy()
		repl := map[string]*ebpf.Map{}
		for _, name := range p.prog.NamedSets {
			sp := sets[name]
			if sp == nil {
				return &HookError{Hook: p.id, Err: fmt.Errorf("set @%s is not defined", name)}
			}
			ms := spec.Maps["set_"+name]
			if ms == nil {
				return &HookError{Hook: p.id, Err: fmt.Errorf("compiler: no map for set @%s", name)}
			}
			ms.MaxEntries = sp.m.MaxEntries() // a reused map may be larger
			ms.Contents = nil
			repl["set_"+name] = sp.m
		}
		coll, err := bpf.LoadCollection(spec, bpf.LoadOptions{What: p.id.String(), Maps: repl, Verbose: b.opts.Verbose})
		if err != nil {
			return p.loadError(err)
		}
		updates = append(updates, bpf.Update{HookID: p.id, Ifindex: p.ifc.Index, Coll: coll})
	}
	// Segmentation devices' return programs, attached before the hooks
	// that redirect to them.
	returns, err := seg.updates()
	if err != nil {
		return err
	}
	for _, u := range returns {
		keep[u.HookID] = true
	}
	updates = append(returns, updates...)
	// Hooks that no longer have rules.
	pinned, err := s.PinnedHooks()
	if err != nil {
		return err
	}
	if old != nil {
		for _, h := range old.Hooks {
			pinned = append(pinned, h.id())
		}
	}
	for _, id := range pinned {
		if !keep[id] {
			keep[id] = true
			updates = append(updates, bpf.Update{HookID: id})
		}
	}

	// The connmark table must be there before rules that use ct mark run.
	table := b.table(ctMask)
	needTable := usesCtMark(rs)
	hadTable := false
	if needTable {
		if hadTable, err = table.Exists(); err != nil {
			return err
		}
		if err := table.Ensure(); err != nil {
			return err
		}
	}
	undoTable := func() {
		if needTable && !hadTable {
			table.Remove()
		}
	}

	// Live changes from here on.
	var synced []string
	undoSets := func() {
		for _, name := range synced {
			if set := setOf(old, name); set != nil {
				bpf.SyncSet(sets[name].m, compiler.SetMap(set))
			}
		}
	}
	for _, set := range rs.Sets {
		sp := sets[set.Name]
		if sp.fresh {
			continue
		}
		synced = append(synced, set.Name)
		if err := bpf.SyncSet(sp.m, sp.spec); err != nil {
			undoSets()
			undoTable()
			return err
		}
	}
	// Counters of surviving rules: what the replaced program counted, read
	// once it no longer runs, becomes part of the new program's base.
	retire := func(l *bpf.Live) {
		oh, nh := old.hook(l.HookID), next.hook(l.HookID)
		if oh == nil || nh == nil || l.Counters() == nil {
			return
		}
		cs, err := bpf.ReadCounters(l.Counters())
		if err != nil {
			return
		}
		live := map[uint64]bool{}
		for _, h := range nh.Handles {
			live[h] = true
		}
		nh.Base = map[uint64]ruleset.Counter{}
		for i, h := range oh.Handles {
			if !live[h] || h == 0 || i >= len(cs) {
				continue
			}
			c := oh.Base[h]
			c.Packets += cs[i].Packets
			c.Bytes += cs[i].Bytes
			nh.Base[h] = c
		}
	}
	if err := s.Swap(updates, retire); err != nil {
		undoSets()
		undoTable()
		return err
	}

	// Committed. What follows only tidies up and records.
	committed = true
	var errs []error
	errs = append(errs, removeSegdevsExcept(seg.keep()))
	names := map[string]bool{}
	for _, set := range rs.Sets {
		names[set.Name] = true
		if sp := sets[set.Name]; sp.fresh {
			errs = append(errs, s.PinSet(set.Name, sp.m))
		}
	}
	errs = append(errs, s.UnpinSetsExcept(names))
	if !needTable {
		errs = append(errs, table.Remove())
	}
	errs = append(errs, writeState(s, next))
	s.CollectGarbage() // dead namespaces' pins; best effort
	return errors.Join(errs...)
}

func usesFreshSet(names []string, sets map[string]*setPlan) bool {
	for _, n := range names {
		if sp := sets[n]; sp != nil && sp.fresh {
			return true
		}
	}
	return false
}

func (b *Backend) isLive(s *bpf.Store, id bpf.HookID) bool {
	l, err := s.Live(id)
	if err != nil || l == nil {
		return false
	}
	l.Close()
	return true
}

func setOf(st *liveState, name string) *grammar.Set {
	if st == nil || st.Ruleset == nil {
		return nil
	}
	for _, s := range st.Ruleset.Sets {
		if s.Name == name {
			return s
		}
	}
	return nil
}

// Load returns the live ruleset: what was committed, minus the hooks whose
// program is no longer attached (interface deleted, filter removed by hand).
func (b *Backend) Load() (*ruleset.Ruleset, error) {
	s, err := b.existing()
	if err != nil || s == nil {
		return &ruleset.Ruleset{}, err
	}
	st, err := readState(s)
	if err != nil {
		return nil, err
	}
	if st == nil || st.Ruleset == nil {
		return &ruleset.Ruleset{}, nil
	}
	rs := st.Ruleset
	for _, h := range st.Hooks {
		if b.isLive(s, h.id()) {
			continue
		}
		for _, ifc := range rs.Interfaces {
			if ifc.Name == h.Ifname {
				if h.Hook == grammar.HookEgress {
					ifc.Egress = nil
				} else {
					ifc.Ingress = nil
				}
			}
		}
	}
	// An interface whose hooks all went away is gone; one committed
	// without rules stays as it was.
	kept := rs.Interfaces[:0]
	for _, ifc := range rs.Interfaces {
		if len(ifc.Ingress)+len(ifc.Egress) > 0 || st.hook(bpf.HookID{Ifname: ifc.Name, Hook: grammar.HookIngress}) == nil &&
			st.hook(bpf.HookID{Ifname: ifc.Name, Hook: grammar.HookEgress}) == nil {
			kept = append(kept, ifc)
		}
	}
	rs.Interfaces = kept
	return rs, nil
}

// Counters returns the counters of the live rules by handle.
func (b *Backend) Counters() (map[uint64]ruleset.Counter, error) {
	out := map[uint64]ruleset.Counter{}
	s, err := b.existing()
	if err != nil || s == nil {
		return out, err
	}
	st, err := readState(s)
	if err != nil || st == nil {
		return out, err
	}
	err = b.eachLiveCounters(s, st, func(h *hookState, m *ebpf.Map) error {
		cs, err := bpf.ReadCounters(m)
		if err != nil {
			return err
		}
		for i, handle := range h.Handles {
			if i < len(cs) {
				base := h.Base[handle]
				out[handle] = ruleset.Counter{Packets: base.Packets + cs[i].Packets, Bytes: base.Bytes + cs[i].Bytes}
			}
		}
		return nil
	})
	return out, err
}

// ResetCounters zeroes the counters of the given handles (all if nil).
func (b *Backend) ResetCounters(handles []uint64) error {
	s, err := b.existing()
	if err != nil || s == nil {
		return err
	}
	unlock, err := s.Lock()
	if err != nil {
		return err
	}
	defer unlock()
	want := map[uint64]bool{}
	for _, h := range handles {
		want[h] = true
	}
	st, err := readState(s)
	if err != nil || st == nil {
		return err
	}
	rebased := false
	for i := range st.Hooks {
		h := &st.Hooks[i]
		for handle := range h.Base {
			if handles == nil || want[handle] {
				delete(h.Base, handle)
				rebased = true
			}
		}
	}
	// The base first: a failure after it leaves counters too low, never
	// resurrects old counts.
	if rebased {
		if err := writeState(s, st); err != nil {
			return err
		}
	}
	return b.eachLiveCounters(s, st, func(h *hookState, m *ebpf.Map) error {
		if handles == nil {
			return bpf.ZeroCounters(m, nil)
		}
		idx := []int{}
		for i, handle := range h.Handles {
			if want[handle] {
				idx = append(idx, i)
			}
		}
		return bpf.ZeroCounters(m, idx)
	})
}

func (b *Backend) eachLiveCounters(s *bpf.Store, st *liveState, f func(*hookState, *ebpf.Map) error) error {
	for i := range st.Hooks {
		h := &st.Hooks[i]
		l, err := s.Live(h.id())
		if err != nil {
			return err
		}
		if l == nil {
			continue
		}
		if l.Counters() != nil {
			err = f(h, l.Counters())
		}
		l.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", h.id(), err)
		}
	}
	return nil
}
