// Package udpsock is the tunnel's UDP socket: one dual-stack socket on the
// listen port, optionally bound to an interface, that receives and sends
// batches of datagrams with recvmmsg/sendmmsg into caller-owned buffers.
package udpsock

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Conn is a UDP socket bound to a port on all addresses.
type Conn struct {
	file *os.File
	rc   syscall.RawConn
	v6   bool // AF_INET6 dual-stack; false: AF_INET only
	port uint16

	// Per-direction state of the batch in flight: one goroutine reads and
	// one writes, and the callbacks are built once so I/O allocates nothing.
	readFn, writeFn func(fd uintptr) bool
	r, w            ioState
	gso, gro        bool
	// SendErrors counts datagrams the kernel refused to send.
	SendErrors atomic.Uint64
}

// Options for Listen.
type Options struct {
	Port            int
	BindToInterface string // SO_BINDTODEVICE, "" for none
	BufferBytes     int    // SO_RCVBUF/SO_SNDBUF; 0: 4 MiB
	// Offload sends runs of equal-sized datagrams to one peer as one UDP
	// GSO message (UDP_SEGMENT) and receives coalesced runs (UDP_GRO).
	Offload bool
}

// Listen opens the socket.
func Listen(o Options) (*Conn, error) {
	c := &Conn{v6: true, port: uint16(o.Port)}
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if errors.Is(err, unix.EAFNOSUPPORT) {
		c.v6 = false
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	}
	if err != nil {
		return nil, fmt.Errorf("udp socket: %w", err)
	}
	fail := func(what string, err error) (*Conn, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("udp socket: %s: %w", what, err)
	}
	if c.v6 {
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_V6ONLY, 0); err != nil {
			return fail("IPV6_V6ONLY", err)
		}
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fail("SO_REUSEADDR", err)
	}
	if o.BindToInterface != "" {
		if err := unix.BindToDevice(fd, o.BindToInterface); err != nil {
			return fail("bind to interface "+o.BindToInterface, err)
		}
	}
	bufBytes := o.BufferBytes
	if bufBytes == 0 {
		bufBytes = 4 << 20
	}
	for _, opt := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
		if unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt[0], bufBytes) != nil {
			unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt[1], bufBytes)
		}
	}
	if o.Offload {
		c.gso = true
		c.gro = unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
	}
	var sa unix.Sockaddr = &unix.SockaddrInet6{Port: o.Port}
	if !c.v6 {
		sa = &unix.SockaddrInet4{Port: o.Port}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return fail(fmt.Sprintf("bind port %d", o.Port), err)
	}
	if o.Port == 0 {
		if got, err := unix.Getsockname(fd); err == nil {
			switch a := got.(type) {
			case *unix.SockaddrInet6:
				c.port = uint16(a.Port)
			case *unix.SockaddrInet4:
				c.port = uint16(a.Port)
			}
		}
	}
	c.file = os.NewFile(uintptr(fd), "udp")
	if c.rc, err = c.file.SyscallConn(); err != nil {
		c.file.Close()
		return nil, err
	}
	c.readFn, c.writeFn = c.doRead, c.doWrite
	return c, nil
}

// Port is the bound port.
func (c *Conn) Port() uint16 { return c.port }

// Close closes the socket; blocked reads return an error.
func (c *Conn) Close() error { return c.file.Close() }

type ioState struct {
	cur         *Batch
	count, done int
	err         error
}

var cmsgSpace = unix.CmsgSpace(4)

type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
	_   [4]byte
}

// Batch holds the buffers and headers of up to Cap datagrams. A received
// datagram i lives at Bufs[i][Off:Off+Sizes[i]] and came from Peers[i]; to
// send, set Out[i] (any slice, e.g. into another buffer) and Peers[i].
type Batch struct {
	Bufs  [][]byte
	Off   int
	Sizes []int
	Out   [][]byte
	Peers []netip.AddrPort
	// Seg[i] is the size of the datagrams coalesced into received
	// message i (UDP GRO), 0 if it is a single datagram.
	Seg   []int
	hdrs  []mmsghdr
	cmsgs []byte
	first []int // for writes: the Out index each message starts at
	iovs  []unix.Iovec
	names []unix.RawSockaddrInet6
}

// NewBatch allocates n buffers of size bytes each.
func NewBatch(n, size, off int) *Batch {
	b := &Batch{Bufs: make([][]byte, n), Off: off, Sizes: make([]int, n), Out: make([][]byte, n), Peers: make([]netip.AddrPort, n),
		hdrs: make([]mmsghdr, n), iovs: make([]unix.Iovec, n), names: make([]unix.RawSockaddrInet6, n),
		Seg: make([]int, n), cmsgs: make([]byte, n*cmsgSpace), first: make([]int, n+1)}
	for i := range b.Bufs {
		if size > 0 {
			b.Bufs[i] = make([]byte, size)
		}
	}
	return b
}

