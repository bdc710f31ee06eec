package bpf

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/internal/faults"
)

// A generation's state record is kept in the kernel next to its programs,
// so that a fresh process sees what is live even when no file was written:
// an array map of fixed-size chunks of the data; entry 0 holds the length
// (and rawBlob; without it the chunks are gzip data, as older sfunnels
// wrote them).
const stateChunk = 16 << 10

// WriteState replaces g's state record with data. The new map is built
// completely and then pinned over the old one (rename), so a reader sees
// either the old or the new record.
func (g *Gen) WriteState(data []byte) error { return g.WriteBlob("state", data) }

// ReadState returns g's state record, nil if it has none.
func (g *Gen) ReadState() ([]byte, error) { return g.ReadBlob("state") }

// rawBlob, in the length word, marks a blob stored as is (blobs of older
// sfunnels are gzip data): compressing took a tenth of a small change's
// time for little kernel memory saved.
const rawBlob = 1 << 63

// WriteBlob replaces the named blob of g (a state record, a cache) with
// data, atomically for readers.
func (g *Gen) WriteBlob(name string, data []byte) error {
	z := bytes.NewBuffer(data)
	n := (z.Len() + stateChunk - 1) / stateChunk
	m, err := ebpf.NewMap(&ebpf.MapSpec{
		Name: "sfunnel_state", Type: ebpf.Array, KeySize: 4, ValueSize: stateChunk,
		MaxEntries: uint32(n + 1), Flags: 0,
	})
	if err != nil {
		return fmt.Errorf("create state map: %w", permission(err))
	}
	defer m.Close()
	buf := make([]byte, stateChunk)
	binary.NativeEndian.PutUint64(buf, uint64(z.Len())|rawBlob)
	if err := m.Put(uint32(0), buf); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	for i := 0; i < n; i++ {
		chunk := z.Bytes()[i*stateChunk:]
		if len(chunk) >= stateChunk {
			chunk = chunk[:stateChunk] // written as is, without a copy
		} else {
			clear(buf)
			copy(buf, chunk)
			chunk = buf
		}
		if err := m.Put(uint32(i+1), chunk); err != nil {
			return fmt.Errorf("write state: %w", err)
		}
	}
	if err := pinReplace(m, filepath.Join(g.Dir, name)); err != nil {
		return err
	}
	faults.Point("write " + name)
	return nil
}

// ReadBlob returns the named blob of g, nil if it has none.
func (g *Gen) ReadBlob(name string) ([]byte, error) {
	m, err := ebpf.LoadPinnedMap(filepath.Join(g.Dir, name), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open state: %w", permission(err))
	}
	defer m.Close()
	if m.ValueSize() != stateChunk {
		return nil, fmt.Errorf("state map has value size %d, want %d", m.ValueSize(), stateChunk)
	}
	buf := make([]byte, stateChunk)
	if err := m.Lookup(uint32(0), buf); err != nil {
		return nil, fmt.Errorf("read state: %w", err)
	}
	size := binary.NativeEndian.Uint64(buf)
	raw := size&rawBlob != 0
	size &^= rawBlob
	if size > uint64(m.MaxEntries()-1)*stateChunk {
		return nil, fmt.Errorf("state map is corrupt (length %d)", size)
	}
	// Chunks are read straight into their place (the last one whole:
	// the buffer is rounded up).
	chunks := (size + stateChunk - 1) / stateChunk
	z := make([]byte, chunks*stateChunk)
	for i := uint64(0); i < chunks; i++ {
		if err := m.Lookup(uint32(i+1), z[i*stateChunk:(i+1)*stateChunk]); err != nil {
			return nil, fmt.Errorf("read state: %w", err)
		}
	}
	z = z[:size:size]
	if raw {
		return z, nil
	}
	zr, err := gzip.NewReader(bytes.NewReader(z))
	if err != nil {
		return nil, fmt.Errorf("state map is corrupt: %w", err)
	}
	data, err := io.ReadAll(zr)
	if err != nil {
		return nil, fmt.Errorf("state map is corrupt: %w", err)
	}
	return data, nil
}

// LinkBlob makes g hold the same named blob as from (the same map pinned
// again, no copy); nothing happens when from has none.
func (g *Gen) LinkBlob(from *Gen, name string) error {
	m, err := ebpf.LoadPinnedMap(filepath.Join(from.Dir, name), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open %s: %w", name, permission(err))
	}
	defer m.Close()
	if err := pinMapCopy(m, filepath.Join(g.Dir, name)); err != nil {
		return err
	}
	faults.Point("link " + name)
	return nil
}
