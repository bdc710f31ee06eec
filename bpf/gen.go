package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/faults"
)

// Gen is one generation of a namespace's state: a directory that holds the
// state record, every hook's program with its own maps, and the named sets'
// maps. A committed generation is what a reader reads, without any lock:
// it only changes by a new generation replacing it (the "current" symlink
// renamed), and a counters reset rewriting its state record atomically.
type Gen struct {
	N   uint64
	Dir string
}

func (g *Gen) hookDir(id HookID) string { return filepath.Join(g.Dir, id.dir()) }

const (
	currentLink = "current" // symlink to the committed generation
	pendingLink = "next"    // symlink to a generation being made live: roll forward
	genPrefix   = "gen-"
)

func (s *Store) genAt(n uint64) *Gen {
	return &Gen{N: n, Dir: filepath.Join(s.Dir, genPrefix+strconv.FormatUint(n, 10))}
}

func (s *Store) readGenLink(name string) (*Gen, error) {
	t, err := os.Readlink(filepath.Join(s.Dir, name))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", name, permission(err))
	}
	n, err := strconv.ParseUint(strings.TrimPrefix(t, genPrefix), 10, 64)
	if err != nil || !strings.HasPrefix(t, genPrefix) {
		return nil, fmt.Errorf("%s points at %q, not a generation", name, t)
	}
	return s.genAt(n), nil
}

// Current returns the committed generation, nil when nothing was committed.
func (s *Store) Current() (*Gen, error) { return s.readGenLink(currentLink) }

// Pending returns the generation a commit was making live when it stopped
// (or is making live now, if its writer holds the lock); nil if none.
func (s *Store) Pending() (*Gen, error) { return s.readGenLink(pendingLink) }

// Generation returns the number of the committed generation (0: none). It
// grows by one or more with every commit.
func (s *Store) Generation() (uint64, error) {
	g, err := s.Current()
	if g == nil || err != nil {
		return 0, err
	}
	return g.N, nil
}

// NewGen creates an empty generation numbered after every existing one.
func (s *Store) NewGen() (*Gen, error) {
	ents, err := os.ReadDir(s.Dir)
	if err != nil {
		return nil, err
	}
	var max uint64
	for _, e := range ents {
		if n, err := strconv.ParseUint(strings.TrimPrefix(e.Name(), genPrefix), 10, 64); err == nil && n > max {
			max = n
		}
	}
	g := s.genAt(max + 1)
	for _, d := range []string{"hooks", "sets"} {
		if err := os.MkdirAll(filepath.Join(g.Dir, d), 0o700); err != nil {
			return nil, fmt.Errorf("create generation: %w", err)
		}
	}
	return g, nil
}

// setGenLink points the symlink name at g, atomically (a new symlink renamed
// over the old one).
func (s *Store) setGenLink(name string, g *Gen) error {
	tmp := filepath.Join(s.Dir, name+"_new")
	os.Remove(tmp)
	if err := os.Symlink(filepath.Base(g.Dir), tmp); err != nil {
		return fmt.Errorf("link %s: %w", name, err)
	}
	faults.Point("symlink " + name + "_new")
	if err := os.Rename(tmp, filepath.Join(s.Dir, name)); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("link %s: %w", name, err)
	}
	faults.Point("rename " + name)
	return nil
}

// MarkPending is a commit's point of no return: from here on, the next
// holder of the lock finishes making g live if this process does not.
func (s *Store) MarkPending(g *Gen) error { return s.setGenLink(pendingLink, g) }

// Publish makes g the committed generation readers see, then forgets the
// pending mark and removes every other generation.
func (s *Store) Publish(g *Gen) error {
	if err := s.setGenLink(currentLink, g); err != nil {
		return err
	}
	if err := s.Unpend(); err != nil {
		return err
	}
	return s.Prune()
}

// Prune removes what unfinished commits left: generations that are neither
// current nor pending (prepared but never committed), and temporary names.
// Call it with the lock held.
func (s *Store) Prune() error {
	cur, err := s.Current()
	if err != nil {
		return err
	}
	pend, err := s.Pending()
	if err != nil {
		return err
	}
	ents, err := os.ReadDir(s.Dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		name := e.Name()
		path := filepath.Join(s.Dir, name)
		switch {
		case strings.HasSuffix(name, "_new"):
			errs = append(errs, os.RemoveAll(path))
		case strings.HasPrefix(name, genPrefix):
			if (cur != nil && path == cur.Dir) || (pend != nil && path == pend.Dir) {
				continue
			}
			errs = append(errs, os.RemoveAll(path))
			faults.Point("remove " + name)
		}
	}
	return errors.Join(errs...)
}

