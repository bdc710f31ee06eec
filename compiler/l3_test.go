package compiler_test

import (
	"bytes"
	"encoding/hex"
	"net"
	"os"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"golang.org/x/sys/unix"
)

// openTun creates a TUN device (no packet information) in ns and returns
// its file; the device lives as long as the file is open.
func openTun(t *testing.T, ns *testenv.NS, name string) *os.File {
	t.Helper()
	var f *os.File
	err := ns.Do(func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			return err
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return err
		}
		f = os.NewFile(uintptr(fd), "tun")
		return nil
	})
	if err != nil {
		t.Fatalf("tun: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// TestL3Device runs programs compiled for a device without MAC header on
// a real TUN device: a datagram sent by a socket is funneled at egress
// (read back from the TUN file, byte-exact), and a funneled packet
// written into the TUN file is unfunneled at ingress and delivered.
func TestL3Device(t *testing.T) {
	testenv.RequireRoot(t)
	ns := testenv.NewNS(t)
	tun := openTun(t, ns, "sft0")
	ns.Run(t, "ip", "addr", "add", "198.51.100.1/24", "dev", "sft0")
	ns.Run(t, "ip", "link", "set", "sft0", "up")
	ns.Run(t, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.sft0.rp_filter=0")

	rules := defaultRuleset()
	egress := compileLoad(t, rules[:3], nil, compiler.Options{Hook: grammar.HookEgress, L3: true})
	ingress := compileLoad(t, rules[3:], nil, compiler.Options{Hook: grammar.HookIngress, L3: true})
	attach(t, ns, "sft0", egress.coll.Programs[compiler.ProgramName], ebpf.AttachTCXEgress)
	attach(t, ns, "sft0", ingress.coll.Programs[compiler.ProgramName], ebpf.AttachTCXIngress)

	payload := []byte("sflow sample over a tun device")
	var rx *net.UDPConn
	if err := ns.Do(func() error {
		var err error
		if rx, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(198, 51, 100, 1), Port: 6343}); err != nil {
			return err
		}
		tx, err := net.DialUDP("udp", &net.UDPAddr{IP: net.IPv4(198, 51, 100, 1), Port: 40001}, &net.UDPAddr{IP: net.IPv4(198, 51, 100, 2), Port: 6343})
		if err != nil {
			return err
		}
		defer tx.Close()
		_, err = tx.Write(payload)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer rx.Close()

	// Egress: the TUN file yields what left through TC.
	buf := make([]byte, 2048)
	tun.SetReadDeadline(time.Now().Add(3 * time.Second))
	var out []byte
	for {
		n, err := tun.Read(buf)
		if err != nil {
			t.Fatalf("read tun: %v", err)
		}
		if n >= 20 && buf[0]>>4 == 4 && buf[9] == 6 {
			out = append([]byte(nil), buf[:n]...)
			break
		}
	}
	// The datagram as the socket sent it, reconstructed from the output:
	// the IP header with the original length and protocol, the inner UDP.
	if len(out) < 48 {
		t.Fatalf("short funneled packet %x", out)
	}
	if ok, _ := checksumsOK(append(make([]byte, 12), append([]byte{8, 0}, out...)...)); !ok {
		t.Fatalf("funneled packet checksums invalid: %x", out)
	}
	if !segmentValid(nil, nil, false, 17, out[40:]) || !bytes.Equal(out[48:], payload) {
		t.Fatalf("inner datagram wrong: %x", out)
	}
	sent := unfunnelByHand(out)
	want := expectFunnel(sent, 0, false, grammar.ProtoTCP, 540, 179, rules[2].Actions[0].Funnel)
	if !bytes.Equal(out, want) {
		t.Fatalf("funneled packet\n got %s\nwant %s", hex.EncodeToString(out), hex.EncodeToString(want))
	}

	// Ingress: a funneled packet from the peer is unfunneled and delivered.
	in := craft(t, pktSpec{l3: true, src: net.IPv4(198, 51, 100, 2), dst: net.IPv4(198, 51, 100, 1), l4: udpLayer(40002, 6343), payload: payload})
	funneled := expectFunnel(in, 0, false, grammar.ProtoTCP, 540, 179, rules[2].Actions[0].Funnel)
	if _, err := tun.Write(funneled); err != nil {
		t.Fatalf("write tun: %v", err)
	}
	rx.SetReadDeadline(time.Now().Add(3 * time.Second))
	n, from, err := rx.ReadFromUDP(buf)
	if err != nil {
		t.Fatalf("not delivered after unfunnel: %v", err)
	}
	if !bytes.Equal(buf[:n], payload) || from.Port != 40002 {
		t.Fatalf("delivered %q from %v", buf[:n], from)
	}
}

// unfunnelByHand rebuilds the IPv4 datagram inside a funneled packet: the
// IP header with length and protocol restored, and the inner UDP checksum
// recomputed with the real addresses.
func unfunnelByHand(p []byte) []byte {
	out := append(append([]byte(nil), p[:20]...), p[40:]...)
	out[2], out[3] = byte((len(out))>>8), byte(len(out))
	out[9] = 17
	fixIPv4Checksum(out)
	udp := out[20:]
	udp[6], udp[7] = 0, 0
	c := l4Checksum(net.IP(out[12:16]), net.IP(out[16:20]), false, 17, udp)
	udp[6], udp[7] = byte(c>>8), byte(c)
	return out
}
