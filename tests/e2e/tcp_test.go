package e2e

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Real TCP through every per-segment rewrite, offloads at their defaults
// (TSO, GSO, GRO, checksum offload on; nothing changed with ethtool or
// `ip link`):
//
//	client c0 192.0.2.1 ── r0 192.0.2.254  router  r1 198.51.100.254 ── s0 198.51.100.2 server
//	       2001:db8:1::1     2001:db8:1::fe          2001:db8:2::fe        2001:db8:2::2
//
// The router has GRO on. "local": the client's own segments are rewritten
// at c0 egress (a TSO sender: 64 KB GSO skbs, CHECKSUM_PARTIAL); "forwarded":
// the router rewrites the client's segments at r1 egress (GSO packets it
// forwards). The server rewrites its replies at s0 egress and undoes the
// client's at s0 ingress; the client side undoes the replies. Captures on
// the links between the rewriting ends check every frame of the flow:
// rewritten, MTU-sized, every checksum recomputed and valid.
func TestTCPDefaultOffloads(t *testing.T) {
	for _, fam := range []struct{ name, client, server string }{
		{"ipv4", "192.0.2.1", "198.51.100.2"},
		{"ipv6", "2001:db8:1::1", "2001:db8:2::2"},
	} {
		for _, mode := range []string{"local", "forwarded"} {
			for _, how := range tcpRewrites {
				t.Run(fam.name+"/"+mode+"/"+how.name, func(t *testing.T) {
					testTCPDefaultOffloads(t, netip.MustParseAddr(fam.client), netip.MustParseAddr(fam.server), mode == "forwarded", how)
				})
			}
		}
	}
}

// tcpRewrite is one way of carrying TCP: the rules at the sending and the
// receiving end of each direction, and what a rewritten frame looks like.
type tcpRewrite struct {
	name string
	// Rules for the client→server direction (out at the client side, back
	// at the server) and server→client.
	csOut, csBack, scOut, scBack string
	proto                        uint8 // outer protocol on the wire
	funnel                       bool  // a funnel header precedes the TCP header
}

var tcpRewrites = []tcpRewrite{
	{"funnel-udp", "tcp dport 8080 counter actions funnel udp sport 4000 dport 4000", "udp dport 4000 counter actions unfunnel tcp",
		"tcp sport 8080 counter actions funnel udp sport 4001 dport 4001", "udp dport 4001 counter actions unfunnel tcp", 17, true},
	{"funnel-tcp", "tcp dport 8080 counter actions funnel tcp sport 540 dport 179", "tcp dport 179 sport 540 counter actions unfunnel tcp",
		"tcp sport 8080 counter actions funnel tcp sport 179 dport 540", "tcp sport 179 dport 540 counter actions unfunnel tcp", 6, true},
	{"rewrite-udp", "tcp dport 8080 counter actions rewrite udp", "udp dport 8080 counter actions rewrite tcp",
		"tcp sport 8080 counter actions rewrite udp", "udp sport 8080 counter actions rewrite tcp", 17, false},
}

type tcpTopo struct {
	c, r, s *testenv.NS
	*dp
}

func newTCPTopo(t *testing.T) *tcpTopo {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ethtool")
	c, r, srv := routedChain(t, "r0", "r1")
	tp := &tcpTopo{c: c, r: r, s: srv, dp: newDP(t)}
	// A router as deployed: GRO on where traffic comes in.
	tp.r.Run(t, "ethtool", "-K", "r0", "gro", "on")
	tp.r.Run(t, "ethtool", "-K", "r1", "gro", "on")
	return tp
}

func testTCPDefaultOffloads(t *testing.T, client, server netip.Addr, forwarded bool, how tcpRewrite) {
	tp := newTCPTopo(t)
	fam := ipKeyword(server) + " daddr " + server.String() + " "
	famBack := ipKeyword(client) + " daddr " + client.String() + " "
	out := &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{
		iface("c0", rules(t, 1, famBack+how.scBack), rules(t, 2, fam+how.csOut)),
	}}
	outNS, wireCS := tp.c, startCapture(t, tp.r, "r0")
	if forwarded {
		out.Interfaces[0].Name = "r1"
		outNS, wireCS = tp.r, startCapture(t, tp.s, "s0")
	}
	tp.commit(t, outNS, out)
	tp.commit(t, tp.s, &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{
		iface("s0", rules(t, 1, fam+how.csBack), rules(t, 2, famBack+how.scOut)),
	}})
	wireSC := startCapture(t, tp.r, "r1")

	// Default sockets (MSS from the 1500-byte MTU): the funnel rules clamp
	// the MSS of the SYN and SYN-ACK so that funneled segments still fit.
	size := echoTransferWith(t, net.ListenConfig{}, tp.s, net.JoinHostPort(server.String(), "8080"), tp.c, net.JoinHostPort(server.String(), "8080"), 2<<20)

	for _, side := range []struct {
		name string
		cap  *capture
		from netip.Addr
	}{{"client to server", wireCS, client}, {"server to client", wireSC, server}} {
		n, bad := checkTCPWire(t, side.name, side.cap.stop(), side.from, how)
		if n+side.cap.drops < size/1500 {
			t.Errorf("%s: %d rewritten segments on the wire for %d bytes", side.name, n, size)
		}
		t.Logf("%s: %d rewritten segments, %d bad, %d not captured", side.name, n, bad, side.cap.drops)
	}
	for _, c := range []struct {
		ns  *testenv.NS
		dev string
	}{{outNS, out.Interfaces[0].Name}, {tp.s, "s0"}} {
		cs := tp.counters(t, c.ns)
		if cs[1].Packets == 0 || cs[2].Packets == 0 {
			t.Errorf("%s counters %v: want both rules counting", c.dev, cs)
		}
		st := tp.stats(t, c.ns, c.dev, grammar.HookEgress)
		// The hard case happened: GSO or CHECKSUM_PARTIAL packets went
		// through the segmentation device; none was left alone.
		if st["segmented"] == 0 {
			t.Errorf("%s egress: no packet needed segmenting (%v): the test did not exercise GSO", c.dev, st)
		}
		for _, k := range []string{"gso", "partial-checksum", "mtu-exceeded", "helper-failed", "not-applicable"} {
			if st[k] != 0 {
				t.Errorf("%s egress: %s %d", c.dev, k, st[k])
			}
		}
	}
}

