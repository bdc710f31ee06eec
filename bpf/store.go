// Package bpf loads sfunnel's eBPF programs through the verifier, attaches
// them to TC hooks (tcx links, or clsact + cls_bpf where tcx is missing),
// pins links and maps under bpffs so the datapath outlives the command, and
// swaps programs atomically.
//
// Pinned layout, one directory per network namespace (the same interface
// name can exist in several):
//
//	/sys/fs/bpf/sfunnel/netns-<inode>/
//	    netns                 array map: the namespace cookie (detects a reused inode)
//	    netns_handle          array map: the namespace's file handle (nshandle.go)
//	    lock                  (the directory itself is flock'ed by writers)
//	    current -> gen-N      the committed generation, what readers read
//	    next -> gen-M         only while (or if) a commit is making gen-M live
//	    gen-N/
//	        state             array map: the caller's state record
//	        sets/<name>       named set maps, shared by every program using them (dots as colons)
//	        hooks/<ifname>/<hook>/   (dots in ifname written as colons)
//	            prog          the hook's program
//	            counters      per-rule per-CPU counters
//	            stats, ...    the program's other maps
//	    links/<ifname>/<hook>/
//	        link              the tcx link (absent in clsact mode: the directory marks the filter as ours)
//
// See datapath's commit protocol for how generations are made live.
package bpf

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// DefaultRoot is where sfunnel keeps its pinned state.
const DefaultRoot = "/sys/fs/bpf/sfunnel"

// Options configure a Store.
type Options struct {
	// Root is the state root; "" means DefaultRoot. A bpffs is mounted at
	// /sys/fs/bpf when Root is under it and nothing is mounted there.
	Root string
	// ForceClsact attaches with clsact + cls_bpf even where tcx works
	// (tests of the fallback path, or a user's choice).
	ForceClsact bool
}

// Store is sfunnel's pinned state in the current network namespace (that of
// the calling thread).
type Store struct {
	// Dir is the namespace's state directory.
	Dir  string
	opts Options
}

// Open finds (or creates) the state directory of the current network
// namespace, mounting bpffs if needed. A directory left behind by a deleted
// namespace whose inode number was reused is wiped first.
func Open(opts Options) (*Store, error) {
	if opts.Root == "" {
		opts.Root = DefaultRoot
	}
	opts.Root = hostRoot(opts.Root)
	if err := ensureBPFFS(opts.Root); err != nil {
		return nil, err
	}
	ino, cookie, err := netnsID()
	if err != nil {
		return nil, err
	}
	s := &Store{Dir: filepath.Join(opts.Root, fmt.Sprintf("netns-%d", ino)), opts: opts}
	if err := s.claim(cookie); err != nil {
		return nil, err
	}
	return s, nil
}

// hostRoot handles `ip netns exec`: it gives the command a private mount
// namespace with a fresh /sys, so a bpffs mounted (or pinned to) there would
// vanish when the command exits, and with it every link held only by its
// pins. When /sys/fs/bpf is not a bpffs here but is one in the mount
// namespace of pid 1 or of an ancestor process (the shell that ran `ip
// netns exec`), the state goes there, through /proc/PID/root.
func hostRoot(root string) string {
	const mnt = "/sys/fs/bpf"
	if !strings.HasPrefix(root+"/", mnt+"/") || isBPFFS(mnt) {
		return root
	}
	self, err := os.Readlink("/proc/self/ns/mnt")
	if err != nil {
		return root
	}
	pids := []int{1}
	for pid, i := os.Getppid(), 0; pid > 1 && i < 8; i++ {
		pids = append(pids, pid)
		pid = parentOf(pid)
	}
	for _, pid := range pids {
		proc := fmt.Sprintf("/proc/%d", pid)
		if ns, err := os.Readlink(proc + "/ns/mnt"); err == nil && ns != self && isBPFFS(proc+"/root"+mnt) {
			return proc + "/root" + root
		}
	}
	return root
}

// parentOf returns the parent pid of pid (0 if unknown).
func parentOf(pid int) int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// pid (comm) state ppid ...; comm may contain spaces and parentheses.
	i := strings.LastIndexByte(string(b), ')')
	var state byte
	var ppid int
	if i < 0 {
		return 0
	}
	fmt.Sscanf(string(b[i+1:]), " %c %d", &state, &ppid)
	return ppid
}

// OpenExisting is Open for readers: it creates and mounts nothing, and
// returns nil (and no error) when the namespace has no state (or only the
// stale state of a dead namespace with the same inode).
func OpenExisting(opts Options) (*Store, error) {
	if opts.Root == "" {
		opts.Root = DefaultRoot
	}
	opts.Root = hostRoot(opts.Root)
	ino, cookie, err := netnsID()
	if err != nil {
		return nil, err
	}
	s := &Store{Dir: filepath.Join(opts.Root, fmt.Sprintf("netns-%d", ino)), opts: opts}
	m, err := ebpf.LoadPinnedMap(filepath.Join(s.Dir, "netns"), nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", s.Dir, permission(err))
	}
	defer m.Close()
	var got uint64
	if err := m.Lookup(uint32(0), &got); err != nil || got != cookie {
		return nil, nil
	}
	return s, nil
}

