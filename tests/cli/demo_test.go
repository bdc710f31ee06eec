package cli

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// TestDemo runs `make demo`'s script, the README's first command: the
// datagrams must cross the wire funneled and arrive intact.
func TestDemo(t *testing.T) {
	testenv.RequireRoot(t)
	for _, c := range []string{"ip", "ethtool", "tcpdump", "socat"} {
		testenv.RequireCommand(t, c)
	}
	cmd := exec.Command("../../scripts/demo.sh")
	cmd.Env = append(os.Environ(), "SF="+binary)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out)
	}
	for _, want := range []string{
		"192.0.2.1.540 > 192.0.2.2.179: Flags [S], cksum", // funneled on the wire
		"(correct), seq 3405691582",                       // 0xcafebabe, valid outer checksum
		"port 4739: telemetry record for port 4739",       // delivered unfunneled
		"counter packets 3 bytes",
		"all 3 datagrams funneled over TCP/179 and delivered intact",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
}
