package datapath

import (
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/ruleset"
)

// run runs commands through a session on the backend, as the command line
// does (Load, change, Commit under the writer lock).
func (e *env) run(t *testing.T, text string) string {
	t.Helper()
	return e.runWith(t, text, nil)
}

// runWith is run with parse options (the types of sets the text names).
func (e *env) runWith(t *testing.T, text string, opts *grammar.Options) string {
	t.Helper()
	var out strings.Builder
	e.do(t, func() error {
		cmds, _, err := grammar.Parse("<test>", text, opts)
		if err != nil {
			return err
		}
		s := &ruleset.Session{Backend: e.be, Out: &out, Err: io.Discard, Echo: true}
		return s.Run(cmds)
	})
	return out.String()
}

// vbIngressText is a ruleset file of n rules on vb ingress, rule i's text
// being line(i).
func vbIngressText(n int, line func(i int) string) string {
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	for i := 0; i < n; i++ {
		b.WriteString("\t\t" + line(i) + "\n")
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// bigHook is 400 rules on vb ingress in two shapes: IPv4 source + UDP
// port (drop; rules 50 and 300 match datagrams from a, 192.0.2.1) and UDP
// port alone (accept, every fourth rule).
func bigHook() string {
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	for i := 0; i < 400; i++ {
		port := 7000 + i
		switch {
		case i%4 == 3:
			fmt.Fprintf(&b, "\t\tudp dport %d counter actions accept\n", port)
		case i == 50 || i == 300:
			fmt.Fprintf(&b, "\t\tip saddr 192.0.2.1 udp dport %d counter actions drop\n", port)
		default:
			fmt.Fprintf(&b, "\t\tip saddr 192.0.2.%d udp dport %d counter actions drop\n", 100+i%100, port)
		}
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// A rule inserted in the middle of a big hook, and deleted again, changes
// table entries only: the program stays (same id), every other rule keeps
// its counter, and real datagrams through the veth meet the right rule at
// every step — the inserted accept rule before drop rule 300 wins while
// it is there. Two rounds: the spare table generation is brought up to
// date by the previous round's change, and a freed counter slot taken
// again starts from zero.
func TestInsertDeleteInTheMiddle(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, bigHook())
	prog := liveProgID(t, e, id)
	handleOf := func(port int) uint64 {
		t.Helper()
		rs, _ := e.fresh(t)
		for _, r := range rs.Interface("vb").Ingress {
			if r.Dport != nil && int(r.Dport.Ranges[0].Lo) == port && r.Saddr != nil {
				return r.Handle
			}
		}
		t.Fatalf("no rule for port %d", port)
		return 0
	}
	h50, h300 := handleOf(7050), handleOf(7300)
	if got := e.arrive(t, 7050, 3); got != 0 {
		t.Fatalf("%d of 3 datagrams passed rule 50", got)
	}
	if got := e.arrive(t, 7300, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed rule 300", got)
	}
	want300 := uint64(2)
	for round := 1; round <= 2; round++ {
		out := e.run(t, fmt.Sprintf("insert rule vb ingress position %d udp dport 7300 counter actions accept", h300))
		var added uint64
		if _, err := fmt.Sscanf(out[strings.LastIndex(out, "# handle ")+len("# handle "):], "%d", &added); err != nil {
			t.Fatalf("round %d: no handle echoed: %q", round, out)
		}
		if got := liveProgID(t, e, id); got != prog {
			t.Fatalf("round %d: inserting a rule in the middle loaded a program (%d → %d)", round, prog, got)
		}
		if got := e.arrive(t, 7300, 4); got != 4 {
			t.Fatalf("round %d: %d of 4 datagrams passed the inserted accept rule", round, got)
		}
		rs, counters := e.fresh(t)
		rules := rs.Interface("vb").Ingress
		if len(rules) != 401 || rules[300].Handle != added || rules[301].Handle != h300 {
			t.Fatalf("round %d: the rule was not inserted before rule 300", round)
		}
		// A fresh reader parses the stored rules back.
		nb := New(Options{Root: e.root})
		e.do(t, func() error {
			rs, err := nb.Load()
			if err == nil && len(rs.Interface("vb").Ingress) != 401 {
				t.Errorf("round %d: the stored rules read back as %d rules", round, len(rs.Interface("vb").Ingress))
			}
			return err
		})
		if c := counters[added]; c.Packets != 4 {
			t.Errorf("round %d: inserted rule counted %+v, want 4 packets (a reused slot starts from zero)", round, c)
		}
		if c := counters[h300]; c.Packets != want300 {
			t.Errorf("round %d: rule 300 counted %+v, want %d packets", round, c, want300)
		}
		if c := counters[h50]; c.Packets != 3 {
			t.Errorf("round %d: rule 50 counted %+v, want 3 packets", round, c)
		}

		e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", added))
		if got := liveProgID(t, e, id); got != prog {
			t.Fatalf("round %d: deleting a rule in the middle loaded a program", round)
		}
		if got := e.arrive(t, 7300, 1); got != 0 {
			t.Fatalf("round %d: rule 300 does not drop after the delete", round)
		}
		want300++
		_, counters = e.fresh(t)
		if c := counters[h300]; c.Packets != want300 {
			t.Errorf("round %d: rule 300 counted %+v after the delete, want %d packets", round, c, want300)
		}
		if c := counters[h50]; c.Packets != 3 {
			t.Errorf("round %d: rule 50 counted %+v after the delete, want 3 packets", round, c)
		}
	}
	// A rule of the address + port shape (a perfect-hash table, rebuilt
	// in the spare generation's value), inserted before rule 50 and
	// deleted again.
	if got := e.arrive(t, 7051, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to port 7051 arrived before the insert", got)
	}
	out := e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7051 counter actions drop", h50))
	var hp uint64
	fmt.Sscanf(out[strings.LastIndex(out, "# handle ")+len("# handle "):], "%d", &hp)
	if got := liveProgID(t, e, id); got != prog {
		t.Fatal("inserting an address + port rule loaded a program")
	}
	if got := e.arrive(t, 7051, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the inserted address + port drop rule", got)
	}
	if got := e.arrive(t, 7050, 1); got != 0 {
		t.Fatal("rule 50 stopped dropping after the insert")
	}
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", hp))
	if got := liveProgID(t, e, id); got != prog {
		t.Fatal("deleting an address + port rule loaded a program")
	}
	if got := e.arrive(t, 7051, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to port 7051 arrived after the delete", got)
	}
	if _, counters := e.fresh(t); counters[h50].Packets != 4 {
		t.Errorf("rule 50 counted %+v, want 4 packets", counters[h50])
	}

	// The same rule as rule 50 again, at the end: its entry is dead (rule
	// 50 comes first), no program; deleting rule 50 then hands the key to
	// it (a compilation decides that), and datagrams still drop.
	out = e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp dport 7050 counter actions drop")
	var dup uint64
	fmt.Sscanf(out[strings.LastIndex(out, "# handle ")+len("# handle "):], "%d", &dup)
	if got := liveProgID(t, e, id); got != prog {
		t.Fatal("adding a rule whose key an earlier rule holds loaded a program")
	}
	if got := e.arrive(t, 7050, 1); got != 0 {
		t.Fatal("rule 50 stopped dropping after its duplicate was added")
	}
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", h50))
	if got := e.arrive(t, 7050, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the duplicate of the deleted rule 50", got)
	}
	if _, counters := e.fresh(t); counters[dup].Packets != 2 {
		t.Errorf("the duplicate counted %+v, want 2 packets", counters[dup])
	}
	prog = liveProgID(t, e, id)

	// A rule whose body the hook does not have needs a program.
	e.run(t, fmt.Sprintf("insert rule vb ingress position %d udp dport 7300 counter actions drop", h300))
	if got := liveProgID(t, e, id); got == prog {
		t.Fatal("a rule with a new action body did not load a program")
	}
	if _, counters := e.fresh(t); counters[dup].Packets != 2 {
		t.Errorf("the duplicate of rule 50 counted %+v after the reload, want 2 packets", counters[dup])
	}
}

// assignSlots keeps the priorities and slots of rules that stay, puts new
// rules between their neighbours in free slots, and starts afresh when
// there is no room or nothing stays.
func TestAssignSlots(t *testing.T) {
	rule := func(h uint64) *grammar.Rule { return &grammar.Rule{Handle: h} }
	old := &hookState{Rules: []ruleRecord{{Handle: 1, Prio: 100, Slot: 0}, {Handle: 2, Prio: 200, Slot: 1}, {Handle: 3, Prio: 300, Slot: 2}}}
	// Rule 2 deleted, rules 7 and 8 inserted between 1 and 3, 9 at the end.
	prios, slots := assignSlots(old, []*grammar.Rule{rule(1), rule(7), rule(8), rule(3), rule(9)})
	if fmt.Sprint(prios) != fmt.Sprint([]uint32{100, 166, 232, 300, 300 + prioGap}) {
		t.Errorf("priorities %v", prios)
	}
	// Slot 1 (rule 2's) is not reused by this commit: the old program may
	// still count in it.
	if fmt.Sprint(slots) != fmt.Sprint([]uint32{0, 3, 4, 2, 5}) {
		t.Errorf("slots %v", slots)
	}
	// No room between 100 and 101: afresh.
	tight := &hookState{Rules: []ruleRecord{{Handle: 1, Prio: 100, Slot: 0}, {Handle: 2, Prio: 101, Slot: 1}}}
	prios, slots = assignSlots(tight, []*grammar.Rule{rule(1), rule(5), rule(2)})
	if fmt.Sprint(prios, slots) != fmt.Sprint([]uint32{prioGap, 2 * prioGap, 3 * prioGap}, []uint32{0, 1, 2}) {
		t.Errorf("no room: %v %v", prios, slots)
	}
	// Nothing stays (flush ruleset): afresh, from slot 0.
	prios, slots = assignSlots(old, []*grammar.Rule{rule(10), rule(11)})
	if fmt.Sprint(prios, slots) != fmt.Sprint([]uint32{prioGap, 2 * prioGap}, []uint32{0, 1}) {
		t.Errorf("nothing stays: %v %v", prios, slots)
	}
}

// Priorities, slots and segments are stored with the rules (the state
// record's index) and come back on them.
func TestPlacementRoundTrip(t *testing.T) {
	st := &liveState{Interfaces: []ifaceRecord{{Name: "vb", Hooks: []hookState{{Hook: "ingress",
		Rules: []ruleRecord{{Handle: 4, Text: "udp dport 1 accept", Prio: 1 << 14, Slot: 3, Segment: 1, Table: true}, {Handle: 5, Text: "udp dport 2 accept", Prio: 2 << 14, Slot: 0}}}}}}}
	data, err := encodeState(st)
	if err != nil {
		t.Fatal(err)
	}
	back, err := decodeState(data)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := fmt.Sprint(back.Interfaces[0].Hooks[0].Rules), fmt.Sprint(st.Interfaces[0].Hooks[0].Rules); got != want {
		t.Errorf("rules came back as %s, want %s", got, want)
	}
}

// scanHook is n rules on vb ingress whose shapes no other rule shares
// (each has its own `sport !=`), so they are records of the record scan:
// rule i drops datagrams from 192.0.2.1 to port 7000+2i, every fourth
// rule accepts them instead.
func scanHook(n int) string {
	return vbIngressText(n, func(i int) string {
		verdict := "drop"
		if i%4 == 3 {
			verdict = "accept"
		}
		return fmt.Sprintf("ip saddr 192.0.2.1 udp sport != %d dport %d counter actions %s", 100+i, 7000+2*i, verdict)
	})
}

// echoed returns the handle `-e` echoed.
func echoed(t *testing.T, out string) uint64 {
	t.Helper()
	var h uint64
	if _, err := fmt.Sscanf(out[strings.LastIndex(out, "# handle ")+len("# handle "):], "%d", &h); err != nil {
		t.Fatalf("no handle echoed: %q", out)
	}
	return h
}

// Rules of the record scan change by records alone: a rule of a shape of
// its own inserted in the middle, replaced, deleted, added at the end,
// and a counter-only rule, keep the program (same id), every other rule
// keeps its counter, and datagrams through the veth meet the right rule
// at each step.
func TestRecordChangesWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, scanHook(120))
	prog := liveProgID(t, e, id)
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	h60, h61 := rules[60].Handle, rules[61].Handle // drop 7120, drop 7122
	same := e.unchanged(t, id, prog)
	if got := e.arrive(t, 7120, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed rule 60", got)
	}

	// Inserted before rule 60: its accept wins.
	ins := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp sport != 9 dport 7120 counter actions accept", h60)))
	same("inserting a scanned rule")
	if got := e.arrive(t, 7120, 3); got != 3 {
		t.Fatalf("%d of 3 datagrams passed the inserted accept rule", got)
	}
	// Replaced by one for rule 61's port: rule 60 drops again, 61's
	// datagrams pass.
	e.run(t, fmt.Sprintf("replace rule vb ingress handle %d ip saddr 192.0.2.1 udp sport != 9 dport 7122 counter actions accept", ins))
	same("replacing a scanned rule")
	if got := e.arrive(t, 7120, 1); got != 0 {
		t.Fatal("rule 60 does not drop after the replace")
	}
	if got := e.arrive(t, 7122, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams passed the replaced accept rule", got)
	}
	// A counter-only rule before rule 61 counts, and rule 61 still drops.
	cnt := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp sport != 9 dport 7122 counter", h61)))
	same("inserting a counter-only rule")
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", ins))
	same("deleting a scanned rule")
	if got := e.arrive(t, 7122, 4); got != 0 {
		t.Fatalf("%d of 4 datagrams passed rule 61 after the delete", got)
	}
	// Added at the end, for a port no rule has.
	if got := e.arrive(t, 7500, 1); got != 1 {
		t.Fatal("port 7500 dropped before any rule for it")
	}
	end := echoed(t, e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp sport != 9 dport 7500 counter actions drop"))
	same("adding a scanned rule")
	if got := e.arrive(t, 7500, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the added drop rule", got)
	}

	rs, counters := e.fresh(t)
	rules = rs.Interface("vb").Ingress
	if len(rules) != 122 || rules[61].Handle != cnt || rules[62].Handle != h61 || rules[121].Handle != end {
		t.Fatalf("rules not where they were put: %d rules", len(rules))
	}
	checkCounts(t, counters, []counted{{"rule 60", h60, 3}, {"rule 61", h61, 4}, {"the counter-only rule", cnt, 4}, {"the added rule", end, 2}})
	checkEntries(t, e, id)
}

// applyVbIngress applies text (a ruleset for vb's ingress) and returns the
// hook's id and same, the check that a later step kept its program.
func (e *env) applyVbIngress(t *testing.T, text string) (bpf.HookID, func(step string)) {
	t.Helper()
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, text)
	return id, e.unchanged(t, id, liveProgID(t, e, id))
}

// unchanged returns a check that a step changed hook id by table entries
// alone: the program is still prog and the hook was not compiled.
func (e *env) unchanged(t *testing.T, id bpf.HookID, prog ebpf.ProgramID) func(step string) {
	patched := e.be.patched
	return func(step string) {
		t.Helper()
		if got := liveProgID(t, e, id); got != prog {
			t.Fatalf("%s loaded a program (%d → %d)", step, prog, got)
		}
		if e.be.patched != patched+1 {
			t.Fatalf("%s compiled the hook", step)
		}
		patched = e.be.patched
	}
}

// probePort is a port no rule of the tests' hooks matches.
const probePort = 7999

// arrive sends n datagrams from a to b:port, then one to probePort, and
// returns how many of the n arrived once the probe did (the probe follows
// them through the veth; drops are known without waiting for a timeout).
func (e *env) arrive(t *testing.T, port, n int) int {
	return e.udp(t, e.a, e.b, net.IPv4(192, 0, 2, 2), port, port, n)
}

// leave is arrive from b to a: through vb's egress.
func (e *env) leave(t *testing.T, port, n int) int {
	return e.udp(t, e.b, e.a, net.IPv4(192, 0, 2, 1), port, port, n)
}

// redirected is arrive, counting what reached b:to.
func (e *env) redirected(t *testing.T, port, to, n int) int {
	return e.udp(t, e.a, e.b, net.IPv4(192, 0, 2, 2), port, to, n)
}

// udp sends n datagrams from src to ip:port and one to ip:probePort, and
// returns how many of the n dst received on port to once the probe came.
func (e *env) udp(t *testing.T, src, dst *testenv.NS, ip net.IP, port, to, n int) int {
	t.Helper()
	var rx, probe, tx, ptx *net.UDPConn
	if err := dst.Do(func() (err error) {
		if rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: ip, Port: to}); err != nil {
			return err
		}
		probe, err = net.ListenUDP("udp4", &net.UDPAddr{IP: ip, Port: probePort})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	defer probe.Close()
	if err := src.Do(func() (err error) {
		if tx, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: ip, Port: port}); err != nil {
			return err
		}
		ptx, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: ip, Port: probePort})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	defer ptx.Close()
	return countBeforeProbe(t, rx, probe, tx, ptx, n)
}

