package datapath

import (
	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
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
}

// Status returns the live hooks in the order of the ruleset.
func (b *Backend) Status() ([]HookStatus, error) {
	s, g, st, err := b.snapshot()
	if err != nil || st == nil {
		return nil, err
	}
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
