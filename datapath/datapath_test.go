package datapath

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/ruleset"
	"github.com/vishvananda/netns"
)

// A child process (the test binary run again) loads the live ruleset in a
// namespace, as a fresh `sfunnel --netns NAME list ruleset` would.
const childEnv = "SFUNNEL_DATAPATH_TEST_CHILD"

func TestMain(m *testing.M) {
	if spec := os.Getenv(childEnv); spec != "" {
		os.Exit(child(spec))
	}
	os.Exit(m.Run())
}

func child(spec string) int {
	nsName, root, _ := strings.Cut(spec, ",")
	runtime.LockOSThread()
	h, err := netns.GetFromName(nsName)
	if err == nil {
		err = netns.Set(h)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	b := New(Options{Root: root})
	rs, err := b.Load()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cs, err := b.Counters()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	json.NewEncoder(os.Stdout).Encode(struct {
		Ruleset  *ruleset.Ruleset
		Counters map[uint64]ruleset.Counter
	}{rs, cs})
	return 0
}

// env is two namespaces joined by a veth pair; the backend works in b.
type env struct {
	a, b *testenv.NS
	root string
	be   *Backend
}

func newEnv(t *testing.T, opts Options) *env {
	testenv.RequireRoot(t)
	e := &env{a: testenv.NewNS(t), b: testenv.NewNS(t)}
	testenv.Veth(t, e.a, "va", "192.0.2.1/24", e.b, "vb", "192.0.2.2/24")
	e.root = filepath.Join("/sys/fs/bpf", fmt.Sprintf("sfunnel-dptest-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "_")))
	t.Cleanup(func() { os.RemoveAll(e.root) })
	opts.Root = e.root
	if opts.NftTable == "" {
		opts.NftTable = "sfunnel"
	}
	e.be = New(opts)
	return e
}

// do runs f in b.
func (e *env) do(t *testing.T, f func() error) {
	t.Helper()
	if err := e.b.Do(f); err != nil {
		t.Fatal(err)
	}
}

// current runs f in b with the current generation of b's state.
func (e *env) current(t *testing.T, f func(cur *bpf.Gen) error) {
	t.Helper()
	e.do(t, func() error {
		s, err := bpf.OpenExisting(bpf.Options{Root: e.root})
		if err != nil || s == nil {
			return fmt.Errorf("no state: %v", err)
		}
		cur, err := s.Current()
		if err != nil {
			return err
		}
		return f(cur)
	})
}

func (e *env) commit(t *testing.T, rs *ruleset.Ruleset) {
	t.Helper()
	e.do(t, func() error { return e.be.Commit(rs) })
}

// fresh returns what a new process sees in b.
func (e *env) fresh(t *testing.T) (*ruleset.Ruleset, map[uint64]ruleset.Counter) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), childEnv+"="+e.b.Name+","+e.root)
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("child: %v\n%s", err, ee.Stderr)
		}
		t.Fatal(err)
	}
	var got struct {
		Ruleset  *ruleset.Ruleset
		Counters map[uint64]ruleset.Counter
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("child output: %v\n%s", err, out)
	}
	return got.Ruleset, got.Counters
}

// send sends n UDP datagrams from a to b:port and returns how many arrived.
func (e *env) send(t *testing.T, port, n int) int {
	t.Helper()
	return e.sendTo(t, port, port, n)
}

// sendTo sends n UDP datagrams from a to b:port and returns how many a
// socket bound to b:at received (a dnat may change the port).
func (e *env) sendTo(t *testing.T, port, at, n int) int {
	t.Helper()
	var rx, tx *net.UDPConn
	e.do(t, func() (err error) {
		rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: at})
		return err
	})
	defer rx.Close()
	if err := e.a.Do(func() (err error) {
		tx, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: port})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	for i := 0; i < n; i++ {
		tx.Write([]byte("datagram"))
	}
	got := 0
	buf := make([]byte, 100)
	for got < n {
		// The first datagram may wait for ARP on a loaded machine.
		wait := 300 * time.Millisecond
		if got == 0 {
			wait = 3 * time.Second
		}
		rx.SetReadDeadline(time.Now().Add(wait))
		if _, err := rx.Read(buf); err != nil {
			break
		}
		got++
	}
	return got
}