// stats returns the datapath events of a live hook.
func (tp *dp) stats(t *testing.T, ns *testenv.NS, ifname string, hook grammar.Hook) map[string]uint64 {
	t.Helper()
	var out map[string]uint64
	must(t, ns.Do(func() error {
		hs, err := tp.be.Status()
		for _, h := range hs {
			if h.Ifname == ifname && h.Hook == hook {
				out = h.Stats
			}
		}
		return err
	}))
	if out == nil {
		t.Fatalf("%s %s: not live", ifname, hook)
	}
	return out
}

// checkTCPWire checks the frames of the test flow sent by from: each one
// rewritten, at most 1500 bytes of IP, with valid checksums recomputed from
// the bytes. It returns the number of good and bad frames.
func checkTCPWire(t *testing.T, side string, frames []frame, from netip.Addr, how tcpRewrite) (good, bad int) {
	t.Helper()
	syns := 0
	fail := func(format string, args ...any) {
		if bad++; bad <= 5 {
			t.Errorf("%s: %s", side, fmt.Sprintf(format, args...))
		}
	}
	for _, f := range frames {
		w, err := parseWire(f)
		if err != nil || w.src != from || (w.proto != 6 && w.proto != 17) {
			continue
		}
		if len(f.data)-14 > 1500 {
			fail("%d-byte IP packet on a 1500-byte link (an unsegmented GSO packet)", len(f.data)-14)
			continue
		}
		if w.proto != how.proto {
			fail("protocol %d on the wire: not rewritten", w.proto)
			continue
		}
		if how.proto == 6 {
			if sp, dp := w.ports(); sp == 8080 || dp == 8080 {
				fail("TCP to or from port 8080 on the wire: not funneled")
				continue
			}
		}
		if how.funnel {
			if err := w.checkFunneled(how.proto, 6); err != nil {
				fail("%d-byte packet: %v", len(w.l4), err)
				continue
			}
			if mss, ok := w.innerSYNMSS(how.proto); ok {
				syns++
				// What fits a 1500-byte MTU behind the funnel header.
				limit := 1500 - 20 - 20 - map[uint8]int{6: 20, 17: 8}[how.proto]
				if w.src.Is6() {
					limit -= 20
				}
				if mss > limit {
					fail("funneled SYN announces MSS %d, more than %d fits", mss, limit)
				}
			}
		} else if err := checkTCPInUDP(w); err != nil {
			fail("%d-byte datagram: %v", len(w.l4), err)
			continue
		}
		good++
	}
	if how.funnel && syns == 0 {
		t.Errorf("%s: no funneled SYN with an MSS option seen", side)
	}
	return good, bad
}

// innerSYNMSS returns the MSS option of a funneled SYN's inner TCP header.
func (w *wire) innerSYNMSS(outer uint8) (int, bool) {
	hl := 8
	if outer == 6 {
		hl = int(w.l4[12]>>4) * 4
	}
	in := w.l4[hl:]
	if len(in) < 20 || in[13]&0x02 == 0 {
		return 0, false
	}
	end := min(int(in[12]>>4)*4, len(in))
	for o := 20; o+1 < end; {
		switch in[o] {
		case 0:
			return 0, false
		case 1:
			o++
			continue
		case 2:
			if o+4 <= end {
				return int(binary.BigEndian.Uint16(in[o+2:])), true
			}
			return 0, false
		}
		if in[o+1] < 2 {
			return 0, false
		}
		o += int(in[o+1])
	}
	return 0, false
}

// checkTCPInUDP checks a TCP-in-UDP datagram: UDP length and checksum, and
// the draft's layout behind the UDP header (data offset within the
// datagram, port 8080 on one side).
func checkTCPInUDP(w *wire) error {
	if len(w.l4) < 20 {
		return fmt.Errorf("shorter than a TCP header")
	}
	if l := binary.BigEndian.Uint16(w.l4[4:]); int(l) != len(w.l4) {
		return fmt.Errorf("UDP length %d for %d bytes", l, len(w.l4))
	}
	if !l4Valid(w.src.AsSlice(), w.dst.AsSlice(), 17, w.l4) {
		return fmt.Errorf("UDP checksum wrong")
	}
	if doff := int(w.l4[8]>>4) * 4; doff < 20 || doff > len(w.l4) {
		return fmt.Errorf("data offset %d", doff)
	}
	if sp, dp := w.ports(); sp != 8080 && dp != 8080 {
		return fmt.Errorf("ports %d→%d", sp, dp)
	}
	if w.l4[9]&0x20 != 0 {
		return fmt.Errorf("URG set")
	}
	return nil
}
