package datapath

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/faults"
	"github.com/sfunnel/sfunnel/ruleset"
)

// The commit protocol. A process killed at any instant of a commit must
// leave a state that the next sfunnel command turns into exactly the old or
// exactly the new ruleset, on every hook, with `list` showing what runs.
//
//  1. Prepare, under the namespace's writer lock, changing nothing live:
//     compile, load every changed program through the verifier, and build
//     a new generation directory gen-M holding every hook's program and
//     maps (unchanged hooks pin their running objects again), every named
//     set's map, and the state record. A crash here leaves an orphan
//     directory that the next writer removes: the old ruleset stays.
//  2. Commit point: the symlink "next" is pointed at gen-M (one rename).
//     From here on the transaction is rolled forward by whoever holds the
//     lock next, if this process dies.
//  3. Roll forward, every step idempotent: swap new elements maps into
//     the set maps shared with the old generation (a set whose elements
//     change in a transaction that also changes the rules of a hook
//     reading it gets a fresh set map instead, which only the new
//     programs read: rulesChangeWith); make every hook's attach point
//     run gen-M's program (tcx link update or cls_bpf replace, atomic per
//     hook); detach hooks gen-M does not have; carry counters of replaced
//     programs into gen-M's state record.
//  4. Publish: the symlink "current" is pointed at gen-M (one rename; the
//     switch point for readers), "next" removed, older generations removed.
//
// Readers take no lock: they read the generation "current" points at, whose
// objects never change. A reader that finds "next" and can take the lock
// (its writer died) rolls the commit forward first, so it reports what the
// kernel runs. While a writer is alive between steps 2 and 4, readers see
// the previous generation; packets may meet the new program on one hook
// and the old one on another until the writer is done (per-hook link
// updates are atomic; across hooks only the end state is).
//
// A set's elements change with one update of its set map (step 3), so a
// packet sees all the elements of an `add element` or none; programs are
// not reloaded for that. (Set maps of the layout before elements maps,
// still live after an upgrade, change element by element until the next
// commit that rebuilds them.)

// setPlan is a named set's map for a transaction: the one of the current
// generation (its elements synced in place) or a fresh one.
type setPlan struct {
	m     *ebpf.Map
	fresh bool
}

// Lock takes the namespace's writer lock for a batch that reads the live
// ruleset and then commits (ruleset.Locker): Commit and ResetCounters called
// meanwhile use it instead of taking it again.
func (b *Backend) Lock() (func(), error) {
	s, err := b.store()
	if err != nil {
		return nil, err
	}
	unlock, err := s.Lock()
	if err != nil {
		return nil, err
	}
	b.held = true
	return func() { b.held = false; unlock() }, nil
}

func (b *Backend) writeLock(s *bpf.Store) (func(), error) {
	if b.held {
		return func() {}, nil
	}
	return s.Lock()
}

