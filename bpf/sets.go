package bpf

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	"github.com/cilium/ebpf"
)

// setPin is where a set's map is pinned. bpffs refuses dots in names, set
// names may have them, and colons they can't have stand in for them.
func (s *Store) setPin(name string) string {
	return filepath.Join(s.Dir, "sets", strings.ReplaceAll(name, ".", ":"))
}

// SetMap opens the pinned map of a named set, nil if there is none.
func (s *Store) SetMap(name string) (*ebpf.Map, error) {
	return loadPinnedMapIfAny(s.setPin(name))
}

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

// PinSet pins m as the map of set name, replacing the previous one.
func (s *Store) PinSet(name string, m *ebpf.Map) error {
	return pinReplace(m, s.setPin(name))
}

// UnpinSetsExcept removes the pins of sets not in keep.
func (s *Store) UnpinSetsExcept(keep map[string]bool) error {
	ents, err := os.ReadDir(filepath.Join(s.Dir, "sets"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	var errs []error
	for _, e := range ents {
		if !keep[strings.ReplaceAll(e.Name(), ":", ".")] {
			errs = append(errs, os.Remove(filepath.Join(s.Dir, "sets", e.Name())))
		}
	}
	return errors.Join(errs...)
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
	}
	for k := range have {
		if _, ok := want[k]; !ok {
			if err := m.Delete([]byte(k)); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("delete element from set %s: %w", spec.Name, err)
			}
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
