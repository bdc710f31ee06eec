package tunnel

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/auth"
	"github.com/sfunnel/sfunnel/tunnel/codec"
	"github.com/sfunnel/sfunnel/tunnel/seal"
	"github.com/sfunnel/sfunnel/tunnel/store"
	"github.com/sfunnel/sfunnel/tunnel/tun"
	"github.com/sfunnel/sfunnel/tunnel/udpsock"
)

// ipCarry moves whole IP packets between this host and one other, over UDP
// datagrams or over TCP streams of length-prefixed frames (TunConnector's
// role). With --key, peers authenticate first: over TCP on the listen port
// before their UDP is accepted, or at the start of each TCP stream.
type ipCarry struct {
	d          *daemon
	server     bool
	client     bool
	maxFrame   int
	remote     netip.AddrPort
	sock       *udpsock.Conn
	dial       *dialer
	lastPeer   atomic.Pointer[netip.AddrPort] // UDP server role without a key: who spoke last
	lastEnt    atomic.Pointer[store.Entry]    // UDP server role with a key: who spoke last
	one        *oneSender
	clientConn atomic.Pointer[streamConn]
	serverConn atomic.Pointer[streamConn]
}

// streamConn is one TCP stream carrying frames.
type streamConn struct {
	c      net.Conn
	peer   string
	ses    *seal.Session // with a key
	broken atomic.Bool
}

// streamRekey is the session lifetime on a TCP stream: records on a
// stream are never reordered and a stream does not roam, so only the
// record counter wears a stream's keys out (the stream is then closed
// and the client reconnects with a new handshake).
const streamRekey = time.Duration(1 << 60) // ~36 years; 2× must not overflow

func (d *daemon) startIP() error {
	e := &ipCarry{d: d, server: d.cfg.Mode != "client", client: d.cfg.Mode != "server", maxFrame: d.cfg.MTU, remote: d.cfg.Remote}
	if d.key == nil {
		d.log.Printf("warning: no --key: packets are accepted from any sender (use sfunnel tunnel genkey)")
	}
	if d.cfg.Transport == "udp" {
		return e.startUDP()
	}
	return e.startTCP()
}

func (e *ipCarry) startUDP() error {
	d := e.d
	sock, err := udpsock.Listen(udpsock.Options{Port: d.cfg.ListenPort, BindToInterface: d.cfg.BindTo, Offload: d.cfg.Offload})
	if err != nil {
		return err
	}
	d.onClose(sock)
	e.sock = sock
	e.one = d.newOneSender(sock)
	d.keepalive = e.one
	if e.server && d.key != nil {
		ln, err := d.listenTCP()
		if err != nil {
			return err
		}
		d.serveAuth(ln)
	}
	if e.client && d.key != nil {
		e.dial = d.newDialer(int(sock.Port()), func(peer netip.AddrPort, pkt []byte) {
			if len(pkt) > 0 {
				e.one.send(d.store.ByPeer(peer), peer, seal.TypeData, pkt)
			}
		})
		e.dial.request(e.remote, nil)
	}
	d.goLoop("tun→udp", func() error { return d.tunToUDP(sock, e.routeUDP) })
	d.goLoop("udp→tun", e.udpToTun)
	return nil
}

// udpPeer picks where a packet from the TUN goes: the remote when this
// side is a client (once authenticated, with a key), else the server-role
// peer that was active last.
func (e *ipCarry) udpPeer(pkt []byte, now int64) (netip.AddrPort, *store.Entry, bool) {
	d := e.d
	if e.client {
		if d.key == nil {
			return e.remote, nil, true
		}
		if ent := d.store.ByPeer(e.remote); ent != nil {
			if ses := ent.Session(); ses != nil && !ses.Expired(now) {
				e.dial.checkSilence(ent, pkt, now)
				if ses.NeedsRekey(now) {
					e.dial.request(e.remote, nil)
				}
				return ent.Endpoint(), ent, true
			}
		}
		e.dial.request(e.remote, pkt)
	}
	if e.server {
		if d.key == nil {
			if p := e.lastPeer.Load(); p != nil {
				return *p, nil, true
			}
		} else if ent := e.lastEnt.Load(); ent != nil && d.store.ByPeer(ent.Peer) == ent {
			if ses := ent.Session(); ses != nil && !ses.Expired(now) {
				return ent.Endpoint(), ent, true
			}
		}
	}
	return netip.AddrPort{}, nil, false
}

