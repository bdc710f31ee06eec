package datapath

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

// Random sequences of add/insert/replace/delete rule (one or two rules per
// change) on a live hook of mixed shapes: after every change, the rules
// `list ruleset` shows in a new process are the rules the sequence asked
// for, and crafted packets run through the live program (whatever mix of
// table entries and reloads the changes took) get what the reference
// model gives for those rules: verdict, packet and mark (and, every fourth
// change, each rule's counter grows by the packets the model counts for
// it). While each change is made, packets run through the live program
// without a pause, and each gets what the model gives for the rules
// before the change or for the rules after it, never anything else (a
// packet sees the old ruleset or the new one). Fixed seed (SFUNNEL_SEED=N
// for another); 40 changes in CI, 400 with SFUNNEL_LONG=1.
func TestRandomChangesAgainstModel(t *testing.T) {
	randomChanges(t, randomChangeRule, 150, 2026)
}

// The same with rules that all end evaluation, most of shapes of their
// own: records of the record scan in lists by family and protocol, and
// in the bucket lists of the port or host that pins them (compiler's
// recordBucket), changed by rewriting those lists.
func TestRandomRecordChangesAgainstModel(t *testing.T) {
	randomChanges(t, randomRecordRule, 120, 2028)
}

// randomChanges runs TestRandomChangesAgainstModel's sequence on a hook
// of base rules drawn by rule.
func randomChanges(t *testing.T, rule func(*rand.Rand, bool) string, base int, seed uint64) {
	changes := 40
	if os.Getenv("SFUNNEL_LONG") != "" {
		changes = 400
	}
	if s, err := strconv.ParseUint(os.Getenv("SFUNNEL_SEED"), 10, 64); err == nil {
		seed = s
	}
	rng := rand.New(rand.NewPCG(8, seed))
	e := newEnv(t, Options{})
	id := bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress}

	var want []stated
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	if n, err := strconv.Atoi(os.Getenv("SFUNNEL_BASE")); err == nil {
		base = n
	}
	for range base {
		fmt.Fprintf(&b, "\t\t%s\n", rule(rng, false))
	}
	b.WriteString("\t}\n}\n")
	e.run(t, b.String())
	rs, _ := e.fresh(t)
	for _, r := range rs.Interface("vb").Ingress {
		want = append(want, stated{r.Handle, grammar.FormatRule(r, nil)})
	}
	canonical := func(text string) string {
		r, err := grammar.ParseRule("<test>", text, nil)
		if err != nil {
			t.Fatalf("%s: %v", text, err)
		}
		return grammar.FormatRule(r, nil)
	}
	before := rs.Interface("vb").Ingress
	patched := e.be.patched
	for step := range changes {
		n := 1 + rng.IntN(2) // two rules in one change now and then
		if rng.IntN(3) != 0 {
			n = 1
		}
		var cmds []string
		adds := 0 // new rules stand in want with handle pendingHandle+i until their handle is echoed
		for range n {
			text := rule(rng, true)
			h := uint64(0)
			for h == 0 || h >= pendingHandle { // a committed rule (not one this change adds)
				h = want[rng.IntN(len(want))].handle
			}
			at := slices.IndexFunc(want, func(s stated) bool { return s.handle == h })
			switch op := rng.IntN(10); {
			case op < 3 || len(want) < 20:
				cmds = append(cmds, "add rule vb ingress "+text)
				want = append(want, stated{pendingHandle + uint64(adds), canonical(text)})
				adds++
			case op < 5:
				cmds = append(cmds, fmt.Sprintf("insert rule vb ingress position %d %s", h, text))
				want = slices.Insert(want, at, stated{pendingHandle + uint64(adds), canonical(text)})
				adds++
			case op < 6:
				cmds = append(cmds, fmt.Sprintf("add rule vb ingress position %d %s", h, text))
				want = slices.Insert(want, at+1, stated{pendingHandle + uint64(adds), canonical(text)})
				adds++
			case op < 8:
				cmds = append(cmds, fmt.Sprintf("replace rule vb ingress handle %d %s", h, text))
				want[at].text = canonical(text)
			default:
				cmds = append(cmds, fmt.Sprintf("delete rule vb ingress handle %d", h))
				want = slices.Delete(want, at, at+1)
			}
		}
		text := strings.Join(cmds, "\n") + "\n"
		stop := hammer(t, e, id, rng)
		out := e.run(t, text)
		seen := stop()
		handles := echoedAll(out)
		if len(handles) != adds {
			t.Fatalf("step %d: %d handles echoed for %d new rules:\n%s\n%s", step, len(handles), adds, text, out)
		}
		for i := range want {
			if h := want[i].handle; h >= pendingHandle {
				want[i].handle = handles[h-pendingHandle]
			}
		}

		rs, counters := e.fresh(t)
		rules := rs.Interface("vb").Ingress
		if len(rules) != len(want) {
			t.Fatalf("step %d (%s): list shows %d rules, want %d", step, text, len(rules), len(want))
		}
		for i, r := range rules {
			if r.Handle != want[i].handle || grammar.FormatRule(r, nil) != want[i].text {
				t.Fatalf("step %d (%s): rule %d is %q # handle %d, want %q # handle %d", step, text, i, grammar.FormatRule(r, nil), r.Handle, want[i].text, want[i].handle)
			}
		}
		what := fmt.Sprintf("step %d (%s)", step, strings.TrimSpace(text))
		counted := agreeWithModel(t, e, id, rules, rng, what)
		if step%4 == 0 { // (a new process's list costs time: every fourth step)
			_, after := e.fresh(t)
			for i, r := range rules {
				got := after[r.Handle].Packets - counters[r.Handle].Packets
				if got != counted[i] {
					t.Fatalf("%s: rule %d (%s # handle %d) counted %d of the packets, the model %d", what, i, grammar.FormatRule(r, nil), r.Handle, got, counted[i])
				}
			}
		}
		seen.check(t, before, rules, what)
		before = rules
	}
	t.Logf("%d of %d changes by table entries alone", e.be.patched-patched, changes)
	if e.be.patched == patched {
		t.Errorf("no change went in by table entries: the sequence did not test them")
	}
	checkEntries(t, e, id)
}

