package tunnel

import (
	"net/netip"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/codec"
	"github.com/sfunnel/sfunnel/tunnel/tun"
	"github.com/sfunnel/sfunnel/tunnel/udpsock"
)

// udpRoute decides, for one packet read from the TUN, what to send and to
// whom; false drops the packet (the route counts why).
type udpRoute func(pkt []byte, now int64) (payload []byte, to netip.AddrPort, ok bool)

// tunToUDP moves packets from the TUN to the UDP socket: a batch of reads
// (or offloaded super-packets cut into segments), then one sendmmsg.
func (d *daemon) tunToUDP(sock *udpsock.Conn, route udpRoute) error {
	r := d.dev.NewReader(d.cfg.Batch, 0, d.cfg.MTU)
	out := udpsock.NewBatch(r.MaxPackets(), 0, 0)
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
			if p, to, ok := route(pkt, now); ok {
				out.Out[m], out.Peers[m] = p, to
				m++
			}
		}
		if m > 0 {
			if err := sock.WriteBatch(out, m); err != nil {
				return err
			}
			d.stats.NetTx.Add(uint64(m))
		}
	}
}

// countReaderDrops moves the reader's count of super-packets it could not
// segment into the daemon's drop counters.
func (d *daemon) countReaderDrops(r *tun.Reader) {
	if r.Dropped > 0 {
		d.stats.Drops[codec.DropMalformed].Add(r.Dropped)
		r.Dropped = 0
	}
}
