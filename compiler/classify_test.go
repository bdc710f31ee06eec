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
	checkFields(t, "matchesSig", want)
}

// checkFields fails for each type whose fields are not those sig knows.
func checkFields(t *testing.T, sig string, want map[reflect.Type][]string) {
	t.Helper()
	for typ, fields := range want {
		var got []string
		for i := 0; i < typ.NumField(); i++ {
			got = append(got, typ.Field(i).Name)
		}
		if !slices.Equal(got, fields) {
			t.Errorf("%v has fields %v, %s knows %v", typ, got, sig, fields)
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
// evaluation; segment after segment (reset), its bitmaps reused.
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
	var bitmap *portOwners
	for seg := range 4 {
		o.reset()
		for _, sh := range shapes {
			o.addShape(sh)
		}
		if o.ports[0] == nil || o.ports[1] != nil {
			t.Fatalf("port bitmaps %v", o.ports)
		}
		if seg > 0 && o.ports[0] != bitmap {
			t.Fatalf("segment %d: a new port bitmap", seg)
		}
		bitmap = o.ports[0]
		held := map[ref]bool{} // value: open
		for range 20000 >> seg {
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
				t.Fatalf("segment %d, shape %d key %x: open %v, want %v", seg, sh, k, got, want)
			}
			open := r.IntN(2) == 0
			_, dup := held[rk]
			if got := o.claim(sh, k, open); got == dup {
				t.Fatalf("segment %d, shape %d key %x: claim %v, held before %v", seg, sh, k, got, dup)
			}
			if !dup {
				held[rk] = open
			}
		}
	}
}

// bodySig encodes every field of a rule, its statements and actions that
// bodyKey prints: a new field must be added there (or two rules that print
// apart could share a body).
func TestBodySigFields(t *testing.T) {
	want := map[reflect.Type][]string{
		reflect.TypeFor[grammar.Rule](): {"Span", "Handle", "Family", "Saddr", "Daddr", "Proto", "Sport", "Dport", "TCPFlags", "MetaMark", "CtMark",
			"Counter", "SetMetaMark", "SetCtMark", "Trace", "Actions", "Comment"},
		reflect.TypeFor[grammar.MarkSet]():      {"Span", "Value", "Mask", "HasMask"},
		reflect.TypeFor[grammar.Action]():       {"Span", "Kind", "Proto", "Funnel", "DNATAddr", "DNATPort"},
		reflect.TypeFor[grammar.FunnelHeader](): {"Sport", "Dport", "HasSport", "HasDport", "Flags", "Seq", "Ack", "Window", "HasFlags", "HasSeq", "HasAck", "HasWindow", "MSS", "HasMSS", "MSSOff"},
	}
	checkFields(t, "bodySig", want)
}

// The memo gives the body key the printer gives, over rules that differ in
// every field the body key prints, and it is used.
func TestBodyKeyMemo(t *testing.T) {
	r := rand.New(rand.NewPCG(4, 4))
	pick := func(n int) int { return r.IntN(n) }
	markSet := func() *grammar.MarkSet {
		if pick(3) > 0 {
			return nil
		}
		return &grammar.MarkSet{Span: grammar.Span{Pos: grammar.Pos{Line: pick(9)}}, Value: uint32(pick(3)), Mask: []uint32{0xff, 0xffffffff}[pick(2)], HasMask: pick(2) == 0}
	}
	action := func() *grammar.Action {
		a := &grammar.Action{Span: grammar.Span{Pos: grammar.Pos{Line: pick(9)}}}
		switch pick(4) {
		case 0:
			a.Kind = grammar.ActAccept
		case 1:
			a.Kind = grammar.ActDrop
		case 2:
			a.Kind, a.Proto = grammar.ActFunnel, grammar.Proto([]uint8{6, 17}[pick(2)])
			b := func() bool { return pick(2) == 0 }
			a.Funnel = &grammar.FunnelHeader{Sport: uint16(pick(2)), Dport: uint16(pick(3)), HasSport: b(), HasDport: b(),
				Flags: uint8(pick(3)), Seq: uint32(pick(2)), Ack: uint32(pick(2)), Window: uint16(pick(2)),
				HasFlags: b(), HasSeq: b(), HasAck: b(), HasWindow: b(), MSS: uint16(536 * pick(2)), HasMSS: b(), MSSOff: b()}
		default:
			a.Kind, a.DNATAddr, a.DNATPort = grammar.ActDNAT, netip.AddrFrom4([4]byte{192, 0, 2, byte(pick(3))}), uint16(pick(2)*53)
		}
		return a
	}
	// clone copies what the mutations below change.
	clone := func(r *grammar.Rule) *grammar.Rule {
		c := *r
		c.Actions = nil
		for _, a := range r.Actions {
			ac := *a
			if a.Funnel != nil {
				f := *a.Funnel
				ac.Funnel = &f
			}
			c.Actions = append(c.Actions, &ac)
		}
		return &c
	}
	// Each changes one field the body key prints (when it is printed).
	funnel := func(f func(h *grammar.FunnelHeader)) func(r *grammar.Rule) {
		return func(r *grammar.Rule) {
			for _, a := range r.Actions {
				if a.Funnel != nil {
					f(a.Funnel)
				}
			}
		}
	}
	mutations := []func(r *grammar.Rule){
		func(r *grammar.Rule) { r.Family = (r.Family + 1) % 3 },
		func(r *grammar.Rule) { r.Proto = grammar.Proto([]uint8{6, 17, 0}[pick(3)]) },
		func(r *grammar.Rule) { r.Counter = !r.Counter },
		func(r *grammar.Rule) { r.Trace = !r.Trace },
		func(r *grammar.Rule) { r.SetMetaMark = markSet() },
		func(r *grammar.Rule) { r.SetCtMark = markSet() },
		func(r *grammar.Rule) { r.Actions = append(r.Actions, action()) },
		func(r *grammar.Rule) {
			for _, a := range r.Actions {
				a.Kind, a.Proto, a.DNATAddr, a.DNATPort = grammar.ActDNAT, 0, netip.AddrFrom4([4]byte{198, 51, 100, byte(pick(2))}), uint16(pick(3))
				a.Funnel = nil
			}
		},
		funnel(func(h *grammar.FunnelHeader) { h.Sport++; h.HasSport = true }),
		funnel(func(h *grammar.FunnelHeader) { h.Dport++; h.HasDport = true }),
		funnel(func(h *grammar.FunnelHeader) { h.Flags++; h.HasFlags = true }),
		funnel(func(h *grammar.FunnelHeader) { h.Seq++; h.HasSeq = true }),
		funnel(func(h *grammar.FunnelHeader) { h.Ack++; h.HasAck = true }),
		funnel(func(h *grammar.FunnelHeader) { h.Window++; h.HasWindow = true }),
		funnel(func(h *grammar.FunnelHeader) { h.MSS += 536; h.HasMSS, h.MSSOff = true, false }),
		funnel(func(h *grammar.FunnelHeader) { h.MSSOff = !h.MSSOff }),
		funnel(func(h *grammar.FunnelHeader) { h.HasSport = !h.HasSport }),
	}
	memo := newShapeMemo()
	check := func(rule *grammar.Rule) {
		t.Helper()
		if got, want := memo.bodyKey(rule), bodyKey(rule); got != want {
			t.Fatalf("rule %s: memo gives %q, the printer %q", Describe(rule), got, want)
		}
	}
	for i := 0; i < 2000; i++ {
		rule := &grammar.Rule{Family: grammar.Family(pick(3)), Proto: grammar.Proto([]uint8{0, 6, 17}[pick(3)]),
			Counter: pick(2) == 0, Trace: pick(4) == 0, SetMetaMark: markSet(), SetCtMark: markSet(), Comment: []string{"", "c"}[pick(2)]}
		for range pick(4) {
			rule.Actions = append(rule.Actions, action())
		}
		check(rule)
		for _, m := range mutations {
			c := clone(rule)
			m(c)
			check(c)
		}
	}
	if n := len(memo.bodies); n < 1000 || n > 30000 {
		t.Fatalf("%d bodies in the memo of 36 000 rules", n)
	}
}