// pendingHandle marks a rule of a change not yet committed.
const pendingHandle = 1 << 62

var echoedHandle = regexp.MustCompile(`# handle (\d+)`)

// echoedAll is every handle `-e` echoed, in order.
func echoedAll(out string) []uint64 {
	var hs []uint64
	for _, m := range echoedHandle.FindAllStringSubmatch(out, -1) {
		h, _ := strconv.ParseUint(m[1], 10, 64)
		hs = append(hs, h)
	}
	return hs
}

// Addresses and ports the random rules and packets are drawn from (a few
// of each, so that rules overlap and packets meet them).
var (
	changeSaddrs = []string{"192.0.2.1", "192.0.2.5", "10.1.2.3", "198.51.100.7"}
	changeNets   = []string{"192.0.2.1", "192.0.2.5", "10.0.0.0/8", "198.51.100.0/24", "10.1.2.3"}
)

// randomChangeRule is a rule of one of several shapes; late rules may
// also name ports no earlier rule has (outside the early exit's ports).
func randomChangeRule(rng *rand.Rand, late bool) string {
	port := func() int {
		if late && rng.IntN(6) == 0 {
			return 7100 + rng.IntN(3)
		}
		return 7000 + rng.IntN(16)
	}
	net := func() string { return changeNets[rng.IntN(len(changeNets))] }
	proto := []string{"udp", "tcp"}[rng.IntN(2)]
	verdict := []string{"accept", "drop", "counter accept", "counter drop"}[rng.IntN(4)]
	switch rng.IntN(11) {
	case 0:
		return fmt.Sprintf("ip saddr %s %s dport %d %s", net(), proto, port(), verdict)
	case 1:
		lo := port()
		return fmt.Sprintf("%s dport %d-%d %s", proto, lo, lo+rng.IntN(5), verdict)
	case 2:
		a, b := net(), net()
		if a == b {
			return fmt.Sprintf("ip saddr %s %s dport %d %s", a, proto, port(), verdict)
		}
		return fmt.Sprintf("ip saddr { %s, %s } %s dport %d %s", a, b, proto, port(), verdict)
	case 3:
		ps := []int{port(), port() + 20, port() + 40}
		return fmt.Sprintf("%s dport { %d, %d, %d } %s", proto, ps[0], ps[1], ps[2], verdict)
	case 4:
		return fmt.Sprintf("ip saddr %s %s sport != %d dport %d %s", net(), proto, []int{9, 100, 5000}[rng.IntN(3)], port(), verdict)
	case 5:
		return fmt.Sprintf("%s dport %d counter", proto, port())
	case 6:
		return fmt.Sprintf("%s dport %d meta mark set 0x%x", proto, port(), 0x100+rng.IntN(4))
	case 7:
		return fmt.Sprintf("meta mark 0x%x %s dport %d %s", 0x10+rng.IntN(2), proto, port(), verdict)
	case 8:
		return fmt.Sprintf("ip saddr != %s %s dport %d %s", net(), proto, port(), verdict)
	case 9:
		return fmt.Sprintf("ip daddr 192.0.2.2 %s sport %d dport %d %s", proto, []int{9, 100, 5000}[rng.IntN(3)], port(), verdict)
	default:
		return fmt.Sprintf("%s dport %d %s", proto, port(), verdict)
	}
}

