package datapath

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// What an older sfunnel left running (the layout before generations: link,
// program and maps under hooks/, a version 1 state record) is adopted: it
// is listed, and the next commit replaces its program instead of running a
// second one beside it.
func TestMigrateLegacyLayout(t *testing.T) {
	e := newEnv(t, Options{})
	old := &ruleset.Ruleset{NextHandle: 2, Interfaces: []*ruleset.Interface{{Name: "vb",
		Ingress: []*grammar.Rule{udpRule(1, 4739, grammar.ActDrop)}}}}
	e.do(t, func() error {
		s, err := bpf.Open(bpf.Options{Root: e.root})
		if err != nil {
			return err
		}
		prog, err := compiler.Compile(old.Interfaces[0].Ingress, nil, compiler.Options{Hook: grammar.HookIngress})
		if err != nil {
			return err
		}
		coll, err := bpf.LoadCollection(prog.Spec, bpf.LoadOptions{What: "legacy"})
		if err != nil {
			return err
		}
		defer coll.Close()
		ifc, err := bpf.LookupInterface("vb")
		if err != nil {
			return err
		}
		dir := filepath.Join(s.Dir, "hooks", "vb", "ingress")
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return err
		}
		lk, err := link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: coll.Programs[bpf.ProgramName], Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		defer lk.Close()
		if err := lk.Pin(filepath.Join(dir, "link")); err != nil {
			return err
		}
		if err := coll.Programs[bpf.ProgramName].Pin(filepath.Join(dir, "prog")); err != nil {
			return err
		}
		for name, m := range coll.Maps {
			if err := m.Pin(filepath.Join(dir, name)); err != nil {
				return err
			}
		}
		rec, err := json.Marshal(map[string]any{"Version": 1, "CtMarkMask": 0x00ff0000, "Ruleset": old,
			"Hooks": []map[string]any{{"Ifname": "vb", "Hook": grammar.HookIngress, "Handles": []uint64{1}}}})
		if err != nil {
			return err
		}
		return (&bpf.Gen{Dir: s.Dir}).WriteState(rec)
	})
	if got := e.send(t, 4739, 3); got != 0 {
		t.Fatalf("the legacy program does not drop (%d of 3 arrived)", got)
	}
	if fresh, _ := e.fresh(t); jsonOf(t, fresh) != jsonOf(t, old) {
		t.Errorf("adopted ruleset:\n%s\nwant\n%s", jsonOf(t, fresh), jsonOf(t, old))
	}
	next := &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{{Name: "vb",
		Ingress: []*grammar.Rule{udpRule(2, 5000, grammar.ActDrop)}}}}
	e.commit(t, next)
	if got := e.send(t, 4739, 3); got != 3 {
		t.Errorf("the legacy program still runs after a commit: %d of 3 arrived", got)
	}
	if got := e.send(t, 5000, 3); got != 0 {
		t.Errorf("the new program does not run: %d of 3 arrived past its drop rule", got)
	}
	e.do(t, func() error {
		s, err := bpf.Open(bpf.Options{Root: e.root})
		if err != nil {
			return err
		}
		for _, name := range []string{"hooks", "state"} {
			if _, err := os.Stat(filepath.Join(s.Dir, name)); !os.IsNotExist(err) {
				t.Errorf("legacy %s left: %v", name, err)
			}
		}
		return nil
	})
}
