package codec

import (
	"bytes"
	"net/netip"
	"testing"
)

// Whatever arrives, StripIP does not panic, and a segment it accepts
// wraps into a packet that parses and carries a valid checksum.
func FuzzStripWrap(f *testing.F) {
	f.Add([]byte{0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2, 0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0})
	f.Add([]byte{0x60, 0, 0, 0, 0, 20, 6, 64})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		seg, src, dst, why := StripIP(pkt)
		Version(pkt)
		if why != DropNone {
			return
		}
		buf := make([]byte, Headroom+len(seg))
		copy(buf[Headroom:], seg)
		out, why := WrapTCP(buf, Headroom, len(seg), src, dst)
		if why != DropNone {
			if why != DropTooBig {
				t.Fatalf("accepted segment refused: %v", why)
			}
			return
		}
		if Version(out) == 0 {
			t.Fatalf("wrapped packet does not parse")
		}
		if !TCPChecksumOK(out[len(out)-len(seg):], src, dst) {
			t.Fatalf("bad checksum after wrap")
		}
		s2, src2, dst2, why := StripIP(out)
		if why != DropNone || src2 != src || dst2 != dst || !bytes.Equal(s2[20:], seg[20:]) {
			t.Fatalf("round trip: %v", why)
		}
		_ = netip.Addr{}
	})
}

// The frame reader never panics and never returns a frame above the limit.
func FuzzFrameReader(f *testing.F) {
	f.Add([]byte{0, 3, 1, 2, 3, 0, 1, 9})
	f.Add([]byte{0xff, 0xff})
	f.Fuzz(func(t *testing.T, stream []byte) {
		fr := NewFrameReader(bytes.NewReader(stream), 1500)
		for range len(stream) + 1 {
			p, err := fr.Next()
			if err != nil {
				return
			}
			if len(p) == 0 || len(p) > 1500 {
				t.Fatalf("frame of %d bytes", len(p))
			}
		}
	})
}

// sumReference is RFC 1071 done the plain way: 16-bit big-endian words.
func sumReference(b []byte) uint16 {
	var acc uint64
	for len(b) >= 2 {
		acc += uint64(b[0])<<8 | uint64(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return Fold(acc)
}

func FuzzSum(f *testing.F) {
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1})
	f.Add(bytes.Repeat([]byte{0xff}, 1500))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Ones' complement: 0x0000 and 0xffff are both zero.
		got, want := Fold(Sum(b, 0)), sumReference(b)
		if got != want && !(got|want == 0xffff && got&want == 0) {
			t.Fatalf("Sum %#x, reference %#x", got, want)
		}
	})
}