// randomRecordRule is a rule that ends evaluation, most of a shape of
// its own (a `sport !=` of its own, which no packet has): records a
// destination port, a port list's source host or a destination host pins
// to a bucket, and now and then a rule of a table shape.
func randomRecordRule(rng *rand.Rand, late bool) string {
	port := func() int {
		if late && rng.IntN(6) == 0 {
			return 7100 + rng.IntN(3)
		}
		return 7000 + rng.IntN(16)
	}
	wide := func() int { return 1000 + rng.IntN(4000) }
	host := func() string { return changeSaddrs[rng.IntN(len(changeSaddrs))] }
	proto := []string{"udp", "tcp"}[rng.IntN(2)]
	verdict := []string{"accept", "drop", "counter accept", "counter drop"}[rng.IntN(4)]
	switch rng.IntN(7) {
	case 0:
		return fmt.Sprintf("ip saddr %s %s sport != %d dport %d %s", host(), proto, wide(), port(), verdict)
	case 1:
		p := port()
		return fmt.Sprintf("ip saddr %s %s sport != %d dport { %d, %d, %d } %s", host(), proto, wide(), p, p+20, p+40, verdict)
	case 2:
		return fmt.Sprintf("ip daddr 192.0.2.2 %s sport != %d dport != %d %s", proto, wide(), port(), verdict)
	case 3:
		lo := port()
		return fmt.Sprintf("%s sport != %d dport %d-%d %s", proto, wide(), lo, lo+rng.IntN(3), verdict)
	case 4:
		return fmt.Sprintf("ip saddr != %s %s sport != %d dport %d %s", changeNets[rng.IntN(len(changeNets))], proto, wide(), port(), verdict)
	case 5:
		return fmt.Sprintf("meta mark 0x%x %s sport != %d dport %d %s", 0x10+rng.IntN(2), proto, wide(), port(), verdict)
	default:
		return fmt.Sprintf("ip saddr %s %s dport %d %s", changeNets[rng.IntN(len(changeNets))], proto, port(), verdict)
	}
}

// agreeWithModel runs crafted packets through hook id's live program and
// compares each outcome with the reference model's for rules. It returns
// how many of them the model says each rule counts.
func agreeWithModel(t *testing.T, e *env, id bpf.HookID, rules []*grammar.Rule, rng *rand.Rand, what string) []uint64 {
	t.Helper()
	model, err := refmodel.New(rules, nil, refmodel.Options{Hook: grammar.HookIngress})
	if err != nil {
		t.Fatal(err)
	}
	return agreeRuns(t, e, id, model, len(rules), 300, func() ([]byte, uint32) { return changePacket(t, rng) }, what)
}

