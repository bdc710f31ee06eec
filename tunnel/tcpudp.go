package tunnel

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/codec"
	"github.com/sfunnel/sfunnel/tunnel/store"
	"github.com/sfunnel/sfunnel/tunnel/udpsock"
)

// maxPacket is the largest IP packet the TUN hands out or takes.
const maxPacket = 65535

// tcpUDP carries TCP segments without their IP header in UDP datagrams
// (udp-encap-tun's format). Server: peers authenticate over TCP on the
// listen port and get a tunnel address each. Client (--endpoint-port):
// a packet's destination address is the server, authenticated on first use.
type tcpUDP struct {
	d      *daemon
	sock   *udpsock.Conn
	client bool
	port   uint16 // endpoint port (client)
	dial   *dialer
}

func (d *daemon) startTCPOverUDP() error {
	sock, err := udpsock.Listen(udpsock.Options{Port: d.cfg.ListenPort, BindToInterface: d.cfg.BindTo, Offload: d.cfg.Offload})
	if err != nil {
		return err
	}
	d.onClose(sock)
	e := &tcpUDP{d: d, sock: sock, client: d.cfg.Mode == "client", port: uint16(d.cfg.EndpointPort)}
	if e.client {
		e.dial = d.newDialer(int(sock.Port()), e.sendHeld)
	} else {
		ln, err := d.listenTCP()
		if err != nil {
			return err
		}
		d.serveAuth(ln)
	}
	d.goLoop("tun→udp", func() error { return d.tunToUDP(sock, e.route) })
	d.goLoop("udp→tun", e.netToTun)
	return nil
}

// sendHeld sends the segment that triggered a handshake once it succeeded,
// so the first SYN does not wait for a retransmission.
func (e *tcpUDP) sendHeld(peer netip.AddrPort, seg []byte) {
	if len(seg) == 0 {
		return
	}
	if err := e.sock.WriteTo(seg, peer); err == nil {
		e.d.stats.NetTx.Add(1)
	}
}

// route strips a packet from the TUN down to its TCP segment and finds
// the peer it goes to.
func (e *tcpUDP) route(pkt []byte, now int64) ([]byte, netip.AddrPort, bool) {
	d := e.d
	seg, _, dst, why := codec.StripIP(pkt)
	if why != codec.DropNone {
		d.stats.drop(why)
		return nil, netip.AddrPort{}, false
	}
	var ent *store.Entry
	var peer netip.AddrPort
	if e.client {
		peer = netip.AddrPortFrom(dst, e.port)
		if ent = d.store.ByPeer(peer); ent == nil {
			e.dial.request(peer, seg)
			d.stats.drop(codec.DropNoPeer)
			return nil, peer, false
		}
		e.dial.checkSilence(ent, seg, now)
	} else {
		if ent = d.store.ByAddr(dst); ent == nil {
			d.stats.drop(codec.DropNoPeer)
			return nil, peer, false
		}
		peer = ent.Peer
	}
	ent.Touch(now)
	ent.TxPackets.Add(1)
	return seg, peer, true
}

func (e *tcpUDP) netToTun() error {
	d := e.d
	in := udpsock.NewBatch(d.cfg.Batch, codec.Headroom+maxPacket, codec.Headroom)
	scratch := make([]byte, codec.Headroom+maxPacket)
	w := d.dev.NewWriter()
	wrap := codec.WrapTCP
	if d.dev.Offload() {
		wrap = codec.WrapTCPPartial
	}
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
			ent := d.store.ByPeer(peer)
			for o := 0; o < len(p) || o == 0; o += seg {
				d.stats.NetRx.Add(1)
				if ent == nil {
					d.stats.drop(codec.DropUnauth)
					continue
				}
				n := min(seg, len(p)-o)
				buf, off := in.Bufs[i], in.Off
				if n != len(p) {
					// A coalesced run (UDP GRO): give each datagram headroom.
					copy(scratch[codec.Headroom:], p[o:o+n])
					buf, off = scratch, codec.Headroom
				}
				src := peer.Addr()
				if !e.client {
					src = ent.Addr
				}
				dst := d.tunAddr(src.Is4())
				if !dst.IsValid() {
					d.stats.drop(codec.DropNoAddress)
					continue
				}
				hl := codec.IPv4HeaderLen
				if !src.Is4() {
					hl = codec.IPv6HeaderLen
				}
				if n+hl > d.cfg.MTU {
					d.stats.drop(codec.DropTooBig)
					continue
				}
				pkt, why := wrap(buf, off, n, src, dst)
				if why != codec.DropNone {
					d.stats.drop(why)
					continue
				}
				if err := w.Write(pkt, d.dev.Offload()); err != nil {
					if errors.Is(err, os.ErrClosed) {
						return err
					}
					d.stats.drop(codec.DropMalformed) // the kernel refused it
					continue
				}
				d.stats.TunTx.Add(1)
				ent.Touch(now)
				ent.Heard()
				ent.RxPackets.Add(1)
			}
		}
		if err := w.Flush(); err != nil {
			if errors.Is(err, os.ErrClosed) {
				return err
			}
			d.stats.drop(codec.DropMalformed)
		}
	}
}