// routeUDP checks a packet from the TUN and picks its peer.
func (e *ipCarry) routeUDP(pkt []byte, now int64) ([]byte, netip.AddrPort, *seal.Session, bool) {
	d := e.d
	if codec.Version(pkt) == 0 {
		d.stats.drop(codec.DropMalformed)
		return nil, netip.AddrPort{}, nil, false
	}
	peer, ent, ok := e.udpPeer(pkt, now)
	if !ok {
		d.stats.drop(codec.DropNoPeer)
		return nil, peer, nil, false
	}
	var ses *seal.Session
	if ent != nil {
		ent.Touch(now)
		ent.TxPackets.Add(1)
		ses = ent.Session()
	}
	return pkt, peer, ses, true
}

func (e *ipCarry) udpToTun() error {
	d := e.d
	in := udpsock.NewBatch(d.cfg.Batch, maxPacket, 0)
	w := d.dev.NewWriter()
	for {
		got, err := e.sock.ReadBatch(in)
		if err != nil {
			return fmt.Errorf("receive: %w", err)
		}
		now := time.Now().UnixNano()
		for i := 0; i < got; i++ {
			peer := in.Peers[i]
			p := in.Payload(i)
			seg := in.Step(i)
			ok := true
			if d.key == nil {
				if !e.server && peer != e.remote {
					ok = false
				}
				if ok && e.server && peer != e.remote {
					if lp := e.lastPeer.Load(); lp == nil || *lp != peer {
						np := peer // a copy: taking peer's address would allocate every time
						e.lastPeer.Store(&np)
					}
				}
			}
			for o := 0; o < len(p) || o == 0; o += seg {
				d.stats.NetRx.Add(1)
				if !ok {
					d.stats.drop(codec.DropUnauth)
					continue
				}
				pkt := p[o:min(o+seg, len(p))]
				if len(pkt) == 0 && d.key == nil {
					d.stats.KeepaliveRx.Add(1) // a plain keepalive
					continue
				}
				if d.key != nil {
					op, ok := d.openUDP(e.one, pkt, nil, peer, now)
					if !ok {
						continue
					}
					// Keepalives count: the peer that kept the tunnel up
					// is the one to send to.
					if e.server && op.ent.Peer != e.remote && e.lastEnt.Load() != op.ent {
						e.lastEnt.Store(op.ent)
					}
					if !op.data {
						continue
					}
					op.ent.RxPackets.Add(1)
					pkt = op.pt
				}
				if len(pkt) > d.cfg.MTU {
					d.stats.drop(codec.DropTooBig)
					continue
				}
				if codec.Version(pkt) == 0 {
					d.stats.drop(codec.DropMalformed)
					continue
				}
				if err := w.Write(pkt, false); err != nil {
					d.stats.drop(codec.DropMalformed)
					continue
				}
				d.stats.TunTx.Add(1)
			}
		}
		if err := w.Flush(); err != nil {
			d.stats.drop(codec.DropMalformed)
		}
	}
}

func (e *ipCarry) startTCP() error {
	d := e.d
	d.streams = func() []string {
		var out []string
		if sc := e.clientConn.Load(); sc != nil {
			out = append(out, "to "+sc.peer)
		}
		if sc := e.serverConn.Load(); sc != nil {
			out = append(out, "from "+sc.peer)
		}
		return out
	}
	d.onClose(closerFunc(func() error {
		for _, sc := range []*streamConn{e.clientConn.Load(), e.serverConn.Load()} {
			if sc != nil {
				sc.c.Close()
			}
		}
		return nil
	}))
	if e.server {
		ln, err := d.listenTCP()
		if err != nil {
			return err
		}
		d.goLoop("accept", func() error { return d.acceptLoop(ln, nil, e.serveStream) })
	}
	if e.client {
		d.goLoop("connect", e.connectLoop)
	}
	d.goLoop("tun→tcp", e.tunToTCP)
	return nil
}

// serveStream carries frames on an accepted (and authenticated) stream.
func (e *ipCarry) serveStream(c net.Conn, ses *seal.Session) {
	d := e.d
	d.setKeepalive(c)
	sc := &streamConn{c: c, peer: c.RemoteAddr().String(), ses: ses}
	if old := e.serverConn.Swap(sc); old != nil {
		old.c.Close() // one peer at a time: the newest stream wins
	}
	d.stats.Connects.Add(1)
	d.log.Printf("stream from %s up", sc.peer)
	err := e.readFrames(sc)
	e.serverConn.CompareAndSwap(sc, nil)
	c.Close()
	d.log.Printf("stream from %s down: %v", sc.peer, err)
}

