package crash

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// previousRelease is main at the end of the session before the perfect-hash
// tables became one map per generation (tblh0/tblh1, was one map tblh), port
// tables got a value for an absent port, and the record scan got bucket lists
// (ScanBuckets 0 in its layouts).
const previousRelease = "db6a702"

// oldBinary builds sfunnel of previousRelease from this repository's history
// (or takes SFUNNEL_OLD_BINARY). Building takes longer than a CI test may, so
// the tests run with SFUNNEL_LONG=1 (make crash-long) or a given binary.
func oldBinary(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("SFUNNEL_OLD_BINARY"); b != "" {
		return b
	}
	if !long() {
		t.Skip("builds sfunnel " + previousRelease + ": SFUNNEL_LONG=1 or SFUNNEL_OLD_BINARY=path")
	}
	oldBuild.Do(func() {
		dir := filepath.Dir(binary) // TestMain removes it
		src := filepath.Join(dir, "src-"+previousRelease)
		oldBuild.bin = filepath.Join(dir, "sfunnel-"+previousRelease)
		steps := [][]string{
			{"mkdir", "-p", src},
			{"sh", "-c", "git archive --format=tar " + previousRelease + " | tar -x -C " + src},
			{"go", "build", "-C", src, "-o", oldBuild.bin, "./cmd/sfunnel"},
		}
		for _, st := range steps {
			c := exec.Command(st[0], st[1:]...)
			c.Dir = "../.."
			if out, err := c.CombinedOutput(); err != nil {
				oldBuild.err = fmt.Errorf("%v (a clone with history is needed): %v\n%s", st, err, out)
				return
			}
		}
	})
	if oldBuild.err != nil {
		t.Fatal(oldBuild.err)
	}
	return oldBuild.bin
}

var oldBuild struct {
	sync.Once
	bin string
	err error
}

// upgradeStep is a change the new binary makes to a hook the old one
// committed, and the ingress probe ports that are dropped after it.
type upgradeStep struct {
	args     []string
	handleOf string // HANDLE in args: the handle of the rule this matches (-a listing)
	drops    []int
	mapOnly  bool // the change must go in without a program (tables or records patched)
}

// testUpgrade applies old with the previous release's binary, checks that
// the new binary lists it the same and that traffic is what it says, then
// makes each step's change with the new binary and checks traffic again.
func testUpgrade(t *testing.T, old string, initial []int, steps []upgradeStep, probes []int) {
	e := newEnv(t)
	prev := oldBinary(t)
	run := func(bin string, args ...string) string {
		t.Helper()
		out, err := exec.Command(bin, append([]string{"--netns", e.b.Name}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", filepath.Base(bin), args, err, out)
		}
		return string(out)
	}
	cmd := exec.Command(prev, "--netns", e.b.Name, "-f", "-")
	cmd.Stdin = strings.NewReader(old)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s -f: %v\n%s", previousRelease, err, out)
	}
	check := func(what string, want []int) {
		t.Helper()
		got := e.probe(t, true, probes)
		if len(got) == len(probes) && len(want) > 0 { // nothing dropped at all: say so plainly
			t.Errorf("%s: no probe was dropped", what)
		}
		for _, p := range probes {
			if dropped := !got[p]; dropped != slices.Contains(want, p) {
				t.Errorf("%s: port %d dropped %v, want %v\n%s", what, p, dropped, !dropped, e.must(t, "", "list", "ruleset"))
			}
		}
	}
	if a, b := counterValues.ReplaceAllString(run(prev, "list", "ruleset"), "counter"), e.listing(t); a != b {
		t.Fatalf("the new binary lists what %s committed otherwise:\n%s\nwant\n%s", previousRelease, b, a)
	}
	check("committed by "+previousRelease, initial)
	// A rule's counter never goes down: programs the new binary compiles
	// carry the old one's counts.
	counts := map[string]int{}
	countsGo := func(what string) {
		t.Helper()
		list := e.must(t, "", "list", "ruleset")
		for _, m := range counterPackets.FindAllStringSubmatch(list, -1) {
			rule := counterValues.ReplaceAllString(m[0], "counter")
			n, _ := strconv.Atoi(m[1])
			if n < counts[rule] {
				t.Errorf("%s: %s counts %d packets, it counted %d before", what, strings.TrimSpace(rule), n, counts[rule])
			}
			counts[rule] = n
		}
	}
	countsGo("committed by " + previousRelease)
	for i, st := range steps {
		args := st.args
		if st.handleOf != "" {
			m := regexp.MustCompile(st.handleOf).FindStringSubmatch(e.must(t, "", "-a", "list", "ruleset"))
			if m == nil {
				t.Fatalf("step %d: no rule matches %s", i, st.handleOf)
			}
			args = slices.Clone(args)
			args[slices.Index(args, "HANDLE")] = m[1]
		}
		r := e.sfunnel(t, "", []string{"SFUNNEL_KILL_TRACE=1"}, args...)
		if r.code != 0 {
			t.Fatalf("step %d: sfunnel %v: exit %d\n%s", i, args, r.code, r.stderr)
		}
		patched := regexp.MustCompile(`(?m)^sfunnel-point \d+ patch (records|tables) `).MatchString(r.stderr)
		if st.mapOnly && !patched {
			t.Errorf("step %d (%v) compiled a program, want a change of tables or records alone", i, args)
		}
		t.Logf("step %d (%v): tables or records patched alone: %v", i, args, patched)
		check(fmt.Sprintf("step %d (%v)", i, args), st.drops)
		countsGo(fmt.Sprintf("step %d (%v)", i, args))
	}
}

