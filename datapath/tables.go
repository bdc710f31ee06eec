package datapath

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"reflect"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/internal/faults"
)

// Changes that only change a hook's rule tables (same compiled program,
// compiler.Program.Digest equal) are made without loading a program: the
// tables hold two generations of entries and the program reads which one
// is live from the control map once per packet.
//
// Before the commit point, the generation the program does not read is
// filled with the new entries (stale ones of an older commit deleted first):
// packets see nothing of it. The state record names the generation to
// switch to; rolling forward writes it into the control map, one 4-byte
// word, so a packet sees the old tables or the new ones. Rolling forward
// again writes the same word; rolling back writes the old one.

// tableUpdate is a hook whose program stays while its tables change.
type tableUpdate struct {
	gen uint32 // the generation to switch to
}

func progDigest(p *compiler.Program) string { return hex.EncodeToString(p.Digest[:]) }

// slotsCompatible reports whether counters keep their meaning: no slot
// counts one rule in the old program and another in the new one (a slot
// freed now is reused by a later commit, after it has been zeroed).
func slotsCompatible(old, new []uint64) bool {
	for i := 0; i < len(old) && i < len(new); i++ {
		if old[i] != new[i] && old[i] != 0 && new[i] != 0 {
			return false
		}
	}
	return true
}

// prepareTables writes prog's entries into the generation of h's tables
// that the running program does not read, zeroes the counter slots that
// new rules take (oldHandles: the running program's slots), and returns
// the update.
func prepareTables(h *bpf.Hook, prog *compiler.Program, oldHandles []uint64) (*tableUpdate, error) {
	live, err := liveGeneration(h)
	if err != nil {
		return nil, err
	}
	next := 1 - live
	for name, kvs := range prog.TableContents(next) {
		m := h.Maps[name]
		if m == nil {
			return nil, fmt.Errorf("%s has no table %s", h.HookID, name)
		}
		if err := fillGeneration(m, next, kvs); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", name, h.HookID, err)
		}
		faults.Point("fill table " + name)
	}
	var fresh []uint32
	for i, handle := range prog.Handles {
		if handle != 0 && (i >= len(oldHandles) || oldHandles[i] == 0) {
			fresh = append(fresh, uint32(i))
		}
	}
	if err := zeroSlots(h, fresh); err != nil {
		return nil, err
	}
	return &tableUpdate{gen: next}, nil
}

// prefillSpare writes generation 1 of a freshly loaded program's tables
// (its maps hold generation 0), so both generations are equal.
func prefillSpare(maps map[string]*ebpf.Map, prog *compiler.Program) error {
	for _, name := range prog.Tables {
		m := maps[name]
		if m == nil {
			return fmt.Errorf("no table %s", name)
		}
		if abi.IsPerfectGen(name) {
			continue // the perfect-hash tables: rewritten whole from the live generation by a map-only change
		}
		var ks, vs [][]byte
		for _, kv := range prog.TableEntries(name, 1) {
			v := kv.Value.([]byte)
			if binary.NativeEndian.Uint32(v) == 0 {
				continue // an empty array slot: zero already
			}
			ks, vs = append(ks, kv.Key.([]byte)), append(vs, v)
		}
		if len(ks) == 0 {
			continue
		}
		if _, err := m.BatchUpdate(records(int(m.KeySize()), ks), records(int(m.ValueSize()), vs), nil); err != nil {
			for i := range ks {
				if err := m.Put(ks[i], vs[i]); err != nil {
					return fmt.Errorf("table %s: %w", name, err)
				}
			}
		}
	}
	return nil
}

// fillGeneration makes generation gen of table m hold exactly kvs: stale
// entries of gen are deleted, missing or different ones written; entries
// of the other generation are left alone. Batched (one system call per few
// thousand entries) where the kernel has the batch API.
func fillGeneration(m *ebpf.Map, gen uint32, kvs []ebpf.MapKV) error {
	ks, vs := int(m.KeySize()), int(m.ValueSize())
	var have map[string][]byte
	if m.Type() != ebpf.Array {
		// Arrays (one-port shapes) are written whole: kvs covers every slot
		// of the generation, and reading both generations to compare costs
		// more than writing one.
		var err error
		if have, err = readTable(m); err != nil {
			return err
		}
	}
	want := make(map[string]bool, len(kvs))
	var putK, putV [][]byte
	for _, kv := range kvs {
		k, v := kv.Key.([]byte), kv.Value.([]byte)
		if len(k) != ks || len(v) != vs {
			return fmt.Errorf("entry of %d/%d bytes, table has %d/%d", len(k), len(v), ks, vs)
		}
		want[string(k)] = true
		if old, ok := have[string(k)]; !ok || !bytes.Equal(old, v) {
			putK, putV = append(putK, k), append(putV, v)
		}
	}
	// Hash tables: the generation is bit 0 of the key's first word.
	// Arrays (one-port shapes, generation<<16 | port) have no deletes:
	// kvs covers every slot of the generation.
	var del [][]byte
	for k := range have {
		if m.Type() != ebpf.Array && binary.NativeEndian.Uint32([]byte(k[:4]))&1 == gen && !want[k] {
			del = append(del, []byte(k))
		}
	}
	if len(del) > 0 {
		if _, err := m.BatchDelete(records(ks, del), nil); err != nil {
			for _, k := range del {
				if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
					return err
				}
			}
		}
	}
	if len(putK) > 0 {
		if _, err := m.BatchUpdate(records(ks, putK), records(vs, putV), nil); err != nil {
			for i := range putK {
				if err := m.Put(putK[i], putV[i]); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// readTable returns every entry of a hash table by key.
func readTable(m *ebpf.Map) (map[string][]byte, error) {
	ks, vs := int(m.KeySize()), int(m.ValueSize())
	out := map[string][]byte{}
	const chunk = 4096
	keys, vals := records(ks, make([][]byte, chunk)), records(vs, make([][]byte, chunk))
	var cursor ebpf.MapBatchCursor
	for {
		n, err := m.BatchLookup(&cursor, keys, vals, nil)
		kv, vv := reflect.ValueOf(keys), reflect.ValueOf(vals)
		for i := 0; i < n; i++ {
			out[string(kv.Index(i).Slice(0, ks).Bytes())] = append([]byte(nil), vv.Index(i).Slice(0, vs).Bytes()...)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if err != nil {
			break // no batch API: iterate
		}
	}
	out = map[string][]byte{}
	key, val := make([]byte, ks), make([]byte, vs)
	it := m.Iterate()
	for it.Next(&key, &val) {
		out[string(key)] = append([]byte(nil), val...)
	}
	return out, it.Err()
}

// records packs byte strings of one size for the batch calls.
func records(size int, recs [][]byte) any { return bpf.Records(size, recs) }

// switchTables makes every hook of st with tables read the generation its
// record names (0 for a program loaded fresh). Idempotent.
func switchTables(st *liveState, g *bpf.Gen) error {
	for _, h := range st.hooks() {
		gh, err := g.Hook(h.id())
		if err != nil {
			return err
		}
		if gh == nil {
			continue
		}
		if ctl := gh.Maps[abi.ControlMap]; ctl != nil {
			var c abi.Control
			if err = ctl.Lookup(uint32(0), &c); err == nil && c.Generation != h.TableGen {
				c.Generation = h.TableGen
				if err = ctl.Put(uint32(0), c); err == nil {
					faults.Point("switch tables " + h.id().String())
				}
			}
		}
		gh.Close()
		if err != nil {
			return fmt.Errorf("control map of %s: %w", h.id(), err)
		}
	}
	return nil
}
