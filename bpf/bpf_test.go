package bpf

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"golang.org/x/sys/unix"
)

const (
	tcxNext = -1 // TCX_NEXT / TC_ACT_UNSPEC
	tcShot  = 2  // TC_ACT_SHOT
)

// countingSpec is a program that counts every packet (packets, bytes) at
// index 0 of "counters" and returns verdict; mark is stored in a "stats"
// entry so tests can tell programs apart.
func countingSpec(verdict int32, mark uint64) *ebpf.CollectionSpec {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.StoreImm(asm.R10, -4, 0, asm.Word),
		asm.Mov.Reg(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, -4),
		asm.LoadMapPtr(asm.R1, 0).WithReference("counters"),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.LoadMem(asm.R1, asm.R6, 0, asm.Word), // skb->len
		asm.Add.Imm(asm.R0, 8),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Mov.Imm(asm.R0, verdict).WithSymbol("out"),
		asm.Return(),
	}
	return &ebpf.CollectionSpec{
		Maps: map[string]*ebpf.MapSpec{
			"counters": {Name: "counters", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: 2},
			"stats": {Name: "stats", Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: 1,
				Contents: []ebpf.MapKV{{Key: uint32(0), Value: []uint64{mark}}}},
		},
		Programs: map[string]*ebpf.ProgramSpec{
			ProgramName: {Name: ProgramName, Type: ebpf.SchedCLS, License: "GPL", Instructions: insns},
		},
	}
}

// pair is two namespaces joined by a veth: a (192.0.2.1, if "va") and b
// (192.0.2.2, if "vb").
type pair struct{ a, b *testenv.NS }

func newPair(t *testing.T) pair {
	p := pair{testenv.NewNS(t), testenv.NewNS(t)}
	testenv.Veth(t, p.a, "va", "192.0.2.1/24", p.b, "vb", "192.0.2.2/24")
	return p
}

// udpDelivered sends n datagrams from a to b and returns how many arrived.
func (p pair) udpDelivered(t *testing.T, n int) int {
	t.Helper()
	var rx, tx *net.UDPConn
	must(t, p.b.Do(func() (err error) {
		rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 4739})
		return err
	}))
	defer rx.Close()
	must(t, p.a.Do(func() (err error) {
		tx, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 4739})
		return err
	}))
	defer tx.Close()
	for i := 0; i < n; i++ {
		if _, err := tx.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
	}
	got := 0
	buf := make([]byte, 64)
	for got < n {
		// The first datagram may wait for ARP on a loaded machine.
		wait := 300 * time.Millisecond
		if got == 0 {
			wait = 3 * time.Second
		}
		rx.SetReadDeadline(time.Now().Add(wait))
		if _, _, err := rx.ReadFrom(buf); err != nil {
			break
		}
		got++
	}
	return got
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func load(t *testing.T, spec *ebpf.CollectionSpec) *ebpf.Collection {
	t.Helper()
	c, err := LoadCollection(spec, LoadOptions{What: "test"})
	must(t, err)
	t.Cleanup(c.Close)
	return c
}

func testRoot(t *testing.T) string {
	testenv.RequireRoot(t)
	must(t, ensureBPFFS(DefaultRoot))
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("sfunnel-test-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "_")))
	t.Cleanup(func() { os.RemoveAll(root) })
	return root
}

func TestVerifierErrorIsOneLine(t *testing.T) {
	testenv.RequireRoot(t)
	spec := &ebpf.CollectionSpec{Programs: map[string]*ebpf.ProgramSpec{ProgramName: {
		Name: ProgramName, Type: ebpf.SchedCLS, License: "GPL",
		Instructions: asm.Instructions{asm.Return()}, // r0 never set
	}}}
	_, err := LoadCollection(spec, LoadOptions{What: "eth0 egress"})
	var verr *VerifierError
	if !errors.As(err, &verr) {
		t.Fatalf("want a VerifierError, got %v", err)
	}
	if strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "R0 !read_ok") ||
		!strings.Contains(err.Error(), "eth0 egress") {
		t.Errorf("error %q: want one line naming the hook and the reason", err)
	}
	if !strings.Contains(verr.Log(), "0: (95) exit") {
		t.Errorf("full log lacks the instruction listing:\n%s", verr.Log())
	}
	verr.Verbose = true
	if !strings.Contains(verr.Error(), "\n") {
		t.Errorf("verbose error should carry the log")
	}
}

