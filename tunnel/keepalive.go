package tunnel

import (
	"time"

	"github.com/sfunnel/sfunnel/tunnel/seal"
	"github.com/sfunnel/sfunnel/tunnel/store"
)

// keepaliveLoop sends a keepalive to every peer that carried no traffic
// for --keepalive, so that NAT and firewall mappings (refreshed by packets
// either way) outlive idle periods. With a key the keepalive is a sealed
// record the peer answers (and both sides count it as use of the entry:
// a tunnel with keepalives stays up while both peers live); a client that
// hears nothing back for a while authenticates again, so a dead or
// restarted peer is noticed even when idle. Without a key it is an empty datagram (IP over UDP clients only:
// the plain format has no way to ask for an answer).
func (d *daemon) keepaliveLoop() error {
	k := d.cfg.Keepalive
	tick := min(max(k/4, 50*time.Millisecond), time.Second)
	t := time.NewTicker(tick)
	defer t.Stop()
	var lastPlain int64
	sent := map[*store.Entry]int64{} // when the last keepalive went to an entry
	for {
		select {
		case <-d.ctx.Done():
			return nil
		case tm := <-t.C:
			if d.keepalive == nil {
				continue // IP over TCP: TCP keepalives on the stream
			}
			now := tm.UnixNano()
			if d.key == nil {
				if d.cfg.Mode == "server" || now-lastPlain < int64(k) {
					continue
				}
				lastPlain = now
				if d.cfg.Carry == "ip" {
					if d.keepalive.send(nil, d.cfg.Remote, 0, nil) {
						d.stats.KeepaliveTx.Add(1)
					}
					continue
				}
				for _, ent := range d.store.Entries() {
					if ent.Idle(now) >= k && d.keepalive.send(nil, ent.Peer, 0, nil) {
						d.stats.KeepaliveTx.Add(1)
					}
				}
				continue
			}
			ents := d.store.Entries()
			if len(sent) > 2*len(ents) {
				clear(sent) // forget expired entries now and then
			}
			for _, ent := range ents {
				if ent.Idle(now) < k || now-sent[ent] < int64(k) || ent.Session() == nil {
					continue
				}
				sent[ent] = now
				if d.keepalive.send(ent, ent.Peer, seal.TypeKeepalive, nil) {
					d.stats.KeepaliveTx.Add(1)
				}
				// A server we keep sending to that stays silent may have
				// restarted and forgotten us: authenticate again.
				if d.dial != nil && (d.cfg.Mode == "client" || ent.Peer == d.cfg.Remote) {
					// The side that keeps the tunnel alive does not let
					// its server's entry expire: it keeps asking.
					ent.Touch(now)
					d.dial.checkSilence(ent, nil, now)
				}
			}
		}
	}
}
