package datapath

import (
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
)

// applyPerfectSpare applies testdata/perfect-spare.conf (vb ingress: a
// port-indexed table in the perfect-hash value before a scanned segment).
func applyPerfectSpare(t *testing.T) (*env, bpf.HookID) {
	text, err := os.ReadFile("testdata/perfect-spare.conf")
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, Options{})
	e.run(t, string(text))
	return e, bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
}

// A hook pinned by an sfunnel that kept both generations of the
// perfect-hash tables in one map of two elements (abi.PerfectTables,
// before they had a map each) is not patched by a change that would be
// map-only: the change compiles the hook, whose new program pins a map per
// generation, and the next change is map-only again. Packets agree with
// the reference model after each.
func TestPerfectTablesOfAnOlderLayout(t *testing.T) {
	e, id := applyPerfectSpare(t)
	// The older layout's pins: tblh (generation 0 in element 0, as a
	// compilation left it), no tblh0 or tblh1.
	pins := func() map[string]bool {
		found := map[string]bool{}
		e.do(t, func() error {
			return filepath.WalkDir(e.root, func(path string, d fs.DirEntry, err error) error {
				if err == nil && !d.IsDir() {
					found[d.Name()] = true
				}
				return err
			})
		})
		return found
	}
	e.do(t, func() error {
		s, err := bpf.OpenExisting(bpf.Options{Root: e.root})
		if err != nil {
			return err
		}
		cur, err := s.Current()
		if err != nil {
			return err
		}
		h, err := cur.Hook(id)
		if err != nil {
			return err
		}
		defer h.Close()
		gen0 := h.Maps[abi.PerfectGen(0)]
		if gen0 == nil || h.Maps[abi.PerfectGen(1)] == nil {
			t.Fatalf("the hook has no map per generation of its perfect-hash tables: %v", h.Maps)
		}
		blob := make([]byte, gen0.ValueSize())
		if err := gen0.Lookup(uint32(0), blob); err != nil {
			return err
		}
		old, err := ebpf.NewMap(&ebpf.MapSpec{Name: abi.PerfectTables, Type: ebpf.Array, KeySize: 4, ValueSize: gen0.ValueSize(), MaxEntries: 2})
		if err != nil {
			return err
		}
		defer old.Close()
		if err := old.Put(uint32(0), blob); err != nil {
			return err
		}
		if err := cur.PinHook(id, h.Prog, map[string]*ebpf.Map{abi.PerfectTables: old}); err != nil {
			return err
		}
		return filepath.WalkDir(cur.Dir, func(path string, d fs.DirEntry, err error) error {
			if err == nil && abi.IsPerfectGen(d.Name()) {
				return os.Remove(path)
			}
			return err
		})
	})
	if p := pins(); !p[abi.PerfectTables] || p[abi.PerfectGen(0)] || p[abi.PerfectGen(1)] {
		t.Fatalf("the older layout was not set up: pins %v", p)
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for i, change := range []string{
		"add rule vb ingress udp dport 7002 drop", // tblh's port table
		"add rule vb ingress udp dport 7003 drop",
	} {
		patched := e.be.patched
		e.run(t, change+"\n")
		if i == 0 && e.be.patched != patched {
			t.Fatalf("%s patched a hook of the older layout", change)
		}
		if i == 1 && e.be.patched != patched+1 {
			t.Fatalf("%s compiled the hook again", change)
		}
		if p := pins(); p[abi.PerfectTables] || !p[abi.PerfectGen(0)] || !p[abi.PerfectGen(1)] {
			t.Fatalf("after %s: pins %v", change, p)
		}
		rs, _ := e.fresh(t)
		agreeWithModel(t, e, id, rs.Interface("vb").Ingress, rng, change)
	}
}
