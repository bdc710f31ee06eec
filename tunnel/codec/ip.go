package codec

import (
	"encoding/binary"
	"net/netip"
)

// Header sizes and protocol numbers the tunnel deals with.
const (
	ProtoTCP      = 6
	IPv4HeaderLen = 20
	IPv6HeaderLen = 40
	TCPHeaderLen  = 20
	// Headroom is what a caller leaves in front of a TCP segment so that
	// WrapTCP can prepend either IP header in place.
	Headroom = IPv6HeaderLen
)

// Drop says why a packet was not forwarded. Counters are indexed by it.
type Drop uint8

// Reasons a packet is dropped.
const (
	DropNone      Drop = iota
	DropMalformed      // too short, bad version or lengths that do not add up
	DropNotTCP         // TCP over UDP carries TCP only (IPv6 extension headers count as not TCP)
	DropIPOptions      // IPv4 header longer than 20 bytes
	DropFragment       // IPv4 fragments cannot be carried without their header
	DropNoPeer         // no authenticated peer for the destination
	DropNoAddress      // the TUN has no address of the needed family
	DropTooBig         // larger than the MTU or a frame allows
	DropUnauth         // datagram from a sender that has not authenticated
	DropNoSession      // sealed record for a session nobody here has (spoofed, or a forgotten peer)
	DropBadTag         // sealed record that did not authenticate (forged or modified)
	DropReplay         // sealed record whose counter was seen already
	DropTooOld         // sealed record behind the replay window
	DropStale          // session worn out (too old or too many records): rekey needed
	NumDrops
)

var dropNames = [NumDrops]string{"none", "malformed", "not_tcp", "ip_options", "fragment",
	"no_peer", "no_address", "too_big", "unauthenticated",
	"unknown_session", "bad_tag", "replayed", "too_old", "stale_session"}

func (d Drop) String() string {
	if d < NumDrops {
		return dropNames[d]
	}
	return "unknown"
}

func addr4(b []byte) netip.Addr  { return netip.AddrFrom4([4]byte(b[:4])) }
func addr16(b []byte) netip.Addr { return netip.AddrFrom16([16]byte(b[:16])) }

// Version returns the IP version of pkt (4 or 6), or 0 if it is not a
// well-formed IPv4/IPv6 packet whose length fields match len(pkt).
func Version(pkt []byte) int {
	if len(pkt) == 0 {
		return 0
	}
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < IPv4HeaderLen || int(pkt[0]&0xf)*4 < IPv4HeaderLen {
			return 0
		}
		if int(binary.BigEndian.Uint16(pkt[2:])) != len(pkt) || int(pkt[0]&0xf)*4 > len(pkt) {
			return 0
		}
		return 4
	case 6:
		if len(pkt) < IPv6HeaderLen || int(binary.BigEndian.Uint16(pkt[4:]))+IPv6HeaderLen != len(pkt) {
			return 0
		}
		return 6
	}
	return 0
}

// PacketLen is the length an IPv4 or IPv6 packet at the start of b
// declares for itself (header included), or 0 if b does not start with one.
func PacketLen(b []byte) int {
	switch {
	case len(b) >= IPv4HeaderLen && b[0]>>4 == 4:
		return int(binary.BigEndian.Uint16(b[2:]))
	case len(b) >= IPv6HeaderLen && b[0]>>4 == 6:
		return IPv6HeaderLen + int(binary.BigEndian.Uint16(b[4:]))
	}
	return 0
}

// Dst returns the destination address of a packet Version accepted.
func Dst(pkt []byte) netip.Addr {
	if pkt[0]>>4 == 4 {
		return addr4(pkt[16:])
	}
	return addr16(pkt[24:])
}

