package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"reflect"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/internal/faults"
)

// SetMapFits reports whether a pinned set map can take spec's contents in
// place: same type, key, value and flags, and room enough.
func SetMapFits(m *ebpf.Map, spec *ebpf.MapSpec) bool {
	return m.Type() == spec.Type && m.KeySize() == spec.KeySize && m.ValueSize() == spec.ValueSize &&
		m.Flags() == spec.Flags && int(m.MaxEntries()) >= len(spec.Contents) && m.MaxEntries() >= spec.MaxEntries
}

// NewSetMap creates a set map from spec (not pinned yet: PinSet does that
// once the programs using it are live).
func NewSetMap(spec *ebpf.MapSpec) (*ebpf.Map, error) {
	m, err := ebpf.NewMap(spec)
	if err != nil {
		return nil, fmt.Errorf("create set map %s: %w", spec.Name, permission(err))
	}
	return m, nil
}

// NewSetElements creates a set's elements map holding spec.Contents
// (written in batches where the kernel can).
func NewSetElements(spec *ebpf.MapSpec) (*ebpf.Map, error) {
	empty := spec.Copy()
	empty.Contents = nil
	m, err := ebpf.NewMap(empty)
	if err != nil {
		return nil, fmt.Errorf("create elements map of %s: %w", spec.Name, permission(err))
	}
	var ks, vs [][]byte
	for _, kv := range spec.Contents {
		k, err := marshalBytes(kv.Key, int(m.KeySize()))
		if err == nil {
			var v []byte
			if v, err = marshalBytes(kv.Value, int(m.ValueSize())); err == nil {
				ks, vs = append(ks, k), append(vs, v)
			}
		}
		if err != nil {
			m.Close()
			return nil, fmt.Errorf("set %s: %w", spec.Name, err)
		}
	}
	if len(ks) > 0 {
		if _, err := m.BatchUpdate(Records(int(m.KeySize()), ks), Records(int(m.ValueSize()), vs), nil); err != nil {
			for i := range ks {
				if err := m.Put(ks[i], vs[i]); err != nil {
					m.Close()
					return nil, fmt.Errorf("add element to set %s: %w", spec.Name, err)
				}
			}
		}
	}
	return m, nil
}

// Records packs byte strings of one size into a []([size]byte), the form
// the batch calls take.
func Records(size int, recs [][]byte) any {
	s := reflect.MakeSlice(reflect.SliceOf(reflect.ArrayOf(size, reflect.TypeOf(byte(0)))), len(recs), len(recs))
	for i, r := range recs {
		if r != nil {
			reflect.Copy(s.Index(i), reflect.ValueOf(r))
		}
	}
	return s.Interface()
}

// SyncSet makes the elements of a live set map equal to spec.Contents:
// new and changed entries are written first, then stale ones deleted, so an
// element present before and after never disappears. Keys and values are
// compared as bytes.
func SyncSet(m *ebpf.Map, spec *ebpf.MapSpec) error {
	want := make(map[string][]byte, len(spec.Contents))
	for _, kv := range spec.Contents {
		k, err := marshalBytes(kv.Key, int(m.KeySize()))
		if err != nil {
			return fmt.Errorf("set %s key: %w", spec.Name, err)
		}
		v, err := marshalBytes(kv.Value, int(m.ValueSize()))
		if err != nil {
			return fmt.Errorf("set %s value: %w", spec.Name, err)
		}
		want[string(k)] = v
	}
	have := map[string][]byte{}
	if m.Type() != ebpf.Array {
		k, v := make([]byte, m.KeySize()), make([]byte, m.ValueSize())
		it := m.Iterate()
		for it.Next(&k, &v) {
			have[string(k)] = append([]byte(nil), v...)
		}
		if err := it.Err(); err != nil {
			return fmt.Errorf("read set %s: %w", spec.Name, err)
		}
	}
	for k, v := range want {
		if hv, ok := have[k]; ok && reflect.DeepEqual(hv, v) {
			continue
		}
		if err := m.Put([]byte(k), v); err != nil {
			return fmt.Errorf("add element to set %s: %w", spec.Name, err)
		}
		faults.Point("put element")
	}
	for k := range have {
		if _, ok := want[k]; !ok {
			if err := m.Delete([]byte(k)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("delete element from set %s: %w", spec.Name, err)
			}
			faults.Point("delete element")
		}
	}
	return nil
}

// marshalBytes encodes a map key or value given as MapSpec.Contents holds
// them ([]byte or a fixed-size value) into size bytes, native endian.
func marshalBytes(v any, size int) ([]byte, error) {
	var b []byte
	switch x := v.(type) {
	case []byte:
		b = x
	case nil:
		b = make([]byte, size)
	default:
		var buf bytes.Buffer
		if err := binary.Write(&buf, binary.NativeEndian, v); err != nil {
			return nil, err
		}
		b = buf.Bytes()
	}
	if len(b) != size {
		return nil, fmt.Errorf("%d bytes, want %d", len(b), size)
	}
	return b, nil
}

func loadPinnedMapIfAny(path string) (*ebpf.Map, error) {
	m, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, permission(err))
	}
	return m, nil
}
