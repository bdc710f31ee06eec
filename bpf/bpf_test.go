package bpf

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
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
			wait = time.Second
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

			// Attach a counting pass-through program.
			must(t, p.b.Do(func() error {
				s, err := Open(opts)
				if err != nil {
					return err
				}
				ifc, err := LookupInterface("vb")
				if err != nil || ifc.Missing || ifc.L3 {
					return fmt.Errorf("lookup vb: %+v %v", ifc, err)
				}
				return s.Swap([]Update{{HookID: id, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcxNext, 1))}}, nil)
			}))
			if got := p.udpDelivered(t, 5); got != 5 {
				t.Fatalf("pass program: %d of 5 datagrams arrived", got)
			}

			// A fresh Store (as a fresh process would) sees it live, counting.
			var first ebpf.ProgramID
			must(t, p.b.Do(func() error {
				s, err := Open(opts)
				if err != nil {
					return err
				}
				l, err := s.Live(id)
				if err != nil || l == nil {
					return fmt.Errorf("live after attach: %v %v", l, err)
				}
				defer l.Close()
				if l.Mode != mode {
					return fmt.Errorf("mode %s, want %s", l.Mode, mode)
				}
				c, err := ReadCounters(l.Counters())
				if err != nil {
					return err
				}
				if c[0].Packets < 5 || c[0].Bytes < 5*(20+8+5) {
					return fmt.Errorf("counters %+v, want ≥ 5 packets of ≥ 33 bytes", c[0])
				}
				info, _ := l.Prog.Info()
				first, _ = info.ID()
				// Swap to a dropping program; the old one's counters are
				// final and handed over.
				retired := 0
				err = s.Swap([]Update{{HookID: id, Ifindex: l.Ifindex, Coll: load(t, countingSpec(tcShot, 2))}}, func(old *Live) {
					if c, err := ReadCounters(old.Counters()); err == nil && c[0].Packets >= 5 && old.HookID == id {
						retired++
					}
				})
				if err == nil && retired != 1 {
					err = fmt.Errorf("retire saw %d old hooks with their counters", retired)
				}
				return err
			}))
			if got := p.udpDelivered(t, 3); got != 0 {
				t.Fatalf("drop program: %d datagrams arrived", got)
			}
			must(t, p.b.Do(func() error {
				s, err := Open(opts)
				if err != nil {
					return err
				}
				l, err := s.Live(id)
				if err != nil || l == nil {
					return fmt.Errorf("live after swap: %v %v", l, err)
				}
				defer l.Close()
				info, _ := l.Prog.Info()
				if id2, _ := info.ID(); id2 == first {
					return fmt.Errorf("program not replaced")
				}
				var mark []uint64
				if err := l.Maps["stats"].Lookup(uint32(0), &mark); err != nil || mark[0] != 2 {
					return fmt.Errorf("stats of the live program: %v %v", mark, err)
				}
				c, _ := ReadCounters(l.Counters())
				if c[0].Packets < 3 {
					return fmt.Errorf("counter of the new program %+v, want ≥ 3 packets", c[0])
				}
				if err := ZeroCounters(l.Counters(), nil); err != nil {
					return err
				}
				if c, _ := ReadCounters(l.Counters()); c[0].Packets != 0 {
					return fmt.Errorf("counter after reset: %+v", c[0])
				}
				// Detach: traffic flows, pins are gone.
				if err := s.Swap([]Update{{HookID: id}}, nil); err != nil {
					return err
				}
				if l, err := s.Live(id); l != nil || err != nil {
					return fmt.Errorf("live after detach: %v %v", l, err)
				}
				if hooks, _ := s.PinnedHooks(); len(hooks) != 0 {
					return fmt.Errorf("pins left after detach: %v", hooks)
				}
				return nil
			}))
			if got := p.udpDelivered(t, 3); got != 3 {
				t.Fatalf("after detach: %d of 3 datagrams arrived", got)
			}
		})
	}
}

// A hook whose interface went away is not live any more, and a new
// interface of the same name can be attached again.
func TestLiveDropsDeletedInterface(t *testing.T) {
	root := testRoot(t)
	p := newPair(t)
	id := HookID{Ifname: "vb", Hook: grammar.HookEgress}
	must(t, p.b.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		ifc, _ := LookupInterface("vb")
		return s.Swap([]Update{{HookID: id, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcxNext, 1))}}, nil)
	}))
	p.b.Run(t, "ip", "link", "del", "vb")
	testenv.Veth(t, p.a, "va2", "198.51.100.1/24", p.b, "vb", "198.51.100.2/24")
	must(t, p.b.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		if l, err := s.Live(id); l != nil || err != nil {
			return fmt.Errorf("hook of a deleted interface reported live: %v %v", l, err)
		}
		ifc, _ := LookupInterface("vb")
		if err := s.Swap([]Update{{HookID: id, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcxNext, 1))}}, nil); err != nil {
			return err
		}
		l, err := s.Live(id)
		if l == nil || err != nil {
			return fmt.Errorf("re-attached hook not live: %v", err)
		}
		l.Close()
		return nil
	}))
}