// Cap is the number of datagrams the batch holds.
func (b *Batch) Cap() int { return len(b.Bufs) }

// Payload returns datagram i.
func (b *Batch) Payload(i int) []byte { return b.Bufs[i][b.Off : b.Off+b.Sizes[i]] }

// Step is how far apart the datagrams of received message i are: the
// UDP GRO size, or the whole payload (at least 1, so that an empty
// datagram is still visited once by "for o := 0; o < n || o == 0; o += step").
func (b *Batch) Step(i int) int {
	if b.Seg[i] > 0 {
		return b.Seg[i]
	}
	return max(b.Sizes[i], 1)
}

// ReadBatch waits for datagrams and receives up to b.Cap() of them.
func (c *Conn) ReadBatch(b *Batch) (int, error) {
	for i := range b.Bufs {
		buf := b.Bufs[i][b.Off:]
		b.iovs[i].Base = &buf[0]
		b.iovs[i].SetLen(len(buf))
		h := &b.hdrs[i].hdr
		*h = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&b.names[i])), Namelen: unix.SizeofSockaddrInet6, Iov: &b.iovs[i]}
		h.SetIovlen(1)
		if c.gro {
			h.Control = &b.cmsgs[i*cmsgSpace]
			h.SetControllen(cmsgSpace)
		}
	}
	c.r = ioState{cur: b, count: len(b.Bufs)}
	if err := c.rc.Read(c.readFn); err != nil {
		return 0, err
	}
	if c.r.err != nil {
		return 0, c.r.err
	}
	for i := 0; i < c.r.done; i++ {
		b.Sizes[i] = int(b.hdrs[i].len)
		b.Peers[i] = c.fromSockaddr(&b.names[i])
		b.Seg[i] = 0
		if c.gro && b.hdrs[i].hdr.Controllen >= uint64(unix.CmsgLen(4)) {
			b.Seg[i] = groSize(b.cmsgs[i*cmsgSpace : (i+1)*cmsgSpace])
		}
	}
	return c.r.done, nil
}

func (c *Conn) doRead(fd uintptr) bool {
	b := c.r.cur
	for {
		n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[0])), uintptr(c.r.count), unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			c.r.done = int(n)
			return true
		case unix.EAGAIN:
			return false
		case unix.EINTR:
			continue
		case unix.EMSGSIZE, unix.ECONNREFUSED, unix.EHOSTUNREACH, unix.ENETUNREACH, unix.EHOSTDOWN, unix.ENOBUFS:
			// An earlier send's error reported on this socket; nothing
			// was received, try again.
			continue
		}
		c.r.err = errno
		return true
	}
}

// WriteBatch sends Out[0..n-1] to Peers[0..n-1]. Datagrams the kernel
// refuses (for example an unreachable peer) are skipped.
func (c *Conn) WriteBatch(b *Batch, n int) error {
retry:
	for {
		msgs := c.prepare(b, n)
		c.w = ioState{cur: b, count: msgs}
		for c.w.done < msgs {
			c.w.err = nil
			if err := c.rc.Write(c.writeFn); err != nil {
				return err
			}
			err := c.w.err
			if err == nil {
				continue
			}
			k := c.w.done
			if c.gso && b.first[k+1]-b.first[k] > 1 && (errors.Is(err, unix.EIO) || errors.Is(err, unix.EINVAL)) {
				// The path cannot take UDP GSO: send one by one from now on.
				c.gso = false
				rest := copy(b.Out, b.Out[b.first[k]:n])
				copy(b.Peers, b.Peers[b.first[k]:n])
				n = rest
				continue retry
			}
			if errors.Is(err, unix.EMSGSIZE) || errors.Is(err, unix.ENETUNREACH) || errors.Is(err, unix.EHOSTUNREACH) ||
				errors.Is(err, unix.ECONNREFUSED) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.EIO) {
				c.w.done++ // skip what the kernel refused
				c.SendErrors.Add(uint64(b.first[k+1] - b.first[k]))
				continue
			}
			return err
		}
		return nil
	}
}

// maxGSOSegments stays below the kernel's UDP_MAX_SEGMENTS.
const maxGSOSegments = 64

