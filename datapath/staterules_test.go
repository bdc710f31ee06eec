package datapath

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand"
	"reflect"
	"slices"
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
)

// The state record's rules read exactly as encoding/json reads
// []ruleRecord, whatever the texts hold.
func TestRuleRecordsJSON(t *testing.T) {
	r := rand.New(rand.NewSource(8))
	pieces := []string{"udp dport 4739 counter actions drop", ` comment "flows to LB"`, "é", "<&>", "\\", "\u2028", "\t", "\x01", "\xff", `"`, "/", "ip6 saddr 2001:db8::1"}
	for n := 0; n < 300; n++ {
		var recs []ruleRecord
		for i := r.Intn(6); i > 0; i-- {
			text := ""
			for j := r.Intn(4); j >= 0; j-- {
				text += pieces[r.Intn(len(pieces))]
			}
			rec := ruleRecord{Handle: r.Uint64() >> r.Intn(64), Text: text}
			if r.Intn(2) == 0 {
				rec.CounterAt = r.Intn(1 << 20)
			}
			recs = append(recs, rec)
		}
		if n%50 == 0 {
			recs = nil
		}
		want, err := json.Marshal(ruleRecords(recs))
		if err != nil {
			t.Fatal(err)
		}
		var plain []ruleRecord
		json.Unmarshal(want, &plain)
		for _, form := range []string{string(want), indent(t, want)} {
			var back ruleRecords
			if err := json.Unmarshal([]byte(form), &back); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual([]ruleRecord(back), plain) {
				t.Fatalf("%s\nreads back as %+v, want %+v", form, back, plain)
			}
		}
	}
	// Forms the fast reader leaves to encoding/json: another key, a
	// number with an exponent, a key in escapes; errors stay errors.
	for _, form := range []string{
		`[{"handle":1,"text":"a","new_field":[1,{"x":2}]}]`,
		`[{"handle":1e1,"text":"a"}]`,
		`[{"h\u0061ndle":3,"text":"a"}]`,
		`[{"handle":01,"text":"a"}]`,
		`[{"handle":"1","text":"a"}]`,
		`[{"handle":1,"text":"a"},]`,
		`[{"handle":1,"text":"a"}`,
	} {
		var plain []ruleRecord
		perr := json.Unmarshal([]byte(form), &plain)
		var back ruleRecords
		err := json.Unmarshal([]byte(form), &back)
		if (err == nil) != (perr == nil) || err == nil && !reflect.DeepEqual([]ruleRecord(back), plain) {
			t.Errorf("%s: read as %+v, %v; encoding/json: %+v, %v", form, back, err, plain, perr)
		}
	}
}

func indent(t *testing.T, data []byte) string {
	var out bytes.Buffer
	if err := json.Indent(&out, data, " ", "\t"); err != nil {
		t.Fatal(err)
	}
	return out.String()
}

// BenchmarkRuleRecords: the rules of a 10 000-rule hook read (kind=fast)
// against encoding/json on []ruleRecord (kind=reflect).
func BenchmarkRuleRecords(b *testing.B) {
	recs := make([]ruleRecord, 10000)
	for i := range recs {
		recs[i] = ruleRecord{Handle: uint64(i + 1), Text: fmt.Sprintf("ip saddr 10.%d.%d.1 udp dport %d counter actions drop", i/250%250, i%250, 1000+i), CounterAt: 40}
	}
	data, _ := json.Marshal(recs)
	b.Run("read/kind=fast", func(b *testing.B) {
		for range b.N {
			var rr ruleRecords
			json.Unmarshal(data, &rr)
		}
	})
	b.Run("read/kind=reflect", func(b *testing.B) {
		for range b.N {
			var rr []ruleRecord
			json.Unmarshal(data, &rr)
		}
	})
}

