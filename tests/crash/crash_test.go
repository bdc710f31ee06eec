// Package crash kills sfunnel with SIGKILL at every numbered point of a
// commit (internal/faults: SFUNNEL_KILL_AT) and checks, after each, that
// the next command lists exactly the old or exactly the new ruleset and
// that real traffic in the namespace behaves as that listing says, on every
// hook.
//
// In `make test` every second or third point is tested (every point of a
// 2 000-address `add element`, whose elements map is swapped in at once);
// SFUNNEL_LONG=1 (make crash-long) tests every point of all of them.
package crash

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sfunnel-crash")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "sfunnel")
	if out, err := exec.Command("go", "build", "-o", binary, "../../cmd/sfunnel").CombinedOutput(); err != nil {
		os.Stderr.Write(out)
		panic(err)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// env is two namespaces joined by a veth: a (192.0.2.1 on va) and b
// (192.0.2.2 on vb), where sfunnel runs on vb.
type env struct {
	a, b *testenv.NS
}

func newEnv(t *testing.T) *env {
	testenv.RequireRoot(t)
	e := &env{testenv.NewNS(t), testenv.NewNS(t)}
	testenv.Veth(t, e.a, "va", "192.0.2.1/24", e.b, "vb", "192.0.2.2/24")
	// Static neighbours: a drop rule must not be confused with ARP delays.
	mac := func(ns *testenv.NS, ifc string) string {
		var m string
		if err := ns.Do(func() error {
			i, err := net.InterfaceByName(ifc)
			if err == nil {
				m = i.HardwareAddr.String()
			}
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return m
	}
	e.a.Run(t, "ip", "neigh", "replace", "192.0.2.2", "lladdr", mac(e.b, "vb"), "dev", "va", "nud", "permanent")
	e.b.Run(t, "ip", "neigh", "replace", "192.0.2.1", "lladdr", mac(e.a, "va"), "dev", "vb", "nud", "permanent")
	t.Cleanup(func() { exec.Command(binary, "--netns", e.b.Name, "flush", "ruleset").Run() })
	return e
}

type result struct {
	stdout, stderr string
	killed         bool
	code           int
}

// sfunnel runs the binary in namespace b; env adds environment variables.
func (e *env) sfunnel(t *testing.T, stdin string, extraEnv []string, args ...string) result {
	t.Helper()
	// A command that hangs (e.g. a reader waiting for a writer) fails.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, append([]string{"--netns", e.b.Name}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Env = append(os.Environ(), extraEnv...)
	var o, er bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &er
	err := cmd.Run()
	r := result{stdout: o.String(), stderr: er.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			r.killed = true
		}
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("sfunnel %v: %v", args, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("sfunnel %v did not return within 60 s", args)
	}
	return r
}

func (e *env) must(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	r := e.sfunnel(t, stdin, nil, args...)
	if r.code != 0 {
		t.Fatalf("sfunnel %v: exit %d\n%s", args, r.code, r.stderr)
	}
	return r.stdout
}

var counterValues = regexp.MustCompile(`counter packets \d+ bytes \d+`)

// listing is `list ruleset` without counter values.
func (e *env) listing(t *testing.T) string {
	t.Helper()
	return counterValues.ReplaceAllString(e.must(t, "", "list", "ruleset"), "counter")
}

// points returns how many crash points running args from the current
// state passes.
func (e *env) points(t *testing.T, stdin string, args ...string) int {
	t.Helper()
	r := e.sfunnel(t, stdin, []string{"SFUNNEL_KILL_TRACE=1"}, args...)
	if r.code != 0 {
		t.Fatalf("sfunnel %v: exit %d\n%s", args, r.code, r.stderr)
	}
	return strings.Count(r.stderr, "sfunnel-point ")
}

// sentinelPort is a port no scenario's rules drop: its datagram, sent
// after the probes, tells when they have had their chance to arrive.
const sentinelPort = 4000

// probe sends two UDP datagrams to each port, from a to b (through vb's
// ingress) or from b to a (through vb's egress), then one to
// sentinelPort, and returns the ports where a datagram arrived. It waits
// for the sentinel (seconds if need be: a loaded machine is slow, and a
// fixed deadline read late datagrams as drops), then a little for
// probes that crossed another CPU's backlog. A round whose sentinel is
// lost (a backlog overflowing on the shared machine) is tried again.
func (e *env) probe(t *testing.T, ingress bool, ports []int) map[int]bool {
	t.Helper()
	for try := 1; ; try++ {
		got, ok := e.probeOnce(t, ingress, ports)
		if ok {
			return got
		}
		if try == 3 {
			t.Fatalf("the datagram to port %d, which no rule drops, did not arrive in %d tries", sentinelPort, try)
		}
	}
}

func (e *env) probeOnce(t *testing.T, ingress bool, ports []int) (map[int]bool, bool) {
	t.Helper()
	src, dst := e.b, e.a
	dstIP := net.IPv4(192, 0, 2, 1)
	if ingress {
		src, dst, dstIP = e.a, e.b, net.IPv4(192, 0, 2, 2)
	}
	conns := map[int]*net.UDPConn{}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	all := append(slices.Clone(ports), sentinelPort)
	if err := dst.Do(func() error {
		for _, p := range all {
			c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: dstIP, Port: p})
			if err != nil {
				return err
			}
			conns[p] = c
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := src.Do(func() error {
		for _, p := range all {
			c, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: dstIP, Port: p})
			if err != nil {
				return err
			}
			for k := 0; k < 2 && err == nil; k++ {
				_, err = c.Write([]byte("probe"))
			}
			c.Close()
			if err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	conns[sentinelPort].SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, _, err := conns[sentinelPort].ReadFrom(buf); err != nil {
		return nil, false
	}
	// Read all sockets at once: a read past its deadline fails at once,
	// even with a datagram queued.
	got := map[int]bool{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	deadline := time.Now().Add(100 * time.Millisecond)
	for _, p := range ports {
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			buf := make([]byte, 16)
			conns[p].SetReadDeadline(deadline)
			if _, _, err := conns[p].ReadFrom(buf); err == nil {
				mu.Lock()
				got[p] = true
				mu.Unlock()
			}
		}(p)
	}
	wg.Wait()
	return got, true
}

type scenario struct {
	name  string
	old   string   // ruleset file applied before each run
	args  []string // the command that is killed
	stdin string
	// handleOf, when set, names a rule by a regexp of its listing: the
	// argument "HANDLE" in args becomes its handle (handles grow with
	// every apply of old).
	handleOf string
	// probes
	ingress, egress []int
	// every tells how many crash points to skip between two tested ones in
	// make test (1: all).
	every int
	// followUp, when set, is a second incremental change run after each
	// kill (after the listing was checked); then the traffic must again
	// be what the listing says: a rule ip saddr 192.0.2.1 udp dport P
	// drops the ingress probe to P, nothing else does. It catches table
	// entries a killed writer left in the spare generation.
	followUp []string
	// setup, when set, are commands run after old is applied (HANDLE as
	// in args), before the command that is killed.
	setup [][]string
}

func (e *env) traffic(t *testing.T, sc *scenario) (ingressDrop, egressDrop map[int]bool) {
	var in, out map[int]bool
	if len(sc.ingress) > 0 {
		in = e.probe(t, true, sc.ingress)
	}
	if len(sc.egress) > 0 {
		out = e.probe(t, false, sc.egress)
	}
	ingressDrop, egressDrop = map[int]bool{}, map[int]bool{}
	for _, p := range sc.ingress {
		if !in[p] {
			ingressDrop[p] = true
		}
	}
	for _, p := range sc.egress {
		if !out[p] {
			egressDrop[p] = true
		}
	}
	return
}

const rulesetA = `flush ruleset
set ports {
	type inet_service
	elements = { 5001 }
}
interface vb {
	ingress {
		udp dport 6000 counter actions drop
	}
	egress {
		udp dport @ports counter actions drop
	}
}
`

const rulesetB = `flush ruleset
set ports {
	type inet_service
	elements = { 5001, 5002 }
}
interface vb {
	ingress {
		udp dport 6001 counter actions drop
	}
	egress {
		udp dport 7000 counter actions drop
		udp dport @ports counter actions drop
	}
}
`

const rulesetC = `flush ruleset
set hosts {
	type ipv4_addr
	elements = { 203.0.113.1 }
}
interface vb {
	egress {
		ip daddr @hosts udp dport 5003 counter actions drop
	}
}
`

// manyHosts lists n addresses of 198.51.100.0/22 and then 192.0.2.1 (the
// probes' destination: only the last element added makes them drop).
func manyHosts(n int) string {
	var b strings.Builder
	for i := 0; i < n-1; i++ {
		fmt.Fprintf(&b, "198.51.%d.%d, ", 100+i/250, 1+i%250)
	}
	b.WriteString("192.0.2.1")
	return b.String()
}

// rulesetD has 40 rules of one shape on vb ingress: the hook classifies
// through rule tables, and a rule of that shape is added by rewriting them.
func rulesetD() string {
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tip saddr 192.0.2.%d udp dport %d counter actions drop\n", 100+i, 7000+i)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// rulesetTwoHooks is rulesetD with 40 rules of one shape on vb egress
// too (for other destinations than the probes'): a change of both hooks
// by table entries alone flips two hooks' tables.
func rulesetTwoHooks() string {
	var b strings.Builder
	b.WriteString("\tegress {\n")
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tip daddr 192.0.2.%d udp dport %d counter actions drop\n", 100+i, 7000+i)
	}
	b.WriteString("\t}\n}\n")
	return strings.TrimSuffix(rulesetD(), "}\n") + b.String()
}

// rulesetE is rulesetD with rule 20 matching the probes' source,
// 192.0.2.1 (port 7020).
func rulesetE() string {
	return strings.Replace(rulesetD(), "ip saddr 192.0.2.120 udp dport 7020", "ip saddr 192.0.2.1 udp dport 7020", 1)
}

// rulesetF has 40 rules of one port each (even ports from 7000) on vb
// ingress: a port-array table, changed entry by entry.
func rulesetF() string {
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tudp dport %d counter actions drop\n", 7000+2*i)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// rulesetG has 20 rules of one shape and then 40 rules of shapes of their
// own (each its own `sport !=`) on vb ingress: a table and the records of
// the record scan, in one segment. Records change list by list; the
// follow-ups add table entries (so a list a killed writer left in the
// spare generation would go live with them, were it not rebuilt).
func rulesetG() string {
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	for i := 0; i < 20; i++ {
		fmt.Fprintf(&b, "\t\tip saddr 192.0.2.%d udp dport %d counter actions drop\n", 200+i, 7100+i)
	}
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tip saddr 192.0.2.%d udp sport != %d dport %d counter actions drop\n", 100+i, 100+i, 7000+i)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// rulesetL is rulesetG with two records that need the shared list maps
// (an address list, a port range list; other sources than the probes'),
// so that the record scan tests lists and a record of a new list goes in
// without compiling. The follow-up's list takes the id a killed writer
// may have filled: it must start empty (scrubLists).
func rulesetL() string {
	return strings.Replace(rulesetG(), "\t\tip saddr 192.0.2.100 ", "\t\tip saddr { 192.0.2.60, 192.0.2.61 } udp sport != 2 dport 7200 counter actions drop\n"+
		"\t\tip saddr 192.0.2.70 udp sport != 3 dport { 7210, 7212, 7214, 7216, 7218 } counter actions drop\n\t\tip saddr 192.0.2.100 ", 1)
}

// rulesetH is rulesetG with rule 20 matching the probes' source.
func rulesetH() string {
	return strings.Replace(rulesetG(), "ip saddr 192.0.2.120 udp sport != 120 dport 7020", "ip saddr 192.0.2.1 udp sport != 120 dport 7020", 1)
}

// dropsOf predicts the ingress probes a listing of rulesets D to L drops:
// a drop rule for the probes' source (or a list with it, or any source) and port (the
// probes' source port is never one a `sport !=` of these rules names).
func dropsOf(list string, ports []int) map[int]bool {
	out := map[int]bool{}
	for _, p := range ports {
		if regexp.MustCompile(fmt.Sprintf(`(?m)^\s*(ip saddr (192\.0\.2\.1|\{[^}]* 192\.0\.2\.1[ ,][^}]*\}) )?udp dport %d (sport != \d+ )?counter`, p)).MatchString(list) {
			out[p] = true
		}
	}
	return out
}

// rulesetP has 40 rules of one shape on vb ingress with 20 distinct dnat
// ports: more than 16 action lists, so the bodies read their values from
// the parameter map, which a rule's change writes too. A probe a rule
// redirects does not reach its port (dropsOf counts it dropped).
func rulesetP() string {
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tip saddr 192.0.2.%d udp dport %d counter actions dnat to 192.0.2.2:%d\n", 100+i, 7000+i, 8000+i%20)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// renumberSetup inserts 14 rules before rule 20 of rulesetD (for
// another source than the probes'): no priority is left between rule 19
// and the last of them, so the next insert there renumbers rules.
func renumberSetup() [][]string {
	var cmds [][]string
	for k := 0; k < 14; k++ {
		cmds = append(cmds, []string{"insert", "rule", "vb", "ingress", "position", "HANDLE", "ip", "saddr", "192.0.2.3", "udp", "dport", strconv.Itoa(7000 + k), "counter", "actions", "drop"})
	}
	return cmds
}

// twoPlacesSetup leaves no priority free at two places of rulesetD (for
// another source than the probes'): before rule 20 (14 rules inserted in
// one change, each halving the room left) and at the start (14 rules
// inserted there one by one).
func twoPlacesSetup() [][]string {
	var batch []string
	for _, cmd := range renumberSetup() {
		if batch != nil {
			batch = append(batch, ";")
		}
		batch = append(batch, cmd...)
	}
	cmds := [][]string{batch}
	for k := 0; k < 14; k++ {
		cmds = append(cmds, []string{"insert", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.3", "udp", "dport", strconv.Itoa(7100 + k), "counter", "actions", "drop"})
	}
	return cmds
}

// twoPlacesOneKey inserts two rules with one key in one change, at the
// places twoPlacesSetup filled: rules are renumbered at both, and the
// first (at the start) takes the key, the second's entry is dead.
func twoPlacesOneKey() []string {
	return strings.Fields("insert rule vb ingress ip saddr 192.0.2.1 udp dport 7021 counter actions drop ; " +
		"insert rule vb ingress position HANDLE ip saddr 192.0.2.1 udp dport 7021 counter actions drop")
}

func manyElements(from, n int) string {
	var b strings.Builder
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(strconv.Itoa(from + i))
	}
	return b.String()
}

func long() bool { return os.Getenv("SFUNNEL_LONG") == "1" }

func TestCrashAtEveryPoint(t *testing.T) {
	for _, sc := range crashScenarios() {
		t.Run(sc.name, func(t *testing.T) { testCrashes(t, sc) })
	}
}

// crashScenarios are the commits TestCrashAtEveryPoint kills (and
// TestStoppedAtEveryPoint, with SFUNNEL_LONG=1, stops).
func crashScenarios() []*scenario {
	return []*scenario{
		{name: "apply", old: rulesetA, args: []string{"-f", "-"}, stdin: rulesetB,
			ingress: []int{6000, 6001}, egress: []int{5001, 5002, 7000}, every: 2},
		{name: "add-rule", old: rulesetA, args: []string{"add", "rule", "vb", "ingress", "udp", "dport", "6002", "counter", "actions", "drop"},
			ingress: []int{6000, 6002}, egress: []int{5001}, every: 2},
		{name: "delete-rule", old: rulesetB, args: []string{"delete", "rule", "vb", "egress", "handle", "HANDLE"}, handleOf: `udp dport 7000 .*# handle (\d+)`,
			ingress: []int{6001}, egress: []int{5002, 7000}, every: 2},
		{name: "add-element", old: rulesetA, args: []string{"add", "element", "ports", "{ " + manyElements(10000, 2000) + " }"},
			ingress: []int{6000}, egress: []int{5001, 10000, 11999}, every: 3},
		{name: "delete-element", old: rulesetB, args: []string{"delete", "element", "ports", "{ 5002 }"},
			ingress: []int{6001}, egress: []int{5001, 5002}, every: 2},
		{name: "add-rule-tables", old: rulesetD(), args: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7005", "counter", "actions", "drop"},
			ingress: []int{7005, 7006}, every: 1},
		{name: "insert-rule-middle", old: rulesetD(), args: []string{"insert", "rule", "vb", "ingress", "position", "HANDLE", "ip", "saddr", "192.0.2.1", "udp", "dport", "7021", "counter", "actions", "drop"},
			handleOf: `udp dport 7020 .*# handle (\d+)`, ingress: []int{7021, 7022, 7030}, every: 2,
			followUp: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "drop"}},
		{name: "delete-rule-middle", old: rulesetE(), args: []string{"delete", "rule", "vb", "ingress", "handle", "HANDLE"},
			handleOf: `saddr 192\.0\.2\.1 udp dport 7020 .*# handle (\d+)`, ingress: []int{7020, 7021, 7030}, every: 2,
			followUp: []string{"insert", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "drop"}},
		{name: "replace-rule-middle", old: rulesetD(), args: []string{"replace", "rule", "vb", "ingress", "handle", "HANDLE", "ip", "saddr", "192.0.2.1", "udp", "dport", "7020", "counter", "actions", "drop"},
			handleOf: `udp dport 7020 .*# handle (\d+)`, ingress: []int{7020, 7021, 7030}, every: 3,
			followUp: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "drop"}},
		{name: "insert-port-rule-middle", old: rulesetF(), args: []string{"insert", "rule", "vb", "ingress", "position", "HANDLE", "udp", "dport", "7021", "counter", "actions", "drop"},
			handleOf: `udp dport 7020 .*# handle (\d+)`, ingress: []int{7021, 7023, 7031}, every: 2,
			followUp: []string{"add", "rule", "vb", "ingress", "udp", "dport", "7031", "counter", "actions", "drop"}},
		{name: "insert-record-middle", old: rulesetG(), args: []string{"insert", "rule", "vb", "ingress", "position", "HANDLE", "ip", "saddr", "192.0.2.1", "udp", "sport", "!=", "9", "dport", "7021", "counter", "actions", "drop"},
			handleOf: `dport 7020 .*# handle (\d+)`, ingress: []int{7021, 7022, 7030}, every: 3,
			followUp: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "drop"}},
		{name: "delete-record-middle", old: rulesetH(), args: []string{"delete", "rule", "vb", "ingress", "handle", "HANDLE"},
			handleOf: `saddr 192\.0\.2\.1 udp dport 7020 sport != 120 .*# handle (\d+)`, ingress: []int{7020, 7021, 7030}, every: 3,
			followUp: []string{"insert", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "drop"}},
		{name: "insert-renumber", old: rulesetD(), setup: renumberSetup(), args: []string{"insert", "rule", "vb", "ingress", "position", "HANDLE", "ip", "saddr", "192.0.2.1", "udp", "dport", "7021", "counter", "actions", "drop"},
			handleOf: `udp dport 7020 .*# handle (\d+)`, ingress: []int{7021, 7022, 7030}, every: 3,
			followUp: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "drop"}},
		{name: "insert-two-places-one-key", old: rulesetD(), setup: twoPlacesSetup(), args: twoPlacesOneKey(),
			handleOf: `udp dport 7020 .*# handle (\d+)`, ingress: []int{7021, 7022, 7030}, every: 3,
			followUp: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "drop"}},
		{name: "insert-record-list", old: rulesetL(), args: []string{"insert", "rule", "vb", "ingress", "position", "HANDLE", "ip", "saddr", "{", "192.0.2.5,", "192.0.2.1", "}", "udp", "sport", "!=", "9", "dport", "7021", "counter", "actions", "drop"},
			handleOf: `saddr 192\.0\.2\.120 udp dport 7020 .*# handle (\d+)`, ingress: []int{7021, 7022, 7030}, every: 3,
			followUp: []string{"insert", "rule", "vb", "ingress", "ip", "saddr", "{", "192.0.2.7,", "192.0.2.8", "}", "udp", "sport", "!=", "9", "dport", "7030", "counter", "actions", "drop"}},
		{name: "add-rule-outside-prefilter", old: rulesetD(), args: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7100", "counter", "actions", "drop"},
			ingress: []int{7100, 7005, 7030}, every: 3,
			followUp: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "drop"}},
		{name: "insert-params-middle", old: rulesetP(), args: []string{"insert", "rule", "vb", "ingress", "position", "HANDLE", "ip", "saddr", "192.0.2.1", "udp", "dport", "7021", "counter", "actions", "dnat", "to", "192.0.2.2:8033"},
			handleOf: `udp dport 7020 .*# handle (\d+)`, ingress: []int{7021, 7022, 7030}, every: 3,
			followUp: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "dport", "7030", "counter", "actions", "dnat", "to", "192.0.2.2:8034"}},
		{name: "set-and-rules", old: rulesetS, args: setAndRules(), handleOf: `saddr @blocked .*# handle (\d+)`,
			ingress: []int{6000, 6001, 6002}, every: 2},
		{name: "flush-interface-hook", old: rulesetB, args: []string{"flush", "interface", "vb", "egress"},
			ingress: []int{6001}, egress: []int{5002, 7000}, every: 2},
		{name: "delete-interface", old: rulesetB, args: []string{"delete", "interface", "vb"},
			ingress: []int{6001}, egress: []int{5002, 7000}, every: 2},
		{name: "two-hooks-tables", old: rulesetTwoHooks(), args: strings.Fields("add rule vb ingress ip saddr 192.0.2.1 udp dport 7005 counter actions drop ; " +
			"add rule vb egress ip daddr 192.0.2.1 udp dport 7006 counter actions drop"),
			ingress: []int{7005}, egress: []int{7006}, every: 2},
		{name: "add-address-elements", old: rulesetC, args: []string{"add", "element", "hosts", "{ " + manyHosts(2000) + " }"},
			egress: []int{5003}, every: 1},
	}
}

func testCrashes(t *testing.T, sc *scenario) {
	e := newEnv(t)
	// The two acceptable outcomes, listed and seen on the wire.
	e.prepare(t, sc)
	oldList := e.listing(t)
	oldIn, oldOut := e.traffic(t, sc)
	n := e.points(t, sc.stdin, e.args(t, sc)...)
	newList := e.listing(t)
	newIn, newOut := e.traffic(t, sc)
	if oldList == newList {
		t.Fatalf("the command does not change the listing:\n%s", oldList)
	}
	if fmt.Sprint(oldIn, oldOut) == fmt.Sprint(newIn, newOut) {
		t.Fatalf("the probes do not tell the old ruleset (drops %v %v) from the new one", oldIn, oldOut)
	}
	if n < 3 {
		t.Fatalf("only %d crash points in the commit", n)
	}
	every := sc.every
	if long() {
		every = 1
	}
	tested := 0
	for k := 1; k <= n; k += every {
		e.prepare(t, sc)
		r := e.sfunnel(t, sc.stdin, []string{"SFUNNEL_KILL_AT=" + strconv.Itoa(k)}, e.args(t, sc)...)
		if !r.killed {
			t.Fatalf("point %d of %d: not killed (exit %d)\n%s", k, n, r.code, r.stderr)
		}
		// The next command (a reader) finishes or undoes the commit.
		list := e.listing(t)
		var want string
		switch list {
		case oldList:
			want = fmt.Sprint(oldIn, oldOut)
		case newList:
			want = fmt.Sprint(newIn, newOut)
		default:
			t.Fatalf("killed at point %d of %d: list shows neither the old nor the new ruleset:\n%s\nold:\n%s\nnew:\n%s", k, n, list, oldList, newList)
		}
		if bad := e.settled(t, sc, fmt.Sprintf("killed at point %d of %d", k, n), func(in, out map[int]bool) string {
			if got := fmt.Sprint(in, out); got != want {
				return fmt.Sprintf("traffic drops %s, the listing says %s\n%s", got, want, list)
			}
			return ""
		}); bad != "" {
			t.Fatal(bad)
		}
		tested++
		// Nothing left behind once a command ran: no pending commit, no
		// orphan generation.
		e.checkTidy(t, k)
		if sc.followUp != nil {
			e.must(t, "", sc.followUp...)
			list := e.listing(t)
			in, _ := e.traffic(t, sc)
			if want := dropsOf(list, sc.ingress); fmt.Sprint(in) != fmt.Sprint(want) {
				t.Fatalf("killed at point %d of %d, then %v: traffic drops %v, the listing says %v\n%s", k, n, sc.followUp, in, want, list)
			}
		}
	}
	t.Logf("%s: %d crash points, %d tested", sc.name, n, tested)
}

// prepare applies the scenario's old ruleset and runs its setup.
func (e *env) prepare(t *testing.T, sc *scenario) {
	t.Helper()
	e.must(t, sc.old, "-f", "-")
	for _, cmd := range sc.setup {
		e.must(t, "", e.withHandle(t, sc, cmd)...)
	}
}

// args returns the scenario's command for the current state.
func (e *env) args(t *testing.T, sc *scenario) []string {
	t.Helper()
	return e.withHandle(t, sc, sc.args)
}

// withHandle returns args with HANDLE replaced by the handle of the
// scenario's handleOf rule.
func (e *env) withHandle(t *testing.T, sc *scenario, args []string) []string {
	t.Helper()
	if sc.handleOf == "" {
		return args
	}
	m := regexp.MustCompile(sc.handleOf).FindStringSubmatch(e.must(t, "", "-a", "list", "ruleset"))
	if m == nil {
		t.Fatalf("no rule matches %s", sc.handleOf)
	}
	out := append([]string(nil), args...)
	for i, a := range out {
		if a == "HANDLE" {
			out[i] = m[1]
		}
	}
	return out
}

// checkTidy checks that the state directory of b holds one generation and
// no pending commit.
func (e *env) checkTidy(t *testing.T, k int) {
	t.Helper()
	if err := e.b.Do(func() error {
		var st syscall.Stat_t
		if err := syscall.Stat("/proc/thread-self/ns/net", &st); err != nil {
			return err
		}
		dir := fmt.Sprintf("/sys/fs/bpf/sfunnel/netns-%d", st.Ino)
		ents, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		var gens, other []string
		for _, en := range ents {
			switch name := en.Name(); {
			case strings.HasPrefix(name, "gen-"):
				gens = append(gens, name)
			case name == "next" || strings.HasSuffix(name, "_new"):
				other = append(other, name)
			}
		}
		if len(gens) != 1 || len(other) != 0 {
			return fmt.Errorf("killed at point %d: left behind %v %v", k, gens, other)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// A writer stopped in the middle of a long commit (after its commit point,
// holding the writer lock) does not block readers: `list ruleset` returns
// the committed ruleset meanwhile; another writer waits; when the first
// one resumes, both changes are there.
func TestReadersDoNotWaitForWriters(t *testing.T) {
	e := newEnv(t)
	e.must(t, rulesetA, "-f", "-")
	before := e.listing(t)
	// Stop at the point right after "next" is renamed into place.
	trace := e.sfunnel(t, rulesetB, []string{"SFUNNEL_KILL_TRACE=1"}, "-f", "-")
	stop := 0
	for _, l := range strings.Split(trace.stderr, "\n") {
		var n int
		if _, err := fmt.Sscanf(l, "sfunnel-point %d rename next", &n); err == nil {
			stop = n
			break
		}
	}
	if stop == 0 {
		t.Fatalf("no commit point in:\n%s", trace.stderr)
	}
	e.must(t, rulesetA, "-f", "-")

	writer := exec.Command(binary, "--netns", e.b.Name, "-f", "-")
	writer.Stdin = strings.NewReader(rulesetB)
	writer.Env = append(os.Environ(), "SFUNNEL_STOP_AT="+strconv.Itoa(stop))
	if err := writer.Start(); err != nil {
		t.Fatal(err)
	}
	defer writer.Process.Kill()
	waitStopped(t, writer.Process.Pid)

	if got := e.listing(t); got != before {
		t.Errorf("list while a writer is stopped in its commit:\n%s\nwant the committed ruleset:\n%s", got, before)
	}
	second := exec.Command(binary, "--netns", e.b.Name, "add", "rule", "vb", "ingress", "udp", "dport", "6002", "counter", "actions", "drop")
	done := make(chan error, 1)
	if err := second.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- second.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("a second writer finished while the first held the lock: %v", err)
	case <-time.After(time.Second):
	}
	writer.Process.Signal(syscall.SIGCONT)
	if err := writer.Wait(); err != nil {
		t.Fatalf("resumed writer: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("second writer: %v", err)
	}
	after := e.listing(t)
	if !strings.Contains(after, "udp dport 7000") || !strings.Contains(after, "udp dport 6002") {
		t.Errorf("after both writers:\n%s", after)
	}
}

// waitStopped waits until process pid is stopped (state T).
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	for i := 0; i < 200; i++ {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		if i := bytes.LastIndexByte(b, ')'); i > 0 && len(b) > i+2 && b[i+2] == 'T' {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("the writer never reached its commit point")
}