// StripIP returns the TCP segment carried by an IPv4 or IPv6 packet and the
// packet's addresses. IPv4 packets with options, fragments and anything
// that is not TCP are refused with the reason.
func StripIP(pkt []byte) (seg []byte, src, dst netip.Addr, why Drop) {
	if len(pkt) == 0 {
		return nil, src, dst, DropMalformed
	}
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < IPv4HeaderLen {
			return nil, src, dst, DropMalformed
		}
		if pkt[9] != ProtoTCP {
			return nil, src, dst, DropNotTCP
		}
		if pkt[0]&0xf != 5 {
			return nil, src, dst, DropIPOptions
		}
		if binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 { // MF or a fragment offset
			return nil, src, dst, DropFragment
		}
		tot := int(binary.BigEndian.Uint16(pkt[2:]))
		if tot > len(pkt) || tot < IPv4HeaderLen+TCPHeaderLen {
			return nil, src, dst, DropMalformed
		}
		seg = pkt[IPv4HeaderLen:tot]
		src, dst = addr4(pkt[12:]), addr4(pkt[16:])
	case 6:
		if len(pkt) < IPv6HeaderLen {
			return nil, src, dst, DropMalformed
		}
		if pkt[6] != ProtoTCP {
			return nil, src, dst, DropNotTCP
		}
		pl := int(binary.BigEndian.Uint16(pkt[4:]))
		if IPv6HeaderLen+pl > len(pkt) || pl < TCPHeaderLen {
			return nil, src, dst, DropMalformed
		}
		seg = pkt[IPv6HeaderLen : IPv6HeaderLen+pl]
		src, dst = addr16(pkt[8:]), addr16(pkt[24:])
	default:
		return nil, src, dst, DropMalformed
	}
	if !ValidTCP(seg) {
		return nil, src, dst, DropMalformed
	}
	return seg, src, dst, DropNone
}

// ValidTCP reports whether seg is long enough for its own TCP header.
func ValidTCP(seg []byte) bool {
	if len(seg) < TCPHeaderLen {
		return false
	}
	off := int(seg[12]>>4) * 4
	return off >= TCPHeaderLen && off <= len(seg)
}

// WrapTCP prepends an IP header (src → dst, protocol TCP) to the TCP segment
// buf[off:off+n], which must leave at least IPv4HeaderLen or IPv6HeaderLen
// bytes of headroom before off, recomputes the TCP checksum for the new
// addresses and returns the whole packet, a sub-slice of buf.
func WrapTCP(buf []byte, off, n int, src, dst netip.Addr) (pkt []byte, why Drop) {
	return wrapTCP(buf, off, n, src, dst, false)
}

// WrapTCPPartial is WrapTCP leaving the TCP checksum for the kernel to
// finish (CHECKSUM_PARTIAL through a TUN with offloads): the field gets
// only the pseudo-header sum, which costs nothing per payload byte.
func WrapTCPPartial(buf []byte, off, n int, src, dst netip.Addr) (pkt []byte, why Drop) {
	return wrapTCP(buf, off, n, src, dst, true)
}

func wrapTCP(buf []byte, off, n int, src, dst netip.Addr, partial bool) (pkt []byte, why Drop) {
	seg := buf[off : off+n]
	if !ValidTCP(seg) {
		return nil, DropMalformed
	}
	if src.Is4() {
		if n+IPv4HeaderLen > 0xffff {
			return nil, DropTooBig
		}
		pkt = buf[off-IPv4HeaderLen : off+n]
		PutIPv4Header(pkt, n, ProtoTCP, src, dst)
	} else {
		if n > 0xffff {
			return nil, DropTooBig
		}
		pkt = buf[off-IPv6HeaderLen : off+n]
		PutIPv6Header(pkt, n, ProtoTCP, src, dst)
	}
	if partial {
		binary.BigEndian.PutUint16(seg[16:], Fold(PseudoSum(src, dst, ProtoTCP, n)))
	} else {
		SetTCPChecksum(seg, src, dst)
	}
	return pkt, DropNone
}

// PutIPv4Header writes a 20-byte IPv4 header (DF, TTL 64) for a payload of
// n bytes at the start of b.
func PutIPv4Header(b []byte, n int, proto uint8, src, dst netip.Addr) {
	h := b[:IPv4HeaderLen]
	h[0], h[1] = 0x45, 0
	binary.BigEndian.PutUint16(h[2:], uint16(IPv4HeaderLen+n))
	h[4], h[5] = 0, 0
	h[6], h[7] = 0x40, 0 // DF: the inner TCP does its own path MTU discovery
	h[8], h[9] = 64, proto
	h[10], h[11] = 0, 0
	s, d := src.As4(), dst.As4()
	copy(h[12:], s[:])
	copy(h[16:], d[:])
	binary.BigEndian.PutUint16(h[10:], ^Fold(Sum(h, 0)))
}

// PutIPv6Header writes a 40-byte IPv6 header (hop limit 64) for a payload
// of n bytes at the start of b.
func PutIPv6Header(b []byte, n int, proto uint8, src, dst netip.Addr) {
	h := b[:IPv6HeaderLen]
	h[0], h[1], h[2], h[3] = 0x60, 0, 0, 0
	binary.BigEndian.PutUint16(h[4:], uint16(n))
	h[6], h[7] = proto, 64
	s, d := src.As16(), dst.As16()
	copy(h[8:], s[:])
	copy(h[24:], d[:])
}
