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
	s, err := b.existing()
	if err != nil || s == nil {
		return nil, err
	}
	st, err := readState(s)
	if err != nil || st == nil {
		return nil, err
	}
	var out []HookStatus
	for _, h := range st.Hooks {
		l, err := s.Live(h.id())
		if err != nil {
			return nil, err
		}
		if l == nil {
			continue
		}
		hs := HookStatus{Ifname: h.Ifname, Hook: h.Hook, Mode: l.Mode, Stats: map[string]uint64{}, MTUExceeded: map[uint64]uint64{}}
		if info, err := l.Prog.Info(); err == nil {
			hs.ProgID, _ = info.ID()
		}
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
					if i < len(h.Handles) && n > 0 {
						hs.MTUExceeded[h.Handles[i]] = n
					}
				}
			}
		}
		l.Close()
		out = append(out, hs)
	}
	return out, nil
}