func udpRule(handle uint64, port uint16, act grammar.ActionKind) *grammar.Rule {
	return &grammar.Rule{
		Handle: handle, Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP,
		Dport:   &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: port, Hi: port}}},
		Counter: true, Actions: []*grammar.Action{{Kind: act}},
	}
}

// jsonOf renders v for comparison; a ruleset as its canonical listing
// with handles (what is stored), other values as JSON.
func jsonOf(t *testing.T, v any) string {
	if rs, ok := v.(*ruleset.Ruleset); ok {
		var b strings.Builder
		if err := ruleset.WriteText(&b, rs, nil, &ruleset.ListOptions{Handles: true}); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "next handle %d\n", rs.NextHandle)
		return b.String()
	}
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// What is committed is what Load returns, in this process and in a fresh
// one; counters count, survive edits of other rules, and reset.
func TestCommitLoadCounters(t *testing.T) {
	e := newEnv(t, Options{})
	rs := &ruleset.Ruleset{
		Interfaces: []*ruleset.Interface{{Name: "vb", Ingress: []*grammar.Rule{udpRule(1, 4739, grammar.ActAccept)}}},
		NextHandle: 2,
	}
	e.commit(t, rs)
	if got := e.send(t, 4739, 10); got != 10 {
		t.Fatalf("%d of 10 datagrams arrived through an accept rule", got)
	}
	var loaded *ruleset.Ruleset
	e.do(t, func() (err error) { loaded, err = e.be.Load(); return err })
	if jsonOf(t, loaded) != jsonOf(t, rs) {
		t.Errorf("Load in the same process:\n got %s\nwant %s", jsonOf(t, loaded), jsonOf(t, rs))
	}
	fresh, counters := e.fresh(t)
	if jsonOf(t, fresh) != jsonOf(t, rs) {
		t.Errorf("Load in a fresh process:\n got %s\nwant %s", jsonOf(t, fresh), jsonOf(t, rs))
	}
	if c := counters[1]; c.Packets < 10 || c.Bytes < 10*(20+8+8) {
		t.Errorf("counter of rule 1: %+v, want ≥ 10 packets, ≥ 360 bytes", c)
	}

	// Insert a rule in front: rule 1 moves to index 1 and keeps its count.
	rs.Interfaces[0].Ingress = []*grammar.Rule{udpRule(2, 5000, grammar.ActDrop), rs.Interfaces[0].Ingress[0]}
	rs.NextHandle = 3
	e.commit(t, rs)
	if got := e.send(t, 5000, 3); got != 0 {
		t.Errorf("%d datagrams passed a drop rule", got)
	}
	_, counters = e.fresh(t)
	if c := counters[1]; c.Packets < 10 {
		t.Errorf("counter of rule 1 after inserting a rule: %+v, want ≥ 10 packets", c)
	}
	if c := counters[2]; c.Packets < 3 {
		t.Errorf("counter of rule 2: %+v, want ≥ 3 packets", c)
	}
	e.do(t, func() error { return e.be.ResetCounters([]uint64{2}) })
	_, counters = e.fresh(t)
	if counters[2].Packets != 0 || counters[1].Packets < 10 {
		t.Errorf("after reset of rule 2: %+v", counters)
	}
	e.do(t, func() error { return e.be.ResetCounters(nil) })
	_, counters = e.fresh(t)
	if counters[1].Packets != 0 {
		t.Errorf("after reset of all: %+v", counters)
	}

	// Flush: nothing attached, nothing pinned for the hook.
	e.commit(t, &ruleset.Ruleset{NextHandle: 3})
	if got := e.send(t, 5000, 3); got != 3 {
		t.Errorf("%d of 3 datagrams arrived after flush", got)
	}
	fresh, _ = e.fresh(t)
	if len(fresh.Interfaces) != 0 {
		t.Errorf("after flush, Load returns %s", jsonOf(t, fresh))
	}
	e.do(t, func() error {
		s, err := bpf.Open(bpf.Options{Root: e.root})
		if err != nil {
			return err
		}
		if hooks, _ := s.AttachPoints(); len(hooks) != 0 {
			t.Errorf("attach points after flush: %v", hooks)
		}
		return nil
	})
}

