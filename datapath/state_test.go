package datapath

import (
	"bytes"
	"flag"
	"fmt"
	"hash/crc32"
	"math/rand/v2"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

var updateState = flag.Bool("update-state", false, "rewrite testdata/state-v3 (only with a new state version, see TestStoredStateV3)")

// The listing both stored fixtures describe (handles and counters shown,
// counters as stored bases).
const fixtureListing = `set ports {
	type inet_service
	elements = { 4739, 6343 }
}

interface vb {
	ingress {
		udp dport 5000 counter packets 0 bytes 0 actions drop # handle 1
		tcp dport 179 sport 540 counter packets 0 bytes 0 actions unfunnel udp # handle 3
	}
	egress {
		ip daddr 192.0.2.1 udp dport @ports counter packets 0 bytes 0 actions funnel tcp dport 179 sport 540 comment "flows" # handle 2
`

func listFixture(t *testing.T, st *liveState) (parsed, stored string) {
	t.Helper()
	counters := map[uint64]ruleset.Counter{}
	for _, h := range st.hooks() {
		for _, handle := range h.CounterHandles {
			counters[handle] = h.base()[handle]
		}
	}
	o := &ruleset.ListOptions{Handles: true, Counters: counters}
	rs, err := st.ruleset(nil)
	if err != nil {
		t.Fatal(err)
	}
	var p, s strings.Builder
	if err := ruleset.WriteText(&p, rs, nil, o); err != nil {
		t.Fatal(err)
	}
	l := &ruleset.Listing{}
	for _, set := range st.Sets {
		l.Sets = append(l.Sets, ruleset.ListedSet{Name: set.Name, Text: set.Text})
	}
	for _, ifc := range st.Interfaces {
		li := ruleset.ListedInterface{Name: ifc.Name}
		for _, h := range ifc.Hooks {
			for _, r := range h.Rules {
				lr := ruleset.ListedRule{Handle: r.Handle, Text: r.Text, CounterAt: r.CounterAt}
				if h.Hook == "egress" {
					li.Egress = append(li.Egress, lr)
				} else {
					li.Ingress = append(li.Ingress, lr)
				}
			}
		}
		l.Interfaces = append(l.Interfaces, li)
	}
	if err := ruleset.WriteListing(&s, l, nil, o); err != nil {
		t.Fatal(err)
	}
	return p.String(), s.String()
}

// decodeFixture reads and decodes a stored record.
func decodeFixture(t *testing.T, path string) ([]byte, *liveState) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	st, err := decodeState(data)
	if err != nil {
		t.Fatal(err)
	}
	return data, st
}

// A version 2 record, as sfunnel wrote them until version 3
// (testdata/state-v2.json, as stored in bpffs), keeps reading the same:
// parsed back into rules, and listed straight from its text; encoded
// again (as version 3), it reads the same.
func TestStoredStateV2(t *testing.T) {
	_, st := decodeFixture(t, "testdata/state-v2.json")
	parsed, stored := listFixture(t, st)
	if parsed != stored {
		t.Errorf("parsed and stored listings differ:\n%s\n---\n%s", parsed, stored)
	}
	want := fixtureListing + "\t\tudp dport 9 counter packets 0 bytes 0 actions drop # handle 4\n\t}\n}\n"
	if parsed != want {
		t.Errorf("listing of the stored state:\n%s\nwant:\n%s", parsed, want)
	}
	if st.NextHandle != 5 || st.CtMarkMask != 0x00ff0000 || len(st.Aux) != 1 || st.Aux[0].id().Ifname != "sfseg3r" {
		t.Errorf("stored state fields: next handle %d, mask %#x, aux %v", st.NextHandle, st.CtMarkMask, st.Aux)
	}
	// Round trip: encoding what was decoded gives a record that decodes the same.
	again, err := encodeState(st)
	if err != nil {
		t.Fatal(err)
	}
	st2, err := decodeState(again)
	if err != nil {
		t.Fatal(err)
	}
	if p2, _ := listFixture(t, st2); p2 != parsed {
		t.Errorf("re-encoded record lists differently:\n%s", p2)
	}
}

