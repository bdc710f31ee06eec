package tun

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/sfunnel/sfunnel/tunnel/codec"
	"golang.org/x/sys/unix"
)

// With IFF_VNET_HDR every packet read from or written to the device is
// preceded by a struct virtio_net_hdr (host byte order, 10 bytes). With
// TSO enabled the kernel hands over TCP super-packets of up to 64 KiB with
// their checksum left to us, and takes such super-packets back, which
// saves the whole stack a traversal per 1.4 KB segment on both sides.
const (
	VnetHdrLen = 10

	vnetFlagNeedsCsum = 1
	vnetGSONone       = 0
	vnetGSOTCPv4      = 1
	vnetGSOTCPv6      = 4
	vnetGSOECN        = 0x80

	tunFCsum = 0x01
	tunFTSO4 = 0x02
	tunFTSO6 = 0x04
)

type vnetHdr struct {
	flags, gsoType                         uint8
	hdrLen, gsoSize, csumStart, csumOffset uint16
}

func (h *vnetHdr) decode(b []byte) {
	h.flags, h.gsoType = b[0], b[1]
	h.hdrLen = binary.NativeEndian.Uint16(b[2:])
	h.gsoSize = binary.NativeEndian.Uint16(b[4:])
	h.csumStart = binary.NativeEndian.Uint16(b[6:])
	h.csumOffset = binary.NativeEndian.Uint16(b[8:])
}

func (h *vnetHdr) encode(b []byte) {
	b[0], b[1] = h.flags, h.gsoType
	binary.NativeEndian.PutUint16(b[2:], h.hdrLen)
	binary.NativeEndian.PutUint16(b[4:], h.gsoSize)
	binary.NativeEndian.PutUint16(b[6:], h.csumStart)
	binary.NativeEndian.PutUint16(b[8:], h.csumOffset)
}

func (d *Device) enableOffload() error {
	var errno unix.Errno
	err := d.rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, unix.TUNSETOFFLOAD, tunFCsum|tunFTSO4|tunFTSO6)
	})
	if err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}

// Reader returns plain IP packets from the device, splitting offloaded
// super-packets into segments of their MSS with checksums filled in.
type Reader struct {
	dev      *Device
	headroom int
	bufs     [][]byte
	sizes    []int
	segs     [][]byte // segment buffers (offload only)
	out      [][]byte
	withHead [][]byte // out[i] with the headroom in front
	Dropped  uint64   // packets that could not be segmented
}

// WithHeadroom returns packet i of the last Read with its headroom bytes
// in front.
func (r *Reader) WithHeadroom(i int) []byte { return r.withHead[i] }

// maxSegsPerRead bounds the segments one read can produce: a 64 KiB
// super-packet with a small MSS.
const maxSegsPerRead = 64

// NewReader reads up to batch packets per wake-up. Every returned packet
// has headroom free bytes in front of it in its buffer.
func (d *Device) NewReader(batch, headroom, mtu int) *Reader {
	r := &Reader{dev: d, headroom: headroom}
	if d.vnet {
		batch = min(batch, 16)
	}
	r.bufs = make([][]byte, batch)
	r.sizes = make([]int, batch)
	for i := range r.bufs {
		r.bufs[i] = make([]byte, headroom+VnetHdrLen+65535)
	}
	if d.vnet {
		r.segs = make([][]byte, batch*maxSegsPerRead)
		for i := range r.segs {
			r.segs[i] = make([]byte, headroom+mtu)
		}
	}
	r.out = make([][]byte, 0, max(batch, len(r.segs)))
	r.withHead = make([][]byte, 0, cap(r.out))
	return r
}

// MaxPackets is the most packets one Read returns.
func (r *Reader) MaxPackets() int { return cap(r.out) }