// Commit makes rs live as one transaction (see the protocol above). Hooks
// whose program did not change are left alone, so `add element` reloads
// nothing.
func (b *Backend) Commit(rs *ruleset.Ruleset) error {
	s, err := b.store()
	if err != nil {
		return err
	}
	unlock, err := b.writeLock(s)
	if err != nil {
		return err
	}
	defer unlock()
	if err := b.recover(s); err != nil {
		return err
	}
	cur, err := s.Current()
	if err != nil {
		return err
	}
	old := b.read
	if old == nil || cur == nil || old.Generation != cur.N || !b.held {
		if old, err = readGenState(cur); err != nil {
			old = nil // unreadable: every hook is replaced or detached
		}
	}
	b.read = nil
	defer func() { b.outline = nil }()
	if err := b.outlineBefore(rs, old); err != nil {
		return err
	}
	ctMask := b.ctMarkMask(old)
	dirty := s.TablesDirty()
	seg := &segdevs{verbose: b.opts.Verbose}
	segKept := false
	defer func() {
		if !segKept {
			seg.undo() // devices this transaction created
		}
	}()

	g, err := s.NewGen()
	if err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			s.RemoveGen(g)
		}
	}()

	// Sets: the current generation's outer map when it fits (programs
	// keep it), else a fresh one; the elements map of the current
	// generation when the elements did not change, else a new one, which
	// roll-forward swaps in with one update (atomic for packets).
	sets := map[string]*setPlan{}
	defer func() {
		for _, sp := range sets {
			sp.m.Close()
		}
	}()
	oldSets := map[string]string{}
	if old != nil {
		for _, sr := range old.Sets {
			oldSets[sr.Name] = sr.Text
		}
	}
	for _, set := range rs.Sets {
		outer := compiler.SetOuter(set)
		outer.Contents = nil
		var pinned, elems *ebpf.Map
		if cur != nil {
			if pinned, err = cur.SetMap(set.Name); err != nil {
				return err
			}
		}
		sp := &setPlan{m: pinned}
		sets[set.Name] = sp
		t, ok := oldSets[set.Name]
		same := ok && t == grammar.FormatSet(set, "")
		if pinned == nil || !bpf.SetMapFits(pinned, outer) || !same && b.rulesChangeWith(set.Name, old, rs) {
			if pinned != nil {
				pinned.Close()
			}
			if sp.m, err = bpf.NewSetMap(outer); err != nil {
				return err
			}
			sp.fresh = true
		} else if same {
			if elems, err = cur.SetElements(set.Name); err != nil {
				return err
			}
		}
		if elems == nil {
			if elems, err = bpf.NewSetElements(compiler.SetMap(set)); err != nil {
				return err
			}
		}
		if sp.fresh {
			err = sp.m.Put(uint32(0), elems)
		}
		if err == nil {
			err = g.PinSetElements(set.Name, elems)
		}
		elems.Close()
		if err == nil {
			err = g.PinSet(set.Name, sp.m)
		}
		if err != nil {
			return err
		}
	}

	// Hooks whose change is table entries of the running program only
	// (patch.go): no compilation.
	patches := map[bpf.HookID]*hookPatch{}
	for _, ifc := range rs.Interfaces {
		for _, hk := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			id := bpf.HookID{Ifname: ifc.Name, Hook: hk}
			oh := old.hook(id)
			if oh == nil || len(ifc.Rules(hk)) == 0 || usesFreshSet(oh.Sets, sets) || !b.attached(s, id) {
				continue
			}
			// Rules that need the segmentation device keep it (and its
			// return program) through seg, as compile does.
			var segOf func() (int, int, error)
			if hk == grammar.HookEgress && compiler.NeedsSegmentation(ifc.Rules(hk)) {
				name := ifc.Name
				segOf = func() (int, int, error) {
					info, err := bpf.LookupInterface(name)
					if err != nil || info.Missing || !wantsSegdev(info, hk, ifc.Rules(hk)) {
						return 0, 0, err
					}
					return seg.ensure(info)
				}
			}
			p, err := b.patchHook(s, cur, oh, rs, ifc.Rules(hk), ctMask, dirty, segOf)
			if err != nil {
				return err
			}
			if p != nil {
				patches[id] = p
			}
		}
	}
	if err := b.outlineCompiled(rs, patches); err != nil {
		return err
	}
	plans, err := b.compile(rs, ctMask, seg.ensure, old, patches)
	if err != nil {
		return err
	}

	// Programs: unchanged ones pinned again (their rule tables rewritten
	// when only those changed), changed ones loaded.
	tables := map[bpf.HookID]*tableUpdate{}
	kept := map[bpf.HookID]uint32{} // table generation of kept programs
	for id := range patches {
		h, err := cur.Hook(id)
		if err != nil {
			return err
		}
		err = g.PinHook(id, h.Prog, h.Maps)
		h.Close()
		if err != nil {
			return err
		}
	}
	for _, p := range plans {
		if oh := old.hook(p.id); oh != nil && !usesFreshSet(p.prog.NamedSets, sets) && b.attached(s, p.id) {
			same := oh.Digest == p.digest
			tablesOnly := !same && len(p.prog.Tables) > 0 && oh.ProgDigest == progDigest(p.prog) &&
				slotsCompatible(oh.CounterHandles, p.prog.Handles)
			h, err := cur.Hook(p.id)
			if err != nil {
				return err
			}
			if h != nil && (same || tablesOnly) {
				var tu *tableUpdate
				if tablesOnly {
					// A failure leaves entries the program does not read;
					// the hook is then reloaded instead.
					if err = s.MarkTablesDirty(); err == nil {
						tu, err = prepareTables(h, p.prog, oh.CounterHandles)
					}
				}
				if err == nil {
					err = g.PinHook(p.id, h.Prog, h.Maps)
					h.Close()
					if err != nil {
						return err
					}
					kept[p.id] = oh.TableGen
					if tu != nil {
						tables[p.id] = tu
					}
					continue
				}
			}
			if h != nil {
				h.Close()
			}
		}
		spec := p.prog.Spec.Copy()
		repl := map[string]*ebpf.Map{}
		for _, name := range p.prog.NamedSets {
			sp := sets[name]
			if sp == nil {
				return &HookError{Hook: p.id, Err: fmt.Errorf("set @%s is not defined", name)}
			}
			ms := spec.Maps[bpf.SetMapPrefix+name]
			if ms == nil {
				return &HookError{Hook: p.id, Err: fmt.Errorf("compiler: no map for set @%s", name)}
			}
			ms.MaxEntries = sp.m.MaxEntries() // a reused map may be larger
			ms.Contents = nil
			repl[bpf.SetMapPrefix+name] = sp.m
			delete(spec.Maps, bpf.SetMapPrefix+name+abi.SetElements) // the set's own
		}
		coll, err := bpf.LoadCollection(spec, bpf.LoadOptions{What: p.id.String(), Maps: repl, Verbose: b.opts.Verbose})
		if err != nil {
			return p.loadError(err)
		}
		// The spare table generation starts equal to the live one, so
		// the next change of a rule writes that rule's entries only.
		if err = prefillSpare(coll.Maps, p.prog); err == nil {
			p.spareKnown = true
			err = g.PinHook(p.id, coll.Programs[bpf.ProgramName], coll.Maps)
		}
		coll.Close()
		if err != nil {
			return err
		}
	}

	// Segmentation devices' return programs: hooks of sfunnel's own.
	aux, err := seg.updates()
	if err != nil {
		return err
	}
	next := stateOf(rs, ctMask, plans, b.recordOf, patches)
	next.CtMarkUsed = usesCtMark(rs, b.outline)
	next.Generation = g.N
	for i, a := range aux {
		err := g.PinHook(a.id, a.coll.Programs[bpf.ProgramName], a.coll.Maps)
		if err != nil {
			for _, a := range aux[i:] {
				a.coll.Close()
			}
			return err
		}
		a.coll.Close()
		next.Aux = append(next.Aux, auxRecord{Interface: a.id.Ifname, Hook: a.id.Hook.String()})
	}
	for _, h := range next.hooks() {
		base := map[uint64]ruleset.Counter{}
		oh := old.hook(h.id())
		if oh != nil {
			base = oh.base() // final for kept programs; replaced ones add their counts in rollForward
		}
		if gen, ok := kept[h.id()]; ok {
			h.TableGen = gen
			if oh != nil && !dirty {
				h.Spare = oh.Spare // tables untouched
			}
		}
		if tu := tables[h.id()]; tu != nil {
			h.TableGen = tu.gen
			h.Spare = nil
		}
		h.setBase(base)
	}
	if err := writeGenState(g, next); err != nil {
		return err
	}
	// The connmark table must be there before rules that use ct mark run.
	if next.CtMarkUsed {
		if err := b.table(ctMask).Ensure(); err != nil {
			return err
		}
	}
	faults.Point("prepared")

	if err := s.MarkPending(g); err != nil {
		return err
	}
	committed, segKept = true, true
	if err := b.rollForward(s, cur, g, next, old); err != nil {
		if rerr := b.rollBack(s, cur, g); rerr != nil {
			return fmt.Errorf("%w (undoing it failed too, the next command retries: %v)", err, rerr)
		}
		return err
	}
	return nil
}

