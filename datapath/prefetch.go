package datapath

import "github.com/sfunnel/sfunnel/bpf"

// Reading ahead. A command parses its input before it reads the live
// state (parse and check before taking any lock), and the state record of
// ten thousand rules takes some 20 ms to decode (7 % of `sfunnel -f` of
// 10 000 rules, which needs the old record to replace it). It does not
// depend on the input, so it is read on the other CPU while the input is
// parsed. The record read ahead is used only if its generation is still
// the committed one when the command reads the state (under the writer
// lock, for writers): generations never change once published.
//
// (Kernel BTF, which the compiler reads, was tried too: reading it during
// the parse added its garbage to the parse's and raised the peak RSS by
// some 6 MB.)

// statePrefetch is a state record being read ahead.
type statePrefetch struct {
	gen uint64
	st  chan *liveState
}

// Prefetch starts reading the committed state record on another
// goroutine. It must be called on the thread that is in the command's
// network namespace (the state directory is the namespace's); the reads
// themselves are of pinned objects, the same from any thread.
func (b *Backend) Prefetch() {
	s, err := b.existing()
	if err != nil || s == nil {
		return
	}
	g, err := s.Current()
	if err != nil || g == nil {
		return
	}
	p := &statePrefetch{gen: g.N, st: make(chan *liveState, 1)}
	go func(g *bpf.Gen) {
		st, err := readGenState(g)
		if err != nil {
			st = nil
		}
		p.st <- st
	}(g)
	b.pre = p
}

// prefetched returns the record read ahead if it is g's (nil otherwise),
// and forgets it.
func (b *Backend) prefetched(g *bpf.Gen) *liveState {
	p := b.pre
	if p == nil {
		return nil
	}
	b.pre = nil
	st := <-p.st
	if st == nil || p.gen != g.N || st.Generation != g.N {
		return nil
	}
	return st
}
