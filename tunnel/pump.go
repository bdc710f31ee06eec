package tunnel

import (
	"net/netip"
	"sync"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/codec"
	"github.com/sfunnel/sfunnel/tunnel/seal"
	"github.com/sfunnel/sfunnel/tunnel/store"
	"github.com/sfunnel/sfunnel/tunnel/tun"
	"github.com/sfunnel/sfunnel/tunnel/udpsock"
)

// udpRoute decides, for one packet read from the TUN, what to send and to
// whom, and under which session (nil: plain, without a key); false drops
// the packet (the route counts why).
type udpRoute func(pkt []byte, now int64) (payload []byte, to netip.AddrPort, ses *seal.Session, ok bool)

// tunToUDP moves packets from the TUN to the UDP socket: a batch of reads
// (or offloaded super-packets cut into segments), each sealed into a
// buffer of its own when there is a key, then one sendmmsg.
func (d *daemon) tunToUDP(sock *udpsock.Conn, route udpRoute) error {
	r := d.dev.NewReader(d.cfg.Batch, 0, d.cfg.MTU)
	out := udpsock.NewBatch(r.MaxPackets(), 0, 0)
	var sealBufs [][]byte
	if d.key != nil {
		sealBufs = make([][]byte, r.MaxPackets())
		for i := range sealBufs {
			sealBufs[i] = make([]byte, d.cfg.MTU+seal.Overhead)
		}
	}
	for {
		pkts, err := r.Read()
		if err != nil {
			return err
		}
		d.countReaderDrops(r)
		now := time.Now().UnixNano()
		m := 0
		for _, pkt := range pkts {
			d.stats.TunRx.Add(1)
			p, to, ses, ok := route(pkt, now)
			if !ok {
				continue
			}
			if ses != nil {
				if len(p)+seal.Overhead > len(sealBufs[m]) {
					d.stats.drop(codec.DropTooBig)
					continue
				}
				if p, ok = ses.Seal(sealBufs[m], seal.TypeData, p); !ok {
					d.stats.drop(codec.DropStale)
					continue
				}
			}
			out.Out[m], out.Peers[m] = p, to
			m++
		}
		if m > 0 {
			if err := sock.WriteBatch(out, m); err != nil {
				return err
			}
			d.stats.NetTx.Add(uint64(m))
		}
	}
}

// oneSender sends single datagrams outside the batches (held packets,
// keepalives), sealing them when the peer has a session.
type oneSender struct {
	d    *daemon
	sock *udpsock.Conn
	mu   sync.Mutex
	buf  []byte
}

func (d *daemon) newOneSender(sock *udpsock.Conn) *oneSender {
	return &oneSender{d: d, sock: sock, buf: make([]byte, maxPacket+seal.Overhead)}
}

// send sends payload to ent (sealed as typ) or, without a key, to peer.
func (o *oneSender) send(ent *store.Entry, peer netip.AddrPort, typ byte, payload []byte) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if ent != nil {
		peer = ent.Endpoint()
		if ses := ent.Session(); ses != nil {
			if len(payload)+seal.Overhead > len(o.buf) {
				return false
			}
			rec, ok := ses.Seal(o.buf, typ, payload)
			if !ok {
				return false
			}
			payload = rec
		}
	}
	if o.sock.WriteTo(payload, peer) != nil {
		return false
	}
	o.d.stats.NetTx.Add(1)
	return true
}

// opened is the verdict on one received datagram with a key.
type opened struct {
	ent  *store.Entry
	pt   []byte
	data bool // a data record (else a keepalive, handled)
}

// openUDP authenticates a sealed datagram from peer: it finds the session
// by the record's receiver index (not by the sender's address), opens it
// into dst (nil: in place), moves the peer's endpoint when the newest
// record comes from a new address, and answers keepalives.
func (d *daemon) openUDP(one *oneSender, rec []byte, dst []byte, peer netip.AddrPort, now int64) (opened, bool) {
	id, ok := seal.Receiver(rec)
	if !ok {
		d.stats.drop(codec.DropUnauth) // not even shaped like a record
		return opened{}, false
	}
	ent := d.store.BySession(id)
	var ses *seal.Session
	if ent != nil {
		ses = ent.SessionFor(id)
	}
	if ses == nil {
		d.stats.drop(codec.DropNoSession)
		return opened{}, false
	}
	typ, pt, newest, why := ses.Open(dst, rec, now)
	if why != seal.OK {
		d.stats.dropSeal(why)
		return opened{}, false
	}
	ent.Confirm(ses)
	ent.Heard()
	ent.Touch(now)
	if newest && ent.SetEndpoint(peer) {
		d.stats.Roamed.Add(1)
		d.log.Printf("peer %s now at %s", ent.Peer, peer)
	}
	switch typ {
	case seal.TypeKeepalive:
		d.stats.KeepaliveRx.Add(1)
		if one.send(ent, netip.AddrPort{}, seal.TypeKeepaliveReply, nil) {
			d.stats.KeepaliveTx.Add(1)
		}
		return opened{ent: ent}, true
	case seal.TypeKeepaliveReply:
		d.stats.KeepaliveRx.Add(1)
		return opened{ent: ent}, true
	}
	return opened{ent: ent, pt: pt, data: true}, true
}

// countReaderDrops moves the reader's count of super-packets it could not
// segment into the daemon's drop counters.
func (d *daemon) countReaderDrops(r *tun.Reader) {
	if r.Dropped > 0 {
		d.stats.Drops[codec.DropMalformed].Add(r.Dropped)
		r.Dropped = 0
	}
}