// recover finishes or undoes what an interrupted commit left: a pending
// generation is rolled forward (or, if that fails, back), orphans removed.
// The caller holds the writer lock.
func (b *Backend) recover(s *bpf.Store) error {
	if err := b.migrate(s); err != nil {
		return fmt.Errorf("adopt the state of an older sfunnel: %w", err)
	}
	pend, err := s.Pending()
	if err != nil {
		return err
	}
	if pend != nil {
		cur, err := s.Current()
		if err != nil {
			return err
		}
		if err := b.rollForward(s, cur, pend, nil, nil); err != nil {
			if rerr := b.rollBack(s, cur, pend); rerr != nil {
				return fmt.Errorf("finish an interrupted commit: %w; undo it: %v", err, rerr)
			}
		}
	}
	return s.Prune()
}

// rollForward makes generation g live and publishes it (steps 3 and 4).
// It can read everything it needs from the pinned state, so a process that
// did not prepare g can run it.
//
// st and old are g's and cur's state records when the caller has them (nil:
// read them from the pins).
func (b *Backend) rollForward(s *bpf.Store, cur, g *bpf.Gen, st, old *liveState) error {
	if st == nil {
		var err error
		if st, err = readGenState(g); err != nil {
			return err
		}
		if st == nil {
			return fmt.Errorf("generation %d has no state record", g.N)
		}
		if cur != nil {
			old, _ = readGenState(cur)
		}
	}
	if err := syncSets(st, g, cur); err != nil {
		return err
	}
	if err := runHooks(s, st, g); err != nil {
		return err
	}
	if err := switchTables(st, g); err != nil {
		return err
	}
	// Counters the replaced programs counted: final now that they stopped.
	// (A kept program's bases were settled when g was prepared.)
	rebased := false
	for _, h := range st.hooks() {
		oh := old.hook(h.id())
		if oh == nil {
			continue
		}
		if !sharesHandles(oh, h) {
			continue // no rule of the old program lives on (flush ruleset): nothing to carry
		}
		base := oh.base()
		replaced, err := addReplacedCounts(base, oh, cur, g)
		if err != nil {
			return err
		}
		if replaced {
			h.setBase(base)
			rebased = true
		}
	}
	if rebased {
		if err := writeGenState(g, st); err != nil {
			return err
		}
	}
	if err := s.Publish(g); err != nil {
		return err
	}
	// g's record was made knowing of the mark: what it says of every
	// hook's spare tables holds.
	if err := s.ClearTablesDirty(); err != nil {
		return err
	}
	// Tidying: failures here do not change what is live.
	if !st.CtMarkUsed {
		b.table(st.CtMarkMask).Remove()
	}
	keep := map[string]bool{}
	for _, a := range st.Aux {
		keep[strings.TrimSuffix(a.Interface, "r")] = true
	}
	removeSegdevsExcept(keep)
	s.CollectGarbage() // dead namespaces' pins; best effort
	return nil
}

