package compiler_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"testing"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"golang.org/x/sys/unix"
)

// attach attaches a program with tcx inside a namespace.
func attach(t *testing.T, ns *testenv.NS, ifname string, prog *ebpf.Program, at ebpf.AttachType) {
	t.Helper()
	var l link.Link
	err := ns.Do(func() error {
		ifc, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		l, err = link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: prog, Attach: at})
		return err
	})
	if err != nil {
		t.Fatalf("attach to %s: %v", ifname, err)
	}
	t.Cleanup(func() { l.Close() })
}

// capture is an AF_PACKET socket that reports whether a frame's checksum
// was still to be finalised (TP_STATUS_CSUMNOTREADY).
type capture struct{ fd int }

func openCapture(t *testing.T, ns *testenv.NS, ifname string) *capture {
	t.Helper()
	c := &capture{fd: -1}
	err := ns.Do(func() error {
		ifc, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, proto)
		if err != nil {
			return err
		}
		c.fd = fd
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifc.Index}); err != nil {
			return err
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_AUXDATA, 1); err != nil {
			return err
		}
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Sec: 2})
	})
	if err != nil {
		t.Fatalf("capture on %s: %v", ifname, err)
	}
	t.Cleanup(func() { unix.Close(c.fd) })
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// next returns the next frame that match accepts.
func (c *capture) next(match func([]byte) bool) (frame []byte, partial bool, err error) {
	buf := make([]byte, 65536)
	oob := make([]byte, 256)
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		n, oobn, _, _, err := unix.Recvmsg(c.fd, buf, oob, 0)
		if err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) { // timeout, or a runtime signal
				continue
			}
			return nil, false, err
		}
		if !match(buf[:n]) {
			continue
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			return nil, false, err
		}
		for _, m := range msgs {
			if m.Header.Level == unix.SOL_PACKET && m.Header.Type == unix.PACKET_AUXDATA && len(m.Data) >= int(unsafe.Sizeof(unix.TpacketAuxdata{})) {
				aux := (*unix.TpacketAuxdata)(unsafe.Pointer(&m.Data[0]))
				partial = aux.Status&unix.TP_STATUS_CSUMNOTREADY != 0
			}
		}
		return append([]byte(nil), buf[:n]...), partial, nil
	}
	return nil, false, fmt.Errorf("no matching frame")
}

// finalise does what a NIC or skb_checksum_help does to a
// CHECKSUM_PARTIAL frame: sum [start, end) (the field holds the seed) and
// store the folded complement at start+offset.
func finalise(frame []byte, start, offset int) {
	c := ^foldSum(onesSum(frame[start:], 0))
	binary.BigEndian.PutUint16(frame[start+offset:], c)
}

// TestWireChecksums sends UDP from a real socket through the funnel at a
// veth's egress, with transmit checksum offload on (CHECKSUM_PARTIAL) and
// off, checks the checksums of what crossed the wire, and receives the
// datagram through the unfunnel at the other end's ingress.
func TestWireChecksums(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ethtool")
	for _, helper := range []bool{false, true} {
		for _, v6 := range []bool{false, true} {
			for _, txOff := range []bool{false, true} {
				name := fmt.Sprintf("%s/tx-%s/%s", map[bool]string{false: "ipv4", true: "ipv6"}[v6], map[bool]string{false: "on", true: "off"}[txOff],
					map[bool]string{false: "inline", true: "helper"}[helper])
				t.Run(name, func(t *testing.T) { wireChecksums(t, v6, txOff, helper, false) })
			}
		}
	}
}

// TestWireChecksumsOptions is TestWireChecksums with IPv4 options or an
// IPv6 destination options header set on the sending socket: the funnel
// header goes behind them and the checksums still hold on the wire.
func TestWireChecksumsOptions(t *testing.T) {
	testenv.RequireRoot(t)
	testenv.RequireCommand(t, "ethtool")
	for _, v6 := range []bool{false, true} {
		for _, txOff := range []bool{false, true} {
			name := fmt.Sprintf("%s/tx-%s", map[bool]string{false: "ipv4", true: "ipv6"}[v6], map[bool]string{false: "on", true: "off"}[txOff])
			t.Run(name, func(t *testing.T) { wireChecksums(t, v6, txOff, false, true) })
		}
	}
}

