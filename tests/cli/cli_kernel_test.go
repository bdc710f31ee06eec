// Package cli tests the sfunnel binary against the real kernel: rulesets
// applied in a network namespace the test creates, listed back by fresh
// processes (the kernel is the source of truth), counters, errors and exit
// codes as a shell script sees them.
package cli

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/jsonaudit"
	"github.com/sfunnel/sfunnel/internal/testenv"
)

var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "sfunnel-cli")
	if err != nil {
		panic(err)
	}
	binary = filepath.Join(dir, "sfunnel")
	out, err := exec.Command("go", "build", "-o", binary, "../../cmd/sfunnel").CombinedOutput()
	if err != nil {
		os.Stderr.Write(out)
		panic(err)
	}
	// Every listing these tests make the real binary print (kernel state,
	// live counters) is also written as JSON and must validate against the
	// schema and read back.
	audit := filepath.Join(dir, "json")
	os.Mkdir(audit, 0o755)
	os.Setenv("SFUNNEL_JSON_AUDIT", audit)
	code := m.Run()
	n, errs := jsonaudit.CheckDir(audit)
	for _, err := range errs {
		fmt.Fprintln(os.Stderr, "JSON audit:", err)
		code = 1
	}
	fmt.Fprintf(os.Stderr, "JSON audit: %d listings validated and read back\n", n)
	os.RemoveAll(dir)
	os.Exit(code)
}

type result struct {
	stdout, stderr string
	code           int
}

func sfunnel(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Stdin = strings.NewReader(stdin)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err := cmd.Run()
	r := result{stdout: o.String(), stderr: e.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("sfunnel %v: %v", args, err)
	}
	return r
}

func mustSfunnel(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	r := sfunnel(t, stdin, args...)
	if r.code != 0 {
		t.Fatalf("sfunnel %s: exit %d\n%s", strings.Join(args, " "), r.code, r.stderr)
	}
	return r.stdout
}

// topology: ns a (veth0 192.0.2.1) — ns b (veth1 192.0.2.2).
func topology(t *testing.T) (*testenv.NS, *testenv.NS) {
	testenv.RequireRoot(t)
	a, b := testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, a, "veth0", "192.0.2.1/24", b, "veth1", "192.0.2.2/24")
	t.Cleanup(func() {
		// Detach before the namespaces go, so no pinned state outlives them.
		sfunnel(t, "", "--netns", a.Name, "flush", "ruleset")
		sfunnel(t, "", "--netns", b.Name, "flush", "ruleset")
	})
	return a, b
}

const ruleset = `flush ruleset
define flow_ports = { 2055, 4739, 6343 }
set collectors { type ipv4_addr; elements = { 192.0.2.0/24 } }
interface veth0 {
	egress {
		ip daddr @collectors udp dport $flow_ports counter actions funnel tcp dport 179 sport 540 comment "flows"
	}
	ingress {
		tcp dport 179 sport 540 counter actions unfunnel udp
	}
}
`

const listed = `set collectors {
	type ipv4_addr
	elements = { 192.0.2.0/24 }
}

interface veth0 {
	ingress {
		tcp dport 179 sport 540 counter packets 0 bytes 0 actions unfunnel udp
	}
	egress {
		ip daddr @collectors udp dport { 2055, 4739, 6343 } counter packets 0 bytes 0 actions funnel tcp dport 179 sport 540 comment "flows"
	}
}
`

