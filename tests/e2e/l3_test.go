package e2e

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"testing"
	"time"
	"unsafe"

	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/ruleset"
	"golang.org/x/sys/unix"
)

// On an L3 device (tun: packets start at the IP header, no MAC header) the
// datapath finds the headers where they are: a funneled packet written
// into the tun, as a peer would send it, is unfunneled at ingress and the
// UDP datagram inside reaches a socket intact.
func TestUnfunnelOnTun(t *testing.T) {
	d := newDP(t)
	ns := testenv.NewNS(t)
	var tun *os.File
	must(t, ns.Do(func() (err error) { tun, err = openTun("tun0"); return err }))
	defer tun.Close()
	ns.Run(t, "ip", "addr", "add", "192.0.2.1", "peer", "192.0.2.2", "dev", "tun0")
	ns.Run(t, "ip", "link", "set", "tun0", "up")

	d.commit(t, ns, &ruleset.Ruleset{NextHandle: 2, Interfaces: []*ruleset.Interface{
		iface("tun0", rules(t, 1, "tcp dport 179 sport 540 counter actions unfunnel udp"), nil),
	}})
	var srv *net.UDPConn
	must(t, ns.Do(func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 4739})
		return err
	}))
	defer srv.Close()

	payload := []byte("IPFIX through a tun")
	if _, err := tun.Write(funneledUDP([4]byte{192, 0, 2, 2}, [4]byte{192, 0, 2, 1}, 5555, 4739, payload)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 200)
	srv.SetReadDeadline(time.Now().Add(2 * time.Second))
	n, from, err := srv.ReadFromUDP(buf)
	if err != nil {
		t.Fatalf("unfunneled datagram not delivered: %v", err)
	}
	if !bytes.Equal(buf[:n], payload) || from.Port != 5555 || !from.IP.Equal(net.IPv4(192, 0, 2, 2)) {
		t.Errorf("got %q from %v", buf[:n], from)
	}
	if c := d.counters(t, ns)[1]; c.Packets != 1 {
		t.Errorf("unfunnel counter %+v, want 1 packet", c)
	}
}

// openTun creates a tun device (IFF_TUN|IFF_NO_PI) in the calling thread's
// namespace.
func openTun(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	var req [unix.IFNAMSIZ + 64]byte
	copy(req[:], name)
	binary.NativeEndian.PutUint16(req[unix.IFNAMSIZ:], unix.IFF_TUN|unix.IFF_NO_PI)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req[0]))); e != 0 {
		unix.Close(fd)
		return nil, e
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun"), nil
}

// funneledUDP builds what sfunnel's funnel puts on the wire for a UDP
// datagram: IPv4 / TCP(sport 540, dport 179, SYN, seq 0xCAFEBABE, ack
// 0xBABECAFE, window 1024) / UDP with an address-neutral checksum.
func funneledUDP(src, dst [4]byte, sport, dport uint16, payload []byte) []byte {
	udp := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], sport)
	binary.BigEndian.PutUint16(udp[2:], dport)
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	copy(udp[8:], payload)
	acc := csumAdd(0, udp) + 17 + uint32(len(udp)) // pseudo header without addresses
	binary.BigEndian.PutUint16(udp[6:], ^fold(acc))

	tcp := make([]byte, 20, 20+len(udp))
	binary.BigEndian.PutUint16(tcp[0:], 540)
	binary.BigEndian.PutUint16(tcp[2:], 179)
	binary.BigEndian.PutUint32(tcp[4:], 0xCAFEBABE)
	binary.BigEndian.PutUint32(tcp[8:], 0xBABECAFE)
	tcp[12] = 5 << 4
	tcp[13] = 0x02
	binary.BigEndian.PutUint16(tcp[14:], 1024)
	tcp = append(tcp, udp...)
	acc = csumAdd(0, tcp) + 6 + uint32(len(tcp))
	acc = csumAdd(acc, src[:])
	acc = csumAdd(acc, dst[:])
	binary.BigEndian.PutUint16(tcp[16:], ^fold(acc))

	ip := make([]byte, 20, 20+len(tcp))
	ip[0] = 0x45
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(tcp)))
	binary.BigEndian.PutUint16(ip[6:], 0x4000) // DF
	ip[8] = 64
	ip[9] = 6
	copy(ip[12:], src[:])
	copy(ip[16:], dst[:])
	binary.BigEndian.PutUint16(ip[10:], ^fold(csumAdd(0, ip)))
	return append(ip, tcp...)
}
