package cli

import (
	"bufio"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMonitor: `sfunnel monitor` reports a program swap and a funnel that
// made a packet exceed the egress MTU, and stops cleanly on SIGINT.
func TestMonitor(t *testing.T) {
	a, _ := topology(t)
	a.Run(t, "ip", "link", "set", "veth0", "mtu", "1280")
	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "egress", "udp", "dport", "4739", "counter", "actions", "funnel", "tcp", "dport", "179", "sport", "540")

	cmd := exec.Command(binary, "--netns", a.Name, "monitor")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 16)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	time.Sleep(700 * time.Millisecond) // the first poll sets the baseline

	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "egress", "udp", "dport", "9", "actions", "drop")
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
	want := map[string]bool{"veth0 egress program": false, "veth0 egress mtu-exceeded +1 # handle 1": false}
	deadline := time.After(5 * time.Second)
	var got []string
wait:
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				break wait
			}
			got = append(got, l)
			for w := range want {
				if strings.HasPrefix(l, w) {
					want[w] = true
				}
			}
			if want["veth0 egress program"] && want["veth0 egress mtu-exceeded +1 # handle 1"] {
				break wait
			}
		case <-deadline:
			break wait
		}
	}
	cmd.Process.Signal(syscall.SIGINT)
	err = cmd.Wait()
	for w, seen := range want {
		if !seen {
			t.Errorf("monitor did not report %q; it printed:\n%s", w, strings.Join(got, "\n"))
		}
	}
	if err != nil {
		t.Errorf("monitor after SIGINT: %v", err)
	}
}
