package bpf

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Namespace file handles. Since Linux 6.18, name_to_handle_at(2) gives a
// network namespace a file handle (nsfs's; the namespace's 64-bit id,
// never reused while the machine runs), and open_by_handle_at(2) opens the
// namespace from it while it lives, and fails with ESTALE once it is gone.
// Every state directory keeps its namespace's handle (handlePin), so that
// CollectGarbage tells dead namespaces from live ones with one syscall each
// instead of reading every thread's and every open file's namespace.

// handlePin is the array map holding the handle: type (uint32), length
// (uint32), bytes.
const (
	handlePin  = "netns_handle"
	handleSize = 8 + 128 // MAX_HANDLE_SZ
)

// pinHandle records the calling thread's namespace handle in dir, if it
// has none yet. Best effort: without a handle (an older kernel) the
// collector scans /proc for this directory as before.
func pinHandle(dir string) {
	path := filepath.Join(dir, handlePin)
	if _, err := os.Stat(path); err == nil {
		return
	}
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, "/proc/thread-self/ns/net", unix.AT_SYMLINK_FOLLOW)
	if err != nil || h.Size() > handleSize-8 {
		return
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "sfunnel_nsfh", Type: ebpf.Array, KeySize: 4, ValueSize: handleSize, MaxEntries: 1})
	if err != nil {
		return
	}
	defer m.Close()
	v := make([]byte, handleSize)
	binary.NativeEndian.PutUint32(v, uint32(h.Type()))
	binary.NativeEndian.PutUint32(v[4:], uint32(h.Size()))
	copy(v[8:], h.Bytes())
	if m.Put(uint32(0), v) == nil {
		pinReplace(m, path)
	}
}

type liveness int

const (
	nsUnknown liveness = iota // no handle, or the kernel can't tell
	nsLive
	nsDead
)

// nsAlive tells from dir's handle whether its namespace still exists.
func nsAlive(dir string) liveness {
	m, err := ebpf.LoadPinnedMap(filepath.Join(dir, handlePin), nil)
	if err != nil {
		return nsUnknown
	}
	defer m.Close()
	v := make([]byte, handleSize)
	if m.ValueSize() != handleSize || m.Lookup(uint32(0), v) != nil {
		return nsUnknown
	}
	n := binary.NativeEndian.Uint32(v[4:])
	if n == 0 || n > handleSize-8 {
		return nsUnknown
	}
	mount, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nsUnknown
	}
	defer unix.Close(mount)
	fd, err := unix.OpenByHandleAt(mount, unix.NewFileHandle(int32(binary.NativeEndian.Uint32(v)), v[8:8+n]), unix.O_RDONLY|unix.O_CLOEXEC)
	switch {
	case err == nil:
		unix.Close(fd)
		return nsLive
	case errors.Is(err, unix.ESTALE):
		return nsDead
	}
	return nsUnknown
}
