package udpsock

import (
	"bytes"
	"net/netip"
	"testing"
)

// Datagrams sent in one batch (as GSO trains when offloads are on) arrive
// complete and in order, whether or not the receiver gets them coalesced.
func TestBatchRoundTrip(t *testing.T) {
	for _, offload := range []bool{false, true} {
		rx, err := Listen(Options{Offload: offload})
		if err != nil {
			t.Fatal(err)
		}
		defer rx.Close()
		tx, err := Listen(Options{Offload: offload})
		if err != nil {
			t.Fatal(err)
		}
		defer tx.Close()
		to := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), rx.Port())
		var sent [][]byte
		out := NewBatch(40, 0, 0)
		for i := range 40 {
			size := 1000
			switch {
			case i == 19:
				size = 300 // ends a train
			case i == 30:
				size = 0 // an empty datagram
			}
			p := bytes.Repeat([]byte{byte(i)}, size)
			sent = append(sent, p)
			out.Out[i], out.Peers[i] = append(p, 0)[:size], to
		}
		if err := tx.WriteBatch(out, 40); err != nil {
			t.Fatal(err)
		}
		in := NewBatch(8, 65535, 0)
		var got [][]byte
		msgs := 0
		for len(got) < len(sent) {
			n, err := rx.ReadBatch(in)
			if err != nil {
				t.Fatal(err)
			}
			for i := range n {
				msgs++
				if in.Peers[i].Port() != tx.Port() {
					t.Fatalf("from %v", in.Peers[i])
				}
				p, step := in.Payload(i), in.Step(i)
				for o := 0; o < len(p) || o == 0; o += step {
					got = append(got, append([]byte(nil), p[o:min(o+step, len(p))]...))
				}
			}
		}
		for i := range sent {
			if !bytes.Equal(got[i], sent[i]) {
				t.Fatalf("offload=%v: datagram %d: %d bytes, want %d", offload, i, len(got[i]), len(sent[i]))
			}
		}
		t.Logf("offload=%v: 40 datagrams in %d received messages", offload, msgs)
	}
}
