package tunnel

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/codec"
	"github.com/sfunnel/sfunnel/tunnel/seal"
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
	one    *oneSender
}

func (d *daemon) startTCPOverUDP() error {
	sock, err := udpsock.Listen(udpsock.Options{Port: d.cfg.ListenPort, BindToInterface: d.cfg.BindTo, Offload: d.cfg.Offload})
	if err != nil {
		return err
	}
	d.onClose(sock)
	e := &tcpUDP{d: d, sock: sock, client: d.cfg.Mode == "client", port: uint16(d.cfg.EndpointPort), one: d.newOneSender(sock)}
	d.keepalive = e.one
	switch {
	case d.key == nil:
		// udp-encap-tun's behaviour: whoever sends is a peer.
		d.log.Printf("warning: no --key: packets are accepted from any sender and sent in the clear (use sfunnel tunnel genkey)")
	case e.client:
		e.dial = d.newDialer(int(sock.Port()), e.sendHeld)
	default:
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
	e.one.send(e.d.store.ByPeer(peer), peer, seal.TypeData, seg)
}

// route strips a packet from the TUN down to its TCP segment and finds
// the peer it goes to.
func (e *tcpUDP) route(pkt []byte, now int64) ([]byte, netip.AddrPort, *seal.Session, bool) {
	d := e.d
	seg, _, dst, why := codec.StripIP(pkt)
	if why != codec.DropNone {
		d.stats.drop(why)
		return nil, netip.AddrPort{}, nil, false
	}
	var ent *store.Entry
	var ses *seal.Session
	if e.client {
		peer := netip.AddrPortFrom(dst, e.port)
		ent = d.store.ByPeer(peer)
		if d.key == nil {
			if ent == nil {
				var err error
				if ent, err = d.store.Add(peer, time.Unix(0, now)); err != nil {
					d.stats.drop(codec.DropNoPeer)
					return nil, peer, nil, false
				}
			}
		} else {
			if ent != nil {
				ses = ent.Session()
			}
			if ent == nil || ses == nil || ses.Expired(now) {
				e.dial.request(peer, seg)
				d.stats.drop(codec.DropNoPeer)
				return nil, peer, nil, false
			}
			e.dial.checkSilence(ent, seg, now)
			if ses.NeedsRekey(now) {
				e.dial.request(peer, nil)
			}
		}
	} else {
		if ent = d.store.ByAddr(dst); ent == nil {
			d.stats.drop(codec.DropNoPeer)
			return nil, netip.AddrPort{}, nil, false
		}
		if ses = ent.Session(); d.key != nil && (ses == nil || ses.Expired(now)) {
			d.stats.drop(codec.DropStale)
			return nil, netip.AddrPort{}, nil, false
		}
	}
	ent.Touch(now)
	ent.TxPackets.Add(1)
	return seg, ent.Endpoint(), ses, true
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
			for o := 0; o < len(p) || o == 0; o += seg {
				d.stats.NetRx.Add(1)
				n := min(seg, len(p)-o)
				buf, off := in.Bufs[i], in.Off
				var ent *store.Entry
				if d.key != nil {
					// Opened in place, or for a coalesced run (UDP GRO)
					// into scratch: either way with headroom in front.
					var dst []byte
					if n != len(p) {
						dst = scratch[codec.Headroom:]
					}
					op, ok := d.openUDP(e.one, p[o:o+n], dst, peer, now)
					if !ok || !op.data {
						continue
					}
					ent, n = op.ent, len(op.pt)
					if dst != nil {
						buf, off = scratch, codec.Headroom
					} else {
						off += seal.HeaderLen
					}
				} else {
					if n == 0 {
						d.stats.KeepaliveRx.Add(1) // a plain keepalive
						continue
					}
					if ent = d.store.ByPeer(peer); ent == nil {
						var err error
						if e.client {
							// Only from servers we send to.
							d.stats.drop(codec.DropUnauth)
							continue
						}
						if ent, err = d.store.Add(peer, time.Unix(0, now)); err != nil {
							d.stats.drop(codec.DropNoPeer)
							continue
						}
					}
					if n != len(p) {
						// A coalesced run (UDP GRO): give each datagram headroom.
						copy(scratch[codec.Headroom:], p[o:o+n])
						buf, off = scratch, codec.Headroom
					}
				}
				src := ent.Peer.Addr()
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