// agreeRuns runs n packets drawn by draw (with their skb mark) through
// hook id's live program and compares each outcome with model's; nrules
// is the number of rules model holds. It returns how many of the packets
// the model says each rule counts.
func agreeRuns(t *testing.T, e *env, id bpf.HookID, model *refmodel.Model, nrules, n int, draw func() ([]byte, uint32), what string) []uint64 {
	t.Helper()
	prog, err := ebpf.NewProgramFromID(liveProgID(t, e, id))
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	counted := make([]uint64, nrules)
	for range n {
		pkt, mark := draw()
		out := make([]byte, len(pkt)+256)
		var ctxOut skbContext
		opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: skbContext{Mark: mark}, ContextOut: &ctxOut}
		ret, err := prog.Run(opts)
		if err != nil {
			t.Fatalf("run: %v", err)
		}
		m := model.Run(refmodel.Input{Packet: pkt, Mark: mark})
		for i, c := range m.Counters {
			counted[i] += c.Packets
		}
		if int32(ret) != m.Verdict || ctxOut.Mark != m.Mark || !bytes.Equal(opts.DataOut, m.Packet) {
			t.Fatalf("%s: %s packet %s mark %#x: live program gives %d mark %#x, the model %d mark %#x (rule %d; packet changed: %v / %v)",
				what, id, hex.EncodeToString(pkt), mark, int32(ret), ctxOut.Mark, m.Verdict, m.Mark, m.Rule, !bytes.Equal(opts.DataOut, pkt), !bytes.Equal(m.Packet, pkt))
		}
	}
	return counted
}

// changePacket is a packet of randomChangePacket, crafted, and its mark.
func changePacket(t *testing.T, rng *rand.Rand) ([]byte, uint32) {
	src, udp, sport, dport, mark := randomChangePacket(rng)
	return craftChangePacket(t, src, udp, sport, dport), mark
}

// randomChangePacket draws a packet's fields from what the rules name.
func randomChangePacket(rng *rand.Rand) (src net.IP, udp bool, sport, dport uint16, mark uint32) {
	src = net.ParseIP(changeSaddrs[rng.IntN(len(changeSaddrs))])
	sport = uint16([]int{9, 100, 5000, 40000}[rng.IntN(4)])
	dport = uint16(7000 + rng.IntN(60))
	if rng.IntN(4) == 0 {
		dport = uint16(7100 + rng.IntN(3))
	}
	return src, rng.IntN(2) == 0, sport, dport, []uint32{0, 0x10, 0x11, 0x101}[rng.IntN(4)]
}

// skbContext is the head of struct __sk_buff a test run takes and returns.
type skbContext struct {
	Len, PktType, Mark uint32
	_                  [192 - 12]byte
}

// craftChangePacket is an Ethernet frame: IPv4 from src to 192.0.2.2,
// UDP or TCP (an ACK), sport to dport, with a short payload.
func craftChangePacket(t *testing.T, src net.IP, udp bool, sport, dport uint16) []byte {
	t.Helper()
	return craftPacket(t, src, net.IPv4(192, 0, 2, 2), udp, false, sport, dport)
}

// outcome is what the program did to a packet.
type outcome struct {
	verdict int32
	mark    uint32
	out     string
}

// runs are outcomes of packets run while a change was made.
type runs struct {
	pkts  [][]byte
	marks []uint32
	got   map[[2]int]outcome // by packet and outcome number, distinct ones
}

// hammer runs packets through hook id's live program until the returned
// function is called, which returns what they got.
func hammer(t *testing.T, e *env, id bpf.HookID, rng *rand.Rand) func() *runs {
	t.Helper()
	return hammerWith(t, e, id, func() ([]byte, uint32) { return changePacket(t, rng) })
}

