// Package e2e runs sfunnel's datapath end to end: real namespaces, real
// interfaces, real kernel sockets, and checks of the bytes on the wire.
package e2e

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Addresses of the topology (sfunnel's own test topology):
//
//	client ns  c0 192.0.2.1 ── n0 192.0.2.254  NAT ns  n1 198.51.100.254 ── s0 198.51.100.2  server ns
//
// The client talks to a service address, 203.0.113.10, that the NAT hop
// DNATs to the server; it also SNATs (masquerades) towards the server, as a
// Kubernetes node does for a LoadBalancer service.
var (
	clientIP = netip.MustParseAddr("192.0.2.1")
	vip      = netip.MustParseAddr("203.0.113.10")
	natOutIP = netip.MustParseAddr("198.51.100.254")
	serverIP = netip.MustParseAddr("198.51.100.2")

	// The same in IPv6 (NAT66 in the middle, as nft does it).
	clientIP6 = netip.MustParseAddr("2001:db8:1::1")
	vip6      = netip.MustParseAddr("2001:db8:ff::10")
	natOutIP6 = netip.MustParseAddr("2001:db8:2::fe")
	serverIP6 = netip.MustParseAddr("2001:db8:2::2")
)

// family holds the addresses of the topology in one IP version.
type family struct {
	name                        string
	client, vip, natOut, server netip.Addr
}

var families = []family{
	{"ipv4", clientIP, vip, natOutIP, serverIP},
	{"ipv6", clientIP6, vip6, natOutIP6, serverIP6},
}

type topo struct {
	c, n, s *testenv.NS
	*dp
}

// dp is the datapath backend of a test, with its own bpffs root.
type dp struct {
	root string
	be   *datapath.Backend
}

func newDP(t *testing.T) *dp {
	testenv.RequireRoot(t)
	d := &dp{root: filepath.Join("/sys/fs/bpf", fmt.Sprintf("sfunnel-e2e-%d-%s", os.Getpid(), strings.ReplaceAll(t.Name(), "/", "_")))}
	t.Cleanup(func() { os.RemoveAll(d.root) })
	d.be = datapath.New(datapath.Options{Root: d.root})
	return d
}

// routedChain makes client ─ middle ─ server namespaces, dual stack: the
// client's c0 (192.0.2.1, 2001:db8:1::1) faces the middle's in
// (192.0.2.254, 2001:db8:1::fe), the middle's out (198.51.100.254,
// 2001:db8:2::fe) faces the server's s0 (198.51.100.2, 2001:db8:2::2); the
// middle forwards and the ends route through it.
func routedChain(t *testing.T, in, out string) (c, mid, s *testenv.NS) {
	c, mid, s = testenv.NewNS(t), testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, c, "c0", "192.0.2.1/24", mid, in, "192.0.2.254/24")
	testenv.Veth(t, mid, out, "198.51.100.254/24", s, "s0", "198.51.100.2/24")
	for _, a := range []struct {
		ns       *testenv.NS
		dev, adr string
	}{{c, "c0", "2001:db8:1::1/64"}, {mid, in, "2001:db8:1::fe/64"}, {mid, out, "2001:db8:2::fe/64"}, {s, "s0", "2001:db8:2::2/64"}} {
		a.ns.Run(t, "ip", "-6", "addr", "add", a.adr, "dev", a.dev, "nodad")
	}
	c.Run(t, "ip", "route", "add", "default", "via", "192.0.2.254")
	s.Run(t, "ip", "route", "add", "default", "via", "198.51.100.254")
	c.Run(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:1::fe")
	s.Run(t, "ip", "-6", "route", "add", "default", "via", "2001:db8:2::fe")
	mid.Run(t, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	return c, mid, s
}

func newTopo(t *testing.T) *topo {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "nft")
	c, n, srv := routedChain(t, "n0", "n1")
	tp := &topo{c: c, n: n, s: srv, dp: newDP(t)}
	nftScript(t, tp.n, `table ip nat {
	chain pre { type nat hook prerouting priority dstnat; ip daddr 203.0.113.10 dnat to 198.51.100.2; }
	chain post { type nat hook postrouting priority srcnat; oifname "n1" masquerade; }
}
table ip6 nat {
	chain pre { type nat hook prerouting priority dstnat; ip6 daddr 2001:db8:ff::10 dnat to 2001:db8:2::2; }
	chain post { type nat hook postrouting priority srcnat; oifname "n1" masquerade; }
}`)
	return tp
}

func nftScript(t *testing.T, ns *testenv.NS, script string) {
	t.Helper()
	cmd := ns.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
}

// offload turns transmit checksum offload (and with it TSO) on or off.
func offload(t *testing.T, ns *testenv.NS, ifname string, on bool) {
	t.Helper()
	testenv.RequireCommand(t, "ethtool")
	v := "off"
	if on {
		v = "on"
	}
	ns.Run(t, "ethtool", "-K", ifname, "tx", v)
}

// rules parses rule text, one rule per line, giving handles from first.
func rules(t *testing.T, first uint64, text ...string) []*grammar.Rule {
	t.Helper()
	var rs []*grammar.Rule
	for i, s := range text {
		r, err := grammar.ParseRule("<test>", s, nil)
		if err != nil {
			t.Fatalf("rule %q: %v", s, err)
		}
		r.Handle = first + uint64(i)
		rs = append(rs, r)
	}
	return rs
}

// commit makes a ruleset live in a namespace.
func (tp *dp) commit(t *testing.T, ns *testenv.NS, rs *ruleset.Ruleset) {
	t.Helper()
	if err := ns.Do(func() error { return tp.be.Commit(rs) }); err != nil {
		t.Fatalf("commit in %s: %v", ns.Name, err)
	}
}

func (tp *dp) counters(t *testing.T, ns *testenv.NS) map[uint64]ruleset.Counter {
	t.Helper()
	var cs map[uint64]ruleset.Counter
	if err := ns.Do(func() (err error) { cs, err = tp.be.Counters(); return err }); err != nil {
		t.Fatal(err)
	}
	return cs
}

// progID returns the id of the program live on a hook.
func (tp *dp) progID(t *testing.T, ns *testenv.NS, ifname string, hook grammar.Hook) ebpf.ProgramID {
	t.Helper()
	var id ebpf.ProgramID
	err := ns.Do(func() error {
		s, err := bpf.OpenExisting(bpf.Options{Root: tp.root})
		if err != nil || s == nil {
			return fmt.Errorf("no datapath state: %v", err)
		}
		a, err := s.Attached(bpf.HookID{Ifname: ifname, Hook: hook})
		if err != nil || a == nil {
			return fmt.Errorf("%s %s not live: %v", ifname, hook, err)
		}
		id = a.ProgID
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func iface(name string, ingress, egress []*grammar.Rule) *ruleset.Interface {
	return &ruleset.Interface{Name: name, Ingress: ingress, Egress: egress}
}

func interfaceIndex(name string) (int, error) {
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return 0, err
	}
	return ifi.Index, nil
}

// wire is a captured IP packet.
type wire struct {
	src, dst netip.Addr
	proto    uint8
	l4       []byte // L4 header and payload
}

var errNotIP = errors.New("not IP")

func parseWire(f frame) (*wire, error) {
	p := gopacket.NewPacket(f.data, layers.LayerTypeEthernet, gopacket.Default)
	if ip, _ := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ip != nil {
		hdr := f.data[14 : 14+int(ip.IHL)*4]
		if fold(csumAdd(0, hdr)) != 0xffff {
			return nil, fmt.Errorf("IPv4 header checksum %#04x is wrong", ip.Checksum)
		}
		end := 14 + int(ip.Length)
		if end > len(f.data) {
			return nil, fmt.Errorf("IPv4 total length %d exceeds the frame (%d)", ip.Length, len(f.data)-14)
		}
		src, _ := netip.AddrFromSlice(ip.SrcIP.To4())
		dst, _ := netip.AddrFromSlice(ip.DstIP.To4())
		return &wire{src: src, dst: dst, proto: uint8(ip.Protocol), l4: f.data[14+len(hdr) : end]}, nil
	}
	if ip, _ := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6); ip != nil {
		end := 14 + 40 + int(ip.Length)
		if end > len(f.data) {
			return nil, fmt.Errorf("IPv6 payload length %d exceeds the frame (%d)", ip.Length, len(f.data)-54)
		}
		src, _ := netip.AddrFromSlice(ip.SrcIP)
		dst, _ := netip.AddrFromSlice(ip.DstIP)
		// The tests send no extension headers: the L4 header follows.
		return &wire{src: src, dst: dst, proto: uint8(ip.NextHeader), l4: f.data[54:end]}, nil
	}
	return nil, errNotIP
}

func (w *wire) ports() (sport, dport uint16) {
	if len(w.l4) < 4 {
		return 0, 0
	}
	return uint16(w.l4[0])<<8 | uint16(w.l4[1]), uint16(w.l4[2])<<8 | uint16(w.l4[3])
}

// checkFunneled verifies a funneled packet on the wire: valid IPv4 header,
// valid outer L4 checksum for the packet's addresses, and an inner L4
// checksum that is valid address-neutrally (sfunnel's wire format: NAT on
// the way needs no knowledge of the inner header).
func (w *wire) checkFunneled(outer, inner uint8) error {
	if w.proto != outer {
		return fmt.Errorf("outer protocol %d, want %d", w.proto, outer)
	}
	if !l4Valid(w.src.AsSlice(), w.dst.AsSlice(), outer, w.l4) {
		return fmt.Errorf("outer L4 checksum wrong (%v → %v)", w.src, w.dst)
	}
	return w.checkInner(outer, inner)
}

func outerCsumOffset(proto uint8) int {
	if proto == 6 {
		return 16
	}
	return 6
}

// checkInner verifies the inner header of a funneled packet: its length
// and its address-neutral checksum.
func (w *wire) checkInner(outer, inner uint8) error {
	hl := 8
	if outer == 6 {
		hl = int(w.l4[12]>>4) * 4
	}
	if hl > len(w.l4) {
		return fmt.Errorf("outer header longer than the packet")
	}
	in := w.l4[hl:]
	if inner == 17 && len(in) >= 8 && int(uint16(in[4])<<8|uint16(in[5])) != len(in) {
		return fmt.Errorf("inner UDP length %d, %d bytes follow", uint16(in[4])<<8|uint16(in[5]), len(in))
	}
	if !l4Valid(nil, nil, inner, in) {
		return fmt.Errorf("inner L4 checksum not address-neutral-valid")
	}
	return nil
}

// echoTransfer runs a TCP echo server in srv on listen and sends size random
// bytes to it from cl through dial, both ways at once; it fails the test
// unless the connection completes and every byte comes back intact. It
// returns the size.
func echoTransfer(t *testing.T, srv *testenv.NS, listen string, cl *testenv.NS, dial string, size int) int {
	t.Helper()
	return echoTransferWith(t, smallMSS, srv, listen, cl, dial, size)
}

// echoTransferWith is echoTransfer with both sockets set up by lc.
func echoTransferWith(t *testing.T, lc net.ListenConfig, srv *testenv.NS, listen string, cl *testenv.NS, dial string, size int) int {
	t.Helper()
	var ln net.Listener
	must(t, srv.Do(func() (err error) {
		ln, err = lc.Listen(context.Background(), "tcp", listen)
		return err
	}))
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		io.Copy(c, c)
	}()
	var conn net.Conn
	must(t, cl.Do(func() (err error) {
		d := net.Dialer{Timeout: 5 * time.Second, Control: lc.Control}
		conn, err = d.Dial("tcp", dial)
		return err
	}))
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	payload := make([]byte, size)
	rand.Read(payload)
	go func() {
		conn.Write(payload)
		conn.(*net.TCPConn).CloseWrite()
	}()
	echo, err := io.ReadAll(conn)
	if err != nil {
		t.Fatalf("after %d bytes echoed: %v", len(echo), err)
	}
	if sha256.Sum256(echo) != sha256.Sum256(payload) {
		t.Fatalf("echo differs: %d bytes back of %d", len(echo), len(payload))
	}
	return size
}

// smallMSS leaves room for a funnel header in 1500-byte packets: both ends
// announce and use an MSS of 1400.
var smallMSS = net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG, 1400) })
	return errors.Join(err, serr)
}}
