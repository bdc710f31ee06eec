package datapath

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"slices"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
)

// fmtDigest is digest as earlier versions wrote it, through fmt.Fprint:
// the digests they stored must keep matching an unchanged program.
func fmtDigest(spec *ebpf.CollectionSpec, handles []uint64) string {
	h := sha256.New()
	w := func(vs ...any) {
		for _, v := range vs {
			fmt.Fprint(h, v, "\x00")
		}
	}
	for _, n := range slices.Sorted(mapKeys(spec.Programs)) {
		p := spec.Programs[n]
		w("prog", n, p.Type, p.AttachType)
		for _, ins := range p.Instructions {
			w(uint8(ins.OpCode), uint8(ins.Dst), uint8(ins.Src), ins.Offset, ins.Constant, ins.Reference(), ins.Symbol())
		}
	}
	for _, n := range slices.Sorted(mapKeys(spec.Maps)) {
		m := spec.Maps[n]
		w("map", n, m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
		if !isSetMap(n) {
			for _, kv := range m.Contents {
				w(kv.Key, kv.Value)
			}
		}
	}
	binary.Write(h, binary.LittleEndian, handles)
	return hex.EncodeToString(h.Sum(nil))
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

func TestDigestValueAsFmt(t *testing.T) {
	type named []byte
	every := make([]byte, 256)
	for i := range every {
		every[i] = byte(i)
	}
	for _, v := range []any{every, "", "prog", uint8(0), uint8(255), int16(-32768), int16(7), uint32(1 << 31), int64(-1 << 63), int64(42),
		[]byte(nil), []byte{}, []byte{0, 1, 255}, named{1, 2}, struct{ A, B uint32 }{1, 2}, ebpf.SchedCLS, uint64(9)} {
		if got, want := string(appendDigestValue(nil, v)), fmt.Sprint(v, "\x00"); got != want {
			t.Errorf("%T %v: %q, want %q", v, v, got, want)
		}
	}
}

// The digest of programs of every kind of table (prefixes, ranges, marks,
// IPv6, dnat parameters, records of a shape) is the one fmt wrote.
func TestDigestAsStored(t *testing.T) {
	testenv.RequireRoot(t)
	for _, n := range []int{1, 30, 400} {
		prog := mixedProgram(t, n)
		if got, want := digest(prog.Spec, prog.Handles), fmtDigest(prog.Spec, prog.Handles); got != want {
			t.Errorf("%d rules: digest %s, fmt wrote %s", n, got, want)
		}
	}
}

// The digest of `sfunnel -f` of 10 000 rules of bench/control's mixed
// shapes (and dnat parameters).
func BenchmarkDigest(b *testing.B) {
	testenv.RequireRoot(b)
	prog := mixedProgram(b, 10000)
	b.Run("kind=append", func(b *testing.B) {
		for range b.N {
			digest(prog.Spec, prog.Handles)
		}
	})
	b.Run("kind=fmt", func(b *testing.B) {
		for range b.N {
			fmtDigest(prog.Spec, prog.Handles)
		}
	})
}

// mixedProgram compiles n rules of six shapes for an ingress hook.
func mixedProgram(t testing.TB, n int) *compiler.Program {
	t.Helper()
	var rules []*grammar.Rule
	for i := range n {
		var m string
		switch i % 6 {
		case 0:
			m = fmt.Sprintf("ip saddr 10.%d.%d.1 udp dport %d counter actions drop", i/250%250, i%250, 1000+i%60000)
		case 1:
			m = fmt.Sprintf("ip daddr 10.%d.%d.0/24 tcp sport %d counter actions drop", i/250%250, i%250, 2000+i%5000)
		case 2:
			m = fmt.Sprintf("udp dport %d-%d counter actions drop", 3000+i%1000, 3100+i%1000)
		case 3:
			m = fmt.Sprintf("meta mark %d counter actions accept", i)
		case 4:
			m = fmt.Sprintf("ip6 saddr 2001:db8::%x udp dport %d actions drop", i, i%60000+1)
		default:
			m = fmt.Sprintf("ip daddr 192.0.2.2 udp dport %d counter actions dnat to 192.0.2.2:%d", 5000+i%1000, 6000+i%1000)
		}
		r, err := grammar.ParseRule("<test>", m, nil)
		if err != nil {
			t.Fatal(err)
		}
		r.Handle = uint64(i + 1)
		rules = append(rules, r)
	}
	prog, err := compiler.Compile(rules, nil, compiler.Options{Hook: grammar.HookIngress})
	if err != nil {
		t.Fatal(err)
	}
	return prog
}