// RemoveGen removes a generation that was never committed.
func (s *Store) RemoveGen(g *Gen) error { return os.RemoveAll(g.Dir) }

// Hook is one hook's program and its own maps as a generation holds them.
type Hook struct {
	HookID
	Prog *ebpf.Program
	// Maps are the program's own maps by name ("counters", "stats", ...);
	// shared set maps are not among them.
	Maps map[string]*ebpf.Map
}

// Counters returns the hook's "counters" map (nil if it has none).
func (h *Hook) Counters() *ebpf.Map { return h.Maps[CountersMap] }

// Close releases the file descriptors (the pins keep the objects).
func (h *Hook) Close() {
	if h.Prog != nil {
		h.Prog.Close()
	}
	for _, m := range h.Maps {
		m.Close()
	}
}

// PinHook pins a hook's program and its own maps (not set maps) in g.
func (g *Gen) PinHook(id HookID, prog *ebpf.Program, maps map[string]*ebpf.Map) error {
	dir := g.hookDir(id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	// Pin clones: pinning an object opened from a pin would move that pin
	// (cilium/ebpf renames it), and the old generation must keep its own.
	pc, err := prog.Clone()
	if err != nil {
		return err
	}
	defer pc.Close()
	if err := pinReplace(pc, filepath.Join(dir, "prog")); err != nil {
		return err
	}
	for name, m := range maps {
		if strings.HasPrefix(name, SetMapPrefix) {
			continue
		}
		if err := pinMapCopy(m, filepath.Join(dir, name)); err != nil {
			return err
		}
	}
	faults.Point("pin " + id.String())
	return nil
}

// Hook opens a hook's pinned program and maps; nil when g has no such hook.
func (g *Gen) Hook(id HookID) (*Hook, error) {
	dir := g.hookDir(id)
	prog, err := ebpf.LoadPinnedProgram(filepath.Join(dir, "prog"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open %s program: %w", id, permission(err))
	}
	h := &Hook{HookID: id, Prog: prog, Maps: map[string]*ebpf.Map{}}
	ents, err := os.ReadDir(dir)
	if err != nil {
		h.Close()
		return nil, err
	}
	for _, e := range ents {
		name := e.Name()
		if name == "prog" || strings.HasSuffix(name, "_new") {
			continue
		}
		m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil)
		if err != nil {
			h.Close()
			return nil, fmt.Errorf("open %s map %s: %w", id, name, permission(err))
		}
		h.Maps[name] = m
	}
	return h, nil
}

// Hooks lists the hooks g holds.
func (g *Gen) Hooks() ([]HookID, error) { return listHooks(filepath.Join(g.Dir, "hooks")) }

// listHooks lists the <ifname>/<hook> entries below dir.
func listHooks(dir string) ([]HookID, error) {
	ifs, err := os.ReadDir(dir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	var ids []HookID
	for _, i := range ifs {
		name := strings.ReplaceAll(i.Name(), ":", ".")
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			if _, err := os.Stat(filepath.Join(dir, i.Name(), h.String())); err == nil {
				ids = append(ids, HookID{Ifname: name, Hook: h})
			}
		}
	}
	return ids, nil
}

// setPin is where a set's map is pinned. bpffs refuses dots in names, set
// names may have them, and colons they can't have stand in for them.
func (g *Gen) setPin(name string) string {
	return filepath.Join(g.Dir, "sets", strings.ReplaceAll(name, ".", ":"))
}

// SetMap opens the map of a named set, nil if g has none.
func (g *Gen) SetMap(name string) (*ebpf.Map, error) {
	return loadPinnedMapIfAny(g.setPin(name))
}

// SetElements opens the elements map of a named set (the value of its
// outer map), nil if g has none (the layout before elements maps).
func (g *Gen) SetElements(name string) (*ebpf.Map, error) {
	return loadPinnedMapIfAny(filepath.Join(g.Dir, "elements", strings.ReplaceAll(name, ".", ":")))
}

// PinSetElements pins m as the elements map of set name in g.
func (g *Gen) PinSetElements(name string, m *ebpf.Map) error {
	dir := filepath.Join(g.Dir, "elements")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := pinMapCopy(m, filepath.Join(dir, strings.ReplaceAll(name, ".", ":"))); err != nil {
		return err
	}
	faults.Point("pin elements " + name)
	return nil
}

// PinSet pins m as the map of set name in g.
func (g *Gen) PinSet(name string, m *ebpf.Map) error {
	if err := pinMapCopy(m, g.setPin(name)); err != nil {
		return err
	}
	faults.Point("pin set " + name)
	return nil
}

// Unpend forgets the pending generation (a commit undone).
func (s *Store) Unpend() error {
	if err := os.Remove(filepath.Join(s.Dir, pendingLink)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	faults.Point("remove next")
	return nil
}

// pinMapCopy pins m at path without moving a pin m already has.
func pinMapCopy(m *ebpf.Map, path string) error {
	c, err := m.Clone()
	if err != nil {
		return err
	}
	defer c.Close()
	return pinReplace(c, path)
}

// Untidy reports whether an unfinished commit left something behind: a
// pending generation, a generation other than the current one, or a
// temporary name, or the layout of an older sfunnel. (While a writer works,
// it is untidy too: its lock tells.)
func (s *Store) Untidy() bool {
	ents, err := os.ReadDir(s.Dir)
	if err != nil {
		return false
	}
	cur, _ := os.Readlink(filepath.Join(s.Dir, currentLink))
	for _, e := range ents {
		name := e.Name()
		if name == pendingLink || strings.HasSuffix(name, "_new") || name == "hooks" || name == "state" || name == "sets" ||
			strings.HasPrefix(name, genPrefix) && name != cur {
			return true
		}
	}
	return false
}

// The layout before generations (sfunnel ≤ 0.1): a state map, sets/ and
// hooks/<ifname>/<hook>/{link,prog,maps…} directly in the namespace
// directory.

// Legacy returns the namespace's state in the old layout: its state record
// (nil if none) and whether anything of that layout is there.
func (s *Store) Legacy() (state []byte, found bool, err error) {
	_, herr := os.Stat(filepath.Join(s.Dir, "hooks"))
	_, serr := os.Stat(filepath.Join(s.Dir, "state"))
	if herr != nil && serr != nil {
		return nil, false, nil
	}
	state, err = (&Gen{Dir: s.Dir}).ReadState()
	return state, true, err
}

// AdoptLegacy moves the old layout into generation g and the attach
// points: each hook's link pin (or clsact marker) to links/, its program and
// maps and the sets pinned in g. The old directories stay until
// RemoveLegacy. Idempotent.
func (s *Store) AdoptLegacy(g *Gen) ([]HookID, error) {
	ids, err := listHooks(filepath.Join(s.Dir, "hooks"))
	if err != nil {
		return nil, err
	}
	legacy := &Gen{Dir: s.Dir}
	for _, id := range ids {
		old := filepath.Join(s.Dir, id.dir())
		if err := os.MkdirAll(s.linkDir(id), 0o700); err != nil {
			return nil, err
		}
		if _, err := os.Stat(filepath.Join(old, "link")); err == nil {
			if err := os.Rename(filepath.Join(old, "link"), filepath.Join(s.linkDir(id), "link")); err != nil {
				return nil, fmt.Errorf("adopt %s: %w", id, err)
			}
			faults.Point("adopt link " + id.String())
		}
		h, err := legacy.Hook(id)
		if err != nil {
			return nil, err
		}
		if h == nil {
			continue
		}
		err = g.PinHook(id, h.Prog, h.Maps)
		h.Close()
		if err != nil {
			return nil, err
		}
	}
	sets, _ := os.ReadDir(filepath.Join(s.Dir, "sets"))
	for _, e := range sets {
		name := strings.ReplaceAll(e.Name(), ":", ".")
		m, err := legacy.SetMap(name)
		if err != nil || m == nil {
			return nil, err
		}
		err = g.PinSet(name, m)
		m.Close()
		if err != nil {
			return nil, err
		}
	}
	return ids, nil
}

// RemoveLegacy removes what is left of the old layout.
func (s *Store) RemoveLegacy() error {
	var errs []error
	for _, name := range []string{"hooks", "sets", "state"} {
		errs = append(errs, os.RemoveAll(filepath.Join(s.Dir, name)))
	}
	return errors.Join(errs...)
}

// tablesDirty marks that a writer may have changed the spare generation of
// some hook's rule tables without committing (see datapath's incremental
// changes). A symlink: bpffs has no regular files.
const tablesDirty = "tables-dirty"

// TablesDirty reports whether the mark is there.
func (s *Store) TablesDirty() bool {
	_, err := os.Lstat(filepath.Join(s.Dir, tablesDirty))
	return err == nil
}

// MarkTablesDirty sets the mark (before a spare generation is written).
func (s *Store) MarkTablesDirty() error {
	err := os.Symlink("spare", filepath.Join(s.Dir, tablesDirty))
	if err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("mark tables: %w", err)
	}
	faults.Point("mark tables dirty")
	return nil
}

// ClearTablesDirty removes the mark (once a commit that knew of it is
// published).
func (s *Store) ClearTablesDirty() error {
	if err := os.Remove(filepath.Join(s.Dir, tablesDirty)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}
