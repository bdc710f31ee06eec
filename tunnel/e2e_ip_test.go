package tunnel

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/codec"
)

// IP over UDP and over TCP: whole packets, both inner families, the outer
// path over IPv4 for one case and IPv6 for the others, authenticated.
func TestIPCarry(t *testing.T) {
	for _, tc := range []struct {
		name, transport, serverMode, clientMode, remote string
		offload                                         string
	}{
		{"udp", "udp", "server", "client", "192.0.2.2:7000", "true"},
		{"tcp", "tcp", "server", "client", "[2001:db8:1::2]:7000", "true"},
		{"udp-both", "udp", "both", "both", "[2001:db8:1::2]:7000", "true"},
		{"tcp-both", "tcp", "both", "client", "192.0.2.2:7000", "true"},
		{"udp-no-offload", "udp", "server", "client", "192.0.2.2:7000", "false"},
		{"tcp-no-offload", "tcp", "server", "client", "192.0.2.2:7000", "false"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, b := twoHosts(t)
			key := writeKey(t)
			srvArgs := []string{"--carry", "ip", "--transport", tc.transport, "--mode", tc.serverMode, "-l", "7000",
				"--address", "198.51.100.2/24,2001:db8:2::2/64", "--key", key, "--offload=" + tc.offload}
			if tc.serverMode == "both" {
				srvArgs = append(srvArgs, "--remote", "192.0.2.1:7000")
			}
			cliArgs := []string{"--carry", "ip", "--transport", tc.transport, "--mode", tc.clientMode, "--remote", tc.remote,
				"--address", "198.51.100.1/24,2001:db8:2::1/64", "--key", key, "--offload=" + tc.offload}
			if tc.clientMode == "both" {
				cliArgs = append(cliArgs, "-l", "7000")
			}
			srv := startTunnel(t, b, srvArgs...)
			cli := startTunnel(t, a, cliArgs...)
			peers := echoServer(t, b, "tcp", ":5001")
			if tc.transport == "tcp" {
				cli.waitCounter("connects", 1)
			}
			transfer(t, a, "tcp", "198.51.100.2:5001", transferSize)
			remoteIn(t, peers, "198.51.100.1/32")
			transfer(t, a, "tcp", "[2001:db8:2::2]:5001", transferSize)
			remoteIn(t, peers, "2001:db8:2::1/128")
			checkAllocs(t, func() { transfer(t, a, "tcp", "198.51.100.2:5001", transferSize) }, srv, cli)
			for _, p := range []*proc{srv, cli} {
				st := p.getStatus()
				if st.Counters["tun_tx"] < 1000 || st.Counters["auth_ok"] == 0 {
					t.Errorf("%s: counters %v", p.ns.Name, st.Counters)
				}
			}
		})
	}
}

// The IP-over-TCP client reconnects (with backoff) after the server went
// away and came back, and traffic flows again.
func TestIPOverTCPReconnect(t *testing.T) {
	a, b := twoHosts(t)
	key := writeKey(t)
	srvArgs := []string{"--carry", "ip", "--transport", "tcp", "--mode", "server", "-l", "7000", "--address", "198.51.100.2/24", "--key", key}
	srv := startTunnel(t, b, srvArgs...)
	cli := startTunnel(t, a, "--carry", "ip", "--transport", "tcp", "--mode", "client", "--remote", "192.0.2.2:7000", "--address", "198.51.100.1/24", "--key", key)
	cli.waitCounter("connects", 1)
	echoServer(t, b, "tcp", ":5001")
	transfer(t, a, "tcp", "198.51.100.2:5001", 1<<20)
	if code := srv.stop(); code != 0 {
		t.Fatalf("server exit code %d", code)
	}
	time.Sleep(500 * time.Millisecond) // a few failed attempts
	startTunnel(t, b, srvArgs...)
	cli.waitCounter("connects", 2)
	transfer(t, a, "tcp", "198.51.100.2:5001", 1<<20)
	if st := cli.getStatus(); len(st.Streams) != 1 || st.Streams[0] != "to 192.0.2.2:7000" {
		t.Errorf("client streams: %q", st.Streams)
	}
	if !strings.Contains(cli.log.String(), "retry in") {
		t.Errorf("no reconnection attempts logged:\n%s", cli.log.String())
	}
}

// With a key, IP over UDP takes datagrams only from authenticated peers:
// well-formed IP packets from any other port or address are dropped.
func TestIPOverUDPSpoofed(t *testing.T) {
	a, b := twoHosts(t)
	key := writeKey(t)
	srv := startTunnel(t, b, "--carry", "ip", "--transport", "udp", "--mode", "server", "-l", "7000", "--address", "198.51.100.2/24", "--key", key)
	startTunnel(t, a, "--carry", "ip", "--transport", "udp", "--mode", "client", "--remote", "192.0.2.2:7000", "--address", "198.51.100.1/24", "--key", key)
	echoServer(t, b, "tcp", ":5001")
	transfer(t, a, "tcp", "198.51.100.2:5001", 1<<20)
	time.Sleep(200 * time.Millisecond)
	before := srv.getStatus()
	// A valid IPv4/TCP SYN from the client's tunnel address, sent from
	// ports that never authenticated.
	pkt := make([]byte, 40)
	codec.PutIPv4Header(pkt, 20, codec.ProtoTCP, netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2"))
	copy(pkt[20:], tcpSegment())
	codec.SetTCPChecksum(pkt[20:], netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("198.51.100.2"))
	for _, from := range []string{"192.0.2.1:7001", "192.0.2.1:7002"} {
		var u *net.UDPConn
		if err := a.Do(func() (err error) {
			u, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(from)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		for range 100 {
			u.WriteTo(pkt, &net.UDPAddr{IP: net.ParseIP("192.0.2.2"), Port: 7000})
		}
		u.Close()
	}
	time.Sleep(200 * time.Millisecond)
	after := srv.getStatus()
	if got := after.Drops["unauthenticated"] - before.Drops["unauthenticated"]; got != 200 {
		t.Errorf("%d spoofed datagrams counted as unauthenticated, want 200", got)
	}
	if after.Counters["tun_tx"] != before.Counters["tun_tx"] {
		t.Errorf("%d spoofed packets reached the TUN", after.Counters["tun_tx"]-before.Counters["tun_tx"])
	}
	transfer(t, a, "tcp", "198.51.100.2:5001", 1<<20)
}
