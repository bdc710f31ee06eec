package datapath

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// stateVersion changes when the stored description changes incompatibly.
const stateVersion = 1

// liveState is what is stored in the kernel next to the links: the ruleset
// as committed and, per attached hook, what its counters map indexes mean.
type liveState struct {
	Version    int
	CtMarkMask uint32
	Ruleset    *ruleset.Ruleset
	Hooks      []hookState
}

type hookState struct {
	Ifname  string
	Hook    grammar.Hook
	Handles []uint64 // counters index → rule handle
	Digest  string   // of the program, to skip swapping identical ones
	Sets    []string // named sets the program uses
	// Base holds, by handle, what earlier programs of this hook counted
	// for rules that survived into this one: a rule's counter is its base
	// plus the live map. (Copying into the live map instead would race
	// with the program counting in it.)
	Base map[uint64]ruleset.Counter `json:",omitempty"`
}

func (h hookState) id() bpf.HookID { return bpf.HookID{Ifname: h.Ifname, Hook: h.Hook} }

func readState(s *bpf.Store) (*liveState, error) {
	data, err := s.ReadState()
	if err != nil || data == nil {
		return nil, err
	}
	var st liveState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("stored ruleset is corrupt: %w", err)
	}
	if st.Version != stateVersion {
		return nil, fmt.Errorf("stored ruleset has version %d, this sfunnel reads %d (flush ruleset with the sfunnel that wrote it)", st.Version, stateVersion)
	}
	return &st, nil
}

func writeState(s *bpf.Store, st *liveState) error {
	st.Version = stateVersion
	data, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode ruleset: %w", err)
	}
	return s.WriteState(data)
}

func (st *liveState) hook(id bpf.HookID) *hookState {
	if st == nil {
		return nil
	}
	for i := range st.Hooks {
		if st.Hooks[i].id() == id {
			return &st.Hooks[i]
		}
	}
	return nil
}

// digest identifies a compiled program: instructions, map shapes, contents
// of its own maps (not of named sets, which change live) and handle order.
// Equal digests mean the running program can stay.
func digest(spec *ebpf.CollectionSpec, handles []uint64) string {
	h := sha256.New()
	w := func(vs ...any) {
		for _, v := range vs {
			fmt.Fprint(h, v, "\x00")
		}
	}
	names := make([]string, 0, len(spec.Programs))
	for n := range spec.Programs {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		p := spec.Programs[n]
		w("prog", n, p.Type, p.AttachType)
		for _, ins := range p.Instructions {
			w(uint8(ins.OpCode), uint8(ins.Dst), uint8(ins.Src), ins.Offset, ins.Constant, ins.Reference(), ins.Symbol())
		}
	}
	names = names[:0]
	for n := range spec.Maps {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		m := spec.Maps[n]
		w("map", n, m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
		if !isSetMap(n) {
			for _, kv := range m.Contents {
				w(kv.Key, kv.Value)
			}
		}
	}
	binary.Write(h, binary.LittleEndian, handles)
	return hex.EncodeToString(h.Sum(nil))
}

func isSetMap(name string) bool { return len(name) > 4 && name[:4] == "set_" }