// countBeforeProbe sends n datagrams on tx and one on ptx, waits for the
// latter on probe and returns how many of the n rx received.
func countBeforeProbe(t *testing.T, rx, probe, tx, ptx *net.UDPConn, n int) int {
	t.Helper()
	for i := 0; i < n; i++ {
		tx.Write([]byte("datagram"))
	}
	ptx.Write([]byte("probe"))
	buf := make([]byte, 100)
	probe.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := probe.Read(buf); err != nil {
		t.Fatalf("the probe to port %d did not arrive: %v", probePort, err)
	}
	got := 0
	for got < n {
		rx.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		if _, err := rx.Read(buf); err != nil {
			break
		}
		got++
	}
	return got
}

// Rules without a terminal action (counter only) of one shape change by
// table entries alone: inserted, replaced and deleted among 200 such
// rules, without compiling; they count real datagrams, and the drop rule
// after them still sees the packets they counted.
func TestCounterRulesWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id, same := e.applyVbIngress(t, vbIngressText(201, func(i int) string {
		if i == 200 {
			return "udp dport { 7120, 7503 } counter actions drop"
		}
		return fmt.Sprintf("ip saddr 192.0.2.1 udp dport %d counter", 7000+2*i)
	}))
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	h60, last := rules[60].Handle, rules[200].Handle
	if got := e.arrive(t, 7120, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the drop rule", got)
	}
	c := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7501 counter", last)))
	same("inserting a counter-only rule")
	if got := e.arrive(t, 7501, 3); got != 3 {
		t.Fatalf("%d of 3 datagrams passed the counter-only rule", got)
	}
	e.run(t, fmt.Sprintf("replace rule vb ingress handle %d ip saddr 192.0.2.1 udp dport 7503 counter", c))
	same("replacing a counter-only rule")
	if got := e.arrive(t, 7503, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the drop rule after the counter-only rule", got)
	}
	_, counters := e.fresh(t)
	checkCounts(t, counters, []counted{{"the replaced counter-only rule (a replaced rule keeps its handle and counter, compiled or not)", c, 5}, {"rule 60", h60, 2}, {"the drop rule", last, 4}})
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", c))
	same("deleting a counter-only rule")
	if got := e.arrive(t, 7501, 1); got != 1 {
		t.Fatal("port 7501 dropped after the delete")
	}
	if _, counters = e.fresh(t); counters[last].Packets != 4 || counters[h60].Packets != 2 {
		t.Errorf("counters changed by the delete: drop rule %d, rule 60 %d packets", counters[last].Packets, counters[h60].Packets)
	}
	checkEntries(t, e, id)
}