// The record of sfunnel before generations (version 1, a dump of Go
// structs; testdata/state-v1.json as that version stored it) is adopted.
func TestLegacyStateV1(t *testing.T) {
	data, err := os.ReadFile("testdata/state-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	st, err := decodeLegacy(data)
	if err != nil {
		t.Fatal(err)
	}
	parsed, stored := listFixture(t, st)
	if parsed != stored {
		t.Errorf("parsed and stored listings differ:\n%s\n---\n%s", parsed, stored)
	}
	if want := fixtureListing + "\t}\n}\n"; parsed != want {
		t.Errorf("listing of the adopted state:\n%s\nwant:\n%s", parsed, want)
	}
	if st.NextHandle != 4 {
		t.Errorf("next handle %d, want 4", st.NextHandle)
	}
}

// Records of another format or version are refused with what to do.
func TestStateOtherVersion(t *testing.T) {
	for _, rec := range []string{`{"format":"sfunnel-state","version":3}`, `{"Version":1}`, `{}`,
		"sfunnel-state 4 2 0 0\n{}", "sfunnel-state 4\n"} {
		if _, err := decodeState([]byte(rec)); err == nil || !strings.Contains(err.Error(), "flush ruleset") {
			t.Errorf("%s: %v", rec, err)
		}
	}
}

// v3Fixture is the state testdata/state-v3 holds: every field of the
// record set (placement with a table rule, a free counter slot, bases,
// a layout, spare tables, contested keys, the mark in use, an aux hook).
func v3Fixture() *liveState {
	layout := &compiler.Layout{CtMarkMask: 0x00ff0000, Needs: compiler.LayoutNeeds{V4: true, Dport: true}, Slots: 4,
		Tables: map[string]int{"tbl_dport": 16}, Segments: []compiler.SegmentLayout{{
			Shapes: []compiler.ShapeLayout{{Key: "udp dport", ID: 1, Table: "tbl_dport"}}, Bodies: []string{"drop"}, Terminal: true}}}
	return &liveState{Format: stateFormat, Version: stateVersion, Generation: 7, CtMarkMask: 0x00ff0000, NextHandle: 5, CtMarkUsed: true,
		Sets: []setRecord{{Name: "ports", Text: "set ports {\n\ttype inet_service\n\telements = { 4739, 6343 }\n}\n"}},
		Interfaces: []ifaceRecord{{Name: "vb", Hooks: []hookState{
			{Hook: "ingress", ifname: "vb", hook: grammar.HookIngress,
				Digest: "517ae142dd52fc76b4c18c4f1453c2d0bafda8aeb5eedece441a3fef44f6daec", ProgDigest: "1f00", TableGen: 1,
				CounterHandles: numbers[uint64]{1, 0, 3},
				Rules: ruleRecords{
					{Handle: 1, Text: "udp dport 5000 counter actions drop", CounterAt: 22, Prio: 1 << 14, Slot: 0, Segment: 1, Table: true},
					{Handle: 3, Text: "tcp dport 179 sport 540 counter actions unfunnel udp", CounterAt: 31, Prio: 2 << 14, Slot: 2}},
				Base:   []baseRecord{{Handle: 3, Packets: 12, Bytes: 3456}},
				Layout: layout, Spare: &spareRecord{Delta: map[string][]string{"tbl_dport": {"1388"}}}, Contested: []string{"tbl_dport/1388"}},
			{Hook: "egress", ifname: "vb", hook: grammar.HookEgress,
				Digest: "d5f8393fef70b528d9129944c511facaf972713473d8a68a96811a269e57002c", Sets: []string{"ports"},
				CounterHandles: numbers[uint64]{2, 4},
				Rules: ruleRecords{
					{Handle: 2, Text: `ip daddr 192.0.2.1 udp dport @ports counter actions funnel tcp dport 179 sport 540 comment "flows"`, CounterAt: 43},
					{Handle: 4, Text: "udp dport 9 counter actions drop", CounterAt: 19}}}}}},
		Aux: []auxRecord{{Interface: "sfseg3r", Hook: "ingress"}}}
}

// A version 3 record (testdata/state-v3, as stored in bpffs) reads back
// to exactly what was written, lists the same parsed and unparsed, and
// this sfunnel writes the same bytes for it. The last check is the one
// that fails when the format changes: then the change needs a new
// version (stateVersion), a reader for version 3 that keeps this test
// passing on the old fixture, and a new fixture (-update-state).
func TestStoredStateV3(t *testing.T) {
	want := v3Fixture()
	data, err := encodeState(v3Fixture())
	if err != nil {
		t.Fatal(err)
	}
	if *updateState {
		if err := os.WriteFile("testdata/state-v3", data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	stored, st := decodeFixture(t, "testdata/state-v3")
	if !bytes.Equal(data, stored) {
		t.Errorf("the state record format changed without a new version (stateVersion %d): this sfunnel writes\n%q\nwhere testdata/state-v3 has\n%q", stateVersion, data, stored)
	}
	if !reflect.DeepEqual(st, want) {
		t.Errorf("testdata/state-v3 decodes to\n%+v\nwant\n%+v", st, want)
	}
	parsed, listed := listFixture(t, st)
	if parsed != listed {
		t.Errorf("parsed and stored listings differ:\n%s\n---\n%s", parsed, listed)
	}
	wantList := strings.Replace(fixtureListing, "540 counter packets 0 bytes 0", "540 counter packets 12 bytes 3456", 1) +
		"\t\tudp dport 9 counter packets 0 bytes 0 actions drop # handle 4\n\t}\n}\n"
	if parsed != wantList {
		t.Errorf("listing of the stored state:\n%s\nwant:\n%s", parsed, wantList)
	}
}

// The record's text part is the ruleset as a file that parses back to
// the same rules, with their handles in comments.
func TestStateTextPart(t *testing.T) {
	data, st := decodeFixture(t, "testdata/state-v3")
	first := bytes.IndexByte(data, '\n')
	var hlen, tlen int
	if _, err := fmt.Sscanf(string(data[:first]), "sfunnel-state 3 %d %d", &hlen, &tlen); err != nil {
		t.Fatal(err)
	}
	text := string(data[first+1+hlen : first+1+hlen+tlen])
	cmds, _, err := grammar.Parse("state-v3", text, nil)
	if err != nil {
		t.Fatalf("text part does not parse: %v\n%s", err, text)
	}
	var rules []string
	for _, c := range cmds {
		if c.Kind == grammar.CmdAddRule {
			rules = append(rules, ruleset.ListRule(c.Rule).Text)
		}
	}
	var stored []string
	for _, h := range st.hooks() {
		for _, r := range h.Rules {
			stored = append(stored, r.Text)
			if !strings.Contains(text, r.Text+" # handle "+fmt.Sprint(r.Handle)+"\n") {
				t.Errorf("rule %d: no %q with its handle in the text part", r.Handle, r.Text)
			}
		}
	}
	if fmt.Sprint(rules) != fmt.Sprint(stored) {
		t.Errorf("text part parses to %q, want %q", rules, stored)
	}
}

// A damaged record is refused with an error, never a panic or rules
// that are not the stored ones: every truncation, every byte changed.
func TestStateV3Corrupt(t *testing.T) {
	data, _ := decodeFixture(t, "testdata/state-v3")
	for n := 0; n < len(data); n++ {
		if _, err := decodeState(data[:n]); err == nil {
			t.Errorf("truncated to %d bytes: no error", n)
		}
	}
	for i := range data {
		bad := bytes.Clone(data)
		bad[i] ^= 0x5a
		if st, err := decodeState(bad); err == nil {
			t.Errorf("byte %d changed: no error, read %+v", i, st)
		}
	}
	// Part lengths whose sum wraps around to the record's length, with a
	// checksum that fits: an error, not a slice out of range.
	rest := data[bytes.IndexByte(data, '\n')+1:]
	const huge = 1<<63 - 1
	for _, lens := range [][3]int{{huge, huge, len(rest) + 2}, {len(rest) + 2, huge, huge}, {huge, len(rest) + 2, huge}} {
		bad := append(fmt.Appendf(nil, "%s %d %d %d %d %x\n", stateFormat, stateVersion, lens[0], lens[1], lens[2], crc32.Checksum(rest, castagnoli)), rest...)
		if _, err := decodeState(bad); err == nil {
			t.Errorf("parts of %v bytes: no error", lens)
		}
	}
}

// An upgrade: the live ruleset's record as an older sfunnel wrote it
// (version 2) is read, listed, and changed in place by the incremental
// path (priorities and slots came through), and the change writes a
// version 3 record; counters and traffic agree throughout.
func TestUpgradeFromV2(t *testing.T) {
	e := newEnv(t, Options{})
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
	for i := 0; i < 40; i++ {
		fmt.Fprintf(&b, "\t\tudp dport %d counter actions drop\n", 7000+i)
	}
	b.WriteString("\t}\n}\n")
	e.run(t, b.String())
	if got := e.arrive(t, 7003, 3); got != 0 {
		t.Fatalf("%d of 3 datagrams to port 7003 passed its drop rule", got)
	}
	// current runs f on the committed generation.
	current := func(f func(g *bpf.Gen) error) {
		e.do(t, func() error {
			s, err := bpf.OpenExisting(bpf.Options{Root: e.root})
			if err != nil {
				return err
			}
			g, err := s.Current()
			if err == nil {
				err = f(g)
			}
			return err
		})
	}
	record := func() (data []byte) {
		current(func(g *bpf.Gen) (err error) { data, err = g.ReadState(); return err })
		return data
	}
	before, err := decodeState(record())
	if err != nil {
		t.Fatal(err)
	}
	v2, err := encodeV2(before)
	if err != nil {
		t.Fatal(err)
	}
	current(func(g *bpf.Gen) error { return g.WriteState(v2) })
	if data := record(); isV3(data) || !bytes.Contains(data, []byte(`"version":2`)) {
		t.Fatalf("the record was not replaced by a version 2 one: %.80q", data)
	}
	rs, counters := e.fresh(t)
	rules := rs.Interface("vb").Ingress
	if len(rules) != 40 || counters[rules[3].Handle].Packets != 3 {
		t.Fatalf("the version 2 record reads back as %d rules, counter %+v", len(rules), counters[rules[3].Handle])
	}
	patched := e.be.patched
	e.run(t, fmt.Sprintf("delete rule vb ingress handle %d", rules[5].Handle))
	if e.be.patched != patched+1 {
		t.Errorf("delete rule on a version 2 record compiled the hook (priorities and slots lost?)")
	}
	if data := record(); !isV3(data) {
		t.Errorf("the change wrote %.40q, not a version 3 record", data)
	}
	rs, counters = e.fresh(t)
	after := rs.Interface("vb").Ingress
	if len(after) != 39 || after[5].Handle != rules[6].Handle || counters[rules[3].Handle].Packets != 3 {
		t.Errorf("after the change: %d rules, 6th handle %d (want %d), counter %+v", len(after), after[5].Handle, rules[6].Handle, counters[rules[3].Handle])
	}
	if got := e.arrive(t, 7005, 2); got != 2 {
		t.Errorf("%d of 2 datagrams to the deleted rule's port arrived", got)
	}
	if got := e.arrive(t, 7006, 2); got != 0 {
		t.Errorf("%d of 2 datagrams to port 7006 passed its drop rule", got)
	}
}

// Whatever a state holds (texts with quotes, escapes, newlines and other
// than ASCII, empty hooks and interfaces, no sets, the largest numbers),
// version 3 gives it back exactly.
func TestStateV3RoundTrip(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 3))
	words := []string{"udp", "dport", `"a \"b\""`, "é", "\n", "\\", "# handle 9", "\x00", "ct mark", "{", "}"}
	text := func() string {
		var b strings.Builder
		for range r.IntN(8) {
			b.WriteString(words[r.IntN(len(words))])
			b.WriteByte(' ')
		}
		return b.String()
	}
	for round := range 200 {
		st := &liveState{Format: stateFormat, Version: stateVersion, Generation: r.Uint64(), CtMarkMask: r.Uint32(),
			NextHandle: r.Uint64(), CtMarkUsed: r.IntN(2) == 0, Sets: []setRecord{}, Interfaces: []ifaceRecord{}}
		for range r.IntN(3) {
			st.Sets = append(st.Sets, setRecord{Name: fmt.Sprint("s", r.IntN(9)), Text: text()})
		}
		for range r.IntN(3) {
			ifc := ifaceRecord{Name: fmt.Sprint("if", r.IntN(9)), Hooks: []hookState{}}
			for _, hk := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress}[:r.IntN(3)] {
				h := hookState{Hook: hk.String(), ifname: ifc.Name, hook: hk, Digest: text(), Rules: ruleRecords{}}
				for range r.IntN(20) {
					rt := text()
					h.Rules = append(h.Rules, ruleRecord{Handle: r.Uint64(), Text: rt, CounterAt: r.IntN(len(rt) + 1),
						Prio: r.Uint32(), Slot: r.Uint32(), Segment: r.IntN(1 << 31), Table: r.IntN(2) == 0})
				}
				for range r.IntN(5) {
					h.CounterHandles = append(h.CounterHandles, r.Uint64())
				}
				for range r.IntN(3) {
					h.Base = append(h.Base, baseRecord{Handle: r.Uint64(), Packets: r.Uint64(), Bytes: r.Uint64()})
				}
				ifc.Hooks = append(ifc.Hooks, h)
			}
			st.Interfaces = append(st.Interfaces, ifc)
		}
		data, err := encodeState(st)
		if err != nil {
			t.Fatal(err)
		}
		back, err := decodeState(data)
		if err != nil {
			t.Fatalf("round %d: %v\n%q", round, err, data)
		}
		if !reflect.DeepEqual(back, st) {
			t.Fatalf("round %d: read back\n%+v\nwant\n%+v", round, back, st)
		}
	}
}