func TestAttachSwapDetach(t *testing.T) {
	for _, mode := range []Mode{ModeTCX, ModeClsact} {
		t.Run(string(mode), func(t *testing.T) {
			root := testRoot(t)
			p := newPair(t)
			id := HookID{Ifname: "vb", Hook: grammar.HookIngress}
			opts := Options{Root: root, ForceClsact: mode == ModeClsact}
			pass := load(t, countingSpec(tcxNext, 1))

			// Attach a counting pass-through program.
			must(t, p.b.Do(func() error {
				s, err := Open(opts)
				if err != nil {
					return err
				}
				return s.Run(id, pass.Programs[ProgramName])
			}))
			if got := p.udpDelivered(t, 5); got != 5 {
				t.Fatalf("pass program: %d of 5 datagrams arrived", got)
			}
			c, err := ReadCounters(pass.Maps[CountersMap])
			must(t, err)
			if c[0].Packets < 5 || c[0].Bytes < 5*(20+8+5) {
				t.Fatalf("counters %+v, want ≥ 5 packets of ≥ 33 bytes", c[0])
			}

			// A fresh Store (as a fresh process would) sees it attached; Run
			// again replaces the program in place.
			drop := load(t, countingSpec(tcShot, 2))
			must(t, p.b.Do(func() error {
				s, err := Open(opts)
				if err != nil {
					return err
				}
				a, err := s.Attached(id)
				if err != nil || a == nil {
					return fmt.Errorf("not attached after Run: %v %v", a, err)
				}
				if a.Mode != mode || a.ProgID != ProgID(pass.Programs[ProgramName]) {
					return fmt.Errorf("attached %+v, want mode %s program %d", a, mode, ProgID(pass.Programs[ProgramName]))
				}
				if err := s.Run(id, drop.Programs[ProgramName]); err != nil {
					return err
				}
				// Idempotent: running the same program again changes nothing.
				return s.Run(id, drop.Programs[ProgramName])
			}))
			if got := p.udpDelivered(t, 3); got != 0 {
				t.Fatalf("drop program: %d datagrams arrived", got)
			}
			must(t, p.b.Do(func() error {
				s, err := Open(opts)
				if err != nil {
					return err
				}
				a, err := s.Attached(id)
				if err != nil || a == nil || a.ProgID != ProgID(drop.Programs[ProgramName]) {
					return fmt.Errorf("after Run: %+v %v", a, err)
				}
				if err := s.Detach(id); err != nil {
					return err
				}
				if err := s.Detach(id); err != nil {
					return fmt.Errorf("second Detach: %w", err)
				}
				if a, err := s.Attached(id); a != nil || err != nil {
					return fmt.Errorf("attached after Detach: %v %v", a, err)
				}
				if hooks, _ := s.AttachPoints(); len(hooks) != 0 {
					return fmt.Errorf("attach points left after Detach: %v", hooks)
				}
				return nil
			}))
			if got := p.udpDelivered(t, 3); got != 3 {
				t.Fatalf("after Detach: %d of 3 datagrams arrived", got)
			}
		})
	}
}

// A hook whose interface went away is not attached any more, and a new
// interface of the same name can be attached again.
func TestAttachedDropsDeletedInterface(t *testing.T) {
	root := testRoot(t)
	p := newPair(t)
	id := HookID{Ifname: "vb", Hook: grammar.HookEgress}
	prog := load(t, countingSpec(tcxNext, 1)).Programs[ProgramName]
	must(t, p.b.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		return s.Run(id, prog)
	}))
	p.b.Run(t, "ip", "link", "del", "vb")
	testenv.Veth(t, p.a, "va2", "198.51.100.1/24", p.b, "vb", "198.51.100.2/24")
	must(t, p.b.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		if a, err := s.Attached(id); a != nil || err != nil {
			return fmt.Errorf("hook of a deleted interface reported attached: %v %v", a, err)
		}
		if err := s.Run(id, prog); err != nil {
			return err
		}
		if a, err := s.Attached(id); a == nil || err != nil {
			return fmt.Errorf("re-attached hook not attached: %v", err)
		}
		return nil
	}))
}

// Run on a missing interface says so and attaches nothing.
func TestRunMissingInterface(t *testing.T) {
	root := testRoot(t)
	ns := testenv.NewNS(t)
	id := HookID{Ifname: "ghost0", Hook: grammar.HookIngress}
	prog := load(t, countingSpec(tcShot, 1)).Programs[ProgramName]
	must(t, ns.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		if err := s.Run(id, prog); !errors.Is(err, ErrNoInterface) {
			return fmt.Errorf("Run on a missing interface: %v", err)
		}
		if hooks, _ := s.AttachPoints(); len(hooks) != 0 {
			return fmt.Errorf("attach points after a failed Run: %v", hooks)
		}
		return nil
	}))
}