// contestedHook is 200 rules of one shape (source address and port) on vb
// ingress, dropping (accepting: every fourth) datagrams to 7000+i; rules
// 50, 149 and 150 (all drop) match 192.0.2.1, the test datagrams' source.
func contestedHook() string {
	return vbIngressText(200, func(i int) string {
		verdict, host := "drop", 100+i%100
		if i%4 == 3 {
			verdict = "accept"
		}
		if i == 50 || i == 149 || i == 150 {
			host = 1
		}
		return fmt.Sprintf("ip saddr 192.0.2.%d udp dport %d counter actions %s", host, 7000+i, verdict)
	})
}

// Keys two rules hold change without compiling: a rule inserted before
// one with the same key takes the key, and gives it back when deleted;
// deleting the first of two rules with one key hands it to the second,
// and deleting that one frees it. Datagrams meet the rule that holds the
// key at every step, and counters stay with their rules.
func TestContestedKeysWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id, same := e.applyVbIngress(t, contestedHook())
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	h50, h150 := rules[50].Handle, rules[150].Handle // drop 7050 and 7150 from 192.0.2.1

	// Before rule 150, with its key: the accept wins, then rule 150 again.
	acc := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7150 counter actions accept", h150)))
	same("inserting a rule before one with the same key")
	if got := e.arrive(t, 7150, 3); got != 3 {
		t.Fatalf("%d of 3 datagrams passed the accept rule inserted before rule 150", got)
	}
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", acc))
	same("deleting the rule that took the key")
	if got := e.arrive(t, 7150, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed rule 150 once the accept rule was gone", got)
	}

	// A second rule with rule 50's key, at the end: its entry is dead.
	dup := echoed(t, e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp dport 7050 counter actions drop"))
	same("adding a rule with an earlier rule's key")
	if got := e.arrive(t, 7050, 1); got != 0 {
		t.Fatal("rule 50 stopped dropping")
	}
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", h50))
	same("deleting the first of two rules with one key")
	if got := e.arrive(t, 7050, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the second rule with rule 50's key", got)
	}
	_, counters := e.fresh(t)
	checkCounts(t, counters, []counted{{"rule 150", h150, 2}, {"the second rule with rule 50's key", dup, 2}})
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", dup))
	same("deleting the last rule with a key")
	if got := e.arrive(t, 7050, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to port 7050 arrived once no rule had the key", got)
	}
	checkEntries(t, e, id)
}