// A hook whose interface went away is not listed.
func TestLoadReflectsKernel(t *testing.T) {
	e := newEnv(t, Options{})
	rs := &ruleset.Ruleset{Interfaces: []*ruleset.Interface{{Name: "vb",
		Ingress: []*grammar.Rule{udpRule(1, 4739, grammar.ActAccept)},
		Egress:  []*grammar.Rule{udpRule(2, 4739, grammar.ActAccept)},
	}}, NextHandle: 3}
	e.commit(t, rs)
	e.b.Run(t, "ip", "link", "del", "vb")
	fresh, _ := e.fresh(t)
	if len(fresh.Interfaces) != 0 {
		t.Errorf("Load lists a deleted interface: %s", jsonOf(t, fresh))
	}
}

// Check loads through the verifier and changes nothing; an unknown
// interface is an error naming it, and a failed commit changes nothing.
func TestCheckAndFailedCommit(t *testing.T) {
	e := newEnv(t, Options{})
	good := &ruleset.Ruleset{Interfaces: []*ruleset.Interface{{Name: "vb",
		Ingress: []*grammar.Rule{udpRule(1, 4739, grammar.ActDrop)}}}, NextHandle: 2}
	e.do(t, func() error {
		if err := e.be.Check(good); err != nil {
			return err
		}
		if s, err := bpf.OpenExisting(bpf.Options{Root: e.root}); s != nil || err != nil {
			t.Errorf("Check created state: %v %v", s, err)
		}
		return nil
	})
	if got := e.send(t, 4739, 3); got != 3 {
		t.Errorf("Check attached something: %d of 3 datagrams arrived past a drop rule", got)
	}
	bad := &ruleset.Ruleset{Interfaces: []*ruleset.Interface{
		{Name: "vb", Ingress: []*grammar.Rule{udpRule(1, 4739, grammar.ActDrop)}},
		{Name: "nosuch0", Ingress: []*grammar.Rule{udpRule(2, 4739, grammar.ActDrop)}},
	}, NextHandle: 3}
	var ierr *InterfaceError
	e.do(t, func() error {
		if err := e.be.Check(bad); !errors.As(err, &ierr) || ierr.Name != "nosuch0" {
			t.Errorf("Check with an unknown interface: %v", err)
		}
		if err := e.be.Commit(bad); !errors.As(err, &ierr) || ierr.Name != "nosuch0" {
			t.Errorf("Commit with an unknown interface: %v", err)
		}
		return nil
	})
	if got := e.send(t, 4739, 3); got != 3 {
		t.Errorf("failed commit changed the datapath: %d of 3 datagrams arrived", got)
	}
	fresh, _ := e.fresh(t)
	if len(fresh.Interfaces) != 0 {
		t.Errorf("failed commit is listed: %s", jsonOf(t, fresh))
	}
}

func liveProgID(t *testing.T, e *env, id bpf.HookID) ebpf.ProgramID {
	t.Helper()
	var pid ebpf.ProgramID
	e.do(t, func() error {
		s, err := bpf.OpenExisting(bpf.Options{Root: e.root})
		if err != nil || s == nil {
			return fmt.Errorf("no state: %v", err)
		}
		a, err := s.Attached(id)
		if err != nil || a == nil {
			return fmt.Errorf("%s not live: %v", id, err)
		}
		pid = a.ProgID
		return nil
	})
	return pid
}

