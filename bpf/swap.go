package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/internal/faults"
)

// Names the compiler gives the program and its maps (package abi).
const (
	ProgramName  = abi.ProgramName
	CountersMap  = abi.CountersMap  // per-CPU Counter by rule index
	SetMapPrefix = abi.SetMapPrefix // shared named sets
)

// An attach point is where one hook's program runs: a tcx link pinned at
// links/<ifname>/<hook>/link, or, in clsact mode, sfunnel's cls_bpf filter
// on the interface with an empty links/<ifname>/<hook> directory marking
// it as sfunnel's. Attach points live outside the generations: a commit
// changes which program each one runs.

func (s *Store) linkDir(id HookID) string { return filepath.Join(s.Dir, "links", id.rel()) }

// ErrNoInterface is returned by Run for a hook whose interface is gone.
var ErrNoInterface = errors.New("no such interface")

// Run makes hook id run prog, whatever it ran before: a tcx link attached
// to the interface of that name is updated in place (atomic for packets),
// sfunnel's cls_bpf filter replaced (atomic too), and a hook that runs
// nothing yet is attached (tcx, or clsact where tcx is missing or
// ForceClsact is set). Run is idempotent, so a commit that stopped half way
// can be finished by running it again.
func (s *Store) Run(id HookID, prog *ebpf.Program) error {
	ifc, err := LookupInterface(id.Ifname)
	if err != nil {
		return err
	}
	if ifc.Missing {
		return fmt.Errorf("%s: %w", id, ErrNoInterface)
	}
	dir := s.linkDir(id)
	lk, err := link.LoadPinnedLink(filepath.Join(dir, "link"), nil)
	switch {
	case err == nil:
		defer lk.Close()
		info, ierr := lk.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifc.Index {
			if err := lk.Update(prog); err != nil {
				return fmt.Errorf("update tcx link of %s: %w", id, err)
			}
			faults.Point("update link " + id.String())
			return nil
		}
		// Attached to an interface that was renamed or deleted: that
		// program must not go on running under another name.
		lk.(interface{ Detach() error }).Detach()
		os.Remove(filepath.Join(dir, "link"))
		faults.Point("drop stale link " + id.String())
	case !errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("open %s link: %w", id, permission(err))
	default:
		if _, serr := os.Stat(dir); serr == nil {
			// clsact mode: replace the filter.
			if err := setClsact(id, ifc.Index, prog); err != nil {
				return err
			}
			faults.Point("replace filter " + id.String())
			return nil
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	if !s.opts.ForceClsact {
		err := s.attachTCX(id, ifc.Index, prog)
		if !errors.Is(err, ebpf.ErrNotSupported) {
			if err == nil {
				faults.Point("attach link " + id.String())
			}
			return err
		}
	}
	if err := setClsact(id, ifc.Index, prog); err != nil {
		return err
	}
	faults.Point("add filter " + id.String())
	return nil
}

// Detach stops hook id from running sfunnel's program. Idempotent.
func (s *Store) Detach(id HookID) error {
	dir := s.linkDir(id)
	lk, err := link.LoadPinnedLink(filepath.Join(dir, "link"), nil)
	switch {
	case err == nil:
		derr := lk.(interface{ Detach() error }).Detach()
		lk.Close()
		if derr != nil && !errors.Is(derr, os.ErrNotExist) {
			return fmt.Errorf("detach %s: %w", id, derr)
		}
		faults.Point("detach link " + id.String())
	case errors.Is(err, os.ErrNotExist):
		if _, serr := os.Stat(dir); serr != nil {
			return nil // nothing attached
		}
		if ifc, err := LookupInterface(id.Ifname); err == nil && !ifc.Missing {
			if err := delClsact(id, ifc.Index); err != nil {
				return err
			}
			faults.Point("delete filter " + id.String())
		}
	default:
		return fmt.Errorf("open %s link: %w", id, permission(err))
	}
	return removeHookDir(dir)
}

// Attachment is what runs at one attach point.
type Attachment struct {
	HookID
	Mode    Mode
	Ifindex int
	ProgID  ebpf.ProgramID
}

// Attached reports what runs at hook id, nil when sfunnel runs nothing
// there: not attached, or attached to an interface that is no longer the
// one of that name (deleted, renamed), or its filter removed by hand.
func (s *Store) Attached(id HookID) (*Attachment, error) {
	dir := s.linkDir(id)
	if _, err := os.Stat(dir); err != nil {
		return nil, nil
	}
	ifc, err := LookupInterface(id.Ifname)
	if err != nil || ifc.Missing {
		return nil, err
	}
	a := &Attachment{HookID: id, Ifindex: ifc.Index}
	lk, err := link.LoadPinnedLink(filepath.Join(dir, "link"), nil)
	switch {
	case err == nil:
		defer lk.Close()
		info, err := lk.Info()
		if err != nil {
			return nil, fmt.Errorf("%s link info: %w", id, err)
		}
		tcx := info.TCX()
		if tcx == nil || int(tcx.Ifindex) != ifc.Index || ebpf.AttachType(tcx.AttachType) != tcxAttach(id.Hook) {
			return nil, nil
		}
		a.Mode, a.ProgID = ModeTCX, info.Program
	case errors.Is(err, os.ErrNotExist):
		pid, err := clsactProgID(ifc.Index, id.Hook)
		if err != nil || pid == 0 {
			return nil, err
		}
		a.Mode, a.ProgID = ModeClsact, pid
	default:
		return nil, fmt.Errorf("open %s link: %w", id, permission(err))
	}
	return a, nil
}

// AttachPoints lists the hooks with an attach point (live or not).
func (s *Store) AttachPoints() ([]HookID, error) { return listHooks(filepath.Join(s.Dir, "links")) }

// removeHookDir removes a hook's directory, and its interface's directory
// when that is left empty.
func removeHookDir(dir string) error {
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	os.Remove(filepath.Dir(dir)) // fails while the other hook is there
	return nil
}

// ProgID returns a program's kernel id (0 if unknown).
func ProgID(p *ebpf.Program) ebpf.ProgramID {
	info, err := p.Info()
	if err != nil {
		return 0
	}
	id, _ := info.ID()
	return id
}
