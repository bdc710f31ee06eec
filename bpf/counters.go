package bpf

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// Counter is one rule's counter: the value type of the per-CPU "counters"
// map.
type Counter struct {
	Packets, Bytes uint64
}

// perCPU reads the per-CPU values of one counters index.
func perCPU(m *ebpf.Map, i int) ([]Counter, error) {
	var v []Counter
	if err := m.Lookup(uint32(i), &v); err != nil {
		return nil, fmt.Errorf("read counter %d: %w", i, err)
	}
	return v, nil
}

// ReadCounters returns the counters of every index, summed over CPUs.
func ReadCounters(m *ebpf.Map) ([]Counter, error) {
	out := make([]Counter, m.MaxEntries())
	for i := range out {
		v, err := perCPU(m, i)
		if err != nil {
			return nil, err
		}
		for _, c := range v {
			out[i].Packets += c.Packets
			out[i].Bytes += c.Bytes
		}
	}
	return out, nil
}

// ZeroCounters zeroes the given indexes (all when idx is nil).
func ZeroCounters(m *ebpf.Map, idx []int) error {
	if idx == nil {
		for i := 0; i < int(m.MaxEntries()); i++ {
			idx = append(idx, i)
		}
	}
	zero := make([]Counter, ebpfPossibleCPUs())
	for _, i := range idx {
		if i < 0 || i >= int(m.MaxEntries()) {
			continue
		}
		if err := m.Put(uint32(i), zero); err != nil {
			return fmt.Errorf("reset counter %d: %w", i, err)
		}
	}
	return nil
}

func ebpfPossibleCPUs() int {
	n, err := ebpf.PossibleCPU()
	if err != nil || n < 1 {
		return 1
	}
	return n
}

// carry moves per-rule values from the old map into the new one along idx
// (new index → old index, -1 for none). With snap nil it copies the old
// values and returns them as the snapshot; with a snapshot it adds what the
// old map gained since (packets counted by the old program until the swap).
// Missing maps carry nothing.
func carry[T any](old, nw *ebpf.Map, idx []int, snap [][]T, add func(cur *T, now, was T) bool) ([][]T, error) {
	if old == nil || nw == nil {
		return nil, nil
	}
	get := func(m *ebpf.Map, i int) ([]T, error) {
		var v []T
		if err := m.Lookup(uint32(i), &v); err != nil {
			return nil, fmt.Errorf("read %s[%d]: %w", m, i, err)
		}
		return v, nil
	}
	first := snap == nil
	if first {
		snap = make([][]T, len(idx))
	}
	for i, j := range idx {
		if j < 0 || j >= int(old.MaxEntries()) || i >= int(nw.MaxEntries()) {
			continue
		}
		if !first && snap[i] == nil {
			continue
		}
		now, err := get(old, j)
		if err != nil {
			return nil, err
		}
		if first {
			if err := nw.Put(uint32(i), now); err != nil {
				return nil, fmt.Errorf("carry counter %d: %w", i, err)
			}
			snap[i] = now
			continue
		}
		cur, err := get(nw, i)
		if err != nil {
			return nil, err
		}
		changed := false
		for c := range cur {
			if c < len(now) && c < len(snap[i]) && add(&cur[c], now[c], snap[i][c]) {
				changed = true
			}
		}
		if changed {
			if err := nw.Put(uint32(i), cur); err != nil {
				return nil, fmt.Errorf("carry counter %d: %w", i, err)
			}
		}
	}
	return snap, nil
}

func addCounter(cur *Counter, now, was Counter) bool {
	cur.Packets += now.Packets - was.Packets
	cur.Bytes += now.Bytes - was.Bytes
	return now != was
}

func addUint64(cur *uint64, now, was uint64) bool {
	*cur += now - was
	return now != was
}

// ReadStats returns a per-CPU array of uint64 summed over CPUs.
func ReadStats(m *ebpf.Map) ([]uint64, error) {
	out := make([]uint64, m.MaxEntries())
	for i := range out {
		var v []uint64
		if err := m.Lookup(uint32(i), &v); err != nil {
			return nil, fmt.Errorf("read stat %d: %w", i, err)
		}
		for _, x := range v {
			out[i] += x
		}
	}
	return out, nil
}