// Twenty rules inserted at one place (for ports of the hook's range whose
// rules match other sources) exhaust the priorities between two
// neighbours (2^14 apart, halved by each insert): the rules around are
// renumbered in the maps, without compiling, and keep matching in order
// and counting in their slots.
func TestRenumberWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, contestedHook())
	prog := liveProgID(t, e, id)
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	h149, h150 := rules[149].Handle, rules[150].Handle
	if got := e.arrive(t, 7150, 1); got != 0 {
		t.Fatal("rule 150 does not drop")
	}
	patched := e.be.patched
	for k := 0; k < 20; k++ {
		e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport %d counter actions drop", h150, 7000+2*k))
		if e.be.patched != patched+1 {
			t.Fatalf("insert %d compiled the hook", k+1)
		}
		patched = e.be.patched
	}
	// The last one, before rule 150 with its key, takes it.
	e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7150 counter actions accept", h150))
	if e.be.patched != patched+1 {
		t.Fatal("the insert before rule 150 compiled the hook")
	}
	if got := liveProgID(t, e, id); got != prog {
		t.Fatalf("inserting loaded a program (%d → %d)", prog, got)
	}
	for _, port := range []int{7000, 7020, 7038} { // (in the ports the hook wants: see TestPortOutsideThePrefilter)
		if got := e.arrive(t, port, 1); got != 0 {
			t.Errorf("the inserted rule for port %d does not drop", port)
		}
	}
	if got := e.arrive(t, 7150, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams passed the accept rule inserted before rule 150", got)
	}
	if got := e.arrive(t, 7149, 1); got != 0 {
		t.Fatal("rule 149 does not drop")
	}
	rs, counters := e.fresh(t)
	rules = rs.Interface("vb").Ingress
	if len(rules) != 221 || rules[149].Handle != h149 || rules[171].Handle != h150 {
		t.Fatalf("rules out of order: %d rules", len(rules))
	}
	if c := counters[h150].Packets; c != 1 {
		t.Errorf("rule 150 counted %d packets, want 1", c)
	}
	if c := counters[h149].Packets; c != 1 {
		t.Errorf("rule 149 counted %d packets, want 1", c)
	}
	checkEntries(t, e, id)
}

// An egress hook whose TCP rules take the segmentation device changes by
// table entries too: the device (and its return program) stays, the
// program too, and UDP datagrams from b meet the inserted drop rule.
func TestSegdevHookWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookEgress}
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tegress {\n")
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tip daddr 198.51.100.%d tcp dport %d counter actions funnel udp dport 4000\n", 1+i, 8000+i)
	}
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tip daddr 198.51.100.%d udp dport %d counter actions drop\n", 1+i, 7000+i)
	}
	b.WriteString("\t}\n}\n")
	e.run(t, b.String())
	prog := liveProgID(t, e, id)
	segdevs := func() []Segdev {
		var sds []Segdev
		e.do(t, func() (err error) { sds, err = Segdevs(); return err })
		return sds
	}
	before := segdevs()
	if len(before) != 1 {
		t.Fatalf("segmentation devices %+v, want one", before)
	}
	rs, _ := e.fresh(t)
	h20 := rs.Interface("vb").Egress[60].Handle // udp dport 7020
	patched := e.be.patched
	if got := e.leave(t, 7021, 1); got != 1 {
		t.Fatal("port 7021 dropped before any rule for it")
	}
	ins := echoed(t, e.run(t, fmt.Sprintf("insert rule vb egress position %d ip daddr 192.0.2.1 udp dport 7021 counter actions drop", h20)))
	if e.be.patched != patched+1 || liveProgID(t, e, id) != prog {
		t.Fatal("inserting a rule in a hook with a segmentation device compiled or loaded the hook")
	}
	if got := e.leave(t, 7021, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the inserted drop rule", got)
	}
	if after := segdevs(); len(after) != 1 || after[0].TxIndex != before[0].TxIndex {
		t.Fatalf("segmentation devices %+v after the insert, want %+v", after, before)
	}
	e.run(t, fmt.Sprintf("delete rule vb egress handle %d", ins))
	if e.be.patched != patched+2 || liveProgID(t, e, id) != prog {
		t.Fatal("deleting a rule in a hook with a segmentation device compiled or loaded the hook")
	}
	if got := e.leave(t, 7021, 1); got != 1 {
		t.Fatal("port 7021 still dropped after the delete")
	}
	if after := segdevs(); len(after) != 1 || after[0].TxIndex != before[0].TxIndex {
		t.Fatalf("segmentation devices %+v after the delete, want %+v", after, before)
	}
	checkEntries(t, e, id)
}

// checkEntries checks what hook id's live tables and records hold against
// its state record: every entry and record names a rule of the hook by its
// counter slot, with that rule's priority (an entry left with a stale
// priority or slot by an incremental change fails it).
func checkEntries(t *testing.T, e *env, id bpf.HookID) {
	t.Helper()
	e.current(t, func(cur *bpf.Gen) error {
		st, err := readGenState(cur)
		if err != nil {
			return err
		}
		hs := st.hook(id)
		h, err := cur.Hook(id)
		if err != nil || hs == nil || h == nil || hs.Layout == nil {
			return fmt.Errorf("%s: no hook, state or layout (%v)", id, err)
		}
		defer h.Close()
		if h.Maps[abi.ControlMap] == nil {
			return nil // no tables (the fast matcher's program)
		}
		live, err := liveGeneration(h)
		if err != nil {
			return err
		}
		prioOf := map[uint32]uint32{} // by slot
		for _, r := range hs.Rules {
			prioOf[r.Slot] = r.Prio
		}
		check := func(where string, prio, slot uint32) {
			if want, ok := prioOf[slot]; !ok || want != prio {
				t.Errorf("%s: entry with priority %d for slot %d, whose rule has priority %d (%v)", where, prio, slot, want, ok)
			}
		}
		n := 0
		for _, sl := range hs.Layout.Segments {
			for _, sh := range sl.Shapes {
				m := tableMap(h, sh.Table, live)
				if m == nil {
					return fmt.Errorf("no table %s", sh.Table)
				}
				if sh.Perfect {
					blob := make([]byte, m.ValueSize())
					if err := m.Lookup(uint32(0), blob); err != nil {
						return err
					}
					for _, v := range compiler.PerfectTableValues(blob, sh.PerfectLayout) {
						check(sh.Table, v.Prio, v.Slot)
						n++
					}
					continue
				}
				all, err := readTable(m)
				if err != nil {
					return err
				}
				for k, v := range all {
					w := binary.NativeEndian.Uint32([]byte(k[:4]))
					gen, mine := w&1, w>>1 == sh.ID
					if sh.Array {
						gen, mine = w>>16, true
					}
					if gen != live || !mine || binary.NativeEndian.Uint32(v) == 0 {
						continue
					}
					check(sh.Table, binary.NativeEndian.Uint32(v), binary.NativeEndian.Uint32(v[4:]))
					n++
				}
			}
		}
		if sc := hs.Layout.Scan; sc != nil {
			recs, err := readRecords(h.Maps[compiler.RecordMap], sc, live)
			if err != nil {
				return err
			}
			for _, sl := range hs.Layout.Segments {
				for d := sl.Scan - 1; sl.Scan > 0 && d < sl.Scan-1+max(sl.ScanLists, 1); d++ {
					at := compiler.RecordPrio(recs[d*compiler.RecordSize:]) - live*uint32(sc.Cap)
					for ; compiler.RecordPrio(recs[int(at)*compiler.RecordSize:]) != 0; at++ {
						r := recs[int(at)*compiler.RecordSize:]
						if compiler.RecordOfRule(r) { // (a shape record's slot is a shape id)
							check("records", compiler.RecordPrio(r), compiler.RecordSlot(r))
							n++
							// In the list a packet that matches it reads.
							if l := compiler.RecordList(r, max(sl.ScanLists, 1), sl.ScanBuckets); l != d-(sl.Scan-1) {
								t.Errorf("record of slot %d in list %d of its segment, not in its list %d", compiler.RecordSlot(r), d-(sl.Scan-1), l)
							}
						}
					}
				}
			}
		}
		if n == 0 {
			t.Errorf("%s: no entries checked", id)
		}
		return nil
	})
}