// Elements of a named set change live, without reloading the program.
func TestSetElementsLive(t *testing.T) {
	e := newEnv(t, Options{})
	rule, err := grammar.ParseRule("<test>", "ip saddr @blocked-v4.x udp dport 4739 counter actions drop", &grammar.Options{
		LookupSet: func(string) (grammar.SetType, bool) { return grammar.SetIPv4Addr, true },
	})
	if err != nil {
		t.Fatal(err)
	}
	rule.Handle = 1
	set := func(prefixes ...string) *ruleset.Ruleset {
		s := &grammar.Set{Name: "blocked-v4.x", Type: grammar.SetIPv4Addr}
		for _, p := range prefixes {
			s.Prefixes = append(s.Prefixes, netip.MustParsePrefix(p))
		}
		return &ruleset.Ruleset{NextHandle: 2, Sets: []*grammar.Set{s},
			Interfaces: []*ruleset.Interface{{Name: "vb", Ingress: []*grammar.Rule{rule}}}}
	}
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.commit(t, set("198.51.100.7/32"))
	if got := e.send(t, 4739, 3); got != 3 {
		t.Fatalf("%d of 3 datagrams from an address not in the set arrived", got)
	}
	before := liveProgID(t, e, id)
	oldElems := e.elements(t, "blocked-v4.x")
	defer oldElems.Close()
	e.commit(t, set("198.51.100.7/32", "192.0.2.0/28"))
	// The elements were not added one by one to the map packets read: a
	// new elements map took its place in one update; the old one still
	// holds exactly the old element.
	newElems := e.elements(t, "blocked-v4.x")
	defer newElems.Close()
	if mapIDOf(t, newElems) == mapIDOf(t, oldElems) {
		t.Error("add element changed the elements map in place")
	}
	if n, m := countEntries(t, oldElems), countEntries(t, newElems); n != 1 || m != 2 {
		t.Errorf("old elements map holds %d entries (want 1), new one %d (want 2)", n, m)
	}
	if got := e.send(t, 4739, 3); got != 0 {
		t.Errorf("%d datagrams from an address added to the set passed a drop rule", got)
	}
	if after := liveProgID(t, e, id); after != before {
		t.Errorf("adding an element reloaded the program (id %d → %d)", before, after)
	}
	fresh, counters := e.fresh(t)
	if len(fresh.Sets) != 1 || len(fresh.Sets[0].Prefixes) != 2 {
		t.Errorf("Load after add element: %s", jsonOf(t, fresh.Sets))
	}
	if counters[1].Packets != 3 {
		t.Errorf("drop counter %+v, want 3 packets", counters[1])
	}
	e.commit(t, set("198.51.100.7/32"))
	if got := e.send(t, 4739, 3); got != 3 {
		t.Errorf("%d of 3 datagrams arrived after the element was deleted", got)
	}
	if after := liveProgID(t, e, id); after != before {
		t.Errorf("deleting an element reloaded the program")
	}
}

// The nftables table exists exactly while a rule uses ct mark.
func TestCtMarkTableFollowsRules(t *testing.T) {
	testenv.RequireCommand(t, "nft")
	e := newEnv(t, Options{})
	ct, err := grammar.ParseRule("<test>", "udp dport 4739 ct mark set 0x10000 counter", nil)
	if err != nil {
		t.Fatal(err)
	}
	ct.Handle = 1
	exists := func() bool {
		var ok bool
		e.do(t, func() (err error) { ok, err = e.be.table(0x00ff0000).Exists(); return err })
		return ok
	}
	e.commit(t, &ruleset.Ruleset{NextHandle: 2, Interfaces: []*ruleset.Interface{{Name: "vb", Ingress: []*grammar.Rule{ct}}}})
	if !exists() {
		t.Fatal("no nftables table after committing a ct mark rule")
	}
	if got := e.send(t, 4739, 2); got != 2 {
		t.Errorf("%d of 2 datagrams arrived", got)
	}
	e.commit(t, &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{{Name: "vb",
		Ingress: []*grammar.Rule{udpRule(2, 4739, grammar.ActAccept)}}}})
	if exists() {
		t.Error("nftables table left after the last ct mark rule went")
	}
}