func TestStateRoundTripAndNamespaces(t *testing.T) {
	root := testRoot(t)
	a, b := testenv.NewNS(t), testenv.NewNS(t)
	big := []byte(strings.Repeat("sfunnel state ", 50000)) // several chunks even compressed? no: check length only
	for i := range big {
		big[i] ^= byte(i * 7) // make it hard to compress
	}
	must(t, a.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		if got, err := s.ReadState(); got != nil || err != nil {
			return fmt.Errorf("empty store: %q %v", got, err)
		}
		return s.WriteState(big)
	}))
	var dirA string
	must(t, a.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		dirA = s.Dir
		got, err := s.ReadState()
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
		if got, _ := s.ReadState(); got != nil {
			return fmt.Errorf("namespace b sees a's state")
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

// When one swap of a transaction fails, the ones already done are undone:
// replaced programs come back, new attachments go away.
func TestSwapRollsBack(t *testing.T) {
	for _, mode := range []Mode{ModeTCX, ModeClsact} {
		t.Run(string(mode), func(t *testing.T) { testSwapRollsBack(t, mode) })
	}
}

func testSwapRollsBack(t *testing.T, mode Mode) {
	root := testRoot(t)
	p := newPair(t)
	in := HookID{Ifname: "vb", Hook: grammar.HookIngress}
	eg := HookID{Ifname: "vb", Hook: grammar.HookEgress}
	ghost := HookID{Ifname: "ghost0", Hook: grammar.HookIngress}
	must(t, p.b.Do(func() error {
		s, err := Open(Options{Root: root, ForceClsact: mode == ModeClsact})
		if err != nil {
			return err
		}
		ifc, _ := LookupInterface("vb")
		if err := s.Swap([]Update{{HookID: in, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcxNext, 1))}}, nil); err != nil {
			return err
		}
		before := progID(t, s, in)
		err = s.Swap([]Update{
			{HookID: in, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcShot, 2))},
			{HookID: eg, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcShot, 3))},
			{HookID: ghost, Ifindex: 99999, Coll: load(t, countingSpec(tcShot, 4))},
		}, nil)
		if err == nil {
			return fmt.Errorf("attaching to a missing interface succeeded")
		}
		if after := progID(t, s, in); after != before {
			return fmt.Errorf("replaced program not restored (%d, was %d)", after, before)
		}
		for _, id := range []HookID{eg, ghost} {
			if l, err := s.Live(id); l != nil || err != nil {
				return fmt.Errorf("%s attached after a failed transaction: %v", id, err)
			}
		}
		return nil
	}))
	if got := p.udpDelivered(t, 3); got != 3 {
		t.Errorf("%d of 3 datagrams arrived after the failed transaction", got)
	}
}

func progID(t *testing.T, s *Store, id HookID) ebpf.ProgramID {
	t.Helper()
	l, err := s.Live(id)
	if err != nil || l == nil {
		t.Fatalf("%s not live: %v", id, err)
	}
	defer l.Close()
	info, err := l.Prog.Info()
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := info.ID()
	return pid
}

// The state of a deleted namespace is collected; that of live ones stays.
func TestCollectGarbage(t *testing.T) {
	root := testRoot(t)
	p := newPair(t)
	idle := testenv.NewNS(t)
	var deadDir, liveDir, idleDir string
	must(t, p.a.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		deadDir = s.Dir
		ifc, _ := LookupInterface("va")
		return s.Swap([]Update{{HookID: HookID{Ifname: "va", Hook: grammar.HookEgress}, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcxNext, 1))}}, nil)
	}))
	must(t, idle.Do(func() error {
		s, err := Open(Options{Root: root})
		if err == nil {
			idleDir = s.Dir
			err = s.WriteState([]byte("sets only"))
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
		if err := s.Swap([]Update{{HookID: id, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcxNext, 1))}}, nil); err != nil {
			return err
		}
		if hooks, err := s.PinnedHooks(); err != nil || len(hooks) != 1 || hooks[0] != id {
			return fmt.Errorf("pinned hooks %v %v, want [%v]", hooks, err, id)
		}
		l, err := s.Live(id)
		if err != nil || l == nil {
			return fmt.Errorf("not live: %v", err)
		}
		l.Close()
		return s.Swap([]Update{{HookID: id}}, nil)
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
	var l *Live
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
		if err := s.Swap([]Update{{HookID: id, Ifindex: ifc.Index, Coll: load(t, countingSpec(tcxNext, 1))}}, nil); err != nil {
			return err
		}
		l, err = s.Live(id)
		return err
	}))
	defer l.Close()
	p.udpDelivered(t, 3)
	if c, err := ReadCounters(l.Counters()); err != nil || c[0].Packets < 3 {
		t.Errorf("sfunnel's ingress program saw %+v (%v): it runs after a program that drops", c, err)
	}
}