// counterPackets is a listing's line with a counter, its packets.
var counterPackets = regexp.MustCompile(`(?m)^.*counter packets (\d+) bytes \d+.*$`)

// upgradeRuleset has, on vb ingress, a counter-only rule, a port table (one
// port per rule, 65535 among them), a perfect-hash shape (saddr+dport), a
// record scan of shapes of their own (sport != …) and a named set. The
// probes come from 192.0.2.1.
func upgradeRuleset(withTables bool) string {
	var b strings.Builder
	b.WriteString("flush ruleset\nset ports {\n\ttype inet_service\n\telements = { 7400 }\n}\ninterface vb {\n\tingress {\n")
	b.WriteString("\t\tudp dport 7999 counter\n")
	if withTables {
		for i := range 20 {
			fmt.Fprintf(&b, "\t\tudp dport %d counter actions drop\n", 7000+2*i)
		}
		b.WriteString("\t\tudp dport 65535 counter actions drop\n")
		for i := range 20 {
			src := fmt.Sprintf("192.0.2.%d", 100+i)
			if i == 5 {
				src = "192.0.2.1"
			}
			fmt.Fprintf(&b, "\t\tip saddr %s udp dport %d counter actions drop\n", src, 7100+i)
		}
	}
	for i := range 40 {
		src := fmt.Sprintf("192.0.2.%d", 100+i)
		if i == 7 || i == 30 {
			src = "192.0.2.1"
		}
		fmt.Fprintf(&b, "\t\tip saddr %s udp sport != %d dport %d counter actions drop\n", src, 100+i, 7200+i)
	}
	b.WriteString("\t\tudp dport @ports counter actions drop\n\t}\n}\n")
	return b.String()
}

