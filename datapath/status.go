package datapath

import (
	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// HookStatus is what the kernel shows of one live hook: for `monitor`
// (poll and print what grew) and verbose listings. Counts are since the
// hook's current program was loaded.
type HookStatus struct {
	Ifname string
	Hook   grammar.Hook
	Mode   bpf.Mode // tcx, or clsact (fallback)
	ProgID ebpf.ProgramID
	// Stats are the datapath's events by abi.StatNames (fragments
	// passed, invalid unfunnels, funnels over the MTU, ...).
	Stats map[string]uint64
	// MTUExceeded counts, by rule handle, the funnels that made a packet
	// longer than the egress MTU.
	MTUExceeded map[uint64]uint64
	// LeftAlone counts, by rule handle and reason (abi.StatNames), the
	// packets the rule matched but did not transform.
	LeftAlone map[uint64]map[string]uint64
}

// Status returns the live hooks in the order of the ruleset.
func (b *Backend) Status() ([]HookStatus, error) {
	var out []HookStatus
	err := b.readLive(func(s *bpf.Store, g *bpf.Gen, st *liveState) error {
		var err error
		out, err = statusOf(s, g, st)
		return err
	})
	return out, err
}

// statusOf is the status of st's live hooks, read from generation g.
func statusOf(s *bpf.Store, g *bpf.Gen, st *liveState) ([]HookStatus, error) {
	var out []HookStatus
	for _, h := range st.hooks() {
		a, err := s.Attached(h.id())
		if err != nil {
			return nil, err
		}
		if a == nil {
			continue
		}
		l, err := g.Hook(h.id())
		if err != nil {
			return nil, err
		}
		if l == nil {
			continue
		}
		hs := HookStatus{Ifname: h.ifname, Hook: h.hook, Mode: a.Mode, ProgID: a.ProgID, Stats: map[string]uint64{}, MTUExceeded: map[uint64]uint64{}}
		if m := l.Maps[abi.StatsMap]; m != nil {
			if v, err := bpf.ReadStats(m); err == nil {
				for i, n := range v {
					if i < len(abi.StatNames) {
						hs.Stats[abi.StatNames[i]] = n
					}
				}
				hs.LeftAlone = leftAlone(v, h.CounterHandles)
			}
		}
		if m := l.Maps[abi.RuleMTUMap]; m != nil {
			if v, err := bpf.ReadStats(m); err == nil {
				for i, n := range v {
					if i < len(h.CounterHandles) && n > 0 {
						hs.MTUExceeded[h.CounterHandles[i]] = n
					}
				}
			}
		}

		l.Close()
		out = append(out, hs)
	}
	return out, nil
}

// leftAlone turns the per-rule part of a stats map ((slot+1)*NumStats +
// reason) into counts by handle and reason name; zero counts are left out.
func leftAlone(v []uint64, handles []uint64) map[uint64]map[string]uint64 {
	out := map[uint64]map[string]uint64{}
	for k := abi.NumStats; k < len(v); k++ {
		slot, reason := k/abi.NumStats-1, k%abi.NumStats
		if v[k] == 0 || slot >= len(handles) || handles[slot] == 0 {
			continue
		}
		h := handles[slot]
		if out[h] == nil {
			out[h] = map[string]uint64{}
		}
		out[h][abi.StatNames[reason]] += v[k]
	}
	return out
}

// LeftAlone returns, by rule handle and reason, the packets the live rules
// matched but left untouched (since their hook's program was loaded).
func (b *Backend) LeftAlone() (map[uint64]map[string]uint64, error) {
	hs, err := b.Status()
	if err != nil {
		return nil, err
	}
	out := map[uint64]map[string]uint64{}
	for _, h := range hs {
		for handle, m := range h.LeftAlone {
			out[handle] = m
		}
	}
	return out, nil
}

var _ ruleset.LeftAloner = (*Backend)(nil)
