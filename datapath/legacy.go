package datapath

import (
	"encoding/json"
	"fmt"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// legacyState is the state record of sfunnel before generations (version
// 1): the ruleset model dumped as JSON, read once to adopt what an older
// sfunnel left running.
type legacyState struct {
	Version    int
	CtMarkMask uint32
	Ruleset    *ruleset.Ruleset
	Hooks      []struct {
		Ifname  string
		Hook    grammar.Hook
		Handles []uint64
		Base    map[uint64]ruleset.Counter
	}
}

// decodeLegacy turns a version 1 record into a state record. Digests are
// left empty, so the next commit reloads every program.
func decodeLegacy(data []byte) (*liveState, error) {
	var ls legacyState
	if err := json.Unmarshal(data, &ls); err != nil {
		return nil, fmt.Errorf("state of the older sfunnel is unreadable: %w", err)
	}
	if ls.Version != 1 {
		return nil, fmt.Errorf("state of the older sfunnel has version %d, want 1", ls.Version)
	}
	rs := ls.Ruleset
	if rs == nil {
		rs = &ruleset.Ruleset{NextHandle: 1}
	}
	st := stateOf(rs, ls.CtMarkMask, nil, nil, nil)
	st.CtMarkUsed = usesCtMark(rs, nil)
	for _, h := range st.hooks() {
		for _, lh := range ls.Hooks {
			if lh.Ifname == h.ifname && lh.Hook == h.hook {
				h.CounterHandles = lh.Handles
				h.setBase(lh.Base)
			}
		}
	}
	return st, nil
}

// migrate adopts the layout of an older sfunnel: its links become attach
// points, its programs, maps and sets a generation, its ruleset that
// generation's state record. The caller holds the writer lock. A crash
// half way leaves the old layout in place (and an orphan generation), so
// the next command migrates again.
func (b *Backend) migrate(s *bpf.Store) error {
	data, found, err := s.Legacy()
	if err != nil || !found {
		return err
	}
	if cur, err := s.Current(); err != nil || cur != nil {
		if err != nil {
			return err
		}
		return s.RemoveLegacy() // adopted already
	}
	g, err := s.NewGen()
	if err != nil {
		return err
	}
	if _, err := s.AdoptLegacy(g); err != nil {
		return err
	}
	st := &liveState{}
	if data != nil {
		if st, err = decodeLegacy(data); err != nil {
			return err
		}
	}
	// Only hooks whose program was pinned can be run by later commits.
	for i := range st.Interfaces {
		ifc := &st.Interfaces[i]
		kept := ifc.Hooks[:0]
		for _, h := range ifc.Hooks {
			gh, err := g.Hook(h.id())
			if err != nil {
				return err
			}
			if gh != nil {
				gh.Close()
				kept = append(kept, h)
			}
		}
		ifc.Hooks = kept
	}
	st.Generation = g.N
	if err := writeGenState(g, st); err != nil {
		return err
	}
	if err := s.Publish(g); err != nil {
		return err
	}
	return s.RemoveLegacy()
}
