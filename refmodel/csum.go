package refmodel

import "encoding/binary"

// Checksum arithmetic in the form the datapath uses: 16-bit fields are read
// as a little-endian load sees network-order bytes ("wire words"), so
// ones' complement sums of them can be stored back without swapping.

func le16(b []byte) uint32     { return uint32(binary.LittleEndian.Uint16(b)) }
func le32(b []byte) uint32     { return binary.LittleEndian.Uint32(b) }
func put16(b []byte, v uint32) { binary.LittleEndian.PutUint16(b, uint16(v)) }
func put32(b []byte, v uint32) { binary.LittleEndian.PutUint32(b, v) }
func be16(b []byte) uint32     { return uint32(binary.BigEndian.Uint16(b)) }

// swap16 turns a host-order 16-bit value into its wire word and back.
func swap16(v uint32) uint32 { return (v>>8)&0xff | (v&0xff)<<8 }

// fold reduces a ones' complement sum to 16 bits; 0 only for 0.
func fold(v uint64) uint32 {
	for v > 0xffff {
		v = v&0xffff + v>>16
	}
	return uint32(v)
}

// Kernel checksum primitives (include/net/checksum.h), for the helpers.

func csumAdd(a, b uint32) uint32 {
	r := a + b
	if r < b {
		r++
	}
	return r
}

func csumSub(a, b uint32) uint32 { return csumAdd(a, ^b) }

// csumFold is the kernel's csum_fold: the complement of the folded sum.
func csumFold(c uint32) uint32 { return ^fold(uint64(c)) & 0xffff }

// l4CsumReplace mirrors bpf_l4_csum_replace on a skb whose checksum is
// complete (not CHECKSUM_PARTIAL), as BPF_PROG_TEST_RUN builds it.
// size 0 means from is 0 and to is a checksum difference.
func l4CsumReplace(field []byte, from, to uint32, size int, mangled0 bool) {
	old := le16(field)
	if mangled0 && old == 0 {
		return
	}
	var n uint32
	if size == 0 {
		n = csumFold(csumAdd(to, ^old))
	} else {
		n = csumFold(csumAdd(csumSub(^old, from), to))
	}
	if mangled0 && n == 0 {
		n = 0xffff
	}
	put16(field, n)
}
