package tunnel

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestUsageErrors(t *testing.T) {
	key := filepath.Join(t.TempDir(), "k")
	if code := Main([]string{"genkey", key}, os.Stdout, os.Stderr); code != 0 {
		t.Fatalf("genkey: %d", code)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-l", "7472"}, "needs --address"},
		{[]string{"--key", key, "-l", "70000", "-e", "1"}, "out of range"},
		{[]string{"--carry", "udp"}, "--carry must be"},
		{[]string{"--carry", "ip", "--mode", "client"}, "needs --remote"},
		{[]string{"--carry", "ip", "--mode", "server", "--transport", "sctp"}, "--transport must be"},
		{[]string{"--carry", "ip", "--mode", "sideways"}, "--mode must be"},
		{[]string{"--carry", "ip", "--mode", "client", "--remote", "192.0.2.1:0"}, "bad port"},
		{[]string{"--mode", "client", "--key", key}, "need --carry ip"},
		{[]string{"--carry", "ip", "--mode", "server", "--address", "nonsense"}, "not an address"},
		{[]string{"--carry", "ip", "--mode", "server", "--mtu", "100"}, "--mtu"},
		{[]string{"-i", "a-very-long-interface-name", "--key", key, "-e", "1"}, "invalid --interface"},
		{[]string{"--no-such-flag"}, "unknown flag"},
		{[]string{"--key", key, "-e", "1", "--rekey", "2h"}, "--rekey must be between"},
		{[]string{"--key", key, "-e", "1", "--cipher", "rot13"}, "unknown cipher"},
		{[]string{"extra"}, "unexpected argument"},
	} {
		var out, errb bytes.Buffer
		if code := Main(tc.args, &out, &errb); code != ExitUsage {
			t.Errorf("%v: exit %d, want %d", tc.args, code, ExitUsage)
		}
		if !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%v: stderr %q, want %q", tc.args, errb.String(), tc.want)
		}
	}
}

func TestGenkeyAndKeyChecks(t *testing.T) {
	var out, errb bytes.Buffer
	if code := Main([]string{"genkey"}, &out, &errb); code != 0 || len(strings.TrimSpace(out.String())) != 64 {
		t.Fatalf("genkey to stdout: %d %q", code, out.String())
	}
	dir := t.TempDir()
	key := filepath.Join(dir, "k")
	os.WriteFile(key, out.Bytes(), 0o644)
	errb.Reset()
	// The key is checked before anything touches the system, so this
	// needs no root. A configuration error: exit 2, which the systemd
	// unit does not restart on.
	if code := Main([]string{"--key", key, "-e", "7472", "--status-socket", filepath.Join(dir, "s")}, &out, &errb); code != ExitUsage ||
		!strings.Contains(errb.String(), "chmod 600") {
		t.Fatalf("world-readable key: exit %d, %s", code, errb.String())
	}
	if code := Main([]string{"genkey", key}, &out, &errb); code != ExitError {
		t.Fatalf("genkey over an existing file: exit %d", code)
	}
	if code := Main([]string{"status", "--status-socket", filepath.Join(dir, "none")}, &out, &errb); code != ExitError {
		t.Fatalf("status without a daemon: exit %d", code)
	}
}
