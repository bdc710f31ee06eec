package cli

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// entrypoint runs the container entrypoint script with env, as the image would.
func entrypoint(t *testing.T, env ...string) (string, int) {
	t.Helper()
	cmd := exec.Command("../../deploy/container/entrypoint.sh")
	cmd.Env = append(os.Environ(), append([]string{"SFUNNEL=" + binary, "RETRY_DELAY=0", "N_ATTEMPTS=2"}, env...)...)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

// TestContainerEntrypoint: sfunnel's container variables keep working.
func TestContainerEntrypoint(t *testing.T) {
	a, _ := topology(t)
	// Defaults: sfunnel's default ruleset, every interface but lo, ingress.
	if out, code := entrypoint(t, "NETNS="+a.Name); code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	want := `interface veth0 {
	ingress {
		ip udp dport 2055 actions funnel tcp dport 179 sport 540
		ip udp dport 4739 actions funnel tcp dport 179 sport 540
		ip udp dport 6343 actions funnel tcp dport 179 sport 540
		ip tcp dport 179 sport 540 actions unfunnel udp
	}
}
`
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != want {
		t.Errorf("default ruleset:\n%s\nwant:\n%s", got, want)
	}
	// SFUNNEL_RULESET with ';' separators (and a comment), IFACES, DIRECTION.
	out, code := entrypoint(t, "NETNS="+a.Name, "IFACES=veth0", "DIRECTION=both",
		"SFUNNEL_RULESET=flush ruleset; ip tcp dport 179 sport 540 actions unfunnel decap udp #BGP; ip udp dport 9995 actions funnel encap tcp dport 179 sport 540")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset")
	if strings.Count(got, "unfunnel udp") != 2 || strings.Count(got, "dport 9995") != 2 || strings.Contains(got, "4739") {
		t.Errorf("SFUNNEL_RULESET on both hooks:\n%s", got)
	}
	if _, code := entrypoint(t, "NETNS="+a.Name, "DIRECTION=sideways"); code != 2 {
		t.Errorf("bad DIRECTION: exit %d", code)
	}
	// A missing interface may still come up: retried N_ATTEMPTS times.
	out, code = entrypoint(t, "NETNS="+a.Name, "IFACES=nosuch0", "SFUNNEL_RULESET=udp dport 1 actions drop")
	if code != 1 || strings.Count(out, "unknown interface nosuch0") != 2 || !strings.Contains(out, "retrying in") {
		t.Errorf("missing interface: exit %d, want 1 after 2 attempts:\n%s", code, out)
	}
	// A ';' inside a quoted comment does not split the rule.
	out, code = entrypoint(t, "NETNS="+a.Name, "IFACES=veth0", "DIRECTION=egress",
		`SFUNNEL_RULESET=flush ruleset; udp dport 2055 counter actions funnel tcp dport 179 sport 540 comment "netflow; v9 \"a;b\"" #NF; udp dport 9 actions drop`)
	if code != 0 {
		t.Fatalf("comment with ';': exit %d\n%s", code, out)
	}
	got = mustSfunnel(t, "", "--netns", a.Name, "list", "interface", "veth0", "egress")
	if !strings.Contains(got, `comment "netflow; v9 \"a;b\""`) || !strings.Contains(got, "udp dport 9 actions drop") {
		t.Errorf("comment with ';':\n%s", got)
	}
	// A mistake in the rules is reported once, at SFUNNEL_RULESET's line
	// (its rule), not retried; nothing changes.
	out, code = entrypoint(t, "NETNS="+a.Name, "IFACES=veth0", "SFUNNEL_RULESET=udp dport 1 actions drop; udp dport 70000 actions drop")
	if code != 1 || strings.Contains(out, "retrying in") || strings.Count(out, "out of range") != 1 ||
		!strings.Contains(out, "SFUNNEL_RULESET:2:12-16: Error: port 70000 is out of range (0-65535)") || strings.Contains(out, "/tmp") {
		t.Errorf("syntax error: exit %d, want 1 with one located error and no retry:\n%s", code, out)
	}
	if after := mustSfunnel(t, "", "--netns", a.Name, "list", "interface", "veth0", "egress"); after != got {
		t.Errorf("a bad ruleset changed the listing:\n%s", after)
	}
	if out, code := entrypoint(t, "NETNS="+a.Name, "CLEAN=1"); code != 0 {
		t.Fatalf("CLEAN=1: exit %d\n%s", code, out)
	}
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != "" {
		t.Errorf("after CLEAN=1:\n%s", got)
	}
}
