// Package codec turns packets from the TUN device into what goes on the wire
// and back: stripping and rebuilding IP headers around TCP segments
// (TCP over UDP), checksums, and the length-prefixed frames of IP over TCP.
// It never allocates: callers hand in buffers with headroom.
package codec

import (
	"encoding/binary"
	"net/netip"
)

// Sum adds b to a running ones' complement sum (not yet folded).
func Sum(b []byte, acc uint64) uint64 {
	// 32-bit big-endian words into a 64-bit accumulator: carries collect in
	// the upper half and are folded once at the end.
	for len(b) >= 32 {
		acc += uint64(binary.BigEndian.Uint32(b[0:4])) + uint64(binary.BigEndian.Uint32(b[4:8])) +
			uint64(binary.BigEndian.Uint32(b[8:12])) + uint64(binary.BigEndian.Uint32(b[12:16])) +
			uint64(binary.BigEndian.Uint32(b[16:20])) + uint64(binary.BigEndian.Uint32(b[20:24])) +
			uint64(binary.BigEndian.Uint32(b[24:28])) + uint64(binary.BigEndian.Uint32(b[28:32]))
		b = b[32:]
	}
	for len(b) >= 4 {
		acc += uint64(binary.BigEndian.Uint32(b))
		b = b[4:]
	}
	if len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return acc
}

// Fold reduces a running sum to 16 bits (not complemented).
func Fold(acc uint64) uint16 {
	for acc>>16 != 0 {
		acc = (acc & 0xffff) + acc>>16
	}
	return uint16(acc)
}

// PseudoSum is the running sum of the TCP/UDP pseudo header.
func PseudoSum(src, dst netip.Addr, proto uint8, length int) uint64 {
	var acc uint64
	if src.Is4() {
		s, d := src.As4(), dst.As4()
		acc = Sum(s[:], 0)
		acc = Sum(d[:], acc)
	} else {
		s, d := src.As16(), dst.As16()
		acc = Sum(s[:], 0)
		acc = Sum(d[:], acc)
	}
	return acc + uint64(proto) + uint64(length)
}

// SetTCPChecksum computes the full checksum of the TCP segment seg as sent
// from src to dst and stores it.
func SetTCPChecksum(seg []byte, src, dst netip.Addr) {
	seg[16], seg[17] = 0, 0
	c := ^Fold(Sum(seg, PseudoSum(src, dst, ProtoTCP, len(seg))))
	binary.BigEndian.PutUint16(seg[16:], c)
}

// TCPChecksumOK reports whether seg carries a valid checksum for src → dst.
func TCPChecksumOK(seg []byte, src, dst netip.Addr) bool {
	return Fold(Sum(seg, PseudoSum(src, dst, ProtoTCP, len(seg)))) == 0xffff
}
