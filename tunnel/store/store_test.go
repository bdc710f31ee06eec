package store

import (
	"net/netip"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/seal"
)

func TestPoolUniqueBoundedAndExpiry(t *testing.T) {
	now := time.Now()
	s := New(Options{Pools: []netip.Prefix{netip.MustParsePrefix("203.0.113.1/29"), netip.MustParsePrefix("2001:db8:3::1/64")}, TTL: time.Minute})
	seen := map[netip.Addr]bool{}
	// A /29 has 6 hosts; one is ours: 5 peers fit.
	for i := range 5 {
		p := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), uint16(1000+i))
		e, err := s.Add(p, now)
		if err != nil {
			t.Fatalf("peer %d: %v", i, err)
		}
		a := e.Addr
		if seen[a] || a == netip.MustParseAddr("203.0.113.1") || a == netip.MustParseAddr("203.0.113.0") || a == netip.MustParseAddr("203.0.113.7") {
			t.Fatalf("bad or repeated address %s", a)
		}
		seen[a] = true
		if s.ByAddr(a) != e || s.ByPeer(p) != e {
			t.Fatalf("lookups disagree for %s", p)
		}
	}
	if _, err := s.Add(netip.MustParseAddrPort("192.0.2.1:2000"), now); err != ErrFull {
		t.Fatalf("sixth IPv4 peer: %v, want ErrFull", err)
	}
	// The same peer again keeps its address.
	e1 := s.ByPeer(netip.MustParseAddrPort("192.0.2.1:1000"))
	if e, _ := s.Add(netip.MustParseAddrPort("192.0.2.1:1000"), now); e != e1 {
		t.Fatal("re-authentication changed the entry")
	}
	e6, err := s.Add(netip.MustParseAddrPort("[2001:db8:1::1]:7473"), now)
	if err != nil || !e6.Addr.Is6() {
		t.Fatalf("IPv6 peer: %v %v", e6, err)
	}
	// Keep one entry alive, let the rest expire.
	e1.Touch(now.Add(50 * time.Second).UnixNano())
	gone := s.Expire(now.Add(70 * time.Second))
	if len(gone) != 5 || s.Len() != 1 || s.ByAddr(e6.Addr) != nil {
		t.Fatalf("expired %d, left %d", len(gone), s.Len())
	}
	// Freed addresses are handed out again.
	for i := range 4 {
		if _, err := s.Add(netip.AddrPortFrom(netip.MustParseAddr("192.0.2.9"), uint16(i+1)), now); err != nil {
			t.Fatalf("after expiry: %v", err)
		}
	}
}

func TestMaxPeers(t *testing.T) {
	s := New(Options{Pools: []netip.Prefix{netip.MustParsePrefix("2001:db8:3::1/64")}, MaxPeers: 3, TTL: time.Minute})
	for i := range 3 {
		if _, err := s.Add(netip.AddrPortFrom(netip.MustParseAddr("2001:db8::1"), uint16(i+1)), time.Now()); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.Add(netip.MustParseAddrPort("[2001:db8::1]:9"), time.Now()); err != ErrFull {
		t.Fatalf("fourth peer: %v", err)
	}
	if _, err := s.Add(netip.MustParseAddrPort("192.0.2.1:9"), time.Now()); err == nil {
		t.Fatal("IPv4 peer accepted without an IPv4 pool")
	}
}

func BenchmarkLookup(b *testing.B) {
	s := New(Options{Pools: []netip.Prefix{netip.MustParsePrefix("10.0.0.1/16")}, MaxPeers: 50000, TTL: time.Minute})
	var peers []netip.AddrPort
	for i := range 50000 {
		p := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}), uint16(i))
		s.Add(p, time.Now())
		peers = append(peers, p)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		e := s.ByPeer(peers[i%len(peers)])
		s.ByAddr(e.Addr)
		i++
	}
}

func TestSilence(t *testing.T) {
	var e Entry
	const q = 10 * time.Second
	s := int64(time.Second)
	e.Sent(1*s, q)
	if d := e.Sent(6*s, q); d != 5*time.Second {
		t.Fatalf("silent for %v, want 5s", d)
	}
	e.Heard()
	if d := e.Sent(6*s, q); d != 0 {
		t.Fatalf("after an answer: %v", d)
	}
	// Quiet for longer than q: a new count, not an hour of silence.
	if d := e.Sent(3600*s, q); d != 0 {
		t.Fatalf("after an idle hour: %v", d)
	}
	if d := e.Sent(3611*s, q); d != 0 {
		t.Fatalf("11s gap: %v", d)
	}
	for i := int64(1); i <= 12; i++ {
		e.Sent((3611+i)*s, q)
	}
	if d := e.Sent(3624*s, q); d != 13*time.Second {
		t.Fatalf("kept sending unanswered: %v", d)
	}
}

// A rekey's responder keeps sealing under the replaced session until the
// peer has used the new one: the peer learns the new keys over TCP while
// our records go over UDP, so an early record under the new session
// could reach it before it has them. The initiator switches at once.
func TestResponderAwaitsPeerBeforeSealingUnderNewSession(t *testing.T) {
	now := time.Now()
	s := New(Options{TTL: time.Minute})
	e, err := s.Add(netip.MustParseAddrPort("192.0.2.1:7000"), now)
	if err != nil {
		t.Fatal(err)
	}
	session := func(n byte) *seal.Session {
		var k seal.Keys
		k.Send[0], k.Recv[0] = n, n
		k.SendID, k.RecvID = uint32(n), uint32(n)+100
		return seal.NewSession(seal.AESGCM, k, time.Minute, now)
	}
	first, second, third := session(1), session(2), session(3)
	if err := s.Install(e, first, true); err != nil {
		t.Fatal(err)
	}
	if e.Session() != first {
		t.Fatal("a first session (nothing to fall back on) is not used at once")
	}
	if err := s.Install(e, second, true); err != nil {
		t.Fatal(err)
	}
	if e.Session() != first {
		t.Fatal("the responder seals under the new session before the peer used it")
	}
	if e.SessionFor(second.RecvID()) != second || e.SessionFor(first.RecvID()) != first {
		t.Fatal("both sessions must open records meanwhile")
	}
	e.Confirm(first) // a late record under the old session changes nothing
	if e.Session() != first {
		t.Fatal("a record under the old session confirmed the new one")
	}
	e.Confirm(second)
	if e.Session() != second {
		t.Fatal("the peer's record under the new session did not switch sealing to it")
	}
	// Two rekeys without a record between: seal under the one before the
	// newest, which the peer still keeps for receiving.
	if err := s.Install(e, third, true); err != nil {
		t.Fatal(err)
	}
	if e.Session() != second {
		t.Fatal("after a second rekey, the responder does not seal under the session the peer keeps")
	}
	// The initiator installs without waiting.
	fourth := session(4)
	if err := s.Install(e, fourth, false); err != nil || e.Session() != fourth {
		t.Fatalf("the initiator's session is not used at once (%v)", err)
	}
}