// A state record that does not decode (here one flipped byte of a rule's
// text) makes every reader fail with an error that says how to get out,
// and `flush ruleset` followed by new rules replaces it: every hook of the
// old record is replaced or detached, as real traffic shows.
func TestFlushReplacesCorruptState(t *testing.T) {
	e := newEnv(t, Options{})
	e.run(t, "flush ruleset\ninterface vb {\n\tingress {\n\t\tudp dport 7000 counter actions drop\n\t}\n"+
		"\tegress {\n\t\tudp dport 7001 counter actions drop\n\t}\n}\n")
	if e.arrive(t, 7000, 1) != 0 || e.leave(t, 7001, 1) != 0 {
		t.Fatal("the rules do not drop")
	}
	e.current(t, func(cur *bpf.Gen) error {
		data, err := cur.ReadState()
		if err != nil {
			return err
		}
		i := bytes.Index(data, []byte("dport 7000"))
		if i < 0 {
			return fmt.Errorf("no rule text in the record")
		}
		data[i+6] = '8'
		return cur.WriteState(data)
	})
	var err error
	e.do(t, func() error { _, err = New(Options{Root: e.root}).Load(); return nil })
	if err == nil || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), "flush ruleset") {
		t.Fatalf("Load of a corrupt record: %v", err)
	}
	e.run(t, "flush ruleset\ninterface vb {\n\tingress {\n\t\tudp dport 7002 counter actions drop\n\t}\n}\n")
	rs, _ := e.fresh(t)
	vb := rs.Interface("vb")
	if vb == nil || len(vb.Ingress) != 1 || len(vb.Egress) != 0 || grammar.FormatRule(vb.Ingress[0], nil) != "udp dport 7002 counter actions drop" {
		t.Fatalf("after the flush: %s", jsonOf(t, rs))
	}
	if got := e.arrive(t, 7000, 2); got != 2 {
		t.Errorf("%d of 2 datagrams to 7000 arrived after the flush", got)
	}
	if got := e.leave(t, 7001, 2); got != 2 {
		t.Errorf("%d of 2 datagrams to 7001 left after the flush (egress hook not detached)", got)
	}
	if got := e.arrive(t, 7002, 2); got != 0 {
		t.Errorf("%d of 2 datagrams to 7002 arrived past the new rule", got)
	}
}