// hammerWith is hammer with 32 packets drawn by draw.
func hammerWith(t *testing.T, e *env, id bpf.HookID, draw func() ([]byte, uint32)) func() *runs {
	t.Helper()
	prog, err := ebpf.NewProgramFromID(liveProgID(t, e, id))
	if err != nil {
		t.Fatal(err)
	}
	r := &runs{got: map[[2]int]outcome{}}
	for range 32 {
		pkt, mark := draw()
		r.pkts = append(r.pkts, pkt)
		r.marks = append(r.marks, mark)
	}
	done := make(chan struct{})
	var runErr error
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		defer prog.Close()
		distinct := map[outcome]int{}
		for n := 0; n < 200000; n++ {
			select {
			case <-done:
				return
			default:
			}
			i := n % len(r.pkts)
			out := make([]byte, len(r.pkts[i])+256)
			var ctxOut skbContext
			opts := &ebpf.RunOptions{Data: r.pkts[i], DataOut: out, Context: skbContext{Mark: r.marks[i]}, ContextOut: &ctxOut}
			ret, err := prog.Run(opts)
			if err != nil {
				runErr = err
				return
			}
			o := outcome{int32(ret), ctxOut.Mark, string(opts.DataOut)}
			k, ok := distinct[o]
			if !ok {
				k = len(distinct)
				distinct[o] = k
			}
			r.got[[2]int{i, k}] = o
		}
	}()
	return func() *runs {
		close(done)
		<-finished
		if runErr != nil {
			t.Fatalf("run: %v", runErr)
		}
		return r
	}
}

// check holds every outcome to the model of the rules before or after.
func (r *runs) check(t *testing.T, before, after []*grammar.Rule, what string) {
	t.Helper()
	var models [2]*refmodel.Model
	for i, rules := range [][]*grammar.Rule{before, after} {
		m, err := refmodel.New(rules, nil, refmodel.Options{Hook: grammar.HookIngress})
		if err != nil {
			t.Fatal(err)
		}
		models[i] = m
	}
	r.checkModels(t, models, what)
}

// checkModels holds every outcome to models[0] (before the change) or
// models[1] (after it).
func (r *runs) checkModels(t *testing.T, models [2]*refmodel.Model, what string) {
	t.Helper()
	for k, o := range r.got {
		i := k[0]
		ok := false
		for _, m := range models {
			w := m.Run(refmodel.Input{Packet: r.pkts[i], Mark: r.marks[i]})
			ok = ok || o.verdict == w.Verdict && o.mark == w.Mark && o.out == string(w.Packet)
		}
		if !ok {
			t.Fatalf("%s: packet %s mark %#x got %d mark %#x during the change: neither the old rules' outcome nor the new ones'",
				what, hex.EncodeToString(r.pkts[i]), r.marks[i], o.verdict, o.mark)
		}
	}
}

// A map-only change that touches no perfect-hash table (tblh) still
// flips it: its spare generation must be the live one, not what a
// compilation left there (nothing: a zero port entry reads as rule 0 with
// the best priority) nor what an earlier change left. testdata's hook (a
// port-indexed table in tblh before a scanned segment) once accepted every
// UDP datagram after the first change; a second change flips back.
func TestPerfectSpareWithoutReload(t *testing.T) {
	e, id := applyPerfectSpare(t)
	rng := rand.New(rand.NewPCG(1, 2))
	rs, _ := e.fresh(t)
	agreeWithModel(t, e, id, rs.Interface("vb").Ingress, rng, "compiled")
	for _, change := range []string{
		"add rule vb ingress ip saddr != 10.1.2.3 tcp dport 7012 drop", // records only
		"add rule vb ingress udp dport 7002 drop",                      // tblh's port table
		"add rule vb ingress ip saddr 10.1.2.3 tcp dport 7013 accept",  // records only
	} {
		patched := e.be.patched
		e.run(t, change+"\n")
		if e.be.patched != patched+1 {
			t.Fatalf("%s compiled the hook", change)
		}
		rs, _ := e.fresh(t)
		agreeWithModel(t, e, id, rs.Interface("vb").Ingress, rng, change)
	}
}
