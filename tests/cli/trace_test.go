package cli

import (
	"bufio"
	"encoding/json"
	"net"
	"os/exec"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// TestMonitorTrace: with real packets through a veth in a namespace,
// `sfunnel monitor trace` reports the packets a `meta nftrace set 1` rule
// matched (the packet, each rule with its handle, the verdict) and nothing
// of packets only untraced rules matched. The traced packet is still
// funneled (seen on the wire at the other end).
func TestMonitorTrace(t *testing.T) {
	testenv.RequireCommand(t, "tcpdump")
	a, b := topology(t)
	mustSfunnel(t, `interface veth0 {
	egress {
		udp dport 4740 counter
		udp dport 4739 counter meta nftrace set 1
		udp dport 4739 counter actions funnel tcp dport 179 sport 540
	}
}
`, "--netns", a.Name, "-f", "-")

	cmd := exec.Command(binary, "--netns", a.Name, "monitor", "trace")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	// (Records written before monitor opens the ring buffer wait there.)

	// Receive on b what crossed the wire: the funneled datagram arrives as TCP.
	capture := b.Command("tcpdump", "-nn", "-i", "veth1", "-c", "1", "--immediate-mode", "-l", "tcp port 179")
	capOut, err := capture.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	capErr, err := capture.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := capture.Start(); err != nil {
		t.Fatal(err)
	}
	defer capture.Process.Kill()
	for br := bufio.NewReader(capErr); ; {
		l, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("tcpdump: %q %v", l, err)
		}
		if strings.Contains(l, "listening on") {
			break
		}
	}

	send := func(port string) {
		t.Helper()
		err := a.Do(func() error {
			c, err := net.Dial("udp", "192.0.2.2:"+port)
			if err != nil {
				return err
			}
			defer c.Close()
			_, err = c.Write([]byte("hello"))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var got []string
	// monitor trace shows the packets traced after it started: send
	// traced datagrams until it shows one, then let it fall quiet.
	for k := 0; ; k++ {
		if k == 20 {
			t.Fatalf("monitor trace showed none of 20 traced datagrams; it printed:\n%s", strings.Join(got, "\n"))
		}
		send("4739")
		if waitLine(lines, &got, "trace id ", time.Second) {
			break
		}
	}
	for waitLine(lines, &got, "", 300*time.Millisecond) {
	}
	got = nil

	send("4740") // untraced: no record
	send("4739") // traced
	send("4740")
	send("4739")

	next := func() string {
		t.Helper()
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("monitor trace exited; it printed:\n%s", strings.Join(got, "\n"))
			}
			got = append(got, l)
			return l
		case <-time.After(5 * time.Second):
			t.Fatalf("monitor trace printed no more; it printed:\n%s", strings.Join(got, "\n"))
		}
		return ""
	}
	head := regexp.MustCompile(`^trace id ([0-9a-f]{8}) veth0 egress `)
	for k := 0; k < 2; k++ {
		want := []string{
			`packet: ip saddr 192\.0\.2\.1 ip daddr 192\.0\.2\.2 ip protocol udp udp sport \d+ udp dport 4739 length 47$`,
			`rule udp dport 4739 counter meta nftrace set 1 \(handle 2\)$`,
			`rule udp dport 4739 counter actions funnel tcp dport 179 sport 540 \(handle 3\)$`,
			`verdict accept$`,
		}
		var id string
		for _, w := range want {
			l := next()
			m := head.FindStringSubmatch(l)
			if m == nil || !regexp.MustCompile(w).MatchString(l[len(m[0]):]) {
				t.Fatalf("line %q, want %s after the trace id; all lines:\n%s", l, w, strings.Join(got, "\n"))
			}
			if id == "" {
				id = m[1]
			} else if m[1] != id {
				t.Errorf("trace id changed within one packet: %q", l)
			}
		}
	}
	if out, err := bufio.NewReader(capOut).ReadString('\n'); err != nil || !strings.Contains(out, "192.0.2.1.540 > 192.0.2.2.179") {
		t.Errorf("no funneled packet on the wire at the other end: %q %v", out, err)
	}
	cmd.Process.Signal(syscall.SIGINT)
	if err := cmd.Wait(); err != nil {
		t.Errorf("monitor trace after SIGINT: %v", err)
	}
	select {
	case l, ok := <-lines:
		if ok {
			t.Errorf("more trace lines than the traced packets: %q", l)
		}
	default:
	}

	// -j: one JSON object a line.
	cmd = exec.Command(binary, "--netns", a.Name, "-j", "monitor", "trace")
	stdout, err = cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	jlines := make(chan string, 64)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			jlines <- sc.Text()
		}
		close(jlines)
	}()
	var jgot []string
	for k := 0; ; k++ {
		if k == 20 {
			t.Fatalf("monitor -j trace showed none of 20 traced datagrams")
		}
		send("4739")
		if waitLine(jlines, &jgot, "{", time.Second) {
			break
		}
	}
	for len(jgot) < 4 {
		l, ok := <-jlines
		if !ok {
			break
		}
		jgot = append(jgot, l)
	}
	var ev struct{ ID, Interface, Hook, Type, Packet, Rule, Verdict string }
	var types []string
	for _, l := range jgot[:min(4, len(jgot))] {
		if err := json.Unmarshal([]byte(l), &ev); err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		types = append(types, ev.Type)
	}
	if strings.Join(types, " ") != "packet rule rule verdict" || ev.Verdict != "accept" || ev.Interface != "veth0" {
		t.Errorf("-j: types %v, last %+v", types, ev)
	}
	cmd.Process.Signal(syscall.SIGINT)
	cmd.Wait()
}
