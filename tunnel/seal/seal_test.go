package seal

import (
	"bytes"
	"crypto/rand"
	"testing"
	"time"
)

func pair(t testing.TB, c Cipher) (client, server *Session) {
	t.Helper()
	psk, nc, ns := make([]byte, 32), make([]byte, 32), make([]byte, 32)
	rand.Read(psk)
	rand.Read(nc)
	rand.Read(ns)
	kc, err := Derive(psk, nc, ns, true)
	if err != nil {
		t.Fatal(err)
	}
	ks, _ := Derive(psk, nc, ns, false)
	now := time.Now()
	return NewSession(c, kc, 0, now), NewSession(c, ks, 0, now)
}

func TestDerive(t *testing.T) {
	psk, nc, ns := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32), bytes.Repeat([]byte{3}, 32)
	c, _ := Derive(psk, nc, ns, true)
	s, _ := Derive(psk, nc, ns, false)
	if c.Send != s.Recv || c.Recv != s.Send || c.SendID != s.RecvID || c.RecvID != s.SendID {
		t.Fatal("the two sides' keys do not mirror each other")
	}
	if c.Send == c.Recv {
		t.Fatal("both directions share a key")
	}
	other, _ := Derive(psk, ns, nc, true) // nonces swapped: another session
	if other.Send == c.Send {
		t.Fatal("keys do not depend on the nonces' order")
	}
	psk2 := bytes.Repeat([]byte{9}, 32)
	if k, _ := Derive(psk2, nc, ns, true); k.Send == c.Send {
		t.Fatal("keys do not depend on the pre-shared key")
	}
}

func TestSealOpen(t *testing.T) {
	for _, c := range []Cipher{AESGCM, ChaCha20Poly1305} {
		t.Run(c.String(), func(t *testing.T) {
			cli, srv := pair(t, c)
			now := time.Now().UnixNano()
			msg := []byte("a TCP segment, say")
			buf := make([]byte, 2048)
			var recs [][]byte
			for i := 0; i < 3; i++ {
				rec, ok := cli.Seal(buf, TypeData, msg)
				if !ok || len(rec) != len(msg)+Overhead {
					t.Fatalf("seal: %v %d", ok, len(rec))
				}
				if bytes.Contains(rec, msg) {
					t.Fatal("the plaintext is visible in the record")
				}
				recs = append(recs, bytes.Clone(rec))
			}
			// Reordered within the window: 2, 0, 1 all accepted once.
			for _, i := range []int{2, 0, 1} {
				r := bytes.Clone(recs[i])
				typ, pt, newest, why := srv.Open(nil, r, now)
				if why != OK || typ != TypeData || !bytes.Equal(pt, msg) || newest != (i == 2) {
					t.Fatalf("record %d: %v %d %q newest %v", i, why, typ, pt, newest)
				}
			}
			// Replays refused.
			for i := range recs {
				if _, _, _, why := srv.Open(nil, bytes.Clone(recs[i]), now); why != Replay {
					t.Fatalf("replay of %d: %v", i, why)
				}
			}
			// Every single bit flipped is refused, and the window does not move.
			rec, _ := cli.Seal(buf, TypeKeepalive, msg)
			for bit := 0; bit < len(rec)*8; bit++ {
				r := bytes.Clone(rec)
				r[bit/8] ^= 1 << (bit % 8)
				if _, _, _, why := srv.Open(nil, r, now); why == OK {
					t.Fatalf("bit %d flipped: accepted", bit)
				}
			}
			if typ, _, _, why := srv.Open(make([]byte, 100), bytes.Clone(rec), now); why != OK || typ != TypeKeepalive {
				t.Fatalf("the genuine record after the forgeries: %v", why)
			}
			// The other direction's key does not open it.
			r2, _ := cli.Seal(buf, TypeData, msg)
			if _, _, _, why := cli.Open(nil, bytes.Clone(r2), now); why == OK {
				t.Fatal("a record opened with its sender's own session")
			}
			// Worn out by time.
			if _, _, _, why := srv.Open(nil, r2, now+int64(RejectAfter(DefaultRekeyAfter))+1); why != Stale {
				t.Fatalf("stale session: %v", why)
			}
		})
	}
}

func TestWindow(t *testing.T) {
	var w Window
	seen := map[uint64]bool{}
	var last uint64
	check := func(c uint64) {
		t.Helper()
		want := Fresh
		switch {
		case seen[c]:
			want = Replayed
		case c <= last && last-c > WindowSize:
			want = TooOld
		}
		if got := w.Check(c); got != want {
			t.Fatalf("counter %d (newest %d): %v, want %v", c, last, got, want)
		}
		if want == Fresh {
			w.Accept(c)
			seen[c] = true
			last = max(last, c)
		}
	}
	for _, c := range []uint64{0, 0, 5, 3, 5, 1, 2000, 16, 17, 15, 2000 - WindowSize, 2000 - WindowSize - 1, 1 << 20, 1<<20 - 100, 1<<20 - 100, 1<<20 - 2047, 1<<20 + 64, 1<<20 + 63} {
		check(c)
	}
	if w.Check(1<<20+10) != Fresh || w.Check(1<<20+64) != Replayed {
		t.Fatal("bits after the word jump")
	}
}

// FuzzOpen feeds arbitrary records to a session: nothing panics and
// nothing is accepted that its peer did not seal (the fuzzer may mutate
// the genuine seeds, but a mutated record must fail).
func FuzzOpen(f *testing.F) {
	psk, nc, ns := bytes.Repeat([]byte{7}, 32), bytes.Repeat([]byte{8}, 32), bytes.Repeat([]byte{9}, 32)
	kc, _ := Derive(psk, nc, ns, true)
	ks, _ := Derive(psk, nc, ns, false)
	t0 := time.Unix(1e9, 0)
	cli := NewSession(AESGCM, kc, 0, t0)
	genuine := map[string]bool{}
	buf := make([]byte, 256)
	for i, m := range []string{"", "x", "a longer payload of several bytes", string(make([]byte, 100))} {
		rec, _ := cli.Seal(buf, byte(TypeData+i%3), []byte(m))
		genuine[string(rec)] = true
		f.Add(bytes.Clone(rec))
	}
	f.Add([]byte{})
	f.Add(make([]byte, Overhead))
	f.Fuzz(func(t *testing.T, rec []byte) {
		srv := NewSession(AESGCM, ks, 0, t0)
		orig := string(rec)
		for range 2 {
			r := []byte(orig)
			_, _, _, why := srv.Open(nil, r, t0.UnixNano())
			if why == OK && !genuine[orig] {
				t.Fatalf("accepted a record nobody sealed: %x", orig)
			}
		}
	})
}

func BenchmarkSeal(b *testing.B) {
	for _, c := range []Cipher{AESGCM, ChaCha20Poly1305} {
		b.Run(c.String(), func(b *testing.B) {
			cli, srv := pair(b, c)
			buf := make([]byte, 1500+Overhead)
			pt := make([]byte, 1400)
			b.SetBytes(int64(len(pt)))
			b.ReportAllocs()
			now := time.Now().UnixNano()
			for b.Loop() {
				rec, _ := cli.Seal(buf, TypeData, pt)
				if _, _, _, why := srv.Open(nil, rec, now); why != OK {
					b.Fatal(why)
				}
			}
		})
	}
}
