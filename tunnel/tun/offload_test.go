package tun

import (
	"bytes"
	"encoding/binary"
	"io"
	"net/netip"
	"os"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/tunnel/codec"
)

// superPacket builds what the kernel hands a TUN with TSO: one TCP packet
// with n*mss+tail bytes of payload and a vnet header asking for segments.
func superPacket(t *testing.T, v6 bool, mss, n, tail int) (hdr vnetHdr, pkt, payload []byte) {
	t.Helper()
	payload = make([]byte, n*mss+tail)
	for i := range payload {
		payload[i] = byte(i * 7)
	}
	tcp := &layers.TCP{SrcPort: 40000, DstPort: 5001, Seq: 0xfffff000, Ack: 77, ACK: true, PSH: true, Window: 999,
		Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}}}
	var ip gopacket.SerializableLayer
	if v6 {
		l := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolTCP,
			SrcIP: netip.MustParseAddr("2001:db8::1").AsSlice(), DstIP: netip.MustParseAddr("2001:db8::2").AsSlice()}
		tcp.SetNetworkLayerForChecksum(l)
		ip = l
		hdr.gsoType = vnetGSOTCPv6
	} else {
		l := &layers.IPv4{Version: 4, TTL: 64, Id: 100, Flags: layers.IPv4DontFragment, Protocol: layers.IPProtocolTCP,
			SrcIP: netip.MustParseAddr("192.0.2.1").AsSlice(), DstIP: netip.MustParseAddr("192.0.2.2").AsSlice()}
		tcp.SetNetworkLayerForChecksum(l)
		ip = l
		hdr.gsoType = vnetGSOTCPv4
	}
	sb := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(sb, gopacket.SerializeOptions{ComputeChecksums: true, FixLengths: true}, ip, tcp, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	pkt = sb.Bytes()
	hdr.flags = vnetFlagNeedsCsum
	hdr.gsoSize = uint16(mss)
	return hdr, pkt, payload
}

// Segmenting a super-packet gives valid MSS-sized packets (checked by
// gopacket), and merging them again gives back the super-packet.
func TestSegmentAndMerge(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, tail := range []int{0, 1, 700} {
			const mss, n = 1000, 20
			hdr, pkt, payload := superPacket(t, v6, mss, n, tail)
			r := &Reader{headroom: 2, segs: make([][]byte, maxSegsPerRead)}
			for i := range r.segs {
				r.segs[i] = make([]byte, 2+1500)
			}
			out, used, ok := r.segment(nil, 0, pkt, &hdr)
			want := n
			if tail > 0 {
				want++
			}
			if !ok || len(out) != want || used != want {
				t.Fatalf("v6=%v tail=%d: %d segments (ok=%v), want %d", v6, tail, len(out), ok, want)
			}
			var got []byte
			first := layers.LayerTypeIPv4
			if v6 {
				first = layers.LayerTypeIPv6
			}
			for i, s := range out {
				p := gopacket.NewPacket(s, first, gopacket.Default)
				if p.ErrorLayer() != nil {
					t.Fatalf("segment %d: %v", i, p.ErrorLayer().Error())
				}
				tcp := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
				if tcp.Seq != 0xfffff000+uint32(i*mss) || tcp.PSH != (i == len(out)-1) {
					t.Fatalf("segment %d: seq %#x psh %v", i, tcp.Seq, tcp.PSH)
				}
				var src, dst netip.Addr
				if v6 {
					ip := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6)
					src, dst = netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
					if int(ip.Length) != len(s)-40 {
						t.Fatalf("segment %d: payload length %d", i, ip.Length)
					}
				} else {
					ip := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4)
					src, dst = netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
					if int(ip.Length) != len(s) || ip.Id != uint16(100+i) || codec.Fold(codec.Sum(s[:20], 0)) != 0xffff {
						t.Fatalf("segment %d: IPv4 length %d id %d or header checksum wrong", i, ip.Length, ip.Id)
					}
				}
				if !codec.TCPChecksumOK(s[len(s)-len(tcp.Payload)-32:], src, dst) {
					t.Fatalf("segment %d: TCP checksum wrong", i)
				}
				got = append(got, tcp.Payload...)
			}
			if !bytes.Equal(got, payload) {
				t.Fatalf("payload differs after segmentation")
			}

			// Merge them back through a Writer writing into a pipe.
			pr, pw, _ := os.Pipe()
			d := &Device{file: pw, vnet: true}
			w := d.NewWriter()
			res := make(chan []byte, 1)
			go func() { b, _ := io.ReadAll(pr); res <- b }()
			for _, s := range out {
				if err := w.Write(s, false); err != nil {
					t.Fatal(err)
				}
			}
			w.Flush()
			pw.Close()
			b := <-res
			var h vnetHdr
			h.decode(b)
			merged := b[VnetHdrLen:]
			if len(merged) != len(pkt) || h.gsoSize != mss || h.gsoType != hdr.gsoType || h.flags != vnetFlagNeedsCsum {
				t.Fatalf("merged %d bytes (want %d), header %+v", len(merged), len(pkt), h)
			}
			// Equal to the original except the TCP checksum, which is now
			// the pseudo-header seed for the kernel to finish.
			iphl := 20
			if v6 {
				iphl = 40
			}
			a, c := append([]byte(nil), merged...), append([]byte(nil), pkt...)
			a[iphl+16], a[iphl+17], c[iphl+16], c[iphl+17] = 0, 0, 0, 0
			if !bytes.Equal(a, c) {
				t.Fatalf("merged packet differs from the original")
			}
			src, dst := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")
			if v6 {
				src, dst = netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("2001:db8::2")
			}
			seed := binary.BigEndian.Uint16(merged[iphl+16:])
			if want := codec.Fold(codec.PseudoSum(src, dst, codec.ProtoTCP, len(merged)-iphl)); seed != want || h.csumStart != uint16(iphl) || h.csumOffset != 16 {
				t.Fatalf("checksum field %#x, want the pseudo-header seed %#x; csum_start %d offset %d", seed, want, h.csumStart, h.csumOffset)
			}
		}
	}
}
