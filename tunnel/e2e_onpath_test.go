package tunnel

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/tunnel/seal"
)

// relay is an on-path attacker (and a NAT) between a client and a server:
// it forwards UDP between a front socket the client sends to and a back
// socket it sends to the server from, and, while attacking, adds replays,
// bit-flipped copies, forgeries and reordering to the client's datagrams.
// Everything it injects leaves from the back socket: the server sees it
// from the authenticated peer's own address and port.
type relay struct {
	t      *testing.T
	front  *net.UDPConn
	server *net.UDPAddr
	ns     *testenv.NS

	mu     sync.Mutex
	back   *net.UDPConn
	client *net.UDPAddr

	attack atomic.Bool
	// what was sent towards the server
	genuine, replayed, tooOld, flipped, forged, unknownID, plain atomic.Uint64
	history                                                      [][]byte
	old                                                          [][]byte // kept to be sent once far behind the window
	held                                                         []byte
	since                                                        int
	n                                                            int
}

func newRelay(t *testing.T, ns *testenv.NS, front string, server string) *relay {
	r := &relay{t: t, ns: ns, server: net.UDPAddrFromAddrPort(netip.MustParseAddrPort(server))}
	if err := ns.Do(func() (err error) {
		r.front, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort(front)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	r.front.SetReadBuffer(8 << 20)
	r.rebind()
	t.Cleanup(func() {
		r.front.Close()
		r.mu.Lock()
		r.back.Close()
		r.mu.Unlock()
	})
	go r.toServer()
	return r
}

// rebind moves the relay's back socket to a new source port, as a NAT
// that lost its mapping does.
func (r *relay) rebind() {
	var b *net.UDPConn
	if err := r.ns.Do(func() (err error) { b, err = net.ListenUDP("udp", nil); return err }); err != nil {
		r.t.Fatal(err)
	}
	b.SetReadBuffer(8 << 20)
	r.mu.Lock()
	old := r.back
	r.back = b
	r.mu.Unlock()
	if old != nil {
		old.Close()
	}
	go r.toClient(b)
}

func (r *relay) backPort() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.back.LocalAddr().(*net.UDPAddr).Port
}

func (r *relay) toClient(b *net.UDPConn) {
	buf := make([]byte, 65536)
	for {
		n, _, err := b.ReadFromUDP(buf)
		if err != nil {
			return
		}
		r.mu.Lock()
		c := r.client
		r.mu.Unlock()
		if c != nil {
			r.front.WriteToUDP(buf[:n], c)
		}
	}
}

func (r *relay) send(p []byte) {
	r.mu.Lock()
	b := r.back
	r.mu.Unlock()
	b.WriteToUDP(p, r.server)
}

func (r *relay) toServer() {
	buf := make([]byte, 65536)
	for {
		n, from, err := r.front.ReadFromUDP(buf)
		if err != nil {
			return
		}
		r.mu.Lock()
		r.client = from
		r.mu.Unlock()
		p := bytes.Clone(buf[:n])
		if !r.attack.Load() || len(p) < seal.Overhead {
			r.send(p)
			r.genuine.Add(1)
			continue
		}
		r.misbehave(p)
	}
}

// misbehave forwards p among the attacks. Every genuine datagram is
// forwarded exactly once, some of them late.
func (r *relay) misbehave(p []byte) {
	r.n++
	if r.n%7 == 2 {
		// The same datagram with one bit of its ciphertext or tag
		// flipped, ahead of the original (behind it, it would be refused
		// as a replay before its tag is even checked).
		q := bytes.Clone(p)
		var b [2]byte
		rand.Read(b[:])
		bit := 128 + int(binary.LittleEndian.Uint16(b[:]))%(len(q)*8-128)
		q[bit/8] ^= 1 << (bit % 8)
		r.send(q)
		r.flipped.Add(1)
	}
	switch {
	case r.held == nil && r.n%10 == 0:
		// Reorder: hold this one back until five others went ahead.
		r.held, r.since = p, 0
	default:
		r.send(p)
		r.genuine.Add(1)
		if r.held != nil {
			if r.since++; r.since == 5 {
				r.send(r.held)
				r.genuine.Add(1)
				r.held = nil
			}
		}
	}
	r.history = append(r.history, p)
	if len(r.history) > 64 {
		r.history = r.history[1:]
	}
	switch r.n % 7 {
	case 1: // replay one of the recent datagrams (already delivered)
		if len(r.history) > 8 {
			r.send(r.history[len(r.history)-8])
			r.replayed.Add(1)
		}
	case 3: // a forgery under the genuine session index and a fresh counter
		q := make([]byte, len(p))
		rand.Read(q)
		copy(q[:8], p[:8])
		binary.LittleEndian.PutUint64(q[8:], binary.LittleEndian.Uint64(p[8:])+1<<30)
		r.send(q)
		r.forged.Add(1)
	case 4: // a record for a session nobody has
		q := bytes.Clone(p)
		binary.LittleEndian.PutUint32(q[4:], binary.LittleEndian.Uint32(q[4:])^0x5a5a5a5a)
		r.send(q)
		r.unknownID.Add(1)
	case 5: // the original attack: a plain TCP SYN from the peer's address and port
		r.send(tcpSegment())
		r.plain.Add(1)
	}
	if r.n == 20 {
		r.old = append(r.old, bytes.Clone(p))
	}
	// Far behind the window (more than 2048 records later): too old,
	// whether or not it was delivered before.
	if r.n == 20+3000 {
		for _, o := range r.old {
			r.send(o)
			r.tooOld.Add(1)
		}
	}
}

// Between a client and a server sits an on-path attacker that injects
// packets from the client's address and port, replays, flips bits,
// forges and reorders. Nothing it sends reaches the server's TUN, the
// counters say why, the transfer through the tunnel completes intact,
// and when the relay changes its source port (NAT rebinding) mid-transfer
// the tunnel follows.
func TestOnPathAttacker(t *testing.T) {
	for _, mode := range []string{"tcp-over-udp", "ip-over-udp"} {
		t.Run(mode, func(t *testing.T) {
			testenv.RequireRoot(t)
			a, m, b := testenv.NewNS(t), testenv.NewNS(t), testenv.NewNS(t)
			testenv.Veth(t, a, "eth0", "192.0.2.1/24", m, "eth0", "192.0.2.254/24")
			testenv.Veth(t, m, "eth1", "198.51.100.254/24", b, "eth0", "198.51.100.2/24")
			a.Run(t, "ip", "route", "add", "default", "via", "192.0.2.254")
			b.Run(t, "ip", "route", "add", "default", "via", "198.51.100.254")
			m.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1") // for the handshake over TCP
			key := writeKey(t)
			var srv, cli *proc
			var r *relay
			var target string
			switch mode {
			case "tcp-over-udp":
				// The client reaches the relay; the handshake goes to the
				// server through DNAT in the middle.
				m.Run(t, "nft", "add table ip nat; add chain ip nat pre { type nat hook prerouting priority dstnat; }; add rule ip nat pre ip daddr 192.0.2.254 tcp dport 7472 dnat to 198.51.100.2")
				srv = startTunnel(t, b, "-i", "tun0", "-l", "7472", "--address", "203.0.113.1/24", "--key", key)
				cli = startTunnel(t, a, "-i", "tun0", "-l", "7473", "-b", "eth0", "-e", "7472", "--address", "198.51.100.1/32", "--key", key)
				a.Run(t, "ip", "route", "add", "192.0.2.254/32", "dev", "tun0")
				r = newRelay(t, m, "192.0.2.254:7472", "198.51.100.2:7472")
				target = "192.0.2.254:5001"
			default:
				m.Run(t, "nft", "add table ip nat; add chain ip nat pre { type nat hook prerouting priority dstnat; }; add rule ip nat pre ip daddr 192.0.2.254 tcp dport 7000 dnat to 198.51.100.2")
				srv = startTunnel(t, b, "--carry", "ip", "--transport", "udp", "--mode", "server", "-l", "7000", "--address", "203.0.113.2/24", "--key", key)
				cli = startTunnel(t, a, "--carry", "ip", "--transport", "udp", "--mode", "client", "--remote", "192.0.2.254:7000", "--address", "203.0.113.1/24", "--key", key)
				r = newRelay(t, m, "192.0.2.254:7000", "198.51.100.2:7000")
				target = "203.0.113.2:5001"
			}
			echoServer(t, b, "tcp", ":5001")
			transfer(t, a, "tcp", target, 1<<20)
			time.Sleep(200 * time.Millisecond)
			before := srv.getStatus()
			g0 := r.genuine.Load()

			r.attack.Store(true)
			done := make(chan struct{})
			go func() {
				defer close(done)
				time.Sleep(700 * time.Millisecond)
				r.rebind() // NAT rebinding mid-transfer
			}()
			transfer(t, a, "tcp", target, 8<<20)
			<-done
			r.attack.Store(false)
			transfer(t, a, "tcp", target, 1<<20) // after the rebinding, still up
			time.Sleep(300 * time.Millisecond)
			after := srv.getStatus()

			d := func(name string) uint64 { return after.Drops[name] - before.Drops[name] }
			genuine := r.genuine.Load() - g0
			tunTx := after.Counters["tun_tx"] - before.Counters["tun_tx"]
			t.Logf("relay: %d genuine, %d replayed, %d too old, %d flipped, %d forged, %d unknown index, %d plain; server drops %v, tun_tx %d",
				genuine, r.replayed.Load(), r.tooOld.Load(), r.flipped.Load(), r.forged.Load(), r.unknownID.Load(), r.plain.Load(), after.Drops, tunTx)
			if r.replayed.Load() < 100 || r.flipped.Load() < 100 || r.tooOld.Load() == 0 {
				t.Fatalf("the attack was too short to say anything")
			}
			// Nothing beyond the genuine datagrams reached the TUN (each
			// genuine datagram is one packet).
			if tunTx > genuine {
				t.Errorf("%d packets reached the server's TUN, the client sent %d", tunTx, genuine)
			}
			// And the genuine ones, reordered or not, did (but for a few
			// the kernel may drop when a loaded machine falls behind).
			if tunTx < genuine-genuine/10 {
				t.Errorf("only %d of %d genuine datagrams reached the server's TUN", tunTx, genuine)
			}
			for _, c := range []struct {
				name string
				sent uint64
			}{
				{"replayed", r.replayed.Load()}, {"too_old", r.tooOld.Load()},
				{"bad_tag", r.flipped.Load() + r.forged.Load()},
				{"unknown_session", r.unknownID.Load()}, {"unauthenticated", r.plain.Load()},
			} {
				// Datagrams lost on the way are not counted; none is counted twice.
				if got := d(c.name); got > c.sent || got < c.sent*9/10 {
					t.Errorf("drop counter %s grew by %d; the attacker sent %d", c.name, got, c.sent)
				}
			}
			if d("malformed") != 0 || d("stale_session") != 0 {
				t.Errorf("unexpected drops: %v", after.Drops)
			}
			// The server follows the new source port.
			if after.Counters["roamed"] == before.Counters["roamed"] || len(after.Peers) != 1 || after.Peers[0].Endpoint != "198.51.100.254:"+strconv.Itoa(r.backPort()) {
				t.Errorf("after the rebinding: roamed %d, peers %+v (relay now at port %d)", after.Counters["roamed"], after.Peers, r.backPort())
			}
			_ = cli
		})
	}
}

// tcpTamperer is an on-path attacker for IP over TCP: a TCP proxy that
// parses the client's frames and, on its first connection, flips a bit in
// one frame and, on its second, sends an earlier frame again. Each
// connection after that is forwarded faithfully.
func tcpTamperer(t *testing.T, ns *testenv.NS, listen, server string) {
	var ln net.Listener
	if err := ns.Do(func() (err error) { ln, err = net.Listen("tcp", listen); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for conn := 0; ; conn++ {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var s net.Conn
			if err := ns.Do(func() (err error) { s, err = net.Dial("tcp", server); return }); err != nil {
				c.Close()
				continue
			}
			go func() { io.Copy(c, s); c.Close() }()
			go func(conn int) {
				defer s.Close()
				// The handshake's two client messages pass unchanged.
				if _, err := io.CopyN(s, c, 41+32); err != nil {
					return
				}
				var saved []byte
				for n := 0; ; n++ {
					var hdr [2]byte
					if _, err := io.ReadFull(c, hdr[:]); err != nil {
						return
					}
					f := make([]byte, 2+int(binary.BigEndian.Uint16(hdr[:])))
					copy(f, hdr[:])
					if _, err := io.ReadFull(c, f[2:]); err != nil {
						return
					}
					if n == 10 {
						saved = bytes.Clone(f)
					}
					switch {
					case conn == 0 && n == 50:
						f[len(f)/2] ^= 0x10
					case conn == 1 && n == 50:
						s.Write(saved)
					}
					if _, err := s.Write(f); err != nil {
						return
					}
				}
			}(conn)
		}
	}()
}

// IP over TCP under a tampering proxy: a modified frame and a replayed
// frame each end the stream, are counted, and reach nothing; the client
// reconnects and the transfer completes intact.
func TestOnPathAttackerTCP(t *testing.T) {
	testenv.RequireRoot(t)
	a, m, b := testenv.NewNS(t), testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, a, "eth0", "192.0.2.1/24", m, "eth0", "192.0.2.254/24")
	testenv.Veth(t, m, "eth1", "198.51.100.254/24", b, "eth0", "198.51.100.2/24")
	key := writeKey(t)
	srv := startTunnel(t, b, "--carry", "ip", "--transport", "tcp", "--mode", "server", "-l", "7000", "--address", "203.0.113.2/24", "--key", key)
	cli := startTunnel(t, a, "--carry", "ip", "--transport", "tcp", "--mode", "client", "--remote", "192.0.2.254:7000", "--address", "203.0.113.1/24", "--key", key)
	tcpTamperer(t, m, "192.0.2.254:7000", "198.51.100.2:7000")
	echoServer(t, b, "tcp", ":5001")
	transfer(t, a, "tcp", "203.0.113.2:5001", 16<<20)
	st := srv.getStatus()
	if st.Drops["bad_tag"] != 1 || st.Drops["replayed"] != 1 {
		t.Errorf("server drops %v, want one bad_tag and one replayed", st.Drops)
	}
	if c := cli.getStatus().Counters["connects"]; c < 3 {
		t.Errorf("client connected %d times, want 3 (two streams cut)", c)
	}
}
