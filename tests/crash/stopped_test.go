package crash

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// rulesetS has a named set of sources and two rules on vb ingress, one of
// them for the set: a batch that adds the probes' source to the set and
// deletes that rule changes nothing for port 6000, before or after.
const rulesetS = `flush ruleset
set blocked {
	type ipv4_addr
	elements = { 203.0.113.1 }
}
interface vb {
	ingress {
		ip saddr @blocked udp dport 6000 counter actions drop
		udp dport 6001 counter actions drop
	}
}
`

// rulesetT is rulesetS on a hook of 40 rules of one shape: the rules
// change by table entries, not by loading a program.
func rulesetT() string {
	return strings.Replace(rulesetD(), "interface vb {\n\tingress {\n",
		"set blocked {\n\ttype ipv4_addr\n\telements = { 203.0.113.1 }\n}\ninterface vb {\n\tingress {\n"+
			"\t\tip saddr @blocked udp dport 6000 counter actions drop\n\t\tudp dport 6001 counter actions drop\n", 1)
}

// setAndRules adds the probes' source to the set, deletes the set's rule
// and adds one for port 6002, in one transaction.
func setAndRules() []string {
	return strings.Fields("add element blocked { 192.0.2.1 } ; delete rule vb ingress handle HANDLE ; add rule vb ingress udp dport 6002 counter actions drop")
}

// A writer stopped (SIGSTOP) at any point of its commit leaves every hook
// running the old ruleset or the new one, as real traffic shows it; a
// packet never sees half of a transaction. The batches change a named
// set's elements and rules that use it together: the set's new elements
// with the old rules would drop what neither ruleset drops. With
// SFUNNEL_LONG=1 (make crash-long) the commits TestCrashAtEveryPoint kills
// are stopped at every point too.
func TestStoppedAtEveryPoint(t *testing.T) {
	scenarios := []*scenario{
		{name: "set-and-rules", old: rulesetS, args: setAndRules(), handleOf: `saddr @blocked .*# handle (\d+)`,
			ingress: []int{6000, 6001, 6002}, every: 1},
		{name: "set-and-table-rules", old: rulesetT(), args: setAndRules(), handleOf: `saddr @blocked .*# handle (\d+)`,
			ingress: []int{6000, 6001, 6002, 7005}, every: 1},
	}
	if long() {
		for _, sc := range crashScenarios() {
			if !slices.ContainsFunc(scenarios, func(s *scenario) bool { return s.name == sc.name }) {
				scenarios = append(scenarios, sc)
			}
		}
	}
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) { testStops(t, sc) })
	}
}

func testStops(t *testing.T, sc *scenario) {
	e := newEnv(t)
	e.prepare(t, sc)
	oldIn, oldOut := e.traffic(t, sc)
	n := e.points(t, sc.stdin, e.args(t, sc)...)
	newIn, newOut := e.traffic(t, sc)
	if fmt.Sprint(oldIn, oldOut) == fmt.Sprint(newIn, newOut) {
		t.Fatalf("the probes do not tell the old ruleset (drops %v %v) from the new one", oldIn, oldOut)
	}
	every := sc.every
	if long() {
		every = 1
	}
	for k := 1; k <= n; k += every {
		e.prepare(t, sc)
		w := exec.Command(binary, append([]string{"--netns", e.b.Name}, e.args(t, sc)...)...)
		w.Stdin = strings.NewReader(sc.stdin)
		w.Env = append(os.Environ(), "SFUNNEL_STOP_AT="+strconv.Itoa(k))
		var stderr strings.Builder
		w.Stderr = &stderr
		if err := w.Start(); err != nil {
			t.Fatal(err)
		}
		waitStopped(t, w.Process.Pid)
		in, out := e.traffic(t, sc)
		w.Process.Signal(syscall.SIGCONT)
		if err := w.Wait(); err != nil {
			t.Fatalf("stopped at point %d of %d, then resumed: %v\n%s", k, n, err, stderr.String())
		}
		if fmt.Sprint(in) != fmt.Sprint(oldIn) && fmt.Sprint(in) != fmt.Sprint(newIn) {
			t.Fatalf("stopped at point %d of %d: ingress drops %v, the old ruleset %v, the new one %v", k, n, in, oldIn, newIn)
		}
		if fmt.Sprint(out) != fmt.Sprint(oldOut) && fmt.Sprint(out) != fmt.Sprint(newOut) {
			t.Fatalf("stopped at point %d of %d: egress drops %v, the old ruleset %v, the new one %v", k, n, out, oldOut, newOut)
		}
	}
}
