package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/tunnel/auth"
)

// recorder keeps what a connection wrote, to replay it later.
type recorder struct {
	net.Conn
	sent bytes.Buffer
}

func (r *recorder) Write(p []byte) (int, error) { r.sent.Write(p); return r.Conn.Write(p) }

func dialFrom(t *testing.T, ns *testenv.NS, local, remote string) net.Conn {
	t.Helper()
	var c net.Conn
	err := ns.Do(func() (err error) {
		// Bound to eth0: in a, traffic to the server's address would
		// otherwise enter the good client's tunnel.
		d := net.Dialer{Timeout: 5 * time.Second, Control: socketControl("eth0", true)}
		if local != "" {
			d.LocalAddr, err = net.ResolveTCPAddr("tcp", local)
			if err != nil {
				return err
			}
		}
		c, err = d.Dial("tcp", remote)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func udpFrom(t *testing.T, ns *testenv.NS, local string) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := ns.Do(func() error {
		lc := net.ListenConfig{Control: socketControl("eth0", false)}
		pc, err := lc.ListenPacket(context.Background(), "udp", local)
		if err != nil {
			return err
		}
		c = pc.(*net.UDPConn)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// tcpSegment is a plausible TCP SYN to port 5001, so that only the
// authentication check can keep it out of the TUN.
func tcpSegment() []byte {
	s := make([]byte, 20)
	binary.BigEndian.PutUint16(s[0:], 40000)
	binary.BigEndian.PutUint16(s[2:], 5001)
	s[12] = 5 << 4
	s[13] = 0x02
	binary.BigEndian.PutUint16(s[14:], 65535)
	return s
}

// The server keeps serving its good peer while others try a wrong key, a
// replayed handshake, spoofed and junk datagrams and a flood of new ports.
func TestTCPOverUDPAttacks(t *testing.T) {
	a, b := twoHosts(t)
	a.Run(t, "ip", "addr", "add", "192.0.2.9/24", "dev", "eth0")
	a.Run(t, "ip", "addr", "add", "192.0.2.10/24", "dev", "eth0")
	key := writeKey(t)
	srv := startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/28", "--max-peers", "8", "--key", key)
	startTunnel(t, a, "-i", "tun0", "-l", "7473", "-b", "eth0", "-e", "7472", "--address", "198.51.100.1/32", "--key", key)
	a.Run(t, "ip", "route", "add", "192.0.2.2/32", "dev", "tun0")
	echoServer(t, b, "tcp", ":5001")
	transfer(t, a, "tcp", "192.0.2.2:5001", 1<<20)
	time.Sleep(300 * time.Millisecond) // let the last ACKs through
	base := srv.getStatus()
	tunTx := base.Counters["tun_tx"]
	good, _ := readKeyForTest(t, key)

	t.Run("wrong key", func(t *testing.T) {
		c := dialFrom(t, a, "192.0.2.9:7600", "192.0.2.2:7472")
		defer c.Close()
		_, err := auth.ClientHandshake(c, auth.GenerateKey(), 3*time.Second)
		if err == nil || !strings.Contains(err.Error(), "authentication failed") {
			t.Fatalf("handshake with a wrong key: %v, want an authentication failure", err)
		}
	})
	t.Run("replayed handshake", func(t *testing.T) {
		c := dialFrom(t, a, "192.0.2.9:7601", "192.0.2.2:7472")
		rec := &recorder{Conn: c}
		if _, err := auth.ClientHandshake(rec, good, 3*time.Second); err != nil {
			t.Fatalf("genuine handshake: %v", err)
		}
		// As the daemon does: let the server close first, so that the
		// port can be used again at once.
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		io.ReadAll(c)
		c.Close()
		// The same client bytes from another port, and from the same port
		// again: the server's fresh nonce makes the old proof worthless.
		for _, from := range []string{"192.0.2.9:7602", "192.0.2.9:7601"} {
			r := dialFrom(t, a, from, "192.0.2.2:7472")
			r.SetDeadline(time.Now().Add(5 * time.Second))
			r.Write(rec.sent.Bytes())
			got, _ := io.ReadAll(r)
			r.Close()
			if len(got) != 86 {
				t.Errorf("replay from %s: server sent %d bytes, want only the 86-byte challenge (no acceptance)", from, len(got))
			}
		}
		if n := len(srv.getStatus().Peers); n != 2 {
			t.Errorf("store has %d peers, want 2 (the client and the genuine handshake)", n)
		}
	})
	t.Run("spoofed and junk datagrams", func(t *testing.T) {
		// From an address that never authenticated, from the authenticated
		// address with another port, and junk from the authenticated test
		// peer 192.0.2.9:7601 itself.
		for _, from := range []string{"192.0.2.9:7700", "192.0.2.1:7474"} {
			u := udpFrom(t, a, from)
			for range 50 {
				u.WriteTo(tcpSegment(), &net.UDPAddr{IP: net.ParseIP("192.0.2.2"), Port: 7472})
			}
		}
		u := udpFrom(t, a, "192.0.2.9:7601")
		junk := make([]byte, 300)
		for i := range 50 {
			rand.Read(junk)
			junk[12] = 0xf0 // data offset beyond the datagram for short ones
			u.WriteTo(junk[:i%40], &net.UDPAddr{IP: net.ParseIP("192.0.2.2"), Port: 7472})
		}
		// Oversized: a TCP segment that would not fit the server's TUN MTU.
		big := append(tcpSegment(), make([]byte, 3000)...)
		for range 5 {
			u.WriteTo(big, &net.UDPAddr{IP: net.ParseIP("192.0.2.2"), Port: 7472})
		}
	})
	t.Run("flood of new source ports", func(t *testing.T) {
		for port := 20000; port < 22000; port++ {
			u := udpFrom(t, a, fmt.Sprintf("192.0.2.9:%d", port))
			u.WriteTo(tcpSegment(), &net.UDPAddr{IP: net.ParseIP("192.0.2.2"), Port: 7472})
			u.Close()
		}
		// Handshake attempts from many ports, all with the wrong key.
		for port := 22000; port < 22020; port++ {
			c := dialFrom(t, a, fmt.Sprintf("192.0.2.9:%d", port), "192.0.2.2:7472")
			auth.ClientHandshake(c, auth.GenerateKey(), time.Second)
			c.Close()
		}
	})
	time.Sleep(200 * time.Millisecond)
	st := srv.getStatus()
	// Whatever reached the TUN came from the good client.
	var fromGood uint64
	for _, p := range st.Peers {
		if p.Peer == "192.0.2.1:7473" {
			fromGood = p.RxPackets - base.Peers[0].RxPackets
		} else if p.RxPackets != 0 {
			t.Errorf("%d packets from %s reached the TUN", p.RxPackets, p.Peer)
		}
	}
	if got := st.Counters["tun_tx"] - tunTx; got != fromGood {
		t.Errorf("%d packets reached the server's TUN, %d of them from the good client", got, fromGood)
	}
	if len(st.Peers) > 2 {
		t.Errorf("store grew to %d peers: %+v", len(st.Peers), st.Peers)
	}
	// With a key nothing here is a sealed record: 2000 from the flood,
	// 100 spoofed, 50 junk and 5 oversized from the authenticated port.
	if st.Drops["unauthenticated"] < 2155 {
		t.Errorf("drops: %v", st.Drops)
	}
	if st.Counters["auth_fail"] < 4 {
		t.Errorf("auth failures counted: %d", st.Counters["auth_fail"])
	}
	// Failures are logged but rate limited.
	if n := strings.Count(srv.log.String(), "authentication from"); n == 0 || n > 10 {
		t.Errorf("%d failure lines logged, want a few", n)
	}
	t.Run("a source that kept failing is refused", func(t *testing.T) {
		c := dialFrom(t, a, "192.0.2.9:7609", "192.0.2.2:7472")
		defer c.Close()
		if _, err := auth.ClientHandshake(c, good, 3*time.Second); err == nil {
			t.Errorf("192.0.2.9 failed more than 5 times in a minute and was still let in")
		}
	})
	t.Run("more good peers than the store holds", func(t *testing.T) {
		// --max-peers 8, two entries taken: six more fit, the rest are
		// refused in the handshake's last message.
		accepted, refused := 0, 0
		for port := 7610; port < 7620; port++ {
			c := dialFrom(t, a, fmt.Sprintf("192.0.2.10:%d", port), "192.0.2.2:7472")
			_, err := auth.ClientHandshake(c, good, 3*time.Second)
			switch {
			case err == nil:
				accepted++
			case errors.Is(err, auth.ErrRefused):
				refused++
			default:
				t.Errorf("port %d: %v", port, err)
			}
			c.SetReadDeadline(time.Now().Add(3 * time.Second))
			io.ReadAll(c)
			c.Close()
		}
		if accepted != 6 || refused != 4 || len(srv.getStatus().Peers) != 8 {
			t.Errorf("accepted %d, refused %d, store %d", accepted, refused, len(srv.getStatus().Peers))
		}
	})
	// And the good peer still gets through.
	transfer(t, a, "tcp", "192.0.2.2:5001", 4<<20)
}

func readKeyForTest(t *testing.T, path string) ([]byte, error) {
	t.Helper()
	k, err := auth.ReadKeyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return k, nil
}

// An authenticated IP-over-TCP peer that sends a frame that is not
// sealed is cut off; nothing reaches the TUN.
func TestIPOverTCPBadFrames(t *testing.T) {
	a, b := twoHosts(t)
	key := writeKey(t)
	srv := startTunnel(t, b, "--carry", "ip", "--transport", "tcp", "--mode", "server", "-l", "7000", "--address", "198.51.100.2/24", "--key", key)
	k, _ := readKeyForTest(t, key)

	c := dialFrom(t, a, "", "192.0.2.2:7000")
	if _, err := auth.ClientHandshake(c, k, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	// A well-framed packet that is not sealed: the stream is cut off.
	junk := []byte{0, 4, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff}
	junk = append(junk, make([]byte, 100)...)
	c.Write(junk)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Errorf("connection still open after an unsealed frame")
	}
	c.Close()
	st := srv.getStatus()
	if st.Counters["tun_tx"] != 0 || st.Drops["unauthenticated"] != 1 {
		t.Errorf("counters %v drops %v", st.Counters, st.Drops)
	}
	// Without the key, no frame is even read.
	c = dialFrom(t, a, "", "192.0.2.2:7000")
	c.Write(append(make([]byte, 36), junk...))
	io.ReadAll(c)
	c.Close()
	if st := srv.getStatus(); st.Counters["tun_tx"] != 0 || st.Counters["auth_fail"] != 1 {
		t.Errorf("after an unauthenticated stream: counters %v", st.Counters)
	}
}

// An idle peer disappears after --expiry; the client authenticates again
// on its next packet.
func TestExpiry(t *testing.T) {
	a, b := twoHosts(t)
	key := writeKey(t)
	srv := startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/24", "--key", key, "--expiry", "1500ms")
	startTunnel(t, a, "-i", "tun0", "-l", "7473", "-b", "eth0", "-e", "7472", "--address", "198.51.100.1/32", "--key", key, "--expiry", "1500ms")
	a.Run(t, "ip", "route", "add", "192.0.2.2/32", "dev", "tun0")
	echoServer(t, b, "tcp", ":5001")
	transfer(t, a, "tcp", "192.0.2.2:5001", 1<<20)
	if n := len(srv.getStatus().Peers); n != 1 {
		t.Fatalf("%d peers after the transfer, want 1", n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(srv.getStatus().Peers) != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the idle peer did not expire: %+v", srv.getStatus().Peers)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st := srv.getStatus(); st.Counters["expired"] != 1 || !strings.Contains(srv.log.String(), "expired") {
		t.Errorf("expiry not counted or logged: %v", st.Counters)
	}
	transfer(t, a, "tcp", "192.0.2.2:5001", 1<<20)
	if st := srv.getStatus(); st.Counters["auth_ok"] != 2 || len(st.Peers) != 1 {
		t.Errorf("after re-authentication: counters %v, peers %d", st.Counters, len(st.Peers))
	}
	// A restarted server knows nobody; the client notices the silence and
	// authenticates again.
	if code := srv.stop(); code != 0 {
		t.Fatalf("server exit code %d", code)
	}
	srv = startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/24", "--key", key, "--expiry", "1500ms")
	transfer(t, a, "tcp", "192.0.2.2:5001", 1<<20)
	if st := srv.getStatus(); st.Counters["auth_ok"] == 0 || len(st.Peers) != 1 {
		t.Errorf("after the server restarted: counters %v, peers %d", st.Counters, len(st.Peers))
	}
}
