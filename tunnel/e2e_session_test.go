package tunnel

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/tunnel/codec"
	"golang.org/x/sys/unix"
)

// sniffUDP captures, with an AF_PACKET socket on ifname in ns, the
// payloads of IPv4 UDP datagrams to port; stop returns them.
func sniffUDP(t *testing.T, ns *testenv.NS, ifname string, port uint16) (stop func() [][]byte) {
	t.Helper()
	var fd int
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_IP))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM, proto); err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_IP), Ifindex: ifi.Index})
	})
	if err != nil {
		t.Fatal(err)
	}
	unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000})
	var mu sync.Mutex
	var got [][]byte
	done := make(chan struct{})
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		buf := make([]byte, 65536)
		for {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				// Stop only once the queue is drained: on a loaded
				// machine this goroutine may run late.
				select {
				case <-done:
					return
				default:
				}
				continue
			}
			if n < 28 || buf[0]>>4 != 4 || buf[9] != 17 {
				continue
			}
			hl := int(buf[0]&0xf) * 4
			if n < hl+8 || binary.BigEndian.Uint16(buf[hl+2:]) != port {
				continue
			}
			mu.Lock()
			got = append(got, bytes.Clone(buf[hl+8:n]))
			mu.Unlock()
		}
	}()
	return func() [][]byte {
		close(done)
		<-stopped
		unix.Close(fd)
		mu.Lock()
		defer mu.Unlock()
		return got
	}
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// sendMarker writes a recognisable text through the tunnel.
func sendMarker(t *testing.T, ns *testenv.NS, addr string, marker []byte) {
	var c net.Conn
	if err := ns.Do(func() (err error) { c, err = net.DialTimeout("tcp", addr, 10*time.Second); return }); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	msg := bytes.Repeat(marker, 200)
	c.Write(msg)
	c.(*net.TCPConn).CloseWrite()
	back := make([]byte, len(msg))
	if _, err := io.ReadFull(c, back); err != nil || !bytes.Equal(back, msg) {
		t.Fatalf("echo through the tunnel: %v", err)
	}
}

// What crosses the wire: without a key the plain format (the inner IP
// packet as the UDP payload, as a TunConnector-style peer expects); with
// a key only records, in which the inner packets' contents do not appear.
func TestWireFormat(t *testing.T) {
	marker := []byte("sfunnel-plaintext-marker:")
	for _, sealed := range []bool{false, true} {
		name := "plain"
		if sealed {
			name = "sealed"
		}
		t.Run(name, func(t *testing.T) {
			a, b := twoHosts(t)
			srvArgs := []string{"--carry", "ip", "--transport", "udp", "--mode", "server", "-l", "7000", "--address", "198.51.100.2/24"}
			cliArgs := []string{"--carry", "ip", "--transport", "udp", "--mode", "client", "--remote", "192.0.2.2:7000", "--address", "198.51.100.1/24", "--keepalive", "300ms"}
			if sealed {
				key := writeKey(t)
				srvArgs = append(srvArgs, "--key", key)
				cliArgs = append(cliArgs, "--key", key)
			}
			srv := startTunnel(t, b, srvArgs...)
			cli := startTunnel(t, a, cliArgs...)
			echoServer(t, b, "tcp", ":5001")
			stop := sniffUDP(t, b, "eth0", 7000)
			sendMarker(t, a, "198.51.100.2:5001", marker)
			got := stop()
			if len(got) == 0 {
				t.Fatalf("captured %d datagrams to port 7000", len(got))
			}
			seen := 0
			for _, p := range got {
				if bytes.Contains(p, marker) {
					seen++
				}
				if sealed {
					if len(p) < 32 || p[0] < 1 || p[0] > 3 || p[1]|p[2]|p[3] != 0 {
						t.Fatalf("not a sealed record on the wire: % x", p[:min(len(p), 32)])
					}
				} else {
					// A UDP GSO super-packet holds several datagrams:
					// each must be one whole IP packet (IPv6 ones are the
					// TUN's own router solicitations and the like).
					for o := 0; o < len(p); {
						n := codec.PacketLen(p[o:])
						if n == 0 || n > len(p)-o || codec.Version(p[o:o+n]) == 0 {
							t.Fatalf("not a plain IP packet on the wire at %d: % x", o, p[o:min(len(p), o+32)])
						}
						o += n
					}
				}
			}
			if sealed && seen > 0 {
				t.Errorf("the plaintext crossed the wire in %d of %d datagrams", seen, len(got))
			}
			if !sealed && seen == 0 {
				t.Errorf("plain mode: the text is not on the wire (the capture sees nothing useful)")
			}
			if !sealed && !strings.Contains(srv.log.String()+cli.log.String(), "warning: no --key") {
				t.Errorf("no warning about running without a key")
			}
			checkAllocs(t, func() { transfer(t, a, "tcp", "198.51.100.2:5001", transferSize) }, srv, cli)
			// Keepalives while idle: sealed records the server answers, or
			// empty datagrams (plain) it only counts.
			time.Sleep(time.Second)
			if st := srv.getStatus(); st.Counters["keepalive_rx"] == 0 || (sealed && st.Counters["keepalive_tx"] == 0) {
				t.Errorf("server keepalive counters: %v", st.Counters)
			}
		})
	}
}