// transportOf finds the transport header of a captured frame: IPv4 with
// options, IPv6 with at most one destination options header.
func transportOf(f []byte, v6 bool) (off int, proto uint8, ok bool) {
	if v6 {
		if len(f) < 54 || binary.BigEndian.Uint16(f[12:]) != 0x86dd {
			return 0, 0, false
		}
		off, proto = 54, f[20]
		if proto == 60 {
			if len(f) < off+8 {
				return 0, 0, false
			}
			proto = f[off]
			off += (int(f[off+1]) + 1) * 8
		}
		return off, proto, len(f) >= off+20
	}
	if len(f) < 34 || binary.BigEndian.Uint16(f[12:]) != 0x0800 {
		return 0, 0, false
	}
	off = 14 + int(f[14]&0xf)*4
	return off, f[23], len(f) >= off+20
}

func wireChecksums(t *testing.T, v6, txOff, helper, withOpts bool) {
	a, b := testenv.NewNS(t), testenv.NewNS(t)
	addrA, addrB, dst := "192.0.2.1/24", "192.0.2.2/24", "192.0.2.2"
	fam := grammar.FamilyIPv4
	if v6 {
		addrA, addrB, dst = "2001:db8::1/64", "2001:db8::2/64", "2001:db8::2"
		fam = grammar.FamilyIPv6
	}
	testenv.Veth(t, a, "sfa", addrA, b, "sfb", addrB)
	if txOff {
		a.Run(t, "ethtool", "-K", "sfa", "tx", "off")
	}
	funnelRules := []*grammar.Rule{{Family: fam, Proto: grammar.ProtoUDP, Dport: ports(4739), Actions: []*grammar.Action{funnelTo(grammar.ProtoTCP, 540, 179)}}}
	unfunnelRules := []*grammar.Rule{{Family: fam, Proto: grammar.ProtoTCP, Dport: ports(179), Sport: ports(540), Actions: []*grammar.Action{act(grammar.ActUnfunnel, grammar.ProtoUDP)}}}
	sender := compileLoad(t, funnelRules, nil, compiler.Options{Hook: grammar.HookEgress, ChecksumHelper: helper})
	receiver := compileLoad(t, unfunnelRules, nil, compiler.Options{Hook: grammar.HookIngress, ChecksumHelper: helper})
	attach(t, a, "sfa", sender.coll.Programs[compiler.ProgramName], ebpf.AttachTCXEgress)
	attach(t, b, "sfb", receiver.coll.Programs[compiler.ProgramName], ebpf.AttachTCXIngress)
	capt := openCapture(t, b, "sfb")

	var rx *net.UDPConn
	if err := b.Do(func() error {
		var err error
		rx, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(dst), Port: 4739})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	payload := bytes.Repeat([]byte("ipfix record "), 40)
	if err := a.Do(func() error {
		tx, err := net.DialUDP("udp", &net.UDPAddr{Port: 40000}, &net.UDPAddr{IP: net.ParseIP(dst), Port: 4739})
		if err != nil {
			return err
		}
		defer tx.Close()
		if withOpts {
			raw, err := tx.SyscallConn()
			if err != nil {
				return err
			}
			var serr error
			raw.Control(func(fd uintptr) {
				if v6 {
					// Destination options: PadN filling 8 bytes.
					serr = unix.SetsockoptString(int(fd), unix.IPPROTO_IPV6, unix.IPV6_DSTOPTS, string([]byte{0, 0, 1, 4, 0, 0, 0, 0}))
				} else {
					// Record route with one slot, then a NOP.
					serr = unix.SetsockoptString(int(fd), unix.IPPROTO_IP, unix.IP_OPTIONS, string([]byte{7, 7, 4, 0, 0, 0, 0, 1}))
				}
			})
			if serr != nil {
				return fmt.Errorf("set IP options: %w", serr)
			}
		}
		_, err = tx.Write(payload)
		return err
	}); err != nil {
		t.Fatal(err)
	}

	frame, partial, err := capt.next(func(f []byte) bool {
		off, proto, ok := transportOf(f, v6)
		return ok && proto == 6 && binary.BigEndian.Uint16(f[off+2:]) == 179
	})
	if err != nil {
		t.Fatalf("funneled frame: %v", err)
	}
	if txOff && partial {
		t.Errorf("tx off, yet the frame is CHECKSUM_PARTIAL")
	}
	l4, _, _ := transportOf(frame, v6)
	if withOpts && l4 == 14+map[bool]int{false: 20, true: 40}[v6] {
		t.Fatalf("the socket sent no options: %x", frame)
	}
	inner := l4 + 20
	if partial {
		finalise(frame, inner, 6)
	}
	var src, dstIP net.IP
	end := 0
	if v6 {
		src, dstIP = frame[22:38], frame[38:54]
		end = 54 + int(binary.BigEndian.Uint16(frame[18:]))
	} else {
		src, dstIP = frame[26:30], frame[30:34]
		end = 14 + int(binary.BigEndian.Uint16(frame[16:]))
		if !ipv4HeaderValid(frame[14:]) {
			t.Fatalf("IPv4 header checksum invalid: %x", frame)
		}
	}
	if end > len(frame) || !segmentValid(src, dstIP, v6, 6, frame[l4:end]) {
		t.Fatalf("outer checksum invalid on the wire (partial %v): %x", partial, frame)
	}
	if !segmentValid(nil, nil, v6, 17, frame[inner:end]) {
		t.Fatalf("inner UDP checksum is not address-neutral (partial %v): %x", partial, frame)
	}
	rx.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 4096)
	n, from, err := rx.ReadFromUDP(buf)
	if err != nil {
		t.Fatalf("datagram not delivered after unfunnel: %v", err)
	}
	if !bytes.Equal(buf[:n], payload) || from.Port != 40000 {
		t.Fatalf("delivered %q from %v", buf[:n], from)
	}
	t.Logf("partial=%v, funneled frame %d bytes, delivered", partial, len(frame))
}