// Generations: state records round-trip (several chunks), publishing one
// removes the others, a hook pinned again in a new generation keeps its pins
// in the old one, and namespaces do not share state.
func TestGenerations(t *testing.T) {
	root := testRoot(t)
	a, b := testenv.NewNS(t), testenv.NewNS(t)
	big := []byte(strings.Repeat("sfunnel state ", 50000))
	for i := range big {
		big[i] ^= byte(i * 7) // hard to compress: several chunks
	}
	coll := load(t, countingSpec(tcxNext, 1))
	id := HookID{Ifname: "lo", Hook: grammar.HookIngress}
	var dirA string
	must(t, a.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		dirA = s.Dir
		if g, err := s.Current(); g != nil || err != nil {
			return fmt.Errorf("empty store has a generation: %v %v", g, err)
		}
		g1, err := s.NewGen()
		if err != nil {
			return err
		}
		if err := g1.WriteState(big); err != nil {
			return err
		}
		if err := g1.PinHook(id, coll.Programs[ProgramName], coll.Maps); err != nil {
			return err
		}
		if err := s.MarkPending(g1); err != nil {
			return err
		}
		if p, _ := s.Pending(); p == nil || p.N != g1.N {
			return fmt.Errorf("pending %v, want %d", p, g1.N)
		}
		if err := s.Publish(g1); err != nil {
			return err
		}
		// Pin g1's objects again in g2, as a commit keeping a hook does.
		h, err := g1.Hook(id)
		if err != nil || h == nil {
			return fmt.Errorf("hook of g1: %v %v", h, err)
		}
		defer h.Close()
		g2, err := s.NewGen()
		if err != nil {
			return err
		}
		if g2.N <= g1.N {
			return fmt.Errorf("new generation %d after %d", g2.N, g1.N)
		}
		if err := g2.PinHook(id, h.Prog, h.Maps); err != nil {
			return err
		}
		if h1, err := g1.Hook(id); h1 == nil || err != nil {
			return fmt.Errorf("pinning in g2 moved g1's pins: %v", err)
		} else {
			h1.Close()
		}
		orphan, err := s.NewGen() // prepared, never committed
		if err != nil {
			return err
		}
		if err := s.MarkPending(g2); err != nil {
			return err
		}
		if err := s.Publish(g2); err != nil {
			return err
		}
		for _, g := range []*Gen{g1, orphan} {
			if _, err := os.Stat(g.Dir); !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("generation %d left after publishing %d", g.N, g2.N)
			}
		}
		if n, _ := s.Generation(); n != g2.N {
			return fmt.Errorf("generation %d, want %d", n, g2.N)
		}
		return nil
	}))
	must(t, a.Do(func() error {
		s, err := OpenExisting(Options{Root: root})
		if err != nil || s == nil {
			return fmt.Errorf("no state: %v", err)
		}
		g, err := s.Current()
		if err != nil || g == nil {
			return fmt.Errorf("current: %v %v", g, err)
		}
		if got, err := g.ReadState(); err != nil || got != nil {
			return fmt.Errorf("g2 has a state record it was never given (%d bytes, %v)", len(got), err)
		}
		if err := g.WriteState(big); err != nil {
			return err
		}
		got, err := g.ReadState()
		if err != nil || string(got) != string(big) {
			return fmt.Errorf("state read back differs (%d bytes, %v)", len(got), err)
		}
		return nil
	}))
	must(t, b.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		if s.Dir == dirA {
			return fmt.Errorf("two namespaces share %s", s.Dir)
		}
		if g, _ := s.Current(); g != nil {
			return fmt.Errorf("namespace b sees a's generation")
		}
		return nil
	}))
}

func TestSyncSet(t *testing.T) {
	testenv.RequireRoot(t)
	spec := &ebpf.MapSpec{Name: "set_x", Type: ebpf.Hash, KeySize: 2, ValueSize: 1, MaxEntries: 16,
		Contents: []ebpf.MapKV{{Key: uint16(1), Value: uint8(1)}, {Key: uint16(2), Value: uint8(1)}}}
	m, err := NewSetMap(spec)
	must(t, err)
	defer m.Close()
	must(t, SyncSet(m, spec))
	spec2 := spec.Copy()
	spec2.Contents = []ebpf.MapKV{{Key: uint16(2), Value: uint8(1)}, {Key: uint16(3), Value: uint8(1)}}
	if !SetMapFits(m, spec2) {
		t.Fatal("same-shaped spec does not fit")
	}
	must(t, SyncSet(m, spec2))
	var keys []uint16
	var k uint16
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if len(keys) != 2 || (keys[0]+keys[1]) != 5 {
		t.Errorf("set holds %v, want [2 3]", keys)
	}
}