// The rekey replaces the session while traffic flows: the server keeps
// the peer's entry and address, and records sealed under the previous
// session that were still in flight are accepted.
func TestRekey(t *testing.T) {
	a, b := twoHosts(t)
	key := writeKey(t)
	srv := startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/24", "--key", key)
	cli := startTunnel(t, a, "-i", "tun0", "-l", "7473", "-b", "eth0", "-e", "7472", "--address", "198.51.100.1/32", "--key", key, "--rekey", "1s")
	a.Run(t, "ip", "route", "add", "192.0.2.2/32", "dev", "tun0")
	echoServer(t, b, "tcp", ":5001")
	transfer(t, a, "tcp", "192.0.2.2:5001", 1<<20)
	addr := srv.getStatus().Peers[0].Address
	for range 3 {
		time.Sleep(1100 * time.Millisecond)
		transfer(t, a, "tcp", "192.0.2.2:5001", 2<<20)
	}
	st, cst := srv.getStatus(), cli.getStatus()
	if st.Counters["rekeys"] < 2 || cst.Counters["rekeys"] < 2 {
		t.Errorf("rekeys: server %d, client %d, want at least 2", st.Counters["rekeys"], cst.Counters["rekeys"])
	}
	if len(st.Peers) != 1 || st.Peers[0].Address != addr {
		t.Errorf("peers after rekeying: %+v, want one with address %s", st.Peers, addr)
	}
	for _, why := range []string{"unknown_session", "bad_tag", "replayed", "too_old", "stale_session"} {
		if st.Drops[why]+cst.Drops[why] != 0 {
			t.Errorf("drops after rekeying: server %v, client %v", st.Drops, cst.Drops)
			break
		}
	}
}

