package e2e

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/ruleset"
)

// TCP-in-UDP between two gateways, with a real TCP connection between
// hosts behind them:
//
//	capp 192.0.2.1 ─ crouter ═ 203.0.113.1 … 203.0.113.2 ═ srouter ─ sapp 198.51.100.2
//
// The routers rewrite TCP to UDP in place on the wire link (═) and back.
// The hosts' links have transmit checksum offload and segmentation off, so
// the routers forward single segments with complete checksums (each still
// takes the segmentation device's detour, as every matched TCP segment
// does). Offloads at their defaults are TestTCPDefaultOffloads' job.
// Offload is toggled on the wire link.
func TestTCPInUDPRewrite(t *testing.T) {
	for _, on := range []bool{true, false} {
		t.Run(onOff(on), func(t *testing.T) { testTCPInUDP(t, on) })
	}
}

func testTCPInUDP(t *testing.T, on bool) {
	tp := newDP(t)
	capp, crouter, srouter, sapp := testenv.NewNS(t), testenv.NewNS(t), testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, capp, "h0", "192.0.2.1/24", crouter, "h1", "192.0.2.254/24")
	testenv.Veth(t, crouter, "w0", "203.0.113.1/24", srouter, "w1", "203.0.113.2/24")
	testenv.Veth(t, srouter, "h1", "198.51.100.254/24", sapp, "h0", "198.51.100.2/24")
	capp.Run(t, "ip", "route", "add", "default", "via", "192.0.2.254")
	sapp.Run(t, "ip", "route", "add", "default", "via", "198.51.100.254")
	crouter.Run(t, "ip", "route", "add", "198.51.100.0/24", "via", "203.0.113.2")
	srouter.Run(t, "ip", "route", "add", "192.0.2.0/24", "via", "203.0.113.1")
	for _, r := range []*testenv.NS{crouter, srouter} {
		r.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	}
	for _, h := range []*testenv.NS{capp, sapp} {
		h.Run(t, "ethtool", "-K", "h0", "tx", "off", "tso", "off", "gso", "off")
	}
	offload(t, crouter, "w0", on)
	offload(t, srouter, "w1", on)

	tp.commit(t, crouter, &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{
		iface("w0", rules(t, 1, "udp sport 8080 counter actions rewrite tcp"),
			rules(t, 2, "ip daddr 198.51.100.2 tcp dport 8080 counter actions rewrite udp")),
	}})
	tp.commit(t, srouter, &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{
		iface("w1", rules(t, 1, "udp dport 8080 counter actions rewrite tcp"),
			rules(t, 2, "tcp sport 8080 counter actions rewrite udp")),
	}})
	capC := startCapture(t, crouter, "w0")
	capS := startCapture(t, srouter, "w1")

	size := echoTransfer(t, sapp, "198.51.100.2:8080", capp, "198.51.100.2:8080", 4<<20)

	for _, side := range []struct {
		name string
		cap  *capture
		from netip.Addr
	}{{"server to client", capC, netip.MustParseAddr("198.51.100.2")}, {"client to server", capS, netip.MustParseAddr("192.0.2.1")}} {
		udp, bad := 0, 0
		for _, f := range side.cap.stop() {
			w, err := parseWire(f)
			if err != nil {
				continue
			}
			if w.src != side.from {
				continue
			}
			if w.proto == 6 {
				if bad++; bad <= 3 {
					t.Errorf("%s: TCP on the wire", side.name)
				}
				continue
			}
			if !l4Valid(w.src.AsSlice(), w.dst.AsSlice(), 17, w.l4) {
				if bad++; bad <= 3 {
					t.Errorf("%s: %d-byte datagram with a wrong UDP checksum", side.name, len(w.l4))
				}
				continue
			}
			if l := binary.BigEndian.Uint16(w.l4[4:]); int(l) != len(w.l4) {
				t.Errorf("%s: UDP length %d for %d bytes", side.name, l, len(w.l4))
			}
			udp++
		}
		if udp+side.cap.drops < size/1500 {
			t.Errorf("%s: %d UDP datagrams on the wire for %d bytes", side.name, udp, size)
		}
		t.Logf("%s: %d rewritten segments, %d bad", side.name, udp, bad)
	}
}
