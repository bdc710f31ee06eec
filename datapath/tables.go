package datapath

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"

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
	// residue holds, for counter slots the hook did not use before, what
	// the map holds there now (left by rules deleted earlier): the new
	// rule's counter starts from it.
	residue map[int]abi.Counter
}

func progDigest(p *compiler.Program) string { return hex.EncodeToString(p.Digest[:]) }

// slotsCompatible reports whether counters keep their meaning: every slot
// the old program used holds the same rule's counter in the new one (rules
// added at the end, or removed from the end, or replaced in place).
func slotsCompatible(old, new []uint64) bool {
	for i := 0; i < len(old) && i < len(new); i++ {
		if old[i] != new[i] {
			return false
		}
	}
	return true
}

// prepareTables writes prog's entries into the generation of h's tables
// that the running program does not read, and returns the update.
func prepareTables(h *bpf.Hook, prog *compiler.Program, oldSlots int) (*tableUpdate, error) {
	ctl := h.Maps[abi.ControlMap]
	if ctl == nil {
		return nil, fmt.Errorf("%s has no control map", h.HookID)
	}
	var c abi.Control
	if err := ctl.Lookup(uint32(0), &c); err != nil {
		return nil, fmt.Errorf("read control map of %s: %w", h.HookID, err)
	}
	next := 1 - c.Generation&1
	for name, kvs := range prog.TableContents(next) {
		m := h.Maps[name]
		if m == nil {
			return nil, fmt.Errorf("%s has no table %s", h.HookID, name)
		}
		if err := clearGeneration(m, next); err != nil {
			return nil, fmt.Errorf("table %s of %s: %w", name, h.HookID, err)
		}
		for _, kv := range kvs {
			if err := m.Put(kv.Key, kv.Value); err != nil {
				return nil, fmt.Errorf("table %s of %s: %w", name, h.HookID, err)
			}
		}
		faults.Point("fill table " + name)
	}
	u := &tableUpdate{gen: next, residue: map[int]abi.Counter{}}
	if m := h.Counters(); m != nil {
		for i := oldSlots; i < len(prog.Handles) && i < int(m.MaxEntries()); i++ {
			v, err := bpf.ReadCounter(m, i)
			if err != nil {
				return nil, err
			}
			u.residue[i] = v
		}
	}
	return u, nil
}

// clearGeneration deletes the entries of generation gen from a table.
func clearGeneration(m *ebpf.Map, gen uint32) error {
	var stale [][]byte
	key, val := make([]byte, m.KeySize()), make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&key, &val) {
		if binary.NativeEndian.Uint32(key[:4])&1 == gen {
			stale = append(stale, append([]byte(nil), key...))
		}
	}
	if err := it.Err(); err != nil {
		return err
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

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
