package compiler

import (
	"math/rand/v2"
	"net/netip"
	"testing"
)

// Every member is found with its value, non-members are not, and the same
// list gives the same table.
func TestHostTable(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 7))
	for _, n := range []int{1, 2, 5, 100, 10000} {
		var addrs [][4]byte
		var vals []uint32
		in := map[[4]byte]uint32{}
		for len(addrs) < n {
			a := [4]byte{10, byte(r.IntN(4)), byte(r.IntN(256)), byte(r.IntN(256))}
			if n < 10 {
				a[1] = 0 // dense: neighbours differ in the low bits only
			}
			if _, dup := in[a]; dup {
				continue
			}
			v := 1<<31 | uint32(len(addrs))
			in[a] = v
			addrs = append(addrs, a)
			vals = append(vals, v)
		}
		tab, ok := buildHostTable(addrs, vals)
		if !ok {
			t.Fatalf("n=%d: no table", n)
		}
		for a, want := range in {
			if got, ok := tab.lookup(a); !ok || got != want {
				t.Fatalf("n=%d: %v -> %#x %v, want %#x", n, netip.AddrFrom4(a), got, ok, want)
			}
		}
		for i := 0; i < 20000; i++ {
			a := [4]byte{byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256))}
			if _, member := in[a]; member {
				continue
			}
			if v, ok := tab.lookup(a); ok {
				t.Fatalf("n=%d: non-member %v found (%#x)", n, netip.AddrFrom4(a), v)
			}
		}
		if _, ok := tab.lookup([4]byte{}); ok {
			t.Fatalf("n=%d: 0.0.0.0 found in an empty slot", n)
		}
		again, _ := buildHostTable(addrs, vals)
		if string(again.data) != string(tab.data) || again.mulA != tab.mulA {
			t.Fatalf("n=%d: not deterministic", n)
		}
	}
	if hostTableOf([]netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}, nil) != nil {
		t.Fatal("a /24 got a host table")
	}
	if hostTableOf([]netip.Prefix{netip.MustParsePrefix("2001:db8::1/128")}, nil) != nil {
		t.Fatal("an IPv6 host got a host table")
	}
}
