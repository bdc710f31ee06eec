package bpf

import (
	"errors"
	"fmt"
	"github.com/sfunnel/sfunnel/abi"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sfunnel/sfunnel/grammar"
)

// Update is the new state of one hook in a Swap.
type Update struct {
	HookID
	// Ifindex is the interface's index (LookupInterface) when attaching.
	Ifindex int
	// Coll holds the program "sfunnel" and its maps, loaded by
	// LoadCollection. Its maps are pinned with the hook, except shared set
	// maps (SetMapPrefix). Nil detaches the hook.
	Coll *ebpf.Collection
}

// Names the compiler gives the program and its maps (package abi).
const (
	ProgramName  = abi.ProgramName
	CountersMap  = abi.CountersMap  // per-CPU Counter by rule index
	SetMapPrefix = abi.SetMapPrefix // shared named sets
)

// Swap makes every update live: programs of hooks already attached are
// replaced atomically (link update, or cls_bpf replace with the same
// priority and handle), new hooks are attached, nil updates detached. The
// programs must already be loaded, so the verifier cannot fail here. When a
// swap fails, those already done are rolled back (best effort) and the error
// returned. Swap does not close the collections.
//
// Once every swap is done, retire (if not nil) is called with each replaced
// or detached hook's old state, whose maps then hold their final values
// (counters a caller wants to carry over to the new program).
func (s *Store) Swap(updates []Update, retire func(old *Live)) (err error) {
	type step struct {
		u     Update
		old   *Live
		undo  func() error
		fresh bool
	}
	steps := make([]*step, 0, len(updates))
	defer func() {
		for _, st := range steps {
			if st.old != nil {
				st.old.Close()
			}
		}
	}()
	for _, u := range updates {
		if u.Coll != nil && u.Coll.Programs[ProgramName] == nil {
			return fmt.Errorf("%s: collection has no program %q", u.HookID, ProgramName)
		}
		old, err := s.Live(u.HookID)
		if err != nil {
			return err
		}
		steps = append(steps, &step{u: u, old: old})
	}

	done := 0
	for _, st := range steps {
		if err = s.swapOne(st.u, st.old, &st.undo); err != nil {
			break
		}
		st.fresh = st.old == nil
		done++
	}
	if err != nil {
		for i := done - 1; i >= 0; i-- {
			if steps[i].undo != nil {
				steps[i].undo()
			}
		}
		return err
	}

	// Everything is live: hand over the old state, pin the new objects,
	// drop what detached hooks left.
	if retire != nil {
		for _, st := range steps {
			if st.old != nil {
				retire(st.old)
			}
		}
	}
	var errs []error
	for _, st := range steps {
		dir := filepath.Join(s.Dir, st.u.dir())
		if st.u.Coll == nil {
			if err := removeHookDir(dir); err != nil {
				errs = append(errs, err)
			}
			continue
		}
		if err := pinReplace(st.u.Coll.Programs[ProgramName], filepath.Join(dir, "prog")); err != nil {
			errs = append(errs, err)
		}
		errs = append(errs, pinMaps(dir, st.u.Coll.Maps))
	}
	return errors.Join(errs...)
}

// swapOne makes one update live and sets *undo to what reverts it.
func (s *Store) swapOne(u Update, old *Live, undo *func() error) error {
	dir := filepath.Join(s.Dir, u.dir())
	if u.Coll == nil {
		if old == nil {
			return s.removeStale(u.HookID)
		}
		if err := detach(old); err != nil {
			return err
		}
		prog := old.Prog
		*undo = func() error {
			_, err := s.attach(u.HookID, old.Ifindex, prog, old.Mode)
			return err
		}
		return nil
	}
	prog := u.Coll.Programs[ProgramName]
	if old == nil {
		if err := s.removeStale(u.HookID); err != nil {
			return err
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("create %s: %w", dir, err)
		}
		mode := ModeTCX
		if s.opts.ForceClsact {
			mode = ModeClsact
		}
		used, err := s.attach(u.HookID, u.Ifindex, prog, mode)
		if err != nil {
			return err
		}
		*undo = func() error {
			// Not pinned as a hook yet (no "prog"): undo by hand.
			if used == ModeClsact {
				delClsact(u.HookID, u.Ifindex)
			}
			return s.removeStale(u.HookID)
		}
		return nil
	}
	switch old.Mode {
	case ModeTCX:
		if err := old.link.Update(prog); err != nil {
			return fmt.Errorf("update tcx link of %s: %w", u.HookID, err)
		}
		lk, oldProg := old.link, old.Prog
		*undo = func() error { return lk.Update(oldProg) }
	default:
		if err := setClsact(u.HookID, old.Ifindex, prog); err != nil {
			return err
		}
		oldProg, idx := old.Prog, old.Ifindex
		*undo = func() error { return setClsact(u.HookID, idx, oldProg) }
	}
	return nil
}

// attach attaches prog in the given mode; tcx falls back to clsact when the
// kernel has no tcx. It returns the mode used.
func (s *Store) attach(id HookID, ifindex int, prog *ebpf.Program, mode Mode) (Mode, error) {
	if mode == ModeTCX {
		err := s.attachTCX(id, ifindex, prog)
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return ModeTCX, err
		}
	}
	return ModeClsact, setClsact(id, ifindex, prog)
}

// detach removes a live hook's program from its interface.
func detach(l *Live) error {
	if l.Mode == ModeClsact {
		return delClsact(l.HookID, l.Ifindex)
	}
	if err := l.link.(interface{ Detach() error }).Detach(); err != nil {
		return fmt.Errorf("detach %s: %w", l.HookID, err)
	}
	return nil
}

// removeStale detaches and unpins whatever is left of a hook that is not
// live under its name (e.g. the interface was renamed: its program would
// otherwise go on running on the new name).
func (s *Store) removeStale(id HookID) error {
	dir := filepath.Join(s.Dir, id.dir())
	if lk, err := link.LoadPinnedLink(filepath.Join(dir, "link"), nil); err == nil {
		lk.(interface{ Detach() error }).Detach()
		lk.Close()
	}
	if err := removeHookDir(dir); err != nil {
		return fmt.Errorf("remove stale state of %s: %w", id, err)
	}
	return nil
}

// PinnedHooks lists the hooks that have pinned state, live or not.
func (s *Store) PinnedHooks() ([]HookID, error) {
	ifs, err := os.ReadDir(filepath.Join(s.Dir, "hooks"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var ids []HookID
	for _, i := range ifs {
		name := strings.ReplaceAll(i.Name(), ":", ".")
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			if _, err := os.Stat(filepath.Join(s.Dir, "hooks", i.Name(), h.String())); err == nil {
				ids = append(ids, HookID{Ifname: name, Hook: h})
			}
		}
	}
	return ids, nil
}

// removeHookDir removes a hook's directory, and its interface's directory
// when that is left empty.
func removeHookDir(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	os.Remove(filepath.Dir(dir)) // fails while the other hook is there
	return nil
}

// pinMaps pins a program's own maps in its hook directory and removes pins
// of maps it no longer has.
func pinMaps(dir string, maps map[string]*ebpf.Map) error {
	var errs []error
	for name, m := range maps {
		if strings.HasPrefix(name, SetMapPrefix) {
			continue
		}
		errs = append(errs, pinReplace(m, filepath.Join(dir, name)))
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if n := e.Name(); n != "prog" && n != "link" && maps[n] == nil {
			errs = append(errs, os.Remove(filepath.Join(dir, n)))
		}
	}
	return errors.Join(errs...)
}