// rollBack makes the current generation run again after a failed roll
// forward, and forgets g.
func (b *Backend) rollBack(s *bpf.Store, cur, g *bpf.Gen) error {
	var st *liveState
	if cur != nil {
		var err error
		if st, err = readGenState(cur); err != nil {
			return err
		}
	}
	if st == nil {
		st = &liveState{}
	}
	if cur != nil {
		if err := syncSets(st, cur, g); err != nil {
			return err
		}
		if err := runHooks(s, st, cur); err != nil {
			return err
		}
		if err := switchTables(st, cur); err != nil {
			return err
		}
	} else if err := runHooks(s, st, nil); err != nil {
		return err
	}
	if err := s.Unpend(); err != nil {
		return err
	}
	return s.Prune()
}

// syncSets makes the outer maps of st's sets in g hold g's elements maps
// (one update each, atomic for packets). Sets pinned in the layout before
// elements maps get their elements in place, as then.
func syncSets(st *liveState, g, other *bpf.Gen) error {
	var legacy []string
	for _, sr := range st.Sets {
		m, err := g.SetMap(sr.Name)
		if err != nil {
			return err
		}
		if m == nil {
			return fmt.Errorf("generation %d has no map for set %s", g.N, sr.Name)
		}
		elems, err := g.SetElements(sr.Name)
		if err == nil && elems == nil {
			legacy = append(legacy, sr.Name)
		} else if err == nil {
			err = m.Put(uint32(0), elems)
			elems.Close()
			if err == nil {
				faults.Point("swap set " + sr.Name)
			}
		}
		m.Close()
		if err != nil {
			return fmt.Errorf("set %s: %w", sr.Name, err)
		}
	}
	if len(legacy) == 0 {
		return nil
	}
	sets, err := st.parseSets()
	if err != nil {
		return err
	}
	for _, set := range sets {
		if !slices.Contains(legacy, set.Name) {
			continue
		}
		m, err := g.SetMap(set.Name)
		if err != nil {
			return err
		}
		shared := false
		if other != nil {
			if om, err := other.SetMap(set.Name); err == nil && om != nil {
				shared = mapID(om) == mapID(m)
				om.Close()
			}
		}
		if shared {
			err = bpf.SyncSet(m, compiler.SetMap(set))
		}
		m.Close()
		if err != nil {
			return err
		}
	}
	return nil
}

