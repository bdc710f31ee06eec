package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/auth"
	"github.com/sfunnel/sfunnel/tunnel/seal"
	"github.com/sfunnel/sfunnel/tunnel/store"
	"golang.org/x/sys/unix"
)

// maxHandshakes bounds concurrent handshakes so a connection flood costs
// a fixed amount of memory.
const maxHandshakes = 64

func socketControl(bindTo string, reuse bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if reuse {
				// SO_REUSEPORT as well: in --mode both the handshake to the
				// remote leaves from the port our listener is bound to.
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); serr != nil {
					return
				}
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
					return
				}
			}
			if bindTo != "" {
				serr = unix.BindToDevice(int(fd), bindTo)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// listenTCP opens the TCP listener on the listen port (all addresses).
func (d *daemon) listenTCP() (net.Listener, error) {
	lc := net.ListenConfig{Control: socketControl(d.cfg.BindTo, true)}
	ln, err := lc.Listen(d.ctx, "tcp", fmt.Sprintf(":%d", d.cfg.ListenPort))
	if err != nil {
		return nil, fmt.Errorf("listen on TCP port %d: %w", d.cfg.ListenPort, err)
	}
	d.onClose(ln)
	return ln, nil
}

// serveAuth answers handshakes on ln; every success adds the peer to the
// store (TCP over UDP, IP over UDP).
func (d *daemon) serveAuth(ln net.Listener) {
	d.goLoop("authentication", func() error {
		return d.acceptLoop(ln, func(r *auth.Result) error {
			now := time.Now()
			// A rekey names the session it replaces: the peer keeps its
			// entry (and tunnel address) from wherever it now connects.
			var e *store.Entry
			if r.Prev != 0 {
				e = d.store.BySession(r.Prev)
			}
			rekey := e != nil
			if e == nil {
				var err error
				if e, err = d.store.Add(r.Peer, now); err != nil {
					return err
				}
			}
			if err := d.store.Install(e, d.newSession(r, false, now), true); err != nil {
				return err
			}
			e.Touch(now.UnixNano())
			switch {
			case rekey:
				d.stats.Rekeys.Add(1)
			case e.Addr.IsValid():
				d.log.Printf("peer %s authenticated, tunnel address %s", r.Peer, e.Addr)
			default:
				d.log.Printf("peer %s authenticated", r.Peer)
			}
			return nil
		}, nil)
	})
}

// acceptLoop accepts connections on ln until it is closed. With a key,
// each connection must authenticate first: sources that keep failing are
// refused for a while, at most maxHandshakes run at once, and accept
// decides (with the peer's address) whether a good handshake is welcome.
// Then serve gets the connection; without serve the connection is closed,
// by us first, so the TIME_WAIT state stays here and not on the client's
// fixed port, which it reuses for its next handshake.
func (d *daemon) acceptLoop(ln net.Listener, accept func(*auth.Result) error, serve func(net.Conn, *seal.Session)) error {
	lim := auth.NewLimiter()
	srv := &auth.Server{Key: d.key}
	sem := make(chan struct{}, maxHandshakes)
	for {
		c, err := ln.Accept()
		if err != nil {
			if d.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			time.Sleep(10 * time.Millisecond) // e.g. out of file descriptors
			continue
		}
		from, _ := netip.ParseAddrPort(c.RemoteAddr().String())
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		if d.key != nil && lim.Blocked(from.Addr(), time.Now()) {
			d.stats.AuthFail.Add(1)
			c.Close()
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			c.Close() // too many handshakes at once
			continue
		}
		go func() {
			var ses *seal.Session
			ok := true
			if d.key != nil {
				ses, ok = d.authOne(c, srv, lim, from, accept)
			}
			<-sem
			if !ok || serve == nil {
				c.Close()
				return
			}
			serve(c, ses)
		}()
	}
}

// newSession derives the session keys a handshake agreed on.
func (d *daemon) newSession(r *auth.Result, client bool, now time.Time) *seal.Session {
	k, err := seal.Derive(d.key, r.Nc[:], r.Ns[:], client)
	if err != nil {
		panic(err) // only for absurd lengths
	}
	rekey := d.cfg.Rekey
	if !client {
		// The client decides when to rekey, with an interval we do not
		// know: hold its sessions to the longest it may choose.
		rekey = seal.MaxRekey
	}
	return seal.NewSession(seal.Cipher(r.Cipher), k, rekey, now)
}

// checkCipher decides whether this server takes the AEAD the client
// proposed: any known one with --cipher auto (so that two hosts that
// would pick differently still agree), else only the one configured.
func (d *daemon) checkCipher(r *auth.Result) error {
	c := seal.Cipher(r.Cipher)
	if c != seal.AESGCM && c != seal.ChaCha20Poly1305 {
		return fmt.Errorf("%w: unknown cipher %d", auth.ErrCipher, r.Cipher)
	}
	if d.cfg.Cipher != seal.Auto && c != d.cfg.Cipher {
		return fmt.Errorf("%w: the peer seals with %s, this side requires %s", auth.ErrCipher, c, d.cfg.Cipher)
	}
	return nil
}

// authOne runs the server's side of a handshake; the session is for a
// stream that carries frames itself (IP over TCP), accept installs it
// elsewhere otherwise.
func (d *daemon) authOne(c net.Conn, srv *auth.Server, lim *auth.Limiter, from netip.AddrPort, accept func(*auth.Result) error) (*seal.Session, bool) {
	var ses *seal.Session
	inner := accept
	accept = func(r *auth.Result) error {
		if err := d.checkCipher(r); err != nil {
			return err
		}
		ses = d.newStreamSession(r, false) // used only by IP over TCP
		if inner != nil {
			return inner(r)
		}
		return nil
	}
	_, err := srv.Handshake(c, accept)
	if err != nil {
		d.stats.AuthFail.Add(1)
		if ok, suppressed := lim.Fail(from.Addr(), time.Now()); ok {
			if suppressed > 0 {
				d.log.Printf("authentication from %s failed: %v (and %d more failures not logged)", from, err, suppressed)
			} else {
				d.log.Printf("authentication from %s failed: %v", from, err)
			}
		}
		return nil, false
	}
	c.SetDeadline(time.Time{})
	d.stats.AuthOK.Add(1)
	return ses, true
}

// dialer authenticates this side to servers, from the UDP socket's port,
// one attempt per server at a time and not more often than once a second.
type dialer struct {
	d     *daemon
	port  int
	mu    sync.Mutex
	state map[netip.AddrPort]*dialState
	// after is called with a fresh entry, e.g. to send a packet that was
	// held back while the handshake ran.
	after func(peer netip.AddrPort, held []byte)
}

type dialState struct {
	running bool
	last    time.Time
	held    []byte
}

func (d *daemon) newDialer(port int, after func(netip.AddrPort, []byte)) *dialer {
	d.dial = &dialer{d: d, port: port, state: make(map[netip.AddrPort]*dialState), after: after}
	return d.dial
}

// request starts a handshake with peer unless one is running or failed
// less than a second ago. The latest held packet is sent after success.
func (a *dialer) request(peer netip.AddrPort, held []byte) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s := a.state[peer]
	if s == nil {
		if len(a.state) > 1024 {
			a.state = make(map[netip.AddrPort]*dialState) // bound the table
		}
		s = &dialState{}
		a.state[peer] = s
	}
	if held != nil {
		s.held = append(s.held[:0], held...)
	}
	if s.running || time.Since(s.last) < time.Second {
		return
	}
	s.running = true
	s.last = time.Now()
	go a.run(peer, s)
}