// Two daemons with the same TUN name in two namespaces each answer on
// their own default status socket, and one leaving does not take the
// other's away.
func TestStatusSocketPerNamespace(t *testing.T) {
	a, b := twoHosts(t)
	exe, _ := os.Executable()
	run := func(ns *testenv.NS, args ...string) (*proc, error) {
		js, _ := json.Marshal(args)
		p := &proc{t: t, ns: ns, log: &syncBuf{}, done: make(chan struct{})}
		p.cmd = ns.Command(exe)
		p.cmd.Env = append(os.Environ(), "SFUNNEL_TUNNEL_ARGS="+string(js))
		p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
		if err := p.cmd.Start(); err != nil {
			return nil, err
		}
		go func() { p.cmd.Wait(); p.code = p.cmd.ProcessState.ExitCode(); close(p.done) }()
		t.Cleanup(func() { p.stop() })
		return p, nil
	}
	status := func(ns *testenv.NS) string {
		js, _ := json.Marshal([]string{"status", "-i", "tun0", "-j"})
		c := ns.Command(exe)
		c.Env = append(os.Environ(), "SFUNNEL_TUNNEL_ARGS="+string(js))
		o, _ := c.Output()
		return string(o)
	}
	pa, _ := run(a, "--carry", "ip", "--mode", "server", "-l", "7100", "--address", "198.51.100.1/24")
	pb, _ := run(b, "--carry", "ip", "--mode", "server", "-l", "7200", "--address", "198.51.100.2/24")
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(status(a), `"listen_port": 7100`) || !strings.Contains(status(b), `"listen_port": 7200`) {
		if time.Now().After(deadline) {
			t.Fatalf("status in a answers 7100: %v\nstatus in b: %s\nlogs:\n%s\n%s", strings.Contains(status(a), `"listen_port": 7100`), status(b), pa.log.String(), pb.log.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if code := pb.stop(); code != 0 {
		t.Fatalf("b exited with %d", code)
	}
	if !strings.Contains(status(a), `"listen_port": 7100`) {
		t.Errorf("after the daemon in b stopped, the one in a no longer answers")
	}
}

// The client proposes its cipher in the handshake: a server with --cipher
// auto takes it (two hosts whose CPUs would pick differently still
// agree), a server with another cipher set refuses it, and says why.
func TestCipherNegotiation(t *testing.T) {
	a, b := twoHosts(t)
	key := writeKey(t)
	srv := startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/24", "--key", key)
	cli := startTunnel(t, a, "-i", "tun0", "-l", "7473", "-b", "eth0", "-e", "7472", "--address", "198.51.100.1/32", "--key", key, "--cipher", "chacha20-poly1305")
	a.Run(t, "ip", "route", "add", "192.0.2.2/32", "dev", "tun0")
	echoServer(t, b, "tcp", ":5001")
	transfer(t, a, "tcp", "192.0.2.2:5001", 1<<20)
	if st := srv.getStatus(); len(st.Peers) != 1 || st.Peers[0].Cipher != "chacha20-poly1305" {
		t.Errorf("server peers: %+v", st.Peers)
	}
	cli.stop()
	srv.stop()
	srv = startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/24", "--key", key, "--cipher", "aes-256-gcm")
	cli = startTunnel(t, a, "-i", "tun0", "-l", "7473", "-b", "eth0", "-e", "7472", "--address", "198.51.100.1/32", "--key", key, "--cipher", "chacha20-poly1305")
	a.Run(t, "ip", "route", "replace", "192.0.2.2/32", "dev", "tun0")
	if canConnect(a, "192.0.2.2:5001", 2*time.Second) {
		t.Fatal("a client with another cipher got through")
	}
	if !strings.Contains(cli.log.String(), "another --cipher") || !strings.Contains(srv.log.String(), "requires aes-256-gcm") {
		t.Errorf("the refusal is not explained:\nclient: %s\nserver: %s", cli.log.String(), srv.log.String())
	}
}

// Over TCP, --keepalive turns on TCP keepalives on the streams.
func TestStreamKeepalive(t *testing.T) {
	testenv.RequireCommand(t, "ss")
	a, b := twoHosts(t)
	startTunnel(t, b, "--carry", "ip", "--transport", "tcp", "--mode", "server", "-l", "7000", "--address", "198.51.100.2/24", "--keepalive", "7s")
	cli := startTunnel(t, a, "--carry", "ip", "--transport", "tcp", "--mode", "client", "--remote", "192.0.2.2:7000", "--address", "198.51.100.1/24", "--keepalive", "7s")
	cli.waitCounter("connects", 1)
	for _, ns := range []*testenv.NS{a, b} {
		out := ns.Run(t, "ss", "-tno", "state", "established", "( sport = :7000 or dport = :7000 )")
		if !strings.Contains(out, "timer:(keepalive") {
			t.Errorf("no keepalive timer on the stream in %s:\n%s", ns.Name, out)
		}
	}
}

// Without a key, TCP over UDP is udp-encap-tun's format: each datagram is
// a bare TCP segment, peers need no handshake, and the daemon warns.
func TestPlainTCPOverUDP(t *testing.T) {
	a, b := twoHosts(t)
	srv := startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/24")
	cli := startTunnel(t, a, "-i", "tun0", "-l", "7473", "-b", "eth0", "-e", "7472", "--address", "198.51.100.1/32")
	a.Run(t, "ip", "route", "add", "192.0.2.2/32", "dev", "tun0")
	echoServer(t, b, "tcp", ":5001")
	stop := sniffUDP(t, b, "eth0", 7472)
	transfer(t, a, "tcp", "192.0.2.2:5001", 1<<20)
	got := stop()
	if len(got) == 0 {
		t.Fatal("nothing captured")
	}
	for _, p := range got {
		if len(p) < 20 || binary.BigEndian.Uint16(p[2:]) != 5001 || int(p[12]>>4)*4 < 20 {
			t.Fatalf("not a bare TCP segment to port 5001 on the wire: % x", p[:min(len(p), 24)])
		}
	}
	st := srv.getStatus()
	if len(st.Peers) != 1 || st.Peers[0].Address != "203.0.113.2" || st.Counters["auth_ok"] != 0 {
		t.Errorf("server: peers %+v counters %v", st.Peers, st.Counters)
	}
	if !strings.Contains(srv.log.String(), "warning: no --key") || !strings.Contains(cli.log.String(), "warning: no --key") {
		t.Errorf("no warning about running without a key")
	}
}
