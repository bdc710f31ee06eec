package e2e

import (
	"net"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/ruleset"
)

// `ct mark set` at ingress marks the connection (through sfunnel's nftables
// table); `ct mark` at egress then matches the replies of that connection
// and of no other.
func TestCtMarkMatchesReplies(t *testing.T) {
	tp := newTopo(t)
	tp.commit(t, tp.s, &ruleset.Ruleset{NextHandle: 4, Interfaces: []*ruleset.Interface{
		iface("s0",
			rules(t, 1, "udp dport 4739 ct mark set 1 counter"),
			rules(t, 2, "ct mark 1 counter actions accept", "udp counter")),
	}})
	echo := func(port int) {
		srv, err := listenUDP(tp, port)
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		go func() {
			buf := make([]byte, 100)
			for {
				n, from, err := srv.ReadFromUDP(buf)
				if err != nil {
					return
				}
				srv.WriteToUDP(buf[:n], from)
			}
		}()
		var cl *net.UDPConn
		must(t, tp.c.Do(func() (err error) {
			cl, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: vip.AsSlice(), Port: port})
			return err
		}))
		defer cl.Close()
		for i := 0; i < 5; i++ {
			cl.Write([]byte("ping"))
			cl.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := cl.Read(make([]byte, 100)); err != nil {
				t.Fatalf("port %d, reply %d: %v", port, i, err)
			}
		}
	}
	echo(4739)
	echo(4740)
	c := tp.counters(t, tp.s)
	if c[1].Packets != 5 {
		t.Errorf("ct mark set counted %d packets, want 5", c[1].Packets)
	}
	if c[2].Packets != 5 {
		t.Errorf("ct mark 1 matched %d replies, want the 5 of the marked connection", c[2].Packets)
	}
	if c[3].Packets != 5 {
		t.Errorf("the other connection's replies: %d counted by the next rule, want 5", c[3].Packets)
	}
}

func listenUDP(tp *topo, port int) (*net.UDPConn, error) {
	var srv *net.UDPConn
	err := tp.s.Do(func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: serverIP.AsSlice(), Port: port})
		return err
	})
	return srv, err
}
