package compiler_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// sparse gives n rules priorities 1024 apart and slots in reverse order.
func sparse(n int) (prios, slots []uint32) {
	for i := 0; i < n; i++ {
		prios = append(prios, uint32(i+1)<<10)
		slots = append(slots, uint32(n-1-i))
	}
	return
}

// entrySet renders table entries for comparison.
func entrySet(m map[string][][2][]byte) []string {
	var out []string
	for name, kvs := range m {
		for _, kv := range kvs {
			out = append(out, fmt.Sprintf("%s %x %x", name, kv[0], kv[1]))
		}
	}
	slices.Sort(out)
	return out
}

func contents(p *compiler.Program, gen uint32) map[string][][2][]byte {
	out := map[string][][2][]byte{}
	for name, kvs := range p.TableContents(gen) {
		if abi.IsPerfectGen(name) {
			if len(kvs) == 0 {
				continue // the other generation's map
			}
			name = abi.PerfectTables
			// The perfect-hash tables' value, entry by entry.
			layout, _ := p.Layout()
			for _, seg := range layout.Segments {
				for _, sh := range seg.Shapes {
					if sh.PerfectLayout == nil {
						continue
					}
					for _, en := range compiler.PerfectEntries(kvs[0].Value.([]byte), sh.PerfectLayout) {
						v := binary.NativeEndian.AppendUint32(nil, en.Value.Prio)
						v = binary.NativeEndian.AppendUint32(v, en.Value.Slot)
						v = binary.NativeEndian.AppendUint32(v, en.Value.Body)
						out[name] = append(out[name], [2][]byte{en.Key, v})
					}
				}
			}
			continue
		}
		for _, kv := range kvs {
			v := kv.Value.([]byte)
			if bytes.Equal(v, make([]byte, len(v))) {
				continue // an empty array slot
			}
			out[name] = append(out[name], [2][]byte{kv.Key.([]byte), v})
		}
	}
	return out
}

// A rule inserted in the middle of a table segment with a priority between
// its neighbours' and a free counter slot is a table change only: the
// program is the same, and Layout.Place gives exactly the entries the
// compilation adds; the rule's removal is the reverse.
func TestPlaceInsertInTheMiddle(t *testing.T) {
	opts := compiler.Options{Hook: grammar.HookEgress}
	rules := mixedShapes(140)
	prios, slots := sparse(len(rules))
	opts.Prios, opts.Slots = prios, slots
	a, err := compiler.Compile(rules, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	layout, place := a.Layout()
	if len(layout.Segments) == 0 {
		t.Fatal("no table segment")
	}
	// A rule of the shape of rule 72 (UDP dport range, counter drop: a
	// port-indexed table), inserted after it.
	at := 72
	nr := *rules[at]
	nr.Handle = 1000
	nr.Dport = &grammar.PortMatch{Ranges: []grammar.PortRange{{Lo: 60000, Hi: 60009}}}
	if !place[at].Table || !place[at+1].Table || place[at].Segment != place[at+1].Segment {
		t.Fatalf("rules %d and %d are not table rules of one segment: %+v %+v", at, at+1, place[at], place[at+1])
	}
	newPrio, newSlot := (prios[at]+prios[at+1])/2, uint32(len(rules))
	ents, err := layout.Place(&nr, place[at].Segment, newPrio, newSlot, 1)
	if err != nil {
		t.Fatal(err)
	}
	next := slices.Insert(slices.Clone(rules), at+1, &nr)
	opts.Prios = slices.Insert(slices.Clone(prios), at+1, newPrio)
	opts.Slots = slices.Insert(slices.Clone(slots), at+1, newSlot)
	b, err := compiler.Compile(next, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	if a.Digest != b.Digest {
		t.Fatal("inserting a rule of an existing shape and body changed the program")
	}
	if b.Handles[newSlot] != nr.Handle || b.Handles[slots[0]] != rules[0].Handle {
		t.Fatalf("handles are not indexed by slot: %v", b.Handles)
	}
	want := map[string][][2][]byte{}
	for _, en := range ents {
		want[en.Table] = append(want[en.Table], [2][]byte{en.Key, en.Value})
	}
	before, after := entrySet(contents(a, 1)), entrySet(contents(b, 1))
	added := []string{}
	for _, e := range after {
		if !slices.Contains(before, e) {
			added = append(added, e)
		}
	}
	if got := entrySet(want); !slices.Equal(got, added) {
		t.Fatalf("Place gives\n%v\nthe compilation adds\n%v", got, added)
	}
	if len(after) != len(before)+len(added) {
		t.Fatalf("the compilation changed other entries: %d before, %d after, %d added", len(before), len(after), len(added))
	}

	// New code is refused: another body, a rule that does not end
	// evaluation.
	other := nr
	other.Actions = []*grammar.Action{act(grammar.ActAccept, 0)}
	counting := nr
	counting.Actions = nil
	for name, r := range map[string]*grammar.Rule{"new body": &other, "non-terminal": &counting} {
		if _, err := layout.Place(r, place[at].Segment, newPrio, newSlot, 1); !errors.Is(err, compiler.ErrNotPlaceable) {
			t.Errorf("%s: Place gives %v, want ErrNotPlaceable", name, err)
		}
	}
}

// Sparse priorities and slots out of rule order give the same verdicts and
// count each rule at its own slot.
func TestSparsePrioritiesAndSlots(t *testing.T) {
	opts := compiler.Options{Hook: grammar.HookEgress}
	rules := mixedShapes(70)
	prios, slots := sparse(len(rules))
	l := compileLoad(t, rules, nil, opts)
	opts.Prios, opts.Slots = prios, slots
	s := compileLoad(t, rules, nil, opts)
	checked := 0
	for i, r := range rules {
		if r.Dport == nil || r.Proto != grammar.ProtoUDP || r.Saddr == nil || r.Family != grammar.FamilyIPv4 {
			continue
		}
		pkt := udpPkt(t, false, 40000, r.Dport.Ranges[0].Lo, nil)
		copy(pkt[14+12:], r.Saddr.Prefixes[0].Addr().AsSlice())
		fixIPv4Checksum(pkt[14:])
		a, b := l.run(t, pkt, 0), s.run(t, pkt, 0)
		if a.ret != b.ret || !bytes.Equal(a.out, b.out) {
			t.Fatalf("rule %d: verdict %d vs %d with sparse priorities", i, a.ret, b.ret)
		}
		if r.Counter {
			if ca, cb := l.counter(t, i), s.counter(t, int(slots[i])); ca != cb || ca.Packets == 0 {
				t.Fatalf("rule %d: counter %+v at slot %d, %+v at slot %d", i, ca, i, cb, slots[i])
			}
			checked++
		}
	}
	if checked < 5 {
		t.Fatalf("only %d counted rules checked", checked)
	}
}
