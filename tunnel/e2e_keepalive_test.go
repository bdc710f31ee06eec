package tunnel

import (
	"net"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// natHosts makes a client namespace behind a masquerading NAT in a middle
// namespace whose UDP conntrack entries time out after udpTimeout, and a
// server namespace that has no route back to the client's own addresses.
func natHosts(t *testing.T, udpTimeout string) (a, m, b *testenv.NS) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "nft")
	a, m, b = testenv.NewNS(t), testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, a, "eth0", "192.0.2.1/24", m, "eth0", "192.0.2.254/24")
	testenv.Veth(t, m, "eth1", "198.51.100.254/24", b, "eth0", "198.51.100.2/24")
	a.Run(t, "ip", "route", "add", "default", "via", "192.0.2.254")
	m.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	m.Run(t, "nft", "add table ip nat; add chain ip nat post { type nat hook postrouting priority srcnat; }; add rule ip nat post oifname eth1 masquerade")
	// Conntrack is loaded once the NAT table exists; now its timeouts.
	m.Run(t, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout="+udpTimeout, "net.netfilter.nf_conntrack_udp_timeout_stream="+udpTimeout)
	return a, m, b
}

func canConnect(ns *testenv.NS, addr string, timeout time.Duration) bool {
	var c net.Conn
	err := ns.Do(func() (err error) { c, err = net.DialTimeout("tcp", addr, timeout); return })
	if err == nil {
		c.Close()
	}
	return err == nil
}

// A client behind a NAT whose UDP mappings expire after 30 s keeps its
// mapping through a 60 s idle period with keepalives every 10 s, so the
// server can still reach it; scaled down here by 10 (3 s timeout, 6 s
// idle, keepalive 1 s) to keep the test short. Without keepalives the
// server cannot reach it any more (the control). Then a server that
// restarted while the client was idle is noticed through unanswered
// keepalives, and the client authenticates again by itself.
func TestKeepaliveThroughNAT(t *testing.T) {
	for _, keepalive := range []bool{true, false} {
		name := "without keepalive"
		if keepalive {
			name = "keepalive 1s"
		}
		t.Run(name, func(t *testing.T) {
			a, _, b := natHosts(t, "3")
			// No IPv6 chatter from the client's TUN (router
			// solicitations, MLD reports) refreshing the mapping by chance.
			a.Run(t, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
			key := writeKey(t)
			srvArgs := []string{"--carry", "ip", "--transport", "udp", "--mode", "server", "-l", "7000", "--address", "203.0.113.2/24", "--key", key}
			srv := startTunnel(t, b, srvArgs...)
			cliArgs := []string{"--carry", "ip", "--transport", "udp", "--mode", "client", "--remote", "198.51.100.2:7000", "--address", "203.0.113.1/24", "--key", key}
			if keepalive {
				// A short expiry makes the client give up on a silent
				// server sooner (half of it, here 1.8 s).
				cliArgs = append(cliArgs, "--keepalive", "1s", "--expiry", "4s")
			}
			cli := startTunnel(t, a, cliArgs...)
			echoServer(t, b, "tcp", ":5001")
			echoServer(t, a, "tcp", ":5001")
			transfer(t, a, "tcp", "203.0.113.2:5001", 64<<10) // the server learns where the client is
			time.Sleep(6 * time.Second)                       // idle, twice the NAT's timeout
			ok := canConnect(b, "203.0.113.1:5001", 3*time.Second)
			st := cli.getStatus()
			t.Logf("after the idle period: server reaches the client: %v; client counters %v", ok, st.Counters)
			if !keepalive {
				if ok {
					t.Fatal("the NAT mapping survived without keepalives: the test proves nothing")
				}
				return
			}
			if !ok {
				t.Fatal("the server could not reach the client through the NAT after the idle period")
			}
			if st.Counters["keepalive_tx"] < 4 || st.Counters["keepalive_rx"] < 4 {
				t.Errorf("keepalives: %v", st.Counters)
			}
			// The server restarts and forgets the client; the idle
			// client notices that its keepalives go unanswered.
			srv.stop()
			srv = startTunnel(t, b, srvArgs...)
			deadline := time.Now().Add(10 * time.Second)
			for srv.getStatus().Counters["auth_ok"] == 0 {
				if time.Now().After(deadline) {
					t.Fatalf("the client did not authenticate again with the restarted server:\n%s", cli.log.String())
				}
				time.Sleep(100 * time.Millisecond)
			}
			if !canConnect(b, "203.0.113.1:5001", 5*time.Second) {
				t.Error("the restarted server cannot reach the client")
			}
		})
	}
}