func mapID(m *ebpf.Map) ebpf.MapID {
	info, err := m.Info()
	if err != nil {
		return 0
	}
	id, _ := info.ID()
	return id
}

// runHooks makes every hook of st run g's program and detaches every other
// attach point. A hook whose interface has gone is skipped (Load shows it
// is not live).
func runHooks(s *bpf.Store, st *liveState, g *bpf.Gen) error {
	want := map[bpf.HookID]bool{}
	// Segmentation devices' return programs before the hooks that
	// redirect to them.
	var ids []bpf.HookID
	for _, a := range st.Aux {
		ids = append(ids, a.id())
	}
	for _, h := range st.hooks() {
		ids = append(ids, h.id())
	}
	for _, id := range ids {
		want[id] = true
		gh, err := g.Hook(id)
		if err != nil {
			return err
		}
		if gh == nil {
			return fmt.Errorf("generation %d has no program for %s", g.N, id)
		}
		a, err := s.Attached(id)
		if err == nil && (a == nil || a.ProgID != bpf.ProgID(gh.Prog)) {
			err = s.Run(id, gh.Prog)
		}
		gh.Close()
		if errors.Is(err, bpf.ErrNoInterface) {
			continue
		}
		if err != nil {
			return err
		}
	}
	points, err := s.AttachPoints()
	if err != nil {
		return err
	}
	for _, id := range points {
		if !want[id] {
			if err := s.Detach(id); err != nil {
				return err
			}
		}
	}
	return nil
}

// sharesHandles reports whether a rule of old is a rule of h.
func sharesHandles(old, h *hookState) bool {
	// After a rule change, one of old's first rules is still there: found
	// by a scan, without a map of ten thousand handles.
	for _, o := range old.Rules[:min(len(old.Rules), 4)] {
		for _, r := range h.Rules {
			if r.Handle == o.Handle {
				return true
			}
		}
	}
	in := make(map[uint64]bool, len(h.Rules))
	for _, r := range h.Rules {
		in[r.Handle] = true
	}
	for _, r := range old.Rules {
		if in[r.Handle] {
			return true
		}
	}
	return false
}