// TestRewritePartialOnWire: TCP from a local socket is CHECKSUM_PARTIAL at
// egress, which a TCP-in-UDP rewrite can't carry: the segments pass
// untouched (the connection works) and are counted.
func TestRewritePartialOnWire(t *testing.T) {
	testenv.RequireRoot(t)
	for _, helper := range []bool{false, true} {
		a, b := testenv.NewNS(t), testenv.NewNS(t)
		testenv.Veth(t, a, "sfa", "192.0.2.1/24", b, "sfb", "192.0.2.2/24")
		rules := []*grammar.Rule{{Proto: grammar.ProtoTCP, Dport: ports(5201), Actions: []*grammar.Action{act(grammar.ActRewrite, grammar.ProtoUDP)}}}
		l := compileLoad(t, rules, nil, compiler.Options{Hook: grammar.HookEgress, ChecksumHelper: helper})
		attach(t, a, "sfa", l.coll.Programs[compiler.ProgramName], ebpf.AttachTCXEgress)
		var ln net.Listener
		if err := b.Do(func() (err error) { ln, err = net.Listen("tcp", "192.0.2.2:5201"); return }); err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if err := a.Do(func() error {
			c, err := net.DialTimeout("tcp", "192.0.2.2:5201", 3*time.Second)
			if err != nil {
				return err
			}
			return c.Close()
		}); err != nil {
			t.Fatalf("helper=%v: connection through the untouched segments: %v", helper, err)
		}
		if s := l.stats(t); s[compiler.StatPartialChecksum] == 0 {
			t.Fatalf("helper=%v: no partial-checksum segment counted: %v", helper, s)
		}
	}
}
