package compiler_test

import (
	"encoding/binary"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
)

// TestWireDefaultRuleset sends UDP datagrams from real sockets to each port
// of sfunnel's default ruleset and to one no rule names, through that
// ruleset on one hook at a veth's egress and again at the other end's
// ingress, both on the fast matcher (its port bitmap, then the rules'
// tests): the ruleset as its four rules, and with the three funnels as one
// rule with a port list. What crosses the wire must be TCP sport 540 dport
// 179 carrying the datagram for the rules' ports and the datagram as sent
// for the other port, and every datagram must arrive, unfunneled, at its
// socket.
func TestWireDefaultRuleset(t *testing.T) {
	testenv.RequireRoot(t)
	list := []*grammar.Rule{
		{Handle: 1, Family: grammar.FamilyIPv4, Proto: grammar.ProtoUDP, Dport: ports(2055, 4739, 6343), Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}},
		defaultRuleset()[3],
	}
	for _, tc := range []struct {
		name  string
		rules []*grammar.Rule
	}{{"four rules", defaultRuleset()}, {"a port list", list}} {
		t.Run(tc.name, func(t *testing.T) {
			for _, h := range []grammar.Hook{grammar.HookEgress, grammar.HookIngress} {
				p, err := compiler.Compile(tc.rules, nil, compiler.Options{Hook: h})
				if err != nil {
					t.Fatal(err)
				}
				if l := compiler.Listing(p.Spec.Programs[compiler.ProgramName].Instructions); !containsAll(l, "rules on protocol and ports", "bitmap") {
					t.Fatalf("%s: the program is not on the fast matcher with its port bitmap:\n%s", h, l)
				}
			}
			wireFastPorts(t, tc.rules)
		})
	}
}

func wireFastPorts(t *testing.T, rules []*grammar.Rule) {
	a, b := testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, a, "sfa", "192.0.2.1/24", b, "sfb", "192.0.2.2/24")
	sender := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookEgress})
	receiver := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookIngress})
	attach(t, a, "sfa", sender.coll.Programs[compiler.ProgramName], ebpf.AttachTCXEgress)
	attach(t, b, "sfb", receiver.coll.Programs[compiler.ProgramName], ebpf.AttachTCXIngress)
	capt := openCapture(t, b, "sfb")
	dst := net.ParseIP("192.0.2.2")
	for i, port := range []uint16{2055, 4739, 6343, 5000} {
		funneled := port != 5000
		var rx *net.UDPConn
		if err := b.Do(func() error {
			var err error
			rx, err = net.ListenUDP("udp", &net.UDPAddr{IP: dst, Port: int(port)})
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer rx.Close()
		payload := []byte(fmt.Sprintf("datagram %d to port %d", i, port))
		sport := 40000 + i
		if err := a.Do(func() error {
			tx, err := net.DialUDP("udp", &net.UDPAddr{Port: sport}, &net.UDPAddr{IP: dst, Port: int(port)})
			if err != nil {
				return err
			}
			defer tx.Close()
			_, err = tx.Write(payload)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		// The frame on the wire: the UDP header (inner, if funneled) names
		// our source and destination ports.
		_, _, err := capt.next(func(f []byte) bool {
			l4, proto, ok := transportOf(f, false)
			if !ok {
				return false
			}
			udp := l4
			if funneled {
				if proto != 6 || binary.BigEndian.Uint16(f[l4:]) != 540 || binary.BigEndian.Uint16(f[l4+2:]) != 179 {
					return false
				}
				udp, proto = l4+20, 17
			}
			return proto == 17 && len(f) >= udp+8 && binary.BigEndian.Uint16(f[udp:]) == uint16(sport) && binary.BigEndian.Uint16(f[udp+2:]) == port
		})
		if err != nil {
			t.Fatalf("port %d (funneled %v): no such frame on the wire: %v", port, funneled, err)
		}
		rx.SetReadDeadline(time.Now().Add(3 * time.Second))
		buf := make([]byte, 2048)
		n, from, err := rx.ReadFromUDP(buf)
		if err != nil {
			t.Fatalf("port %d: datagram not delivered: %v", port, err)
		}
		if string(buf[:n]) != string(payload) || from.Port != sport {
			t.Fatalf("port %d: delivered %q from %v", port, buf[:n], from)
		}
	}
}

func containsAll(s string, subs ...string) bool {
	for _, sub := range subs {
		if !strings.Contains(s, sub) {
			return false
		}
	}
	return true
}