// A rule of a shape of its own goes into a segment whose scan also holds
// shape records (shapes past the code budget, compiler/shapescan.go):
// inserted and deleted by records alone, the shape records kept.
func TestRecordsBesideShapeRecords(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, vbIngressText(24*5, func(i int) string {
		s, j := i/5, i%5
		if j == 4 { // a rule of a shape of its own (a plain record) now and then
			return fmt.Sprintf("ip saddr 192.0.2.%d udp sport != %d dport %d counter actions drop", 150+s, 500+s, 7200+s)
		}
		return fmt.Sprintf("ip saddr 192.0.2.%d udp sport != %d dport %d counter actions drop", 100+j, s+1, 7000+4*s+j)
	}))
	prog := liveProgID(t, e, id)
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	patched := e.be.patched
	if got := e.arrive(t, 7041, 1); got != 1 {
		t.Fatal("port 7041 dropped before any rule for it")
	}
	ins := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp sport != 999 dport 7041 counter actions drop", rules[50].Handle)))
	if e.be.patched != patched+1 || liveProgID(t, e, id) != prog {
		t.Fatal("inserting a record beside shape records compiled or loaded the hook")
	}
	if got := e.arrive(t, 7041, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the inserted drop rule", got)
	}
	checkEntries(t, e, id)
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", ins))
	if e.be.patched != patched+2 {
		t.Fatal("deleting the record compiled the hook")
	}
	if got := e.arrive(t, 7041, 1); got != 1 {
		t.Fatal("port 7041 still dropped after the delete")
	}
	if got := e.arrive(t, 7040, 1); got != 1 {
		t.Fatal("port 7040 dropped: a shape record's rule for another source matched")
	}
	checkEntries(t, e, id)
}

// In a hook whose bodies read their values from the parameter map (more
// than 16 distinct action lists), a rule with its own dnat address and
// port is inserted and deleted by table entries and its parameter entry:
// no compilation, and its datagrams reach the port it names.
func TestParametricHookWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, vbIngressText(40, func(i int) string {
		return fmt.Sprintf("ip saddr 192.0.2.%d udp dport %d counter actions dnat to 192.0.2.2:%d", 100+i, 7000+i, 8000+i%20)
	}))
	prog := liveProgID(t, e, id)
	rs, _ := e.fresh(t)
	h20 := rs.Interface("vb").Ingress[20].Handle
	patched := e.be.patched
	ins := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7021 counter actions dnat to 192.0.2.2:8033", h20)))
	if e.be.patched != patched+1 || liveProgID(t, e, id) != prog {
		t.Fatal("inserting a rule with its own dnat port compiled or loaded the hook")
	}
	if got := e.redirected(t, 7021, 8033, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to 7021 reached port 8033", got)
	}
	checkEntries(t, e, id)
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", ins))
	if e.be.patched != patched+2 || liveProgID(t, e, id) != prog {
		t.Fatal("deleting it compiled or loaded the hook")
	}
	if got := e.redirected(t, 7021, 8033, 1); got != 0 {
		t.Fatal("a datagram to 7021 still reached port 8033 after the delete")
	}
	// Again (the freed slot's parameters are written anew), with another port.
	e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7021 counter actions dnat to 192.0.2.2:8034", h20))
	if got := e.redirected(t, 7021, 8034, 1); got != 1 {
		t.Fatal("the datagram to 7021 did not reach port 8034")
	}
	if e.be.patched != patched+3 {
		t.Fatal("inserting again compiled the hook")
	}
	checkEntries(t, e, id)
}

// The same with records: rules of shapes of their own with more than 16
// dnat ports; a record's parameters go with it.
func TestParametricRecordsWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, vbIngressText(60, func(i int) string {
		return fmt.Sprintf("ip saddr 192.0.2.%d udp sport != %d dport %d counter actions dnat to 192.0.2.2:%d", 100+i, 100+i, 7000+i, 8000+i%20)
	}))
	prog := liveProgID(t, e, id)
	rs, _ := e.fresh(t)
	h20 := rs.Interface("vb").Ingress[20].Handle
	same := e.unchanged(t, id, prog)
	ins := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp sport != 9 dport 7021 counter actions dnat to 192.0.2.2:8033", h20)))
	same("inserting a record with its own dnat port")
	if got := e.redirected(t, 7021, 8033, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to 7021 reached port 8033", got)
	}
	checkEntries(t, e, id)
	e.run(t, fmt.Sprintf("replace rule vb ingress handle %d ip saddr 192.0.2.1 udp sport != 9 dport 7021 counter actions dnat to 192.0.2.2:8034", ins))
	same("replacing it with another port")
	if got := e.redirected(t, 7021, 8034, 1); got != 1 {
		t.Fatal("the datagram to 7021 did not reach port 8034 after the replace")
	}
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", ins))
	same("deleting it")
	if got := e.redirected(t, 7021, 8034, 1); got != 0 {
		t.Fatal("a datagram to 7021 still reached port 8034 after the delete")
	}
	checkEntries(t, e, id)
}

// A record that tests a named set the record scan already tests goes in
// by its record too.
func TestRecordWithNamedSetWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	var b strings.Builder
	b.WriteString("flush ruleset\nset blocked {\n\ttype ipv4_addr\n\telements = { 192.0.2.1 }\n}\ninterface vb {\n\tingress {\n")
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tip saddr @blocked udp sport != %d dport %d counter actions drop\n", 100+i, 7000+2*i)
	}
	b.WriteString("\t}\n}\n")
	e.run(t, b.String())
	prog := liveProgID(t, e, id)
	rs, _ := e.fresh(t)
	h20 := rs.Interface("vb").Ingress[20].Handle
	same := e.unchanged(t, id, prog)
	if got := e.arrive(t, 7041, 1); got != 1 {
		t.Fatal("port 7041 dropped before any rule for it")
	}
	sets := &grammar.Options{LookupSet: func(string) (grammar.SetType, bool) { return grammar.SetIPv4Addr, true }}
	ins := echoed(t, e.runWith(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr @blocked udp sport != 9 dport 7041 counter actions drop", h20), sets))
	same("inserting a record of a named set")
	if got := e.arrive(t, 7041, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the inserted rule", got)
	}
	checkEntries(t, e, id)
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", ins))
	same("deleting it")
	if got := e.arrive(t, 7041, 1); got != 1 {
		t.Fatal("port 7041 still dropped after the delete")
	}
}

// Two new rules with one key in one change go in by table entries: the
// first in rule order takes the key (whichever command came first), and
// deleting it hands the key to the other.
func TestSameKeyInOneChangeWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id, same := e.applyVbIngress(t, contestedHook())
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	h140, h150 := rules[140].Handle, rules[150].Handle
	if got := e.arrive(t, 7151, 1); got != 1 {
		t.Fatal("port 7151 dropped before any rule for it")
	}

	// An accept before rule 150 and a drop at the end, for one key.
	out := e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7151 counter actions accept\n"+
		"add rule vb ingress ip saddr 192.0.2.1 udp dport 7151 counter actions drop", h150))
	same("adding two rules with one key")
	rs, _ = e.fresh(t)
	rules = rs.Interface("vb").Ingress
	acc, drop := rules[150].Handle, rules[201].Handle
	if !strings.Contains(out, fmt.Sprintf("# handle %d", acc)) || !strings.Contains(out, fmt.Sprintf("# handle %d", drop)) {
		t.Fatalf("the rules are not where they were put: %q", out)
	}
	if got := e.arrive(t, 7151, 3); got != 3 {
		t.Fatalf("%d of 3 datagrams passed the accept rule, the first with the key", got)
	}
	checkEntries(t, e, id)
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", acc))
	same("deleting the first of them")
	if got := e.arrive(t, 7151, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the drop rule that has the key now", got)
	}

	// The later command's rule comes first in rule order: it wins.
	e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7152 counter actions drop\n"+
		"insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7152 counter actions accept", h150, h140))
	same("inserting two rules with one key, the second before the first")
	if got := e.arrive(t, 7152, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams passed the accept rule inserted before rule 140", got)
	}
	rs, counters := e.fresh(t)
	rules = rs.Interface("vb").Ingress
	if len(rules) != 203 || rules[140].Handle == h140 || rules[152].Handle != h150 {
		t.Fatalf("rules not where they were put: %d rules", len(rules))
	}
	checkCounts(t, counters, []counted{{"the accept rule before rule 140", rules[140].Handle, 2}, {"the drop rule for 7152", rules[151].Handle, 0}, {"the drop rule for 7151", drop, 2}})
	checkEntries(t, e, id)
}