// The state of a deleted namespace is collected; that of live ones stays.
func TestCollectGarbage(t *testing.T) {
	root := testRoot(t)
	p := newPair(t)
	idle := testenv.NewNS(t)
	var deadDir, liveDir, idleDir string
	prog := load(t, countingSpec(tcxNext, 1)).Programs[ProgramName]
	must(t, p.a.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		deadDir = s.Dir
		return s.Run(HookID{Ifname: "va", Hook: grammar.HookEgress}, prog)
	}))
	must(t, idle.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		idleDir = s.Dir
		g, err := s.NewGen()
		if err == nil {
			err = g.WriteState([]byte("sets only"))
		}
		if err == nil {
			err = s.Publish(g)
		}
		return err
	}))
	testenv.Run(t, "ip", "netns", "del", p.a.Name)
	var removed []string
	deadline := time.Now().Add(5 * time.Second)
	for {
		must(t, p.b.Do(func() error {
			s, err := Open(Options{Root: root})
			if err != nil {
				return err
			}
			liveDir = s.Dir
			removed, err = s.CollectGarbage()
			return err
		}))
		if len(removed) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond) // namespace teardown is asynchronous
	}
	if len(removed) != 1 || removed[0] != deadDir {
		t.Errorf("collected %v, want only %s", removed, deadDir)
	}
	for _, d := range []string{liveDir, idleDir} {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("state of a live namespace removed: %v", err)
		}
	}
}

// With the namespaces' file handles (Linux 6.18), the collector tells
// dead from live namespaces without scanning /proc: a namespace that only
// a process keeps alive (no bind mount, no program attached) stays, and
// goes once the process is gone. A directory without a handle (as older
// sfunnels left them) is still judged, by the scan.
func TestCollectGarbageByHandle(t *testing.T) {
	root := testRoot(t)
	_, _, err := unix.NameToHandleAt(unix.AT_FDCWD, "/proc/self/ns/net", unix.AT_SYMLINK_FOLLOW)
	testenv.Require(t, err == nil, "no file handles for network namespaces (Linux 6.18): %v", err)
	self := testenv.NewNS(t)
	collect := func() (removed []string) {
		t.Helper()
		must(t, self.Do(func() error {
			s, err := Open(Options{Root: root})
			if err == nil {
				removed, err = s.CollectGarbage()
			}
			return err
		}))
		return removed
	}
	scans := procScans
	for _, handle := range []bool{true, false} {
		held, dir := processNS(t, root, handle)
		if removed := collect(); len(removed) != 0 {
			t.Errorf("handle %v, process alive: collected %v", handle, removed)
		}
		held.Process.Kill()
		held.Wait()
		if removed := collect(); len(removed) != 1 || removed[0] != dir {
			t.Errorf("handle %v, process gone: collected %v, want %s", handle, removed, dir)
		}
		if want := 0; !handle {
			if want = 2; procScans-scans != want {
				t.Errorf("without a handle: %d scans of /proc, want %d", procScans-scans, want)
			}
		} else if procScans-scans != want {
			t.Errorf("with handles: %d scans of /proc, want %d", procScans-scans, want)
		}
	}
}

// processNS starts a process in a namespace of its own (no bind mount,
// nothing attached) and opens a store there, with or without the handle.
func processNS(t *testing.T, root string, handle bool) (*exec.Cmd, string) {
	held := exec.Command("unshare", "--net", "sh", "-c", "echo unshared; exec sleep 60")
	out, err := held.StdoutPipe()
	must(t, err)
	must(t, held.Start())
	t.Cleanup(func() { held.Process.Kill(); held.Wait() })
	if line, err := bufio.NewReader(out).ReadString('\n'); line != "unshared\n" {
		t.Fatalf("unshare: %q %v", line, err)
	}
	proc := fmt.Sprintf("/proc/%d/ns/net", held.Process.Pid)
	var dir string
	errc := make(chan error, 1)
	go func() {
		// Back to this namespace afterwards: a thread that stayed would
		// keep the process's namespace alive (the main thread, which
		// Go does not end, may be the one).
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			errc <- err
			return
		}
		defer unix.Close(orig)
		fd, err := unix.Open(proc, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err == nil {
			err = unix.Setns(fd, unix.CLONE_NEWNET)
			unix.Close(fd)
		}
		var s *Store
		if err == nil {
			s, err = Open(Options{Root: root})
			if rerr := unix.Setns(orig, unix.CLONE_NEWNET); rerr != nil {
				errc <- rerr
				return // the thread dies locked
			}
		}
		runtime.UnlockOSThread()
		if err == nil {
			dir = s.Dir
			if !handle {
				err = os.Remove(filepath.Join(s.Dir, handlePin))
			}
		}
		errc <- err
	}()
	must(t, <-errc)
	return held, dir
}