// TestKernelIsSourceOfTruth: what one process applies, a fresh process
// lists back from the kernel, with live counters.
func TestKernelIsSourceOfTruth(t *testing.T) {
	a, _ := topology(t)
	mustSfunnel(t, ruleset, "--netns", a.Name, "-f", "-")
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != listed {
		t.Fatalf("fresh process lists:\n%s\nwant:\n%s", got, listed)
	}
	// Two datagrams to the collector: the egress rule counts them.
	err := a.Do(func() error {
		c, err := net.Dial("udp", "192.0.2.2:4739")
		if err != nil {
			return err
		}
		defer c.Close()
		for i := 0; i < 2; i++ {
			if _, err := c.Write([]byte("ipfix record")); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	got := mustSfunnel(t, "", "--netns", a.Name, "list", "interface", "veth0", "egress")
	// Bytes count the frame as TC sees it: 40 bytes of IP + 14 of Ethernet.
	if !strings.Contains(got, "counter packets 2 bytes 108 ") {
		t.Errorf("counter after 2 datagrams of 54-byte frames:\n%s", got)
	}
	mustSfunnel(t, "", "--netns", a.Name, "reset", "counters")
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != listed {
		t.Errorf("after reset counters:\n%s", got)
	}
	// -j shows the same state in libnftables-json's shape, valid against
	// the schema, and reads back.
	js := mustSfunnel(t, "", "--netns", a.Name, "-j", "list", "ruleset")
	if !strings.Contains(js, `{"match":{"left":{"payload":{"field":"dport","protocol":"udp"}},"op":"==","right":{"set":[2055,4739,6343]}}},{"counter":{"packets":0,"bytes":0}},{"funnel":{"dport":179,"protocol":"tcp","sport":540}}]`) {
		t.Errorf("json: %s", js)
	}
	if err := jsonaudit.Validate([]byte(js)); err != nil {
		t.Errorf("json does not validate: %v", err)
	}
	if err := jsonaudit.RoundTrip([]byte(js), nil); err != nil {
		t.Error(err)
	}
}

// TestSaveFlushRestore: save, flush, restore, list is byte-identical.
func TestSaveFlushRestore(t *testing.T) {
	a, _ := topology(t)
	mustSfunnel(t, ruleset, "--netns", a.Name, "-f", "-")
	mustSfunnel(t, "", "--netns", a.Name, "add", "element", "collectors", "{", "198.51.100.0/24", "}")
	mustSfunnel(t, "", "--netns", a.Name, "insert", "rule", "veth0", "egress", "ip6", "udp", "dport", "53", "actions", "drop")
	before := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset")
	saved := filepath.Join(t.TempDir(), "sfunnel.conf")
	mustSfunnel(t, "", "--netns", a.Name, "save", saved)
	mustSfunnel(t, "", "--netns", a.Name, "flush", "ruleset")
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != "" {
		t.Fatalf("after flush: %q", got)
	}
	mustSfunnel(t, "", "--netns", a.Name, "-f", saved)
	if after := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); after != before {
		t.Errorf("round trip differs:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestCheckChangesNothing: -c verifies without attaching.
func TestCheckChangesNothing(t *testing.T) {
	a, _ := topology(t)
	mustSfunnel(t, "", "--netns", a.Name, "-c", "-f", "-")
	r := sfunnel(t, ruleset, "--netns", a.Name, "-c", "-f", "-")
	if r.code != 0 {
		t.Fatalf("-c of a good ruleset: %d %s", r.code, r.stderr)
	}
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != "" {
		t.Errorf("-c attached something:\n%s", got)
	}
}

// TestErrorsAndExitCodes as a script sees them.
func TestErrorsAndExitCodes(t *testing.T) {
	a, _ := topology(t)
	r := sfunnel(t, "", "--netns", a.Name, "add", "rule", "eth7", "egress", "udp", "dport", "1", "actions", "drop")
	want := "<cmdline>:1:10-13: Error: unknown interface eth7\nadd rule eth7 egress udp dport 1 actions drop\n         ^^^^\n"
	if r.code != 1 || r.stderr != want {
		t.Errorf("unknown interface: exit %d\n%s\nwant exit 1\n%s", r.code, r.stderr, want)
	}
	// A failed transaction leaves what was attached alone.
	mustSfunnel(t, ruleset, "--netns", a.Name, "-f", "-")
	r = sfunnel(t, "flush ruleset\nadd rule veth0 egress udp dport 1 actions drop\nadd rule eth7 egress udp dport 2 actions drop\n", "--netns", a.Name, "-f", "-")
	if r.code != 1 || !strings.HasPrefix(r.stderr, "/dev/stdin:3:10-13: Error: unknown interface eth7") {
		t.Errorf("exit %d: %s", r.code, r.stderr)
	}
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != listed {
		t.Errorf("failed transaction changed the kernel:\n%s", got)
	}
	if r := sfunnel(t, "", "--frobnicate"); r.code != 2 {
		t.Errorf("usage error: exit %d", r.code)
	}
	if r := sfunnel(t, "", "--netns", "sfunnel-no-such-ns", "list", "ruleset"); r.code == 0 {
		t.Errorf("missing namespace: exit 0")
	}
	// Without privileges: exit 3 and what is missing.
	testenv.RequireCommand(t, "setpriv")
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", binary, "list", "ruleset")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Errorf("unprivileged list: %v\n%s", err, out)
	}
}

// TestIPNetnsExec: state applied under `ip netns exec` (a private mount
// namespace with its own /sys) is the same state --netns sees.
func TestIPNetnsExec(t *testing.T) {
	a, _ := topology(t)
	cmd := a.Command(binary, "-f", "-")
	cmd.Stdin = strings.NewReader(ruleset)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("ip netns exec sfunnel -f: %v\n%s", err, out)
	}
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != listed {
		t.Errorf("--netns after ip netns exec lists:\n%s", got)
	}
	out, err := a.Command(binary, "list", "ruleset").CombinedOutput()
	if err != nil || string(out) != listed {
		t.Errorf("ip netns exec list: %v\n%s", err, out)
	}
}
