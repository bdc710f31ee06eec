package bpf

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/cilium/ebpf/link"
)

// CollectGarbage removes the state directories of network namespaces that
// no longer exist (their links are detached already; the pins would
// otherwise keep maps and programs in kernel memory forever, one set per
// dead namespace, e.g. per deleted pod). It returns the directories
// removed.
//
// A directory records a file handle of its namespace (Linux 6.18 and
// later: nsfs file handles), which open_by_handle_at(2) opens while the
// namespace lives and refuses with ESTALE once it is gone: one syscall per
// directory. Only directories without a usable handle (written by an
// older sfunnel, or an older kernel) are judged by scanning the machine:
// a namespace counts as alive while any thread is in it, any process
// holds it open, or it is bind-mounted (ip netns) in this mount
// namespace. Either way, a directory that may still have a program
// attached stays.
func (s *Store) CollectGarbage() ([]string, error) {
	root := filepath.Dir(s.Dir)
	ents, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	cand := map[uint64]string{}  // dead or unknown
	unknown := map[uint64]bool{} // no handle to tell
	for _, e := range ents {
		name := e.Name()
		ino, err := strconv.ParseUint(strings.TrimPrefix(name, "netns-"), 10, 64)
		if err != nil || !strings.HasPrefix(name, "netns-") || filepath.Join(root, name) == s.Dir {
			continue
		}
		dir := filepath.Join(root, name)
		switch nsAlive(dir) {
		case nsLive:
			continue
		case nsUnknown:
			unknown[ino] = true
		}
		cand[ino] = dir
	}
	if len(unknown) > 0 {
		scanNamespaces(cand, unknown)
	}
	var removed []string
	for _, dir := range cand {
		// Asked again last: a live namespace that took over the inode
		// (its sfunnel wipes the stale directory and writes its own
		// handle) may have claimed the directory meanwhile.
		if mayBeAttached(dir) || nsAlive(dir) == nsLive {
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			return removed, fmt.Errorf("remove state of a dead namespace: %w", err)
		}
		removed = append(removed, dir)
	}
	return removed, nil
}

// procScans counts scans of /proc (tests check that handles spare them).
var procScans int

// scanNamespaces removes from cand the namespaces in unknown that
// mounts, threads or open files show alive.
func scanNamespaces(cand map[uint64]string, unknown map[uint64]bool) {
	procScans++
	alive := func(ino uint64) {
		if unknown[ino] {
			delete(cand, ino)
			delete(unknown, ino)
		}
	}
	netnsMounts(alive)
	if len(unknown) == 0 {
		return
	}
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		tasks, _ := filepath.Glob(p + "/task/[0-9]*/ns/net")
		for _, t := range tasks {
			alive(nsInode(t))
		}
	}
	if len(unknown) > 0 {
		for _, p := range procs {
			fds, _ := os.ReadDir(p + "/fd")
			for _, fd := range fds {
				alive(nsInode(filepath.Join(p, "fd", fd.Name())))
			}
		}
	}
}

// mayBeAttached reports whether a state directory still has a program
// attached somewhere: a tcx link that is not detached (its namespace is
// alive after all, held by something the scan can't see), or a clsact hook
// (can't be checked from outside its namespace).
func mayBeAttached(dir string) bool {
	hooks, _ := filepath.Glob(filepath.Join(dir, "links", "*", "*"))
	for _, h := range hooks {
		lk, err := link.LoadPinnedLink(filepath.Join(h, "link"), nil)
		if err != nil {
			return true // clsact
		}
		info, err := lk.Info()
		lk.Close()
		if err != nil || info.TCX() == nil || info.TCX().Ifindex != 0 {
			return true
		}
	}
	return false
}

// nsInode returns N for a link to "net:[N]", 0 otherwise.
func nsInode(link string) uint64 {
	t, err := os.Readlink(link)
	if err != nil || !strings.HasPrefix(t, "net:[") {
		return 0
	}
	n, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(t, "net:["), "]"), 10, 64)
	return n
}

// netnsMounts reports the network namespaces bind-mounted in this mount
// namespace (mountinfo's root field of an nsfs mount reads "net:[N]").
func netnsMounts(alive func(uint64)) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) > 3 && strings.HasPrefix(fields[3], "net:[") {
			n, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimPrefix(fields[3], "net:["), "]"), 10, 64)
			alive(n)
		}
	}
}