// renumber gives every new rule a priority between its neighbours' and
// moves only rules whose priorities are in maps, at as many places as a
// change needs: over random changes of hooks whose priorities leave
// little room, the priorities it gives grow with the rules whenever it
// makes room.
func TestRenumberPlaces(t *testing.T) {
	rnd := rand.New(rand.NewPCG(8, 8))
	l := &compiler.Layout{Segments: []compiler.SegmentLayout{{}}}
	made := 0
	for round := 0; round < 300; round++ {
		n := 20 + rnd.IntN(200)
		oh := &hookState{}
		p := uint32(0)
		for k := 0; k < n; k++ {
			p += 1 + uint32(rnd.IntN(8)) // mostly no room
			if rnd.IntN(20) == 0 {
				p += prioGap
			}
			// Now and then a member (its priority is in the code).
			oh.Rules = append(oh.Rules, ruleRecord{Handle: uint64(k + 1), Prio: p, Slot: uint32(k), Segment: 1, Table: rnd.IntN(30) != 0})
		}
		var rules []*grammar.Rule
		var recs []ruleRecord
		var kept []bool
		oldAt := map[uint64]int{}
		next := uint64(n + 1)
		for k, r := range oh.Rules {
			oldAt[r.Handle] = k
			for rnd.IntN(4) == 0 && len(rules) < 2*n { // inserted at up to several places
				rules, recs, kept = append(rules, &grammar.Rule{Handle: next}), append(recs, ruleRecord{}), append(kept, false)
				next++
			}
			if rnd.IntN(10) != 0 {
				rules, recs, kept = append(rules, &grammar.Rule{Handle: r.Handle}), append(recs, r), append(kept, true)
			}
		}
		preset, moved, ok := (*Backend)(nil).renumber(l, oh, rules, recs, kept, oldAt)
		if !ok {
			continue
		}
		made++
		last := uint32(0)
		for k := range rules {
			q := recs[k].Prio
			if !kept[k] {
				var has bool
				if q, has = preset[k]; !has {
					t.Fatalf("round %d: new rule %d has no priority", round, k)
				}
			}
			if q <= last || q >= 1<<31 {
				t.Fatalf("round %d: rule %d has priority %d after %d", round, k, q, last)
			}
			last = q
			if old, ok := moved[k]; ok && (!kept[k] || !recs[k].Table || old != oh.Rules[oldAt[rules[k].Handle]].Prio) {
				t.Fatalf("round %d: rule %d moved from %d: not a table rule that stays, or not its old priority", round, k, old)
			}
			if !ok && kept[k] && q != oh.Rules[oldAt[rules[k].Handle]].Prio {
				t.Fatalf("round %d: rule %d took a new priority without being listed as moved", round, k)
			}
		}
	}
	if made < 100 {
		t.Errorf("renumber made room in %d of 300 changes", made)
	}
}

// Twenty rules inserted before rule 50 and twenty before rule 150 in one
// change exhaust the priorities at two places: the rules around each are
// renumbered in the maps, without compiling, and every rule keeps matching
// in order and counting in its slot.
func TestRenumberAtTwoPlacesWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id, same := e.applyVbIngress(t, contestedHook())
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	h50, h149, h150 := rules[50].Handle, rules[149].Handle, rules[150].Handle
	var b strings.Builder
	for k := 0; k < 20; k++ {
		fmt.Fprintf(&b, "insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport %d counter actions drop\n", h50, 7000+2*k)
		fmt.Fprintf(&b, "insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport %d counter actions drop\n", h150, 7101+2*k)
	}
	// The last before rule 150, with its key, takes it.
	fmt.Fprintf(&b, "insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7150 counter actions accept\n", h150)
	e.run(t, b.String())
	same("inserting twenty rules at each of two places")
	for _, port := range []int{7000, 7038, 7101, 7139} {
		if got := e.arrive(t, port, 1); got != 0 {
			t.Errorf("the inserted rule for port %d does not drop", port)
		}
	}
	if got := e.arrive(t, 7150, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams passed the accept rule inserted before rule 150", got)
	}
	for _, port := range []int{7050, 7149} {
		if got := e.arrive(t, port, 1); got != 0 {
			t.Errorf("the rule for port %d does not drop", port)
		}
	}
	rs, counters := e.fresh(t)
	rules = rs.Interface("vb").Ingress
	if len(rules) != 241 || rules[70].Handle != h50 || rules[169].Handle != h149 || rules[191].Handle != h150 {
		t.Fatalf("rules out of order: %d rules", len(rules))
	}
	checkCounts(t, counters, []counted{{"rule 50", h50, 1}, {"rule 149", h149, 1}, {"rule 150", h150, 0}, {"the first rule inserted before rule 50", rules[50].Handle, 1}})
	checkEntries(t, e, id)
}

// listsHook is scanHook(n) with three more records that need the shared
// list maps (for other sources than the test datagrams'): an address
// list, a port range list (more than four ranges) and a port bitmap (more
// than 32), so that the record scan's callback tests each kind of list.
func listsHook(n int) string {
	var ports []string
	for p := 0; p < 40; p++ {
		ports = append(ports, fmt.Sprint(7800+2*p))
	}
	return strings.Replace(scanHook(n), "\tingress {\n", "\tingress {\n\t\tip saddr { 192.0.2.60, 192.0.2.61 } udp sport != 2 dport 7700 counter actions drop\n"+
		"\t\tip saddr 192.0.2.70 udp sport != 3 dport { 7710, 7712, 7714, 7716, 7718 } counter actions drop\n"+
		"\t\tip saddr 192.0.2.71 udp sport != 4 dport { "+strings.Join(ports, ", ")+" } counter actions drop\n", 1)
}

