package datapath

import (
	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
)

// TraceSource is the trace ring buffer of one live hook whose program has
// a traced rule (`meta nftrace set 1`), and what its rule indexes mean.
type TraceSource struct {
	Ifname string
	Hook   grammar.Hook
	Map    *ebpf.Map   // abi.TraceMap; the caller closes it
	Rules  []TraceRule // by the rule index of abi.TraceRecord
}

// TraceRule is a rule as trace records name it.
type TraceRule struct {
	Handle uint64
	Text   string // canonical rule text
}

// TraceSources opens the trace ring buffers of the live hooks (in the
// calling thread's network namespace). Reading them can happen anywhere.
func (b *Backend) TraceSources() ([]TraceSource, error) {
	var out []TraceSource
	err := b.readLive(func(s *bpf.Store, g *bpf.Gen, st *liveState) error {
		closeSources(out)
		var err error
		out, err = traceSourcesOf(b, s, g, st)
		return err
	})
	if err != nil {
		closeSources(out)
		return nil, err
	}
	return out, nil
}

// traceSourcesOf opens the trace ring buffers of st's live hooks in g.
func traceSourcesOf(b *Backend, s *bpf.Store, g *bpf.Gen, st *liveState) ([]TraceSource, error) {
	var out []TraceSource
	for _, h := range st.hooks() {
		if !b.attached(s, h.id()) {
			continue
		}
		l, err := g.Hook(h.id())
		if err != nil {
			closeSources(out)
			return nil, err
		}
		if l == nil {
			continue
		}
		m := l.Maps[abi.TraceMap]
		if m == nil {
			l.Close()
			continue
		}
		m, err = m.Clone()
		l.Close()
		if err != nil {
			closeSources(out)
			return nil, err
		}
		text := map[uint64]string{}
		for _, r := range h.Rules {
			text[r.Handle] = r.Text
		}
		src := TraceSource{Ifname: h.ifname, Hook: h.hook, Map: m}
		for _, handle := range h.CounterHandles {
			src.Rules = append(src.Rules, TraceRule{Handle: handle, Text: text[handle]})
		}
		out = append(out, src)
	}
	return out, nil
}

func closeSources(srcs []TraceSource) {
	for _, s := range srcs {
		s.Map.Close()
	}
}
