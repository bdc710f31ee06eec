package e2e

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
	"golang.org/x/sys/unix"
)

// capture records the frames arriving on an interface, as they crossed the
// wire, with an AF_PACKET socket. PACKET_VNET_HDR tells, per frame, whether
// the L4 checksum is still to be finalised (CHECKSUM_PARTIAL travels across
// veth unfinalised) and where: finalise() then does what a NIC would.
type capture struct {
	fd       int
	stopping atomic.Bool
	mu       sync.Mutex
	frames   []frame
	drops    int // frames the kernel dropped for want of buffer space
	done     chan struct{}
}

type frame struct {
	data []byte // the frame, checksums finalised as a NIC would
	// partial: the skb was CHECKSUM_PARTIAL when captured, i.e. no NIC
	// finalised it on the way (veth all along).
	partial bool
}

const vnetHdrLen = 10

func startCapture(t *testing.T, ns *testenv.NS, ifname string) *capture {
	t.Helper()
	c := &capture{done: make(chan struct{})}
	err := ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ALL)))
		if err != nil {
			return err
		}
		c.fd = fd
		if err := unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_VNET_HDR, 1); err != nil {
			return fmt.Errorf("PACKET_VNET_HDR: %w", err)
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 64<<20); err != nil {
			return err
		}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000}); err != nil {
			return err
		}
		ifi, err := interfaceIndex(ifname)
		if err != nil {
			return err
		}
		return unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi})
	})
	if err != nil {
		t.Fatalf("capture on %s: %v", ifname, err)
	}
	go c.loop()
	t.Cleanup(func() { c.stop() })
	return c
}

// loop owns the socket: it reads until stop is asked (the receive timeout
// wakes it up) and closes the socket itself, so its number can't be reused
// under it.
func (c *capture) loop() {
	defer close(c.done)
	defer unix.Close(c.fd)
	defer func() {
		if st, err := unix.GetsockoptTpacketStats(c.fd, unix.SOL_PACKET, unix.PACKET_STATISTICS); err == nil {
			c.mu.Lock()
			c.drops += int(st.Drops)
			c.mu.Unlock()
		}
	}()
	buf := make([]byte, 70000)
	for {
		// Once stopping, drain what is queued without waiting, then leave.
		flags := 0
		draining := c.stopping.Load()
		if draining {
			flags = unix.MSG_DONTWAIT
		}
		n, from, err := unix.Recvfrom(c.fd, buf, flags)
		if err == unix.EAGAIN && draining {
			return
		}
		if err == unix.EAGAIN || err == unix.EINTR {
			continue
		}
		if err != nil {
			return
		}
		if ll, ok := from.(*unix.SockaddrLinklayer); ok && ll.Pkttype == unix.PACKET_OUTGOING {
			continue
		}
		if n < vnetHdrLen {
			continue
		}
		f := frame{data: finalise(buf[:vnetHdrLen], append([]byte(nil), buf[vnetHdrLen:n]...)), partial: buf[0]&1 != 0}
		c.mu.Lock()
		c.frames = append(c.frames, f)
		c.mu.Unlock()
	}
}

// stop ends the capture (after the frames in flight are read) and returns
// the frames.
func (c *capture) stop() []frame {
	if !c.stopping.Swap(true) {
		select {
		case <-c.done:
		case <-time.After(2 * time.Second):
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.frames
}

// finalise completes a CHECKSUM_PARTIAL checksum as a NIC does: the ones'
// complement of the sum over [csum_start, end), seed included, stored at
// csum_start + csum_offset.
func finalise(vnet, pkt []byte) []byte {
	const needsCsum = 1
	if vnet[0]&needsCsum == 0 {
		return pkt
	}
	start := int(binary.LittleEndian.Uint16(vnet[6:]))
	off := int(binary.LittleEndian.Uint16(vnet[8:]))
	if start+off+2 > len(pkt) {
		return pkt
	}
	sum := ^fold(csumAdd(0, pkt[start:]))
	binary.BigEndian.PutUint16(pkt[start+off:], sum)
	return pkt
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// csumAdd adds b to a 32-bit ones' complement accumulator.
func csumAdd(acc uint32, b []byte) uint32 {
	for len(b) >= 2 {
		acc += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	return acc
}

func fold(acc uint32) uint16 {
	for acc > 0xffff {
		acc = acc&0xffff + acc>>16
	}
	return uint16(acc)
}

// l4Valid reports whether an L4 segment's checksum is right for the given
// pseudo-header addresses (nil: address-neutral, as if both were zero).
func l4Valid(src, dst []byte, proto uint8, seg []byte) bool {
	acc := csumAdd(0, seg)
	acc = csumAdd(acc, src)
	acc = csumAdd(acc, dst)
	acc += uint32(proto) + uint32(len(seg))
	return fold(acc) == 0xffff
}