// addReplacedCounts adds to base what the old generation's program of hook
// oh counted, if g replaced that program (a kept program goes on counting
// in the same map).
func addReplacedCounts(base map[uint64]ruleset.Counter, oh *hookState, cur, g *bpf.Gen) (replaced bool, err error) {
	if cur == nil || cur.N == g.N {
		return false, nil
	}
	ch, err := cur.Hook(oh.id())
	if err != nil || ch == nil {
		return false, err
	}
	defer ch.Close()
	gh, err := g.Hook(oh.id())
	if err != nil {
		return false, err
	}
	if gh != nil {
		same := bpf.ProgID(gh.Prog) == bpf.ProgID(ch.Prog)
		gh.Close()
		if same {
			return false, nil
		}
	}
	if ch.Counters() == nil {
		return true, nil
	}
	cs, err := bpf.ReadCounters(ch.Counters())
	if err != nil {
		return false, err
	}
	for i, handle := range oh.CounterHandles {
		if handle == 0 || i >= len(cs) {
			continue
		}
		c := base[handle]
		c.Packets += cs[i].Packets
		c.Bytes += cs[i].Bytes
		base[handle] = c
	}
	return true, nil
}

// rulesChangeWith reports whether rs changes the rules of a hook whose
// live program reads set name. Its elements then go to the new programs
// in an outer map of their own, not into the live one: swapped into the
// live one first, they would meet the old rules until the hook's program
// or tables switch (and, were the writer killed between the two, until
// the next command): a packet would see half of the transaction.
func (b *Backend) rulesChangeWith(name string, old *liveState, rs *ruleset.Ruleset) bool {
	for _, oh := range old.hooks() {
		if !slices.Contains(oh.Sets, name) {
			continue
		}
		var rules []*grammar.Rule
		if ifc := rs.Interface(oh.ifname); ifc != nil {
			rules = ifc.Rules(oh.hook)
		}
		if b.rulesChanged(oh, rules) {
			return true
		}
	}
	return false
}

// rulesChanged reports whether rules differ from the rules of oh (their
// handles, order or text).
func (b *Backend) rulesChanged(oh *hookState, rules []*grammar.Rule) bool {
	if len(rules) != len(oh.Rules) {
		return true
	}
	for i, r := range rules {
		rec := oh.Rules[i]
		if r.Handle != rec.Handle {
			return true
		}
		known, ok := b.recordOf(r)
		if !ok {
			known = ruleRecordOf(r)
		}
		if known.Text != rec.Text {
			return true
		}
	}
	return false
}

func usesFreshSet(names []string, sets map[string]*setPlan) bool {
	for _, n := range names {
		if sp := sets[n]; sp != nil && sp.fresh {
			return true
		}
	}
	return false
}

func (b *Backend) attached(s *bpf.Store, id bpf.HookID) bool {
	a, err := s.Attached(id)
	return err == nil && a != nil
}

// parseSets parses the state's set texts.
func (st *liveState) parseSets() ([]*grammar.Set, error) {
	var text string
	for _, s := range st.Sets {
		text += s.Text
	}
	cmds, _, err := grammar.Parse("<stored sets>", text, nil)
	if err != nil {
		return nil, fmt.Errorf("stored sets do not parse: %w", err)
	}
	var out []*grammar.Set
	for _, c := range cmds {
		if c.Kind == grammar.CmdDefineSet {
			out = append(out, c.Set)
		}
	}
	return out, nil
}

// snapshot opens the committed generation for reading, without the writer
// lock. When a commit was interrupted (its writer died), it is finished or
// undone first, if no other writer holds the lock.
func (b *Backend) snapshot() (*bpf.Store, *bpf.Gen, *liveState, error) {
	s, err := b.existing()
	if err != nil || s == nil {
		return nil, nil, nil, err
	}
	if !b.held && s.Untidy() {
		if unlock, ok, _ := s.TryLock(); ok {
			err := b.recover(s)
			unlock()
			if err != nil {
				return nil, nil, nil, err
			}
		}
	}
	for try := 0; ; try++ {
		g, err := s.Current()
		if err != nil || g == nil {
			return s, nil, nil, err
		}
		st := b.prefetched(g)
		if st == nil {
			st, err = readGenState(g)
		}
		if st != nil && st.Generation == g.N {
			b.read = st // Commit, under the lock taken before, reads it again
		}
		if st == nil && err == nil || errors.Is(err, os.ErrNotExist) {
			// A writer published a newer generation and removed this
			// one between our two reads: read again.
			if _, serr := os.Stat(g.Dir); serr != nil && try < 10 {
				continue
			}
		}
		return s, g, st, err
	}
}