// silenceLimit is how long a server may stay silent while we send before
// we authenticate again: it may have restarted and forgotten us, and it
// cannot tell us (it answers nothing to peers it does not know).
func (a *dialer) silenceLimit() time.Duration {
	return min(10*time.Second, a.d.store.TTL()/2)
}

// checkSilence re-authenticates with a server that stopped answering; the
// packet about to be sent is sent again after the handshake.
func (a *dialer) checkSilence(ent *store.Entry, pkt []byte, now int64) {
	// Keepalives sent further apart than the limit still count as one run
	// of unanswered sending.
	quiet := max(a.silenceLimit(), 2*a.d.cfg.Keepalive)
	if ent.Sent(now, quiet) > a.silenceLimit() {
		ent.RestartSilence(now)
		a.d.log.Printf("no answer from %s for %s: authenticating again", ent.Peer, a.silenceLimit())
		a.request(ent.Peer, pkt)
	}
}

func (a *dialer) run(peer netip.AddrPort, s *dialState) {
	err := a.handshake(peer)
	a.mu.Lock()
	s.running = false
	held := s.held
	s.held = nil
	a.mu.Unlock()
	d := a.d
	if err != nil {
		d.stats.AuthFail.Add(1)
		d.log.Printf("authentication with %s failed: %v", peer, err)
		return
	}
	d.stats.AuthOK.Add(1)
	if a.after != nil {
		a.after(peer, held)
	}
}

func (a *dialer) handshake(peer netip.AddrPort) error {
	d := a.d
	ctx, cancel := context.WithTimeout(d.ctx, auth.DefaultTimeout)
	defer cancel()
	dl := net.Dialer{Control: socketControl(d.cfg.BindTo, true)}
	if a.port != 0 {
		dl.LocalAddr = &net.TCPAddr{Port: a.port}
	}
	c, err := dl.DialContext(ctx, "tcp", peer.String())
	if err != nil {
		return err
	}
	defer c.Close()
	var prev uint32
	old := d.store.ByPeer(peer)
	if old != nil && old.Session() != nil {
		prev = old.Session().SendID() // the server's index for it
	}
	r, err := auth.Client(c, d.key, auth.DefaultTimeout, prev, byte(d.cfg.Cipher.Resolve()))
	if err != nil {
		return err
	}
	now := time.Now()
	ent, err := d.store.Add(peer, now)
	if err != nil {
		return err
	}
	if err := d.store.Install(ent, d.newSession(r, true, now), false); err != nil {
		return err
	}
	ent.Heard()
	if old == ent && prev != 0 {
		d.stats.Rekeys.Add(1)
	} else {
		d.log.Printf("authenticated with %s (it sees us as %s)", peer, r.Peer)
	}
	// Let the server close first (see authOne), but do not wait long.
	c.SetReadDeadline(time.Now().Add(time.Second))
	io.Copy(io.Discard, io.LimitReader(c, 1))
	return nil
}