// Read waits for packets. The slices are valid until the next Read.
func (r *Reader) Read() ([][]byte, error) {
	off := r.headroom
	n, err := r.dev.ReadBatch(r.bufs, off, r.sizes)
	if err != nil {
		return nil, err
	}
	out := r.out[:0]
	r.withHead = r.withHead[:0]
	if !r.dev.vnet {
		for i := 0; i < n; i++ {
			out = append(out, r.bufs[i][off:off+r.sizes[i]])
			r.withHead = append(r.withHead, r.bufs[i][:off+r.sizes[i]])
		}
		r.out = out
		return out, nil
	}
	seg := 0
	for i := 0; i < n; i++ {
		if r.sizes[i] < VnetHdrLen {
			r.Dropped++
			continue
		}
		var h vnetHdr
		h.decode(r.bufs[i][off:])
		pkt := r.bufs[i][off+VnetHdrLen : off+r.sizes[i]]
		if h.gsoType == vnetGSONone {
			if h.flags&vnetFlagNeedsCsum != 0 && !finishChecksum(pkt, &h) {
				r.Dropped++
				continue
			}
			// Move the packet over the consumed header so the caller's
			// headroom is intact.
			p := r.bufs[i][off : off+len(pkt)]
			copy(p, pkt)
			out = append(out, p)
			r.withHead = append(r.withHead, r.bufs[i][:off+len(pkt)])
			continue
		}
		var ok bool
		out, seg, ok = r.segment(out, seg, pkt, &h)
		if !ok {
			r.Dropped++
		}
	}
	r.out = out
	return out, nil
}

func finishChecksum(pkt []byte, h *vnetHdr) bool {
	s, o := int(h.csumStart), int(h.csumOffset)
	if s+o+2 > len(pkt) {
		return false
	}
	c := ^codec.Fold(codec.Sum(pkt[s:], 0))
	if c == 0 && o == 6 { // UDP: 0 means "no checksum"
		c = 0xffff
	}
	binary.BigEndian.PutUint16(pkt[s+o:], c)
	return true
}

var errPacketSize = errors.New("packet empty or larger than 64 KiB")

// segment cuts a TCP super-packet into MSS-sized packets, each with its
// own IP length (and IPv4 ID and header checksum), sequence number, flags
// and full TCP checksum.
func (r *Reader) segment(out [][]byte, seg int, pkt []byte, h *vnetHdr) ([][]byte, int, bool) {
	var iphl int
	var src, dst netip.Addr
	switch h.gsoType &^ vnetGSOECN {
	case vnetGSOTCPv4:
		if len(pkt) < codec.IPv4HeaderLen || pkt[0]>>4 != 4 {
			return out, seg, false
		}
		iphl = int(pkt[0]&0xf) * 4
		src, dst = netip.AddrFrom4([4]byte(pkt[12:16])), netip.AddrFrom4([4]byte(pkt[16:20]))
	case vnetGSOTCPv6:
		if len(pkt) < codec.IPv6HeaderLen || pkt[0]>>4 != 6 || pkt[6] != codec.ProtoTCP {
			return out, seg, false
		}
		iphl = codec.IPv6HeaderLen
		src, dst = netip.AddrFrom16([16]byte(pkt[8:24])), netip.AddrFrom16([16]byte(pkt[24:40]))
	default:
		return out, seg, false
	}
	if len(pkt) < iphl+codec.TCPHeaderLen {
		return out, seg, false
	}
	tcphl := int(pkt[iphl+12]>>4) * 4
	hl := iphl + tcphl
	mss := int(h.gsoSize)
	if tcphl < codec.TCPHeaderLen || hl > len(pkt) || mss == 0 {
		return out, seg, false
	}
	payload := pkt[hl:]
	seq := binary.BigEndian.Uint32(pkt[iphl+4:])
	var id uint16
	if iphl != codec.IPv6HeaderLen {
		id = binary.BigEndian.Uint16(pkt[4:])
	}
	flags := pkt[iphl+13]
	for i, o := 0, 0; o < len(payload); i, o = i+1, o+mss {
		if seg >= len(r.segs) {
			return out, seg, false
		}
		n := min(mss, len(payload)-o)
		b := r.segs[seg][r.headroom:]
		if hl+n > len(b) {
			return out, seg, false // MSS beyond our MTU
		}
		seg++
		p := b[:hl+n]
		copy(p, pkt[:hl])
		copy(p[hl:], payload[o:o+n])
		if iphl == codec.IPv6HeaderLen {
			binary.BigEndian.PutUint16(p[4:], uint16(tcphl+n))
		} else {
			binary.BigEndian.PutUint16(p[2:], uint16(hl+n))
			binary.BigEndian.PutUint16(p[4:], id+uint16(i))
			p[10], p[11] = 0, 0
			binary.BigEndian.PutUint16(p[10:], ^codec.Fold(codec.Sum(p[:iphl], 0)))
		}
		t := p[iphl:]
		binary.BigEndian.PutUint32(t[4:], seq+uint32(o))
		f := flags
		if o+n < len(payload) {
			f &^= 0x01 | 0x08 // FIN and PSH only on the last segment
		}
		if i > 0 {
			f &^= 0x80 // CWR only on the first
		}
		t[13] = f
		codec.SetTCPChecksum(t, src, dst)
		out = append(out, p)
		r.withHead = append(r.withHead, r.segs[seg-1][:r.headroom+len(p)])
	}
	return out, seg, true
}