// Load returns the live ruleset: what was committed, minus the hooks whose
// program is no longer attached (interface deleted, filter removed by hand).
func (b *Backend) Load() (*ruleset.Ruleset, error) {
	b.outline = nil
	rs := &ruleset.Ruleset{NextHandle: 1}
	err := b.readLive(func(s *bpf.Store, _ *bpf.Gen, st *liveState) error {
		live := func(h *hookState) bool { return b.attached(s, h.id()) } // (a concurrent commit may detach it: read again)
		r, err := st.ruleset(live)
		if err == nil {
			b.remember(st, r)
			rs = r
		}
		return err
	})
	return rs, err
}

// NextHandle returns the handle the next rule gets (ruleset.Flusher): what
// a batch that starts with `flush ruleset` needs of the live ruleset,
// without its rules.
func (b *Backend) NextHandle() (uint64, error) {
	b.known, b.byHandle, b.outline = nil, nil, nil
	_, _, st, err := b.snapshot()
	if errors.As(err, new(*corruptStateError)) {
		return 1, nil // nothing reads the old handles: Commit replaces every hook
	}
	if err != nil || st == nil {
		return 1, err
	}
	return max(st.NextHandle, 1), nil
}

// remember notes the stored record of every rule Load returns, so that a
// commit of a ruleset made from them does not format them again.
func (b *Backend) remember(st *liveState, rs *ruleset.Ruleset) {
	b.known = map[*grammar.Rule]ruleRecord{}
	b.byHandle = map[uint64]*grammar.Rule{}
	for _, h := range st.hooks() {
		ifc := rs.Interface(h.ifname)
		if ifc == nil {
			continue
		}
		rules := ifc.Rules(h.hook)
		if len(rules) != len(h.Rules) {
			continue
		}
		for i, r := range rules {
			if r.Handle == h.Rules[i].Handle {
				b.known[r] = h.Rules[i]
				b.byHandle[r.Handle] = r
			}
		}
	}
}

// Generation returns the number of the committed generation (0 when nothing
// was ever committed in this namespace); every commit makes it grow. For
// `monitor`: a change means the ruleset changed.
func (b *Backend) Generation() (uint64, error) {
	s, err := b.existing()
	if err != nil || s == nil {
		return 0, err
	}
	return s.Generation()
}

// Counters returns the counters of the live rules by handle.
func (b *Backend) Counters() (map[uint64]ruleset.Counter, error) {
	var out map[uint64]ruleset.Counter
	err := b.readLive(func(s *bpf.Store, g *bpf.Gen, st *liveState) error {
		out = map[uint64]ruleset.Counter{}
		return eachLiveCounters(s, g, st, func(h *hookState, m *ebpf.Map) error {
			cs, err := bpf.ReadCounters(m)
			if err != nil {
				return err
			}
			base := h.base()
			for i, handle := range h.CounterHandles {
				if i < len(cs) && handle != 0 { // 0: a free slot
					c := base[handle]
					out[handle] = ruleset.Counter{Packets: c.Packets + cs[i].Packets, Bytes: c.Bytes + cs[i].Bytes}
				}
			}
			return nil
		})
	})
	if out == nil {
		out = map[uint64]ruleset.Counter{}
	}
	return out, err
}

// readLive runs read on the committed generation, and again when a writer
// published another one meanwhile: that writer removes the generation
// read, whose pinned objects may have gone from under read (a map that
// no longer opens, a hook that seems to have none). Readers take no lock,
// so this is how they see one generation whole. read gets no call when
// nothing is committed.
func (b *Backend) readLive(read func(s *bpf.Store, g *bpf.Gen, st *liveState) error) error {
	for try := 0; ; try++ {
		s, g, st, err := b.snapshot()
		if err != nil || st == nil {
			return err
		}
		err = read(s, g, st)
		if now, cerr := s.Current(); try < 20 && cerr == nil && (now == nil || now.N != g.N) {
			continue
		}
		return err
	}
}