// connectLoop keeps a stream to the remote, reconnecting with exponential
// backoff (100 ms doubling to 10 s, reset by a stream that authenticated).
func (e *ipCarry) connectLoop() error {
	d := e.d
	backoff := 100 * time.Millisecond
	for d.ctx.Err() == nil {
		dl := net.Dialer{Timeout: 5 * time.Second, Control: socketControl(d.cfg.BindTo, true)}
		if d.cfg.ListenPort != 0 && !e.server {
			dl.LocalAddr = &net.TCPAddr{Port: d.cfg.ListenPort}
		}
		c, err := dl.DialContext(d.ctx, "tcp", e.remote.String())
		var ses *seal.Session
		if err == nil && d.key != nil {
			var r *auth.Result
			if r, err = auth.Client(c, d.key, auth.DefaultTimeout, 0, byte(d.cfg.Cipher.Resolve())); err != nil {
				d.stats.AuthFail.Add(1)
				c.Close()
			} else {
				d.stats.AuthOK.Add(1)
				// The server's result byte was the last handshake message.
				ses = d.newStreamSession(r, true)
			}
		}
		if err != nil {
			if d.ctx.Err() != nil {
				return nil
			}
			d.log.Printf("connect to %s: %v (retry in %s)", e.remote, err, backoff)
			select {
			case <-d.ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			backoff = min(backoff*2, 10*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
		d.setKeepalive(c)
		sc := &streamConn{c: c, peer: e.remote.String(), ses: ses}
		e.clientConn.Store(sc)
		d.stats.Connects.Add(1)
		d.log.Printf("stream to %s up", sc.peer)
		err = e.readFrames(sc)
		e.clientConn.CompareAndSwap(sc, nil)
		c.Close()
		if d.ctx.Err() != nil {
			return nil
		}
		d.log.Printf("stream to %s down: %v", sc.peer, err)
	}
	return nil
}

// readFrames writes every frame of the stream into the TUN until the
// stream ends or breaks the framing (then it is closed: it cannot resync).
func (e *ipCarry) readFrames(sc *streamConn) error {
	d := e.d
	max := e.maxFrame
	if sc.ses != nil {
		max = maxSealedFrame
	}
	fr := codec.NewFrameReader(sc.c, max)
	w := d.dev.NewWriter()
	defer w.Flush()
	for {
		if !fr.Buffered() {
			// About to wait on the socket: hand over what was merged.
			w.Flush()
		}
		pkt, err := fr.Next()
		if err != nil {
			if errors.Is(err, codec.ErrBadFrame) {
				d.stats.drop(codec.DropTooBig)
			}
			if errors.Is(err, io.EOF) {
				return io.EOF
			}
			return err
		}
		d.stats.NetRx.Add(1)
		if sc.ses == nil {
			e.toTun(w, pkt)
			continue
		}
		typ, pt, _, why := sc.ses.Open(nil, pkt, time.Now().UnixNano())
		if why != seal.OK {
			// A stream cannot lose or reorder records: anything that
			// does not open is an attack on the stream.
			d.stats.dropSeal(why)
			return fmt.Errorf("sealed frame refused (%s)", dropName(why))
		}
		if typ != seal.TypeData {
			d.stats.KeepaliveRx.Add(1)
			continue
		}
		// One record, one or more whole packets, each delimited by the
		// length in its own header.
		for len(pt) > 0 {
			n := codec.PacketLen(pt)
			if n == 0 || n > len(pt) {
				d.stats.drop(codec.DropMalformed)
				break
			}
			e.toTun(w, pt[:n])
			pt = pt[n:]
		}
	}
}

// toTun writes one packet received over a stream into the TUN.
func (e *ipCarry) toTun(w *tun.Writer, pkt []byte) {
	d := e.d
	if len(pkt) > e.maxFrame {
		d.stats.drop(codec.DropTooBig)
		return
	}
	if codec.Version(pkt) == 0 {
		d.stats.drop(codec.DropMalformed)
		return
	}
	if err := w.Write(pkt, false); err != nil {
		d.stats.drop(codec.DropMalformed)
		return
	}
	d.stats.TunTx.Add(1)
}

// maxSealedFrame is the largest sealed frame over TCP: a record holds as
// many whole packets of one batch from the TUN as fit, so the AEAD runs
// over up to 64 KiB at a time instead of once per packet.
const maxSealedFrame = 0xffff

// sealRecord seals the n bytes of packets staged in buf (after room for
// the frame and record headers) in place and returns the frame.
func sealRecord(ses *seal.Session, buf []byte, n int) ([]byte, bool) {
	h := codec.FrameHeaderLen
	rec, ok := ses.Seal(buf[h:], seal.TypeData, buf[h+seal.HeaderLen:h+seal.HeaderLen+n])
	if !ok {
		return nil, false
	}
	codec.PutFrameHeader(buf, len(rec))
	return buf[:h+len(rec)], true
}

func (e *ipCarry) tunToTCP() error {
	d := e.d
	r := d.dev.NewReader(d.cfg.Batch, codec.FrameHeaderLen, d.cfg.MTU)
	frames := make([][]byte, r.MaxPackets())
	// With a key: records being filled, allocated as first needed.
	recs := make([][]byte, r.MaxPackets())
	const room = maxSealedFrame - seal.Overhead
	var wb net.Buffers
	for {
		pkts, err := r.Read()
		if err != nil {
			return err
		}
		d.countReaderDrops(r)
		sc := e.clientConn.Load()
		if sc == nil {
			sc = e.serverConn.Load()
		}
		m, fill := 0, 0
		for i, pkt := range pkts {
			d.stats.TunRx.Add(1)
			if len(pkt) > e.maxFrame || codec.Version(pkt) == 0 {
				d.stats.drop(codec.DropMalformed)
				continue
			}
			if sc == nil {
				d.stats.drop(codec.DropNoPeer)
				continue
			}
			if sc.ses != nil {
				// Stage the packet into the current record; seal the
				// record when the next packet would not fit.
				if fill > 0 && fill+len(pkt) > room {
					ok := e.finishRecord(sc, recs, frames, &m, fill)
					fill = 0
					if !ok {
						break
					}
				}
				if recs[m] == nil {
					recs[m] = make([]byte, codec.FrameHeaderLen+maxSealedFrame)
				}
				copy(recs[m][codec.FrameHeaderLen+seal.HeaderLen+fill:], pkt)
				fill += len(pkt)
				continue
			}
			// The reader left room for the length in front of the packet.
			f := r.WithHeadroom(i)
			codec.PutFrameHeader(f, len(pkt))
			frames[m] = f
			m++
		}
		if fill > 0 {
			e.finishRecord(sc, recs, frames, &m, fill)
		}
		if m == 0 {
			continue
		}
		wb = frames[:m]
		if _, err := wb.WriteTo(sc.c); err != nil {
			// The reader of this stream notices too and reconnects.
			sc.c.Close()
			d.stats.drop(codec.DropNoPeer)
			continue
		}
		d.stats.NetTx.Add(uint64(m))
	}
}

// finishRecord seals the record being filled (recs[*m], fill bytes) into
// frames[*m]; false when the session is worn out (the stream is closed, a
// new one brings new keys).
func (e *ipCarry) finishRecord(sc *streamConn, recs, frames [][]byte, m *int, fill int) bool {
	f, ok := sealRecord(sc.ses, recs[*m], fill)
	if !ok || sc.ses.NeedsRekey(0) {
		sc.c.Close()
	}
	if !ok {
		e.d.stats.drop(codec.DropStale)
		return false
	}
	frames[*m] = f
	*m++
	return true
}

// newStreamSession derives the keys of one TCP stream.
func (d *daemon) newStreamSession(r *auth.Result, client bool) *seal.Session {
	k, err := seal.Derive(d.key, r.Nc[:], r.Ns[:], client)
	if err != nil {
		panic(err)
	}
	return seal.NewSession(seal.Cipher(r.Cipher), k, streamRekey, time.Now())
}

// setKeepalive turns on TCP keepalives at the --keepalive interval: they
// keep NAT mappings of an idle stream and notice a dead peer (three
// unanswered probes), after which the client reconnects.
func (d *daemon) setKeepalive(c net.Conn) {
	tc, ok := c.(*net.TCPConn)
	if !ok || d.cfg.Keepalive <= 0 {
		return
	}
	tc.SetKeepAliveConfig(net.KeepAliveConfig{Enable: true, Idle: d.cfg.Keepalive, Interval: d.cfg.Keepalive, Count: 3})
}

func dropName(why seal.Reject) string {
	switch why {
	case seal.BadTag:
		return codec.DropBadTag.String()
	case seal.Replay:
		return codec.DropReplay.String()
	case seal.Old:
		return codec.DropTooOld.String()
	case seal.Stale:
		return codec.DropStale.String()
	}
	return codec.DropUnauth.String()
}
