package cli

import (
	"bufio"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// TestMonitor: `sfunnel monitor` reports, like `nft monitor`, rules added
// and deleted, a program swap, a funnel that made a packet exceed the
// egress MTU, sfunnel's nftables table flushed and put back, a hook gone
// from the kernel, and stops cleanly on SIGINT.
func TestMonitor(t *testing.T) {
	testenv.RequireCommand(t, "nft")
	a, _ := topology(t)
	a.Run(t, "ip", "link", "set", "veth0", "mtu", "1280")
	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "egress", "udp", "dport", "4739", "counter", "actions", "funnel", "tcp", "dport", "179", "sport", "540")
	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "ingress", "udp", "dport", "4739", "ct", "mark", "set", "0x10000")

	cmd := exec.Command(binary, "--netns", a.Name, "monitor")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var got []string
	// expect waits for a line starting with each of want, in any order.
	expect := func(want ...string) {
		t.Helper()
		seen := map[string]bool{}
		deadline := time.After(15 * time.Second) // generous: monitor polls, and CI machines can be loaded
		for len(seen) < len(want) {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("monitor exited; it printed:\n%s", strings.Join(got, "\n"))
				}
				got = append(got, l)
				for _, w := range want {
					if strings.HasPrefix(l, w) {
						seen[w] = true
					}
				}
			case <-deadline:
				t.Fatalf("monitor did not report %q; it printed:\n%s", want, strings.Join(got, "\n"))
			}
		}
	}
	// The first poll sets the baseline: what changed before it is not
	// reported. Add rules until one is; every later change is then.
	for k := 0; ; k++ {
		if k == 20 {
			t.Fatalf("monitor reported none of 20 rules added; it printed:\n%s", strings.Join(got, "\n"))
		}
		port := strconv.Itoa(20000 + k)
		mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "ingress", "udp", "dport", port, "counter")
		if waitLine(lines, &got, "add rule veth0 ingress udp dport "+port+" counter # handle", time.Second) {
			break
		}
	}

	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "egress", "udp", "dport", "9", "actions", "drop")
	expect("add rule veth0 egress udp dport 9 actions drop # handle ", "veth0 egress program")
	var handle string
	for _, l := range got {
		if h, ok := strings.CutPrefix(l, "add rule veth0 egress udp dport 9 actions drop # handle "); ok {
			handle = h
		}
	}
	mustSfunnel(t, "", "--netns", a.Name, "delete", "rule", "veth0", "egress", "handle", handle)
	expect("delete rule veth0 egress handle " + handle)
	mustSfunnel(t, "", "--netns", a.Name, "add", "set", "flows", "{", "type", "inet_service;", "elements", "=", "{", "2055", "}", "}")
	expect("add set flows", "add element flows { 2055 }")
	mustSfunnel(t, "", "--netns", a.Name, "add", "element", "flows", "{", "4739,", "6343", "}")
	expect("add element flows { 4739, 6343 }")
	mustSfunnel(t, "", "--netns", a.Name, "delete", "element", "flows", "{", "2055", "}")
	expect("delete element flows { 2055 }")

	// A datagram that fits the MTU as UDP but not once funneled (+20 bytes).
	err = a.Do(func() error {
		c, err := net.Dial("udp", "192.0.2.2:4739")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.Write(make([]byte, 1280-20-8-10))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	expect("veth0 egress mtu-exceeded +1 # handle 1")

	a.Run(t, "nft", "flush", "ruleset")
	expect("# warning: nftables table inet sfunnel is missing")
	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "egress", "udp", "dport", "10", "actions", "drop")
	expect("# resolved: nftables table inet sfunnel is missing")

	a.Run(t, "ip", "link", "del", "veth0")
	expect("# warning: interface veth0 egress is no longer attached", "# warning: interface veth0 ingress is no longer attached", "delete rule veth0 egress handle 1")

	cmd.Process.Signal(syscall.SIGINT)
	if err := cmd.Wait(); err != nil {
		t.Errorf("monitor after SIGINT: %v", err)
	}
}

// waitLine reads lines until one starts with prefix (true) or d passes.
func waitLine(lines <-chan string, got *[]string, prefix string, d time.Duration) bool {
	deadline := time.After(d)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				return false
			}
			*got = append(*got, l)
			if strings.HasPrefix(l, prefix) {
				return true
			}
		case <-deadline:
			return false
		}
	}
}