// ensureBPFFS makes sure root lives on a bpf filesystem.
func ensureBPFFS(root string) error {
	if err := os.MkdirAll(root, 0o700); err == nil {
		if isBPFFS(root) {
			return nil
		}
	}
	const mnt = "/sys/fs/bpf"
	if !isBPFFS(mnt) {
		if err := unix.Mount("bpf", mnt, "bpf", 0, "mode=0700"); err != nil {
			if errors.Is(err, unix.EPERM) {
				return fmt.Errorf("mount bpffs at %s: %w (needs CAP_SYS_ADMIN)", mnt, os.ErrPermission)
			}
			return fmt.Errorf("mount bpffs at %s: %w", mnt, err)
		}
	}
	if err := os.MkdirAll(root, 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	if !isBPFFS(root) {
		return fmt.Errorf("state directory %s is not on a bpf filesystem", root)
	}
	return nil
}

func isBPFFS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && uint32(st.Type) == unix.BPF_FS_MAGIC
}

// netnsID returns the inode and the cookie of the calling thread's network
// namespace. The inode names the directory; the cookie (never reused while
// the machine runs) tells a live namespace from a dead one with the same inode.
func netnsID() (ino uint64, cookie uint64, err error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return 0, 0, fmt.Errorf("identify network namespace: %w", err)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, 0, fmt.Errorf("identify network namespace: %w", err)
	}
	defer unix.Close(fd)
	c, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		// Before 5.14 there is no cookie: the inode alone has to do.
		c = 0
	}
	return st.Ino, c, nil
}

// claim creates the namespace directory, or wipes it when it belongs to a
// namespace that no longer exists.
func (s *Store) claim(cookie uint64) error {
	path := filepath.Join(s.Dir, "netns")
	m, err := ebpf.LoadPinnedMap(path, nil)
	if err == nil {
		var got uint64
		lerr := m.Lookup(uint32(0), &got)
		m.Close()
		if lerr == nil && got == cookie {
			pinHandle(s.Dir) // directories of older sfunnels have none
			return nil
		}
		if err := os.RemoveAll(s.Dir); err != nil {
			return fmt.Errorf("remove stale state %s: %w", s.Dir, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("open %s: %w", path, permission(err))
	}
	if err := os.MkdirAll(filepath.Join(s.Dir, "links"), 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	m, err = ebpf.NewMap(&ebpf.MapSpec{Name: "sfunnel_netns", Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		return fmt.Errorf("create netns map: %w", permission(err))
	}
	defer m.Close()
	var v [8]byte
	binary.NativeEndian.PutUint64(v[:], cookie)
	if err := m.Put(uint32(0), v[:]); err != nil {
		return fmt.Errorf("write netns map: %w", err)
	}
	pinHandle(s.Dir)
	return pinReplace(m, path)
}

// Lock takes the namespace's writer lock, so two sfunnel processes don't
// interleave their transactions (readers take no lock). Call the returned
// function to release it. The lock is an flock on the state directory: the
// kernel drops it when its holder dies, however it dies.
func (s *Store) Lock() (func(), error) {
	unlock, _, err := s.lock(unix.LOCK_EX)
	return unlock, err
}

// TryLock takes the writer lock if nobody holds it; ok is false otherwise.
func (s *Store) TryLock() (unlock func(), ok bool, err error) {
	return s.lock(unix.LOCK_EX | unix.LOCK_NB)
}

func (s *Store) lock(how int) (func(), bool, error) {
	f, err := os.Open(s.Dir)
	if err != nil {
		return nil, false, fmt.Errorf("lock state: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), how); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, false, nil
		}
		return nil, false, fmt.Errorf("lock state: %w", err)
	}
	return func() { f.Close() }, true, nil
}

// Remove deletes the namespace's whole state directory. Links pinned only
// there are released, which detaches them.
func (s *Store) Remove() error {
	return os.RemoveAll(s.Dir)
}

// pinner is a pinnable BPF object.
type pinner interface{ Pin(string) error }

// pinReplace pins obj at path, atomically replacing whatever was pinned there
// (pin under a temporary name, then rename over).
func pinReplace(obj pinner, path string) error {
	tmp := path + "_new" // bpffs refuses dots in names
	os.Remove(tmp)
	if err := obj.Pin(tmp); err != nil {
		return fmt.Errorf("pin %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("pin %s: %w", path, err)
	}
	return nil
}

// permission adds a hint to permission errors; errors.Is(err,
// os.ErrPermission) still holds.
func permission(err error) error {
	if errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("%w (needs CAP_BPF and CAP_NET_ADMIN, or root)", err)
	}
	return err
}