// A hook the previous release committed with perfect-hash tables (one map
// tblh with both generations, port tables of 65 536 values) and a record
// scan without buckets: the new binary lists it the same, and adds,
// inserts, deletes and replaces rules and adds elements with traffic as
// the rules say after each (the first table change compiles: the old
// hook has no tblh0/tblh1).
func TestUpgradeTablesFromPreviousRelease(t *testing.T) {
	probes := []int{6999, 7000, 7002, 7040, 7105, 7106, 7207, 7230, 7240, 7400, 7401, 7999, 65535}
	testUpgrade(t, upgradeRuleset(true), []int{7000, 7002, 7105, 7207, 7230, 7400, 65535}, []upgradeStep{
		{args: []string{"add", "rule", "vb", "ingress", "udp", "dport", "7040", "counter", "actions", "drop"},
			drops: []int{7000, 7002, 7040, 7105, 7207, 7230, 7400, 65535}},
		{args: []string{"insert", "rule", "vb", "ingress", "udp", "dport", "7002", "actions", "accept"},
			drops: []int{7000, 7040, 7105, 7207, 7230, 7400, 65535}},
		{args: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "sport", "!=", "9", "dport", "7240", "counter", "actions", "drop"},
			drops: []int{7000, 7040, 7105, 7207, 7230, 7240, 7400, 65535}},
		{args: []string{"delete", "rule", "vb", "ingress", "handle", "HANDLE"}, handleOf: `udp dport 7207 sport != 107 .*# handle (\d+)`,
			drops: []int{7000, 7040, 7105, 7230, 7240, 7400, 65535}},
		{args: []string{"replace", "rule", "vb", "ingress", "handle", "HANDLE", "ip", "saddr", "192.0.2.1", "udp", "dport", "7106", "counter", "actions", "drop"},
			handleOf: `udp dport 7105 .*# handle (\d+)`,
			drops:    []int{7000, 7040, 7106, 7230, 7240, 7400, 65535}},
		{args: []string{"add", "element", "ports", "{", "7401", "}"},
			drops: []int{7000, 7040, 7106, 7230, 7240, 7400, 7401, 65535}},
		{args: []string{"delete", "rule", "vb", "ingress", "handle", "HANDLE"}, handleOf: `udp dport 65535 .*# handle (\d+)`,
			drops: []int{7000, 7040, 7106, 7230, 7240, 7400, 7401}},
	}, probes)
}

// A hook the previous release committed with a record scan alone (its
// layout has no bucket lists: ScanBuckets 0): the new binary's record
// changes go in by rewriting the old layout's lists, without a program,
// and traffic follows them.
func TestUpgradeRecordsFromPreviousRelease(t *testing.T) {
	probes := []int{6999, 7207, 7208, 7230, 7240, 7241, 7400, 7401, 7402, 7999}
	testUpgrade(t, upgradeRuleset(false), []int{7207, 7230, 7400}, []upgradeStep{
		{args: []string{"add", "element", "ports", "{", "7401", "}"},
			drops: []int{7207, 7230, 7400, 7401}},
		{args: []string{"add", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "sport", "!=", "9", "dport", "7240", "counter", "actions", "drop"},
			drops: []int{7207, 7230, 7240, 7400, 7401}, mapOnly: true},
		{args: []string{"insert", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "sport", "!=", "8", "dport", "7230", "counter", "actions", "accept"},
			drops: []int{7207, 7240, 7400, 7401}}, // a new action list: compiles
		{args: []string{"insert", "rule", "vb", "ingress", "ip", "saddr", "192.0.2.1", "udp", "sport", "!=", "9", "dport", "7241", "counter", "actions", "drop"},
			drops: []int{7207, 7240, 7241, 7400, 7401}, mapOnly: true},
		{args: []string{"delete", "rule", "vb", "ingress", "handle", "HANDLE"}, handleOf: `udp dport 7207 sport != 107 .*# handle (\d+)`,
			drops: []int{7240, 7241, 7400, 7401}, mapOnly: true},
		{args: []string{"replace", "rule", "vb", "ingress", "handle", "HANDLE", "ip", "saddr", "192.0.2.1", "udp", "sport", "!=", "108", "dport", "7208", "counter", "actions", "drop"},
			handleOf: `udp dport 7208 sport != 108 .*# handle (\d+)`,
			drops:    []int{7208, 7240, 7241, 7400, 7401}, mapOnly: true},
		{args: []string{"add", "element", "ports", "{", "7402", "}"},
			drops: []int{7208, 7240, 7241, 7400, 7401, 7402}},
	}, probes)
}