// The record's number and boolean arrays read as encoding/json reads them.
func TestNumbersAndFlagsJSON(t *testing.T) {
	r := rand.New(rand.NewSource(9))
	for n := 0; n < 200; n++ {
		var u64 []uint64
		var u32 []uint32
		var ints []int
		var bs []bool
		for i := r.Intn(8); i > 0; i-- {
			u64 = append(u64, r.Uint64()>>r.Intn(64))
			u32 = append(u32, r.Uint32()>>r.Intn(32))
			ints = append(ints, r.Intn(1<<20))
			bs = append(bs, r.Intn(2) == 0)
		}
		same(t, u64, func(b []byte) (any, error) {
			var v numbers[uint64]
			err := json.Unmarshal(b, &v)
			return []uint64(v), err
		})
		same(t, u32, func(b []byte) (any, error) {
			var v numbers[uint32]
			err := json.Unmarshal(b, &v)
			return []uint32(v), err
		})
		same(t, ints, func(b []byte) (any, error) { var v numbers[int]; err := json.Unmarshal(b, &v); return []int(v), err })
		same(t, bs, func(b []byte) (any, error) { var v flags; err := json.Unmarshal(b, &v); return []bool(v), err })
	}
	for _, form := range []string{`[4294967296]`, `[-1]`, `[1.5]`, `[18446744073709551615]`, `[1,]`, `[true]`, `null`, ` [ 1 , 2 ] `} {
		var plain []uint32
		perr := json.Unmarshal([]byte(form), &plain)
		var v numbers[uint32]
		err := json.Unmarshal([]byte(form), &v)
		if (err == nil) != (perr == nil) || err == nil && !reflect.DeepEqual([]uint32(v), plain) {
			t.Errorf("%s: read as %v, %v; encoding/json: %v, %v", form, v, err, plain, perr)
		}
	}
	for _, form := range []string{`[tru]`, `[true,false]`, `[1]`, `null`, `[ true ]`} {
		var plain []bool
		perr := json.Unmarshal([]byte(form), &plain)
		var v flags
		err := json.Unmarshal([]byte(form), &v)
		if (err == nil) != (perr == nil) || err == nil && !reflect.DeepEqual([]bool(v), plain) {
			t.Errorf("%s: read as %v, %v; encoding/json: %v, %v", form, v, err, plain, perr)
		}
	}
}

// same checks that read gives back v, as encoding/json wrote it (plain and
// indented).
func same[T any](t *testing.T, v []T, read func([]byte) (any, error)) {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	for _, form := range []string{string(data), indent(t, data)} {
		var plain []T
		json.Unmarshal([]byte(form), &plain)
		got, err := read([]byte(form))
		if err != nil || !reflect.DeepEqual(got, any(plain)) {
			t.Fatalf("%s: read as %v, %v; want %v", form, got, err, plain)
		}
	}
}

// encodeV2 writes st as sfunnel wrote it until version 3 (for
// comparisons: this sfunnel only reads version 2).
func encodeV2(st *liveState) ([]byte, error) {
	v2 := *st
	v2.Format, v2.Version = stateFormat, 2
	v2.Interfaces = slices.Clone(st.Interfaces)
	for i := range v2.Interfaces {
		hooks := slices.Clone(v2.Interfaces[i].Hooks)
		for j := range hooks {
			h := &hooks[j]
			if len(h.Rules) == 0 || h.Rules[0].Prio == 0 {
				continue
			}
			p := &placementRecord{}
			for _, r := range h.Rules {
				p.Prio, p.Slot, p.Segment = append(p.Prio, r.Prio), append(p.Slot, r.Slot), append(p.Segment, r.Segment)
				p.Table = append(p.Table, r.Table)
			}
			h.Placement = p
		}
		v2.Interfaces[i].Hooks = hooks
	}
	return json.Marshal(&v2)
}

// bigState is a hook of n rules as `sfunnel -f` stores them.
func bigState(n int) *liveState {
	h := hookState{Hook: "ingress", ifname: "vb", hook: grammar.HookIngress, Digest: "d", Rules: make(ruleRecords, n), CounterHandles: make(numbers[uint64], n)}
	for i := range h.Rules {
		h.Rules[i] = ruleRecord{Handle: uint64(i + 1), Text: fmt.Sprintf("ip saddr 10.%d.%d.1 udp dport %d counter actions drop", i/250%250, i%250, 1000+i),
			CounterAt: 40, Prio: uint32(i+1) << 14, Slot: uint32(i), Segment: 1, Table: true}
		h.CounterHandles[i] = uint64(i + 1)
	}
	return &liveState{Format: stateFormat, Version: stateVersion, NextHandle: uint64(n + 1), Sets: []setRecord{},
		Interfaces: []ifaceRecord{{Name: "vb", Hooks: []hookState{h}}}}
}

// BenchmarkStateRecord: the state record of a 10 000-rule hook decoded
// and encoded, version 3 against version 2.
func BenchmarkStateRecord(b *testing.B) {
	st := bigState(10000)
	v2, err := encodeV2(st)
	if err != nil {
		b.Fatal(err)
	}
	v3, err := encodeState(st)
	if err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		version string
		data    []byte
	}{{"2", v2}, {"3", v3}} {
		b.Run("decode/version="+c.version, func(b *testing.B) {
			b.SetBytes(int64(len(c.data)))
			for range b.N {
				if _, err := decodeState(c.data); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("encode/version=2", func(b *testing.B) {
		for range b.N {
			encodeV2(st)
		}
	})
	b.Run("encode/version=3", func(b *testing.B) {
		for range b.N {
			encodeState(st)
		}
	})
}