// Writer puts IP packets into the device. With offloads it merges runs of
// consecutive segments of one TCP flow into a single super-packet (as GRO
// would), and can leave TCP checksums to the kernel.
type Writer struct {
	dev   *Device
	buf   []byte // vnet header + the group being built
	n     int    // bytes in buf after the header
	count int    // packets in the group
	// group state
	iphl, hl int
	mss      int
	nextSeq  uint32
	partial  bool
	closed   bool // the group takes no more packets
}

// NewWriter makes a writer for the device.
func (d *Device) NewWriter() *Writer {
	return &Writer{dev: d, buf: make([]byte, VnetHdrLen+65535)}
}

// Write queues a packet; it may be merged with the next ones. partial says
// that the TCP checksum field holds only the pseudo-header sum (see
// codec.WrapTCPPartial), which needs offloads. Call Flush after a batch.
func (w *Writer) Write(pkt []byte, partial bool) error {
	if len(pkt) == 0 || len(pkt) > len(w.buf)-VnetHdrLen {
		return errPacketSize
	}
	if !w.dev.vnet {
		if partial {
			if !finishChecksumTCP(pkt) {
				return nil
			}
		}
		return w.dev.Write(pkt)
	}
	if w.count > 0 && w.canAppend(pkt) {
		n := len(pkt) - w.hl
		copy(w.buf[VnetHdrLen+w.n:], pkt[w.hl:])
		w.n += n
		w.count++
		w.nextSeq += uint32(n)
		t := w.buf[VnetHdrLen+w.iphl:]
		t[13] |= pkt[w.iphl+13] & 0x08 // PSH from the last segment
		if n < w.mss || pkt[w.iphl+13]&0x08 != 0 {
			w.closed = true
		}
		w.partial = true
		return nil
	}
	if err := w.Flush(); err != nil {
		return err
	}
	return w.start(pkt, partial)
}

func finishChecksumTCP(pkt []byte) bool {
	iphl := codec.IPv6HeaderLen
	if pkt[0]>>4 == 4 {
		iphl = int(pkt[0]&0xf) * 4
	}
	if len(pkt) < iphl+18 {
		return false
	}
	binary.BigEndian.PutUint16(pkt[iphl+16:], ^codec.Fold(codec.Sum(pkt[iphl:], 0)))
	return true
}

// start begins a group with pkt (alone until others join).
func (w *Writer) start(pkt []byte, partial bool) error {
	copy(w.buf[VnetHdrLen:], pkt)
	w.n, w.count, w.partial, w.closed = len(pkt), 1, partial, true
	w.iphl, w.hl = tcpHeaders(pkt)
	if w.hl == 0 {
		return nil
	}
	n := len(pkt) - w.hl
	t := pkt[w.iphl:]
	// Only plain ACK (and PSH) segments with data are merged.
	if n > 0 && t[13]&^0x08 == 0x10 {
		w.closed = t[13]&0x08 != 0
		w.mss = n
		w.nextSeq = binary.BigEndian.Uint32(t[4:]) + uint32(n)
	}
	return nil
}

