package compiler

import (
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
)

// matchesSig encodes every field of the match types but their spans: a
// new field must be added there (or two shapes could share a key).
func TestMatchesSigFields(t *testing.T) {
	want := map[reflect.Type][]string{
		reflect.TypeFor[grammar.AddrMatch]():  {"Span", "Neg", "Prefixes", "Set"},
		reflect.TypeFor[grammar.PortMatch]():  {"Span", "Neg", "Ranges", "Set"},
		reflect.TypeFor[grammar.PortRange]():  {"Lo", "Hi"},
		reflect.TypeFor[grammar.FlagsMatch](): {"Span", "Form", "Flags", "Mask"},
		reflect.TypeFor[grammar.MarkMatch]():  {"Span", "Neg", "Value", "Mask", "HasMask"},
	}
	for typ, fields := range want {
		var got []string
		for i := 0; i < typ.NumField(); i++ {
			got = append(got, typ.Field(i).Name)
		}
		if !slices.Equal(got, fields) {
			t.Errorf("%v has fields %v, matchesSig knows %v", typ, got, fields)
		}
	}
}

// The memo gives the key the printer gives, over rules that differ in
// every match field.
func TestShapeKeyMemo(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	pick := func(n int) int { return r.IntN(n) }
	addr := func() *grammar.AddrMatch {
		if pick(3) == 0 {
			return nil
		}
		m := &grammar.AddrMatch{Neg: pick(4) == 0}
		if pick(5) == 0 {
			m.Set = []string{"a", "b"}[pick(2)]
			return m
		}
		for i := 0; i <= pick(2); i++ {
			m.Prefixes = append(m.Prefixes, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(pick(2)), 0, byte(pick(3))}), []int{8, 24, 32}[pick(3)]).Masked())
		}
		return m
	}
	port := func() *grammar.PortMatch {
		if pick(3) == 0 {
			return nil
		}
		m := &grammar.PortMatch{Neg: pick(4) == 0}
		if pick(5) == 0 {
			m.Set = "p"
			return m
		}
		lo := uint16(pick(3) * 1000)
		m.Ranges = []grammar.PortRange{{Lo: lo, Hi: lo + uint16([]int{0, 5, 3000}[pick(3)])}}
		return m
	}
	mark := func() *grammar.MarkMatch {
		if pick(2) == 0 {
			return nil
		}
		return &grammar.MarkMatch{Neg: pick(4) == 0, Value: uint32(pick(3)), Mask: []uint32{0xff, 0xffffffff}[pick(2)], HasMask: pick(2) == 0}
	}
	c := &compiler{}
	memo := newShapeMemo()
	for i := 0; i < 5000; i++ {
		rule := &grammar.Rule{Family: grammar.FamilyIPv4, Proto: grammar.Proto([]uint8{0, 6, 17}[pick(3)]), Saddr: addr(), Daddr: addr(),
			MetaMark: mark(), Actions: []*grammar.Action{{Kind: grammar.ActAccept}}}
		if rule.Proto != grammar.ProtoAny {
			rule.Sport, rule.Dport = port(), port()
		}
		if rule.Proto == grammar.ProtoTCP && pick(2) == 0 {
			rule.TCPFlags = &grammar.FlagsMatch{Form: grammar.FlagsForm(pick(3)), Flags: uint8(pick(4)), Mask: uint8(pick(4))}
		}
		vs, err := c.variantsMemo(rule, memo)
		if err != nil {
			continue
		}
		for _, v := range vs {
			if want := shapeKey(rule, v.sh, nil); v.sh.key != want {
				t.Fatalf("rule %s: memo gives %q, the printer %q", Describe(rule), v.sh.key, want)
			}
		}
	}
	if len(memo.keys) < 100 {
		t.Fatalf("only %d shapes drawn", len(memo.keys))
	}
}

// keyOwners answers as a map keyed by shape and key string does, for
// port-only shapes (bitmaps) and keys of every width (words, long keys):
// which keys are free, and which are held by rules that don't end
// evaluation.
func TestKeyOwners(t *testing.T) {
	r := rand.New(rand.NewPCG(8, 8))
	type ref struct {
		sh  int32
		key string
	}
	// Shapes: a port-only one, and keys of 4, 8, 16, 20 and 32 bytes.
	shapes := []*shape{{}, {}, {}, {}, {}, {}}
	shapes[0].keyed[keyDport] = true
	widths := []int{4, 4, 8, 16, 20, 32}
	o := newKeyOwners()
	for _, sh := range shapes {
		o.addShape(sh)
	}
	if o.ports[0] == nil || o.ports[1] != nil {
		t.Fatalf("port bitmaps %v", o.ports)
	}
	held := map[ref]bool{} // value: open
	for i := 0; i < 20000; i++ {
		sh := int32(r.IntN(len(shapes)))
		k := make([]byte, widths[sh])
		if sh == 0 {
			binary.NativeEndian.PutUint32(k, uint32(r.IntN(300))*200) // ports up to 59 800
		} else {
			for j := range k {
				k[j] = byte(r.IntN(3)) // few distinct keys: many repeats
			}
		}
		rk := ref{sh, string(k)}
		if got, want := o.open(sh, k), held[rk]; got != want {
			t.Fatalf("shape %d key %x: open %v, want %v", sh, k, got, want)
		}
		open := r.IntN(2) == 0
		_, dup := held[rk]
		if got := o.claim(sh, k, open); got == dup {
			t.Fatalf("shape %d key %x: claim %v, held before %v", sh, k, got, dup)
		}
		if !dup {
			held[rk] = open
		}
	}
}