// ResetCounters zeroes the counters of the given handles (all if nil).
func (b *Backend) ResetCounters(handles []uint64) error {
	s, err := b.existing()
	if err != nil || s == nil {
		return err
	}
	unlock, err := b.writeLock(s)
	if err != nil {
		return err
	}
	defer unlock()
	b.read = nil
	if err := b.recover(s); err != nil {
		return err
	}
	g, err := s.Current()
	if err != nil || g == nil {
		return err
	}
	st, err := readGenState(g)
	if err != nil || st == nil {
		return err
	}
	want := map[uint64]bool{}
	for _, h := range handles {
		want[h] = true
	}
	rebased := false
	for _, h := range st.hooks() {
		base := h.base()
		for handle := range base {
			if handles == nil || want[handle] {
				delete(base, handle)
				rebased = true
			}
		}
		h.setBase(base)
	}
	// The base first: a failure after it leaves counters too low, never
	// resurrects old counts.
	if rebased {
		if err := writeGenState(g, st); err != nil {
			return err
		}
	}
	return eachLiveCounters(s, g, st, func(h *hookState, m *ebpf.Map) error {
		if handles == nil {
			return bpf.ZeroCounters(m, nil)
		}
		idx := []int{}
		for i, handle := range h.CounterHandles {
			if want[handle] {
				idx = append(idx, i)
			}
		}
		return bpf.ZeroCounters(m, idx)
	})
}

// eachLiveCounters calls f with the counters map of every attached hook.
func eachLiveCounters(s *bpf.Store, g *bpf.Gen, st *liveState, f func(*hookState, *ebpf.Map) error) error {
	for _, h := range st.hooks() {
		if a, err := s.Attached(h.id()); err != nil || a == nil {
			if err != nil {
				return err
			}
			continue
		}
		gh, err := g.Hook(h.id())
		if err != nil {
			return err
		}
		if gh == nil {
			continue
		}
		if gh.Counters() != nil {
			err = f(h, gh.Counters())
		}
		gh.Close()
		if err != nil {
			return fmt.Errorf("%s: %w", h.id(), err)
		}
	}
	return nil
}

var _ ruleset.Lister = (*Backend)(nil)

// Listing returns the live ruleset as stored, without parsing it, with
// the hooks whose program is no longer attached left out (as Load).
func (b *Backend) Listing() (*ruleset.Listing, error) {
	l := &ruleset.Listing{}
	err := b.readLive(func(s *bpf.Store, _ *bpf.Gen, st *liveState) error {
		l = listingOf(b, s, st)
		return nil
	})
	return l, err
}

// listingOf is the listing of st's attached hooks.
func listingOf(b *Backend, s *bpf.Store, st *liveState) *ruleset.Listing {
	l := &ruleset.Listing{}
	for _, set := range st.Sets {
		l.Sets = append(l.Sets, ruleset.ListedSet{Name: set.Name, Text: set.Text})
	}
	for _, ifc := range st.Interfaces {
		li := ruleset.ListedInterface{Name: ifc.Name}
		for i := range ifc.Hooks {
			h := &ifc.Hooks[i]
			if !b.attached(s, h.id()) {
				continue
			}
			rules := make([]ruleset.ListedRule, len(h.Rules))
			for j, r := range h.Rules {
				rules[j] = ruleset.ListedRule{Handle: r.Handle, Text: r.Text, CounterAt: r.CounterAt}
			}
			if h.hook == grammar.HookEgress {
				li.Egress = rules
			} else {
				li.Ingress = rules
			}
		}
		if len(li.Ingress)+len(li.Egress) > 0 {
			l.Interfaces = append(l.Interfaces, li)
		}
	}
	return l
}