// prepare builds the message headers for Out[0:n]. With GSO, a run of
// datagrams to the same peer, all of one size except a shorter last one,
// becomes one message with an iovec per datagram and a UDP_SEGMENT
// control message: one trip through the stack instead of one per datagram.
func (c *Conn) prepare(b *Batch, n int) int {
	msgs := 0
	for i := 0; i < n; {
		j := i + 1
		if c.gso {
			size, total := len(b.Out[i]), len(b.Out[i])
			for j < n && j-i < maxGSOSegments && b.Peers[j] == b.Peers[i] && len(b.Out[j]) <= size && len(b.Out[j]) > 0 &&
				total+len(b.Out[j]) <= 65000 {
				total += len(b.Out[j])
				j++
				if len(b.Out[j-1]) < size {
					break
				}
			}
		}
		for k := i; k < j; k++ {
			b.iovs[k] = unix.Iovec{}
			if len(b.Out[k]) > 0 {
				b.iovs[k].Base = &b.Out[k][0]
				b.iovs[k].SetLen(len(b.Out[k]))
			}
		}
		h := &b.hdrs[msgs].hdr
		nl := c.toSockaddr(&b.names[msgs], b.Peers[i])
		*h = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&b.names[msgs])), Namelen: nl, Iov: &b.iovs[i]}
		h.SetIovlen(j - i)
		if j-i > 1 {
			cm := b.cmsgs[msgs*cmsgSpace : (msgs+1)*cmsgSpace]
			ch := (*unix.Cmsghdr)(unsafe.Pointer(&cm[0]))
			ch.Level, ch.Type = unix.IPPROTO_UDP, unix.UDP_SEGMENT
			ch.SetLen(unix.CmsgLen(2))
			*(*uint16)(unsafe.Pointer(&cm[unix.CmsgLen(0)])) = uint16(len(b.Out[i]))
			h.Control = &cm[0]
			h.SetControllen(unix.CmsgSpace(2))
		}
		b.first[msgs] = i
		msgs++
		i = j
	}
	b.first[msgs] = n
	return msgs
}

func (c *Conn) doWrite(fd uintptr) bool {
	w := &c.w
	for w.done < w.count {
		n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&w.cur.hdrs[w.done])), uintptr(w.count-w.done), unix.MSG_DONTWAIT, 0, 0)
		switch errno {
		case 0:
			w.done += int(n)
			continue
		case unix.EAGAIN:
			return false
		case unix.EINTR:
			continue
		}
		w.err = errno
		return true
	}
	return true
}

// WriteTo sends a single datagram.
func (c *Conn) WriteTo(p []byte, to netip.AddrPort) error {
	var name unix.RawSockaddrInet6
	nl := c.toSockaddr(&name, to)
	var sendErr error
	err := c.rc.Write(func(fd uintptr) bool {
		var base unsafe.Pointer
		if len(p) > 0 {
			base = unsafe.Pointer(&p[0])
		}
		_, _, errno := unix.Syscall6(unix.SYS_SENDTO, fd, uintptr(base), uintptr(len(p)), 0,
			uintptr(unsafe.Pointer(&name)), uintptr(nl))
		if errno == unix.EAGAIN {
			return false
		}
		if errno != 0 {
			sendErr = errno
		}
		return true
	})
	if err != nil {
		return err
	}
	return sendErr
}

// groSize reads the UDP_GRO control message: the size of the coalesced
// datagrams.
func groSize(cm []byte) int {
	h := (*unix.Cmsghdr)(unsafe.Pointer(&cm[0]))
	if h.Level != unix.IPPROTO_UDP || h.Type != unix.UDP_GRO || h.Len < uint64(unix.CmsgLen(4)) {
		return 0
	}
	return int(*(*int32)(unsafe.Pointer(&cm[unix.CmsgLen(0)])))
}

func putPort(p *uint16, port uint16) {
	b := (*[2]byte)(unsafe.Pointer(p))
	b[0], b[1] = byte(port>>8), byte(port)
}

func getPort(p *uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(p))
	return uint16(b[0])<<8 | uint16(b[1])
}

func (c *Conn) toSockaddr(sa *unix.RawSockaddrInet6, to netip.AddrPort) uint32 {
	if c.v6 {
		*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Addr: to.Addr().As16()}
		putPort(&sa.Port, to.Port())
		return unix.SizeofSockaddrInet6
	}
	s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
	*s4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Addr: to.Addr().Unmap().As4()}
	putPort(&s4.Port, to.Port())
	return unix.SizeofSockaddrInet4
}

func (c *Conn) fromSockaddr(sa *unix.RawSockaddrInet6) netip.AddrPort {
	if sa.Family == unix.AF_INET {
		s4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(s4.Addr), getPort(&s4.Port))
	}
	return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr).Unmap(), getPort(&sa.Port))
}
