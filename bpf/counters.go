package bpf

import (
	"errors"
	"fmt"
	"github.com/sfunnel/sfunnel/abi"

	"github.com/cilium/ebpf"
)

// Counter is one rule's counter: the value type of the per-CPU "counters"
// map.
type Counter = abi.Counter

// perCPU reads the per-CPU values of one counters index.
func perCPU(m *ebpf.Map, i int) ([]Counter, error) {
	var v []Counter
	if err := m.Lookup(uint32(i), &v); err != nil {
		return nil, fmt.Errorf("read counter %d: %w", i, err)
	}
	return v, nil
}

// ReadCounter returns the counter of index i, summed over CPUs.
func ReadCounter(m *ebpf.Map, i int) (Counter, error) {
	var c Counter
	v, err := perCPU(m, i)
	for _, x := range v {
		c.Packets += x.Packets
		c.Bytes += x.Bytes
	}
	return c, err
}

// ReadCounters returns the counters of every index, summed over CPUs.
func ReadCounters(m *ebpf.Map) ([]Counter, error) {
	out := make([]Counter, m.MaxEntries())
	add := func(i int, c Counter) {
		out[i].Packets += c.Packets
		out[i].Bytes += c.Bytes
	}
	if readBatched(m, add) {
		return out, nil
	}
	clear(out)
	for i := range out {
		v, err := perCPU(m, i)
		if err != nil {
			return nil, err
		}
		for _, c := range v {
			add(i, c)
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

// ReadStats returns a per-CPU array of uint64 summed over CPUs.
func ReadStats(m *ebpf.Map) ([]uint64, error) {
	out := make([]uint64, m.MaxEntries())
	if readBatched(m, func(i int, v uint64) { out[i] += v }) {
		return out, nil
	}
	clear(out)
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

// readBatched calls add for every CPU's value of every index of a per-CPU
// array, a few thousand indexes per system call (a stats map has
// NumStats entries per rule: per-index lookups made a listing of 10 000
// rules take a second). It reports false when the kernel has no batch
// lookup for the map; add may then have been called for some indexes.
func readBatched[T any](m *ebpf.Map, add func(i int, v T)) bool {
	ncpu, err := ebpf.PossibleCPU()
	if err != nil {
		return false
	}
	n := int(m.MaxEntries())
	keys := make([]uint32, min(4096, n))
	vals := make([]T, len(keys)*ncpu)
	var cursor ebpf.MapBatchCursor
	for seen := 0; seen < n; {
		got, err := m.BatchLookup(&cursor, keys, vals, nil)
		for j := 0; j < got; j++ {
			if int(keys[j]) >= n {
				return false
			}
			for c := 0; c < ncpu; c++ {
				add(int(keys[j]), vals[j*ncpu+c])
			}
		}
		seen += got
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return true
		}
		if err != nil {
			return false
		}
	}
	return true
}