// The clsact fallback gives the same behaviour, and a fresh process sees it.
func TestClsactFallback(t *testing.T) {
	testenv.RequireCommand(t, "tc")
	e := newEnv(t, Options{ForceClsact: true})
	rs := &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{{Name: "vb",
		Ingress: []*grammar.Rule{udpRule(1, 5000, grammar.ActDrop), udpRule(2, 4739, grammar.ActAccept)}}}}
	e.commit(t, rs)
	if got := e.send(t, 5000, 3); got != 0 {
		t.Errorf("%d datagrams passed a drop rule", got)
	}
	if out := e.b.Run(t, "tc", "filter", "show", "dev", "vb", "ingress"); !strings.Contains(out, "direct-action") {
		t.Errorf("no cls_bpf filter on vb:\n%s", out)
	}
	rs.Interfaces[0].Ingress = rs.Interfaces[0].Ingress[1:]
	e.commit(t, rs)
	if got := e.send(t, 5000, 3); got != 3 {
		t.Errorf("%d of 3 datagrams arrived after the drop rule was deleted", got)
	}
	fresh, counters := e.fresh(t)
	if jsonOf(t, fresh) != jsonOf(t, rs) || counters[2].Packets != 0 {
		t.Errorf("fresh process sees %s %v", jsonOf(t, fresh), counters)
	}
	e.commit(t, &ruleset.Ruleset{NextHandle: 3})
	if out := e.b.Run(t, "tc", "filter", "show", "dev", "vb", "ingress"); strings.Contains(out, "direct-action") {
		t.Errorf("cls_bpf filter left after flush:\n%s", out)
	}
}

// Status shows the live hooks and the datapath's events: a funnel that
// would exceed the egress MTU is counted for its rule.
func TestStatusCountsMTUExceeded(t *testing.T) {
	e := newEnv(t, Options{})
	r, err := grammar.ParseRule("<test>", "udp dport 4739 counter actions funnel tcp dport 179 sport 540", nil)
	if err != nil {
		t.Fatal(err)
	}
	r.Handle = 7
	e.commit(t, &ruleset.Ruleset{NextHandle: 8, Interfaces: []*ruleset.Interface{{Name: "vb", Egress: []*grammar.Rule{r}}}})
	e.do(t, func() error {
		c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4739})
		if err != nil {
			return err
		}
		defer c.Close()
		c.Write(make([]byte, 100))
		// At the MTU's edge: 1480 bytes of IP become 1500 (fits), 1481
		// become 1501 (one over).
		c.Write(make([]byte, 1452))
		_, err = c.Write(make([]byte, 1453))
		return err
	})
	var st []HookStatus
	e.do(t, func() (err error) { st, err = e.be.Status(); return err })
	if len(st) != 1 || st[0].Ifname != "vb" || st[0].Hook != grammar.HookEgress || st[0].Mode != bpf.ModeTCX || st[0].ProgID == 0 {
		t.Fatalf("status %+v, want vb egress attached with tcx", st)
	}
	if st[0].MTUExceeded[7] != 1 || st[0].Stats["mtu-exceeded"] != 1 {
		t.Errorf("status %+v: want one MTU overrun, for rule 7", st[0])
	}
}

// elements opens the elements map the live outer map of set name holds.
func (e *env) elements(t *testing.T, name string) *ebpf.Map {
	t.Helper()
	var m *ebpf.Map
	e.do(t, func() error {
		s, err := bpf.OpenExisting(bpf.Options{Root: e.root})
		if err != nil || s == nil {
			return fmt.Errorf("no state: %v", err)
		}
		g, err := s.Current()
		if err != nil {
			return err
		}
		outer, err := g.SetMap(name)
		if err != nil || outer == nil {
			return fmt.Errorf("no map for set %s: %v", name, err)
		}
		defer outer.Close()
		var id uint32
		if err := outer.Lookup(uint32(0), &id); err != nil {
			return err
		}
		m, err = ebpf.NewMapFromID(ebpf.MapID(id))
		return err
	})
	return m
}

func mapIDOf(t *testing.T, m *ebpf.Map) ebpf.MapID {
	t.Helper()
	info, err := m.Info()
	if err != nil {
		t.Fatal(err)
	}
	id, _ := info.ID()
	return id
}

func countEntries(t *testing.T, m *ebpf.Map) int {
	t.Helper()
	n := 0
	k, v := make([]byte, m.KeySize()), make([]byte, m.ValueSize())
	it := m.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		t.Fatal(err)
	}
	return n
}