// Interface names may have dots (VLANs: eth0.100), bpffs names may not.
func TestInterfaceNameWithDot(t *testing.T) {
	root := testRoot(t)
	a, b := testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, a, "va", "", b, "vb.7", "")
	id := HookID{Ifname: "vb.7", Hook: grammar.HookIngress}
	must(t, b.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		ifc, err := LookupInterface("vb.7")
		if err != nil || ifc.Missing {
			return fmt.Errorf("lookup: %+v %v", ifc, err)
		}
		if err := s.Run(id, load(t, countingSpec(tcxNext, 1)).Programs[ProgramName]); err != nil {
			return err
		}
		if hooks, err := s.AttachPoints(); err != nil || len(hooks) != 1 || hooks[0] != id {
			return fmt.Errorf("attach points %v %v, want [%v]", hooks, err, id)
		}
		if a, err := s.Attached(id); err != nil || a == nil {
			return fmt.Errorf("not attached: %v", err)
		}
		return s.Detach(id)
	}))
}

// At ingress sfunnel runs before other tcx programs already attached (it
// restores the packet before they look at it).
func TestIngressRunsFirst(t *testing.T) {
	root := testRoot(t)
	p := newPair(t)
	// The dropping program would eat b's ARP traffic too, and ARP retries
	// are too slow to count on: give a a static neighbour entry for b.
	var mac string
	must(t, p.b.Do(func() error {
		ifc, err := net.InterfaceByName("vb")
		if err == nil {
			mac = ifc.HardwareAddr.String()
		}
		return err
	}))
	p.a.Run(t, "ip", "neigh", "replace", "192.0.2.2", "lladdr", mac, "dev", "va", "nud", "permanent")
	id := HookID{Ifname: "vb", Hook: grammar.HookIngress}
	coll := load(t, countingSpec(tcxNext, 1))
	must(t, p.b.Do(func() error {
		ifc, _ := LookupInterface("vb")
		// Someone else's program that drops everything, attached first.
		other, err := link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: load(t, countingSpec(tcShot, 9)).Programs[ProgramName], Attach: ebpf.AttachTCXIngress})
		if err != nil {
			return err
		}
		t.Cleanup(func() { other.Close() })
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		return s.Run(id, coll.Programs[ProgramName])
	}))
	p.udpDelivered(t, 3)
	if c, err := ReadCounters(coll.Maps[CountersMap]); err != nil || c[0].Packets < 3 {
		t.Errorf("sfunnel's ingress program saw %+v (%v): it runs after a program that drops", c, err)
	}
}

// Batched reads of per-CPU arrays give what per-index lookups give.
func TestReadCountersBatched(t *testing.T) {
	testenv.RequireRoot(t)
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: 5000})
	must(t, err)
	defer m.Close()
	ncpu := ebpfPossibleCPUs()
	for _, i := range []uint32{0, 1, 4095, 4096, 4999} {
		v := make([]Counter, ncpu)
		for c := range v {
			v[c] = Counter{Packets: uint64(i) + 1, Bytes: uint64(c) + 10}
		}
		must(t, m.Put(i, v))
	}
	var got []Counter
	if !readBatched(m, func(i int, c Counter) {
		for len(got) <= i {
			got = append(got, Counter{})
		}
		got[i].Packets += c.Packets
		got[i].Bytes += c.Bytes
	}) {
		t.Fatal("no batch lookup on a per-CPU array")
	}
	want, err := ReadCounters(m)
	must(t, err)
	for i := range want {
		w := Counter{}
		if i < len(got) {
			w = got[i]
		}
		if w != want[i] {
			t.Fatalf("index %d: batched %+v, ReadCounters %+v", i, w, want[i])
		}
	}
	if want[4096].Packets != 4097*uint64(ncpu) || want[4096].Bytes != uint64(ncpu*(ncpu-1)/2+10*ncpu) || want[2].Packets != 0 {
		t.Errorf("counters %+v %+v", want[4096], want[2])
	}
}
