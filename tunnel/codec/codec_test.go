package codec

import (
	"bytes"
	"io"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// A packet built by gopacket (the reference) is stripped and re-wrapped
// with other addresses; gopacket must then agree on every checksum.
func TestStripWrapAgainstGopacket(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, size := range []int{0, 1, 2, 3, 100, 1399, 1400} {
			src, dst := netip.MustParseAddr("198.51.100.1"), netip.MustParseAddr("192.0.2.2")
			nsrc, ndst := netip.MustParseAddr("203.0.113.7"), netip.MustParseAddr("203.0.113.1")
			if v6 {
				src, dst = netip.MustParseAddr("2001:db8:2::1"), netip.MustParseAddr("2001:db8:1::2")
				nsrc, ndst = netip.MustParseAddr("2001:db8:3::7"), netip.MustParseAddr("2001:db8:3::1")
			}
			pkt := buildTCP(t, src, dst, size)
			seg, s, d, why := StripIP(pkt)
			if why != DropNone || s != src || d != dst || len(seg) != 20+size {
				t.Fatalf("strip: %v %v %v %d", why, s, d, len(seg))
			}
			if !TCPChecksumOK(seg, src, dst) {
				t.Fatalf("gopacket's checksum not accepted")
			}
			buf := make([]byte, Headroom+len(seg))
			copy(buf[Headroom:], seg)
			out, why := WrapTCP(buf, Headroom, len(seg), nsrc, ndst)
			if why != DropNone || Version(out) == 0 {
				t.Fatalf("wrap: %v", why)
			}
			p := gopacket.NewPacket(out, map[bool]gopacket.LayerType{false: layers.LayerTypeIPv4, true: layers.LayerTypeIPv6}[v6], gopacket.Default)
			tcp, _ := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
			if tcp == nil || len(tcp.Payload) != size {
				t.Fatalf("gopacket cannot parse the result: %v", p)
			}
			want := tcp.Checksum
			if v6 {
				ip := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6)
				tcp.SetNetworkLayerForChecksum(ip)
			} else {
				ip := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
				tcp.SetNetworkLayerForChecksum(ip)
				ipb := gopacket.NewSerializeBuffer()
				ip2 := *ip
				gopacket.SerializeLayers(ipb, gopacket.SerializeOptions{ComputeChecksums: true}, &ip2, gopacket.Payload(ip.Payload))
				if ip2.Checksum != ip.Checksum {
					t.Fatalf("IPv4 header checksum %#x, gopacket computes %#x", ip.Checksum, ip2.Checksum)
				}
			}
			sb := gopacket.NewSerializeBuffer()
			gopacket.SerializeLayers(sb, gopacket.SerializeOptions{ComputeChecksums: true}, tcp, gopacket.Payload(tcp.Payload))
			if tcp.Checksum != want {
				t.Fatalf("v6=%v size %d: TCP checksum %#x, gopacket computes %#x", v6, size, want, tcp.Checksum)
			}
		}
	}
}

func buildTCP(t *testing.T, src, dst netip.Addr, size int) []byte {
	t.Helper()
	payload := bytes.Repeat([]byte{0xa5, 0x17, 0x3c}, size)[:size]
	tcp := &layers.TCP{SrcPort: 40000, DstPort: 5001, Seq: 7, Ack: 9, ACK: true, Window: 512}
	var l gopacket.SerializableLayer
	if src.Is4() {
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		tcp.SetNetworkLayerForChecksum(ip)
		l = ip
	} else {
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolTCP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
		tcp.SetNetworkLayerForChecksum(ip)
		l = ip
	}
	sb := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(sb, gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}, l, tcp, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return sb.Bytes()
}

func TestStripRefuses(t *testing.T) {
	v4 := buildTCP(t, netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), 10)
	mod := func(f func(p []byte)) []byte { p := append([]byte(nil), v4...); f(p); return p }
	for name, tc := range map[string]struct {
		pkt  []byte
		want Drop
	}{
		"empty":     {nil, DropMalformed},
		"short":     {v4[:10], DropMalformed},
		"udp":       {mod(func(p []byte) { p[9] = 17 }), DropNotTCP},
		"options":   {mod(func(p []byte) { p[0] = 0x46 }), DropIPOptions},
		"fragment":  {mod(func(p []byte) { p[6] |= 0x20 }), DropFragment},
		"offset":    {mod(func(p []byte) { p[7] = 1 }), DropFragment},
		"length":    {mod(func(p []byte) { p[2], p[3] = 0xff, 0xff }), DropMalformed},
		"tcp off":   {mod(func(p []byte) { p[32] = 0xf0 }), DropMalformed},
		"version 5": {mod(func(p []byte) { p[0] = 0x55 }), DropMalformed},
	} {
		if _, _, _, why := StripIP(tc.pkt); why != tc.want {
			t.Errorf("%s: %v, want %v", name, why, tc.want)
		}
	}
}

type chunky struct {
	data []byte
	n    int
}

func (c *chunky) Read(p []byte) (int, error) {
	if len(c.data) == 0 {
		return 0, io.EOF
	}
	n := min(c.n, len(p), len(c.data))
	copy(p, c.data[:n])
	c.data = c.data[n:]
	return n, nil
}

func TestFrameReader(t *testing.T) {
	var stream []byte
	var want [][]byte
	for i := 1; i <= 300; i++ {
		p := bytes.Repeat([]byte{byte(i)}, i*5)
		want = append(want, p)
		hdr := make([]byte, 2)
		PutFrameHeader(hdr, len(p))
		stream = append(append(stream, hdr...), p...)
	}
	for _, chunk := range []int{1, 7, 1500, 1 << 20} {
		fr := NewFrameReader(&chunky{data: stream, n: chunk}, 1500)
		for i, w := range want {
			got, err := fr.Next()
			if err != nil || !bytes.Equal(got, w) {
				t.Fatalf("chunk %d frame %d: %v", chunk, i, err)
			}
		}
		if _, err := fr.Next(); err != io.EOF {
			t.Fatalf("after the last frame: %v", err)
		}
	}
	fr := NewFrameReader(bytes.NewReader([]byte{0x05, 0xdd, 1, 2}), 1500)
	if _, err := fr.Next(); err == nil {
		t.Fatal("a 1501-byte frame was accepted with a 1500 limit")
	}
	fr = NewFrameReader(bytes.NewReader([]byte{0, 0}), 1500)
	if _, err := fr.Next(); err == nil {
		t.Fatal("an empty frame was accepted")
	}
}

func BenchmarkChecksum1400(b *testing.B) {
	buf := make([]byte, 1400)
	b.SetBytes(1400)
	for b.Loop() {
		Fold(Sum(buf, 0))
	}
}
