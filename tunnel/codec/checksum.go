// Package codec turns packets from the TUN device into what goes on the wire
// and back: stripping and rebuilding IP headers around TCP segments
// (TCP over UDP), checksums, and the length-prefixed frames of IP over TCP.
// It never allocates: callers hand in buffers with headroom.
package codec

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
)

// Sum adds b to a running ones' complement sum (not yet folded).
func Sum(b []byte, acc uint64) uint64 {
	// The ones' complement sum does not depend on byte order (RFC 1071),
	// so the bulk is added as native little-endian 64-bit words with
	// end-around carries, folded to 16 bits and byte-swapped once.
	var s, c uint64
	for len(b) >= 32 {
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b[0:8]), c)
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b[8:16]), c)
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b[16:24]), c)
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b[24:32]), c)
		b = b[32:]
	}
	for len(b) >= 8 {
		s, c = bits.Add64(s, binary.LittleEndian.Uint64(b[0:8]), c)
		b = b[8:]
	}
	s, c = bits.Add64(s, c, 0)
	s += c // cannot carry again: s was at most 2^64-2 here
	if s != 0 {
		acc += uint64(bits.ReverseBytes16(Fold(s)))
	}
	for len(b) >= 2 {
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
