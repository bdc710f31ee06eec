package tunnel

import (
	"bytes"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"
)

const transferSize = 8 << 20

func remoteIn(t *testing.T, peers <-chan net.Addr, prefix string) netip.Addr {
	t.Helper()
	a := (<-peers).(*net.TCPAddr).AddrPort().Addr().Unmap()
	if !netip.MustParsePrefix(prefix).Contains(a) {
		t.Fatalf("server saw the connection from %s, want an address in %s (the tunnel's pool)", a, prefix)
	}
	return a
}

// TCP over UDP, client ↔ server with authentication, IPv4 and IPv6 in the
// same pair of daemons, with offloads (TUN TSO, UDP GSO/GRO) and without.
func TestTCPOverUDP(t *testing.T) {
	for _, offload := range []string{"true", "false"} {
		t.Run("offload="+offload, func(t *testing.T) { testTCPOverUDP(t, "--offload="+offload) })
	}
}

func testTCPOverUDP(t *testing.T, offload string) {
	a, b := twoHosts(t)
	key := writeKey(t)
	srv := startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/24", "--address", "2001:db8:3::1/64", "--key", key, offload)
	cli := startTunnel(t, a, "-i", "tun0", "-l", "7473", "-b", "eth0", "-e", "7472", "--address", "198.51.100.1/32", "--address", "2001:db8:2::1/128", "--key", key, offload)
	// Traffic to the server's own address goes into the TUN; the daemon's
	// sockets are bound to eth0 and keep using the real path.
	a.Run(t, "ip", "route", "add", "192.0.2.2/32", "dev", "tun0")
	a.Run(t, "ip", "-6", "route", "add", "2001:db8:1::2/128", "dev", "tun0")
	peers := echoServer(t, b, "tcp", ":5001")

	t.Run("IPv4", func(t *testing.T) {
		transfer(t, a, "tcp", "192.0.2.2:5001", transferSize)
		remoteIn(t, peers, "203.0.113.0/24")
	})
	t.Run("IPv6", func(t *testing.T) {
		transfer(t, a, "tcp", "[2001:db8:1::2]:5001", transferSize)
		remoteIn(t, peers, "2001:db8:3::/64")
	})
	t.Run("no allocation per packet", func(t *testing.T) {
		checkAllocs(t, func() { transfer(t, a, "tcp", "192.0.2.2:5001", transferSize) }, srv, cli)
	})
	st := srv.getStatus()
	if len(st.Peers) != 2 {
		t.Errorf("server store has %d peers, want 2 (one per address family): %+v", len(st.Peers), st.Peers)
	}
	if st.Counters["auth_ok"] < 2 || st.Counters["tun_tx"] == 0 {
		t.Errorf("server counters: %v, drops %v", st.Counters, st.Drops)
	}
	if c := cli.getStatus(); c.Counters["net_tx"] < 1000 {
		t.Errorf("client counters: %v, drops %v", c.Counters, c.Drops)
	}
	// The status command, as text and JSON, and SIGUSR1.
	var out, errb bytes.Buffer
	if code := Main([]string{"status", "--status-socket", srv.status}, &out, &errb); code != 0 ||
		!strings.Contains(out.String(), "peers: 2") || !strings.Contains(out.String(), "203.0.113.") {
		t.Errorf("status: exit %d\n%s%s", code, out.String(), errb.String())
	}
	out.Reset()
	var js Status
	if code := Main([]string{"status", "--status-socket", srv.status, "-j"}, &out, &errb); code != 0 ||
		json.Unmarshal(out.Bytes(), &js) != nil || len(js.Peers) != 2 {
		t.Errorf("status -j: exit %d\n%s", code, out.String())
	}
	srv.cmd.Process.Signal(syscall.SIGUSR1)
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(srv.log.String(), "counters:") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(srv.log.String(), "counters:") {
		t.Errorf("no status on stderr after SIGUSR1")
	}
	if code := cli.stop(); code != 0 {
		t.Errorf("client exit code %d", code)
	}
	if code := srv.stop(); code != 0 {
		t.Errorf("server exit code %d", code)
	}
	if out := b.Run(t, "ip", "link"); strings.Contains(out, "tun0") {
		t.Errorf("tun0 still exists after SIGTERM:\n%s", out)
	}
	if _, err := os.Stat(srv.status); err == nil {
		t.Errorf("status socket left behind")
	}
}

// --persist keeps the device, and the next daemon takes it over.
func TestPersist(t *testing.T) {
	a, _ := twoHosts(t)
	key := writeKey(t)
	args := []string{"-i", "tun7", "-e", "7472", "--key", key, "--persist"}
	for range 2 {
		p := startTunnel(t, a, args...)
		if code := p.stop(); code != 0 {
			t.Fatalf("exit code %d", code)
		}
		if out := a.Run(t, "ip", "link", "show", "tun7"); !strings.Contains(out, "tun7") {
			t.Fatalf("tun7 gone after a --persist daemon stopped")
		}
	}
	p := startTunnel(t, a, "-i", "tun7", "-e", "7472", "--key", key)
	p.stop()
	if out, err := a.Command("ip", "link", "show", "tun7").CombinedOutput(); err == nil {
		t.Fatalf("tun7 still there after a daemon without --persist stopped:\n%s", out)
	}
}
