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
	if _, code := entrypoint(t, "NETNS="+a.Name, "IFACES=nosuch0", "SFUNNEL_RULESET=udp dport 1 actions drop"); code != 1 {
		t.Errorf("missing interface after retries: exit %d", code)
	}
	if out, code := entrypoint(t, "NETNS="+a.Name, "CLEAN=1"); code != 0 {
		t.Fatalf("CLEAN=1: exit %d\n%s", code, out)
	}
	if got := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset"); got != "" {
		t.Errorf("after CLEAN=1:\n%s", got)
	}
}
