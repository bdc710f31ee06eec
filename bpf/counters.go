package bpf

import (
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
