package e2e

import (
	"net"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/ruleset"
)

// `ct mark set` at ingress marks the connection (through sfunnel's nftables
// table) with the literal value, as `conntrack -L` shows it; `ct mark` at
// egress then matches the replies of that connection and of no other; `ct
// mark set 0` clears the mark again.
func TestCtMarkMatchesReplies(t *testing.T) {
	testenv.RequireCommand(t, "conntrack")
	tp := newTopo(t)
	egress := rules(t, 2, "ct mark 0x420000 counter actions accept", "udp counter")
	tp.commit(t, tp.s, &ruleset.Ruleset{NextHandle: 4, Interfaces: []*ruleset.Interface{
		iface("s0", rules(t, 1, "udp dport 4739 ct mark set 0x420000 counter"), egress),
	}})
	srv := map[int]*net.UDPConn{}
	for _, port := range []int{4739, 4740} {
		s, err := listenUDP(tp, port)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		srv[port] = s
		go func() {
			buf := make([]byte, 100)
			for {
				n, from, err := s.ReadFromUDP(buf)
				if err != nil {
					return
				}
				s.WriteToUDP(buf[:n], from)
			}
		}()
	}
	cl := map[int]*net.UDPConn{}
	for _, port := range []int{4739, 4740} {
		var c *net.UDPConn
		must(t, tp.c.Do(func() (err error) {
			c, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: vip.AsSlice(), Port: port})
			return err
		}))
		defer c.Close()
		cl[port] = c
	}
	echo := func(port, n int) {
		t.Helper()
		for i := 0; i < n; i++ {
			cl[port].Write([]byte("ping"))
			cl[port].SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := cl[port].Read(make([]byte, 100)); err != nil {
				t.Fatalf("port %d, reply %d: %v", port, i, err)
			}
		}
	}
	echo(4739, 5)
	echo(4740, 5)
	if got := connMark(t, tp.s, 4739); got != "4325376" {
		t.Errorf("conntrack -L shows mark=%s for the marked connection, want 4325376 (0x420000)", got)
	}
	if got := connMark(t, tp.s, 4740); got != "0" {
		t.Errorf("conntrack -L shows mark=%s for the other connection, want 0", got)
	}
	c := tp.counters(t, tp.s)
	if c[1].Packets != 5 {
		t.Errorf("ct mark set counted %d packets, want 5", c[1].Packets)
	}
	if c[2].Packets != 5 {
		t.Errorf("ct mark 0x420000 matched %d replies, want the 5 of the marked connection", c[2].Packets)
	}
	if c[3].Packets != 5 {
		t.Errorf("the other connection's replies: %d counted by the next rule, want 5", c[3].Packets)
	}

	// ct mark set 0 clears the connection's mark: its replies no longer match.
	tp.commit(t, tp.s, &ruleset.Ruleset{NextHandle: 5, Interfaces: []*ruleset.Interface{
		iface("s0", rules(t, 4, "udp dport 4739 ct mark set 0 counter"), egress),
	}})
	echo(4739, 3)
	if got := connMark(t, tp.s, 4739); got != "0" {
		t.Errorf("after ct mark set 0, conntrack -L shows mark=%s, want 0", got)
	}
	c = tp.counters(t, tp.s)
	if c[2].Packets != 5 || c[3].Packets != 8 {
		t.Errorf("after ct mark set 0: ct mark 0x420000 matched %d (want still 5), next rule %d (want 8)", c[2].Packets, c[3].Packets)
	}
}

// connMark returns the mark of the UDP connection to port in ns, in
// decimal as `conntrack -L` prints it.
func connMark(t *testing.T, ns *testenv.NS, port int) string {
	t.Helper()
	out := ns.Run(t, "conntrack", "-L", "-p", "udp", "--dport", strconv.Itoa(port))
	m := regexp.MustCompile(`mark=(\d+)`).FindAllStringSubmatch(out, -1)
	if len(m) != 1 {
		t.Fatalf("want one connection to port %d in conntrack -L:\n%s", port, out)
	}
	return m[0][1]
}

func listenUDP(tp *topo, port int) (*net.UDPConn, error) {
	var srv *net.UDPConn
	err := tp.s.Do(func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: serverIP.AsSlice(), Port: port})
		return err
	})
	return srv, err
}
