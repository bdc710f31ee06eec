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
		// While the writer is stopped nothing changes: a probe late under
		// load reads as a drop once, a wrong state on every try.
		what := fmt.Sprintf("stopped at point %d of %d", k, n)
		bad := e.settled(t, sc, what, func(in, out map[int]bool) string {
			if fmt.Sprint(in) != fmt.Sprint(oldIn) && fmt.Sprint(in) != fmt.Sprint(newIn) {
				return fmt.Sprintf("ingress drops %v, the old ruleset %v, the new one %v", in, oldIn, newIn)
			}
			if fmt.Sprint(out) != fmt.Sprint(oldOut) && fmt.Sprint(out) != fmt.Sprint(newOut) {
				return fmt.Sprintf("egress drops %v, the old ruleset %v, the new one %v", out, oldOut, newOut)
			}
			return ""
		})
		w.Process.Signal(syscall.SIGCONT) // (before failing: the writer holds the lock the cleanup needs)
		err := w.Wait()
		if bad != "" {
			t.Fatal(bad)
		}
		if err != nil {
			t.Fatalf("%s, then resumed: %v\n%s", what, err, stderr.String())
		}
	}
}

// settled probes sc's traffic until wrong (which says what is wrong with
// what the probes saw, "" if nothing) passes, three tries at most, and
// returns the failure ("" if none): the state probed does not change
// meanwhile, so a wrong state fails every try, while a probe that arrived
// late (a drop, to the probe) under load fails one. Failed tries are
// logged.
func (e *env) settled(t *testing.T, sc *scenario, what string, wrong func(in, out map[int]bool) string) string {
	t.Helper()
	for try := 1; ; try++ {
		in, out := e.traffic(t, sc)
		msg := wrong(in, out)
		if msg == "" {
			return ""
		}
		if try == 3 {
			return fmt.Sprintf("%s: %s (%d tries)", what, msg, try)
		}
		t.Logf("%s: %s (try %d; probing again)", what, msg, try)
	}
}