// tcpHeaders returns the IP and IP+TCP header lengths of a TCP packet that
// can take part in merging, or zeros.
func tcpHeaders(pkt []byte) (iphl, hl int) {
	if len(pkt) < codec.IPv4HeaderLen {
		return 0, 0
	}
	switch pkt[0] >> 4 {
	case 4:
		if pkt[0]&0xf != 5 || pkt[9] != codec.ProtoTCP || binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 {
			return 0, 0
		}
		iphl = codec.IPv4HeaderLen
	case 6:
		if len(pkt) < codec.IPv6HeaderLen || pkt[6] != codec.ProtoTCP {
			return 0, 0
		}
		iphl = codec.IPv6HeaderLen
	default:
		return 0, 0
	}
	if len(pkt) < iphl+codec.TCPHeaderLen {
		return 0, 0
	}
	hl = iphl + int(pkt[iphl+12]>>4)*4
	if hl > len(pkt) || hl < iphl+codec.TCPHeaderLen {
		return 0, 0
	}
	return iphl, hl
}

// canAppend: same flow, next sequence number, same ack, window and
// options, plain ACK(+PSH), a full-size or smaller-and-last segment, room.
func (w *Writer) canAppend(pkt []byte) bool {
	if w.closed || len(pkt) < w.hl {
		return false
	}
	g := w.buf[VnetHdrLen : VnetHdrLen+w.hl]
	iphl, hl := tcpHeaders(pkt)
	if iphl != w.iphl || hl != w.hl {
		return false
	}
	n := len(pkt) - hl
	if n == 0 || n > w.mss || w.n+n > 65535 || w.count >= 64 {
		return false
	}
	if iphl == codec.IPv4HeaderLen {
		// version/IHL/TOS, flags (DF), TTL/protocol, addresses
		if g[0] != pkt[0] || g[1] != pkt[1] || g[6] != pkt[6] || g[8] != pkt[8] || string(g[12:20]) != string(pkt[12:20]) {
			return false
		}
	} else if string(g[0:4]) != string(pkt[0:4]) || g[7] != pkt[7] || string(g[8:40]) != string(pkt[8:40]) {
		return false
	}
	gt, pt := g[iphl:], pkt[iphl:hl]
	if string(gt[0:4]) != string(pt[0:4]) || binary.BigEndian.Uint32(pt[4:]) != w.nextSeq ||
		string(gt[8:12]) != string(pt[8:12]) || pt[13]&^0x08 != 0x10 || string(gt[14:16]) != string(pt[14:16]) ||
		string(gt[20:]) != string(pt[20:]) {
		return false
	}
	return true
}

// Flush writes the pending group.
func (w *Writer) Flush() error {
	if !w.dev.vnet || w.count == 0 {
		return nil
	}
	pkt := w.buf[VnetHdrLen : VnetHdrLen+w.n]
	var h vnetHdr
	if w.count > 1 || w.partial {
		if w.hl == 0 {
			w.count = 0
			return nil
		}
		tcpLen := w.n - w.iphl
		var src, dst netip.Addr
		if w.iphl == codec.IPv4HeaderLen {
			binary.BigEndian.PutUint16(pkt[2:], uint16(w.n))
			pkt[10], pkt[11] = 0, 0
			binary.BigEndian.PutUint16(pkt[10:], ^codec.Fold(codec.Sum(pkt[:w.iphl], 0)))
			src, dst = netip.AddrFrom4([4]byte(pkt[12:16])), netip.AddrFrom4([4]byte(pkt[16:20]))
			h.gsoType = vnetGSOTCPv4
		} else {
			binary.BigEndian.PutUint16(pkt[4:], uint16(tcpLen))
			src, dst = netip.AddrFrom16([16]byte(pkt[8:24])), netip.AddrFrom16([16]byte(pkt[24:40]))
			h.gsoType = vnetGSOTCPv6
		}
		binary.BigEndian.PutUint16(pkt[w.iphl+16:], codec.Fold(codec.PseudoSum(src, dst, codec.ProtoTCP, tcpLen)))
		h.flags = vnetFlagNeedsCsum
		h.csumStart, h.csumOffset = uint16(w.iphl), 16
		if w.count > 1 {
			h.hdrLen, h.gsoSize = uint16(w.hl), uint16(w.mss)
		} else {
			h.gsoType = vnetGSONone
		}
	}
	h.encode(w.buf)
	w.count = 0
	return w.dev.Write(w.buf[:VnetHdrLen+w.n])
}