// Records whose matches need lists in the shared list maps (an address
// list, a port range list, a port bitmap) change by records and list
// entries alone: inserted, replaced and deleted without compiling, and
// datagrams meet the right rule at each step.
func TestRecordListsWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id, same := e.applyVbIngress(t, listsHook(120))
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	h60 := rules[63].Handle // drop 7120
	if got := e.arrive(t, 7120, 1); got != 0 {
		t.Fatal("rule 60 does not drop")
	}

	// An address list before rule 60: its accept wins.
	acc := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr { 192.0.2.9, 192.0.2.1 } udp sport != 9 dport 7120 counter actions accept", h60)))
	same("inserting a record with an address list")
	if got := e.arrive(t, 7120, 3); got != 3 {
		t.Fatalf("%d of 3 datagrams passed the inserted accept rule", got)
	}
	checkEntries(t, e, id)
	// A port range list and a port bitmap, at the end.
	rl := echoed(t, e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp sport != 9 dport { 7500, 7502, 7504, 7506, 7508 } counter actions drop"))
	same("adding a record with a port range list")
	var ports []string
	for p := 0; p < 40; p++ {
		ports = append(ports, fmt.Sprint(7601+2*p))
	}
	bm := echoed(t, e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp sport != 9 dport { "+strings.Join(ports, ", ")+" } counter actions drop"))
	same("adding a record with a port bitmap")
	for _, c := range []struct{ port, want int }{{7504, 0}, {7505, 1}, {7641, 0}, {7642, 1}, {7700, 1}, {7710, 1}} {
		if got := e.arrive(t, c.port, 1); got != c.want {
			t.Errorf("%d of 1 datagrams to port %d arrived, want %d", got, c.port, c.want)
		}
	}
	// Replaced by another list (a new id; the old one is not reused while
	// the live generation may read it), then deleted.
	e.run(t, fmt.Sprintf("replace rule vb ingress handle %d ip saddr 192.0.2.1 udp sport != 9 dport { 7501, 7503, 7505, 7507, 7509 } counter actions drop", rl))
	same("replacing the record with the port range list")
	if got := e.arrive(t, 7504, 1); got != 1 {
		t.Error("port 7504 still dropped after the replace")
	}
	if got := e.arrive(t, 7505, 2); got != 0 {
		t.Errorf("%d of 2 datagrams to port 7505 passed the replaced rule", got)
	}
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", acc))
	same("deleting the record with the address list")
	if got := e.arrive(t, 7120, 1); got != 0 {
		t.Fatal("rule 60 does not drop after the delete")
	}
	_, counters := e.fresh(t)
	checkCounts(t, counters, []counted{{"rule 60", h60, 2}, {"the range list rule (replaced: it keeps its counter)", rl, 3}, {"the bitmap rule", bm, 1}})
	checkEntries(t, e, id)
}

// Rules without a terminal action added after the terminal rules of a
// segment of several shapes: the first compiles the hook (the segment's
// dispatch has no body that counts and goes on yet), and puts it at the
// segment's end; the next ones of its shape follow it there by table
// entries alone, count real datagrams and let them go on, and deleting one
// is table entries too. One of another shape, or before a rule of the
// segment that ends evaluation, is not put there (a packet could match
// both: the first would hide the other), and all count.
func TestCounterAfterTerminalWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	// bigHook with a third shape in its segment, of IPv4 and UDP like the
	// counter-only rules (so their body is the same).
	hook := bigHook()
	for _, i := range []int{10, 20, 30, 40, 60, 70} {
		hook = strings.Replace(hook, fmt.Sprintf("ip saddr 192.0.2.%d udp dport %d", 100+i, 7000+i), fmt.Sprintf("ip daddr 192.0.2.2 udp dport %d", 7000+i), 1)
	}
	e.run(t, hook)
	rs, _ := e.fresh(t)
	h50 := rs.Interface("vb").Ingress[50].Handle // drop 7050 from 192.0.2.1
	first := echoed(t, e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp dport 7001 counter"))
	prog := liveProgID(t, e, id)
	same := e.unchanged(t, id, prog)
	// (Ports of rules for other sources; rules 3 and 7 accept 7003 and 7007.)
	ports := []int{7001, 7002, 7005, 7006}
	var added []uint64
	for _, p := range ports[1:] {
		added = append(added, echoed(t, e.run(t, fmt.Sprintf("add rule vb ingress ip saddr 192.0.2.1 udp dport %d counter", p))))
		same(fmt.Sprintf("adding a counter-only rule for port %d after the terminal rules", p))
	}
	checkEntries(t, e, id)
	for k, p := range ports {
		if got := e.arrive(t, p, k+1); got != k+1 {
			t.Errorf("%d of %d datagrams to port %d passed the counter-only rule", got, k+1, p)
		}
	}
	if got := e.arrive(t, 7050, 1); got != 0 {
		t.Error("rule 50 does not drop")
	}
	_, counters := e.fresh(t)
	for k, h := range append([]uint64{first}, added...) {
		if got := counters[h].Packets; got != uint64(k+1) {
			t.Errorf("counter-only rule for port %d counted %d packets, want %d", ports[k], got, k+1)
		}
	}
	if got := counters[h50].Packets; got != 1 {
		t.Errorf("rule 50 counted %d packets, want 1", got)
	}
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", added[0]))
	same("deleting a counter-only rule after the terminal rules")
	if got := e.arrive(t, 7002, 1); got != 1 {
		t.Error("port 7002 dropped after the delete")
	}
	checkEntries(t, e, id)
	// Another shape of the segment: a datagram to 7001 from 192.0.2.1
	// matches both (behind the first, this one would never count).
	port := echoed(t, e.run(t, "add rule vb ingress ip daddr 192.0.2.2 udp dport 7001 counter"))
	if e.arrive(t, 7001, 2) != 2 {
		t.Fatal("datagrams to 7001 dropped")
	}
	// Of the tail's shape, before rule 10 (drop datagrams to 192.0.2.2:7010):
	// not at the segment's end, and rule 10 still drops what it counted.
	rs, _ = e.fresh(t)
	h10 := rs.Interface("vb").Ingress[10].Handle
	before := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp dport 7010 counter", h10)))
	if got := e.arrive(t, 7010, 2); got != 0 {
		t.Errorf("%d of 2 datagrams to 7010 passed rule 10 behind a counter-only rule", got)
	}
	_, counters = e.fresh(t)
	if counters[first].Packets != 3 || counters[port].Packets != 2 || counters[before].Packets != 2 {
		t.Errorf("the counter-only rules for 7001 counted %d and %d packets, want 3 and 2; the one for 7010 %d, want 2", counters[first].Packets, counters[port].Packets, counters[before].Packets)
	}
	checkEntries(t, e, id)
}

// A rule for a destination port outside the ports the IPv4 fast path's
// early exit lets through (in its code) goes in without compiling: the
// port goes into the early exit's map of extra ranges first, and
// datagrams to it reach the rule. Four such ranges fit; the fifth
// compiles (and folds them into the code). A delete leaves the range.
func TestPortOutsideThePrefilter(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, contestedHook()) // ports 7000-7199
	prog := liveProgID(t, e, id)
	same := e.unchanged(t, id, prog)
	if got := e.arrive(t, 7500, 1); got != 1 {
		t.Fatal("port 7500 dropped before any rule for it")
	}
	var added []uint64
	for _, port := range []int{7500, 7600, 7700, 7800} {
		added = append(added, echoed(t, e.run(t, fmt.Sprintf("add rule vb ingress ip saddr 192.0.2.1 udp dport %d counter actions drop", port))))
		same(fmt.Sprintf("adding a rule for port %d", port))
		if got := e.arrive(t, port, 2); got != 0 {
			t.Fatalf("%d of 2 datagrams to port %d passed the rule added for it", got, port)
		}
	}
	if got := e.arrive(t, 7150, 1); got != 0 {
		t.Error("rule 150 does not drop")
	}
	checkEntries(t, e, id)
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", added[0]))
	same("deleting the rule for port 7500")
	if got := e.arrive(t, 7500, 1); got != 1 {
		t.Error("port 7500 still dropped after the delete")
	}
	// Again: its range is still in the map.
	added[0] = echoed(t, e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp dport 7500 counter actions drop"))
	same("adding the rule for port 7500 again")
	// A fifth range: the map is full.
	fifth := echoed(t, e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp dport 7900 counter actions drop"))
	if liveProgID(t, e, id) == prog {
		t.Fatal("a fifth port range outside the early exit loaded no program")
	}
	for _, port := range []int{7500, 7800, 7900} {
		if got := e.arrive(t, port, 1); got != 0 {
			t.Errorf("a datagram to port %d passed the rule for it", port)
		}
	}
	_, counters := e.fresh(t)
	for k, want := range []uint64{1, 2, 2, 3, 1} { // ports 7500, 7600, 7700, 7800, 7900
		if got := counters[append(added, fifth)[k]].Packets; got != want {
			t.Errorf("the rule for port %d counted %d packets, want %d", 7500+100*k, got, want)
		}
	}
	checkEntries(t, e, id)
}

// The same where the early exit compares single ports (in network order):
// the added range is compared in host order.
func TestPortOutsideSinglePortPrefilter(t *testing.T) {
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}
	e.run(t, vbIngressText(40, func(i int) string {
		return fmt.Sprintf("ip saddr 192.0.2.%d udp dport %d counter actions drop", 100+i, 7000+2*(i%3))
	}))
	same := e.unchanged(t, id, liveProgID(t, e, id))
	e.run(t, "add rule vb ingress ip saddr 192.0.2.1 udp dport 7300-7310 counter actions drop")
	same("adding a rule for ports outside the early exit's")
	for _, c := range []struct{ port, want int }{{7299, 1}, {7300, 0}, {7305, 0}, {7310, 0}, {7311, 1}} {
		if got := e.arrive(t, c.port, 1); got != c.want {
			t.Errorf("%d of 1 datagrams to port %d arrived, want %d", got, c.port, c.want)
		}
	}
	checkEntries(t, e, id)
}

// counted is the packets a rule should have counted.
type counted struct {
	what   string
	handle uint64
	want   uint64
}

// checkCounts checks the rules' packet counters.
func checkCounts(t *testing.T, counters map[uint64]ruleset.Counter, want []counted) {
	t.Helper()
	for _, c := range want {
		if got := counters[c.handle].Packets; got != c.want {
			t.Errorf("%s counted %d packets, want %d", c.what, got, c.want)
		}
	}
}

// scanBuckets returns the port buckets of hook id's scanned segments
// (compiler.SegmentLayout.ScanBuckets), from its state record.
func scanBuckets(t *testing.T, e *env, id bpf.HookID) []int {
	t.Helper()
	var out []int
	e.current(t, func(cur *bpf.Gen) error {
		st, err := readGenState(cur)
		if err != nil {
			return err
		}
		hs := st.hook(id)
		if hs == nil || hs.Layout == nil {
			return fmt.Errorf("%s: no layout", id)
		}
		for _, sl := range hs.Layout.Segments {
			if sl.Scan > 0 {
				out = append(out, sl.ScanBuckets)
			}
		}
		return nil
	})
	return out
}

// Records kept in buckets (compiler/linear.go) change by records alone,
// and a packet still meets the first rule that matches it across its
// fields' buckets and its family/protocol lists: a rule without a
// destination port (in the source host's bucket) inserted before
// rules in destination-port buckets takes their datagrams; a rule in a
// port bucket inserted before it takes its port back; a rule of the
// family/protocol list (a negated address) inserted before that one takes
// it again until it is deleted; rules for new ports added at the end share
// buckets with the old ones; deleting the host rule hands its datagrams
// back. Same program throughout, and every record sits in the list its
// fields say (checkEntries).
func TestBucketRecordsWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	id, same := e.applyVbIngress(t, scanHook(120))
	if b := scanBuckets(t, e, id); len(b) != 1 || b[0] == 0 {
		t.Fatalf("scanned segments' port buckets %v: want one segment with buckets", b)
	}
	rs, _ := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	h60, h61 := rules[60].Handle, rules[61].Handle // drop 7120, drop 7122

	// No destination port (the bucket of source host 192.0.2.1), before
	// rule 60: it wins over rules 60 and 61 in their port buckets.
	wild := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp sport != 9 counter actions accept", h60)))
	same("inserting a rule without a destination port")
	if got := e.arrive(t, 7120, 2) + e.arrive(t, 7122, 2); got != 4 {
		t.Fatalf("%d of 4 datagrams passed the portless accept rule before rules 60 and 61", got)
	}
	// A bucketed rule before it takes port 7122 back.
	back := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr 192.0.2.1 udp sport != 8 dport 7122 counter actions drop", wild)))
	same("inserting a bucketed rule before the portless one")
	if got := e.arrive(t, 7122, 3); got != 0 {
		t.Fatalf("%d of 3 datagrams to 7122 passed the bucketed drop rule before the portless accept", got)
	}
	if got := e.arrive(t, 7120, 1); got != 1 {
		t.Fatal("port 7120 dropped: the portless accept rule no longer wins it")
	}
	// A rule of the IPv4/UDP list before that one takes 7122 again.
	group := echoed(t, e.run(t, fmt.Sprintf("insert rule vb ingress position %d ip saddr != 10.0.0.1 udp sport != 11 counter actions accept", back)))
	same("inserting a rule of the family/protocol list")
	if got := e.arrive(t, 7122, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to 7122 passed the accept rule before the bucketed drop", got)
	}
	_, counters := e.fresh(t)
	checkCounts(t, counters, []counted{{"the family/protocol list's rule", group, 2 + 1}})
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", group))
	same("deleting the rule of the family/protocol list")
	if got := e.arrive(t, 7122, 1); got != 0 {
		t.Fatal("a datagram to 7122 passed the bucketed drop rule again in front")
	}
	// New ports at the end (odd: no rule has them), in buckets the old
	// rules' records fill (120 records in 60 buckets; the counter map's
	// headroom allows a few more rules).
	var added []uint64
	for k := 0; k < 4; k++ {
		added = append(added, echoed(t, e.run(t, fmt.Sprintf("add rule vb ingress ip saddr 192.0.2.1 udp sport != 10 dport %d counter actions drop", 7001+2*k))))
		same(fmt.Sprint("adding bucketed rule ", k))
	}
	if got := e.arrive(t, 7001, 2) + e.arrive(t, 7007, 2); got != 4 {
		t.Fatalf("%d of 4 datagrams to 7001/7007 passed: the portless accept rule comes before the added drops", got)
	}
	_, counters = e.fresh(t) // (it takes the probes, probePort, too: 7)
	checkCounts(t, counters, []counted{{"the portless rule", wild, 4 + 1 + 4 + 7}, {"the bucketed rule before it", back, 3 + 1}})
	// Without the portless rule, the added rules and rule 60 drop.
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", wild))
	same("deleting the portless rule")
	for _, p := range []int{7120, 7001, 7003, 7007} {
		if got := e.arrive(t, p, 2); got != 0 {
			t.Fatalf("%d of 2 datagrams to %d passed after the portless rule's delete", got, p)
		}
	}
	if got := e.arrive(t, 7081, 1); got != 1 {
		t.Fatal("port 7081, which no rule has, dropped")
	}
	_, counters = e.fresh(t)
	checkCounts(t, counters, []counted{{"the bucketed rule before it", back, 3 + 1}, {"rule 60", h60, 2}, {"rule 61", h61, 0}, {"the first added rule", added[0], 2}, {"the last added rule", added[3], 2}})
	checkEntries(t, e, id)
}

// A hook of a power-of-two number of rules of one shape still takes new
// rules of that shape by table entries: the counters map and the shape's
// perfect-hash table keep room for at least a quarter more (they had none
// at 128 rules, so the first add compiled; at 120, the ninth).
func TestAddsToPowerOfTwoHookWithoutReload(t *testing.T) {
	e := newEnv(t, Options{})
	_, same := e.applyVbIngress(t, vbIngressText(128, func(i int) string {
		return fmt.Sprintf("ip saddr 192.0.2.%d udp dport %d counter actions drop", 100+i%100, 7000+i)
	}))
	for k := 0; k < 32; k++ {
		e.run(t, fmt.Sprintf("add rule vb ingress ip saddr 192.0.2.1 udp dport %d counter actions drop", 7001+2*k))
		same(fmt.Sprintf("add %d of 32", k+1))
	}
	if got := e.arrive(t, 7063, 2); got != 0 {
		t.Fatalf("%d of 2 datagrams passed the last added drop rule", got)
	}
	if got := e.arrive(t, 7500, 2); got != 2 {
		t.Fatalf("%d of 2 datagrams to a port no rule names arrived", got)
	}
}
