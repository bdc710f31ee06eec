package tunnel

import (
	"net"
	"net/netip"
	"testing"
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
	if code := cli.stop(); code != 0 {
		t.Errorf("client exit code %d", code)
	}
	if code := srv.stop(); code != 0 {
		t.Errorf("server exit code %d", code)
	}
	if out := b.Run(t, "ip", "link"); containsWord(out, "tun0") {
		t.Errorf("tun0 still exists after SIGTERM:\n%s", out)
	}
}

func containsWord(s, w string) bool {
	for i := 0; i+len(w) <= len(s); i++ {
		if s[i:i+len(w)] == w {
			return true
		}
	}
	return false
}
