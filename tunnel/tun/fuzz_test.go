package tun

import (
	"os"
	"testing"
)

// Super-packets the kernel (or a bug) might hand over: segmenting never
// panics, and merging whatever comes out never panics either.
func FuzzSegmentMerge(f *testing.F) {
	f.Add(uint8(vnetGSOTCPv4), uint16(100), []byte{0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 1, 192, 0, 2, 2,
		0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20})
	f.Fuzz(func(t *testing.T, gso uint8, mss uint16, pkt []byte) {
		r := &Reader{headroom: 2, segs: make([][]byte, maxSegsPerRead)}
		for i := range r.segs {
			r.segs[i] = make([]byte, 2+1500)
		}
		h := vnetHdr{gsoType: gso, gsoSize: mss, flags: vnetFlagNeedsCsum, csumStart: 20, csumOffset: 16}
		out, _, _ := r.segment(nil, 0, pkt, &h)
		finishChecksum(append([]byte(nil), pkt...), &h)
		null, _ := os.OpenFile(os.DevNull, os.O_WRONLY, 0)
		defer null.Close()
		w := (&Device{file: null, vnet: true}).NewWriter()
		w.Write(pkt, true)
		for _, s := range out {
			w.Write(s, false)
		}
		w.Flush()
	})
}
