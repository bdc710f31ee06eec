package datapath

import (
	"os"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/ruleset"
)

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

// A state record written by this version (testdata/state-v2.json, as
// stored in bpffs) keeps reading the same: parsed back into rules, and
// listed straight from its text. A change of the format that breaks this
// needs a new version and a migration.
func TestStoredStateV2(t *testing.T) {
	data, err := os.ReadFile("testdata/state-v2.json")
	if err != nil {
		t.Fatal(err)
	}
	st, err := decodeState(data)
	if err != nil {
		t.Fatal(err)
	}
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
	for _, rec := range []string{`{"format":"sfunnel-state","version":3}`, `{"Version":1}`, `{}`} {
		if _, err := decodeState([]byte(rec)); err == nil || !strings.Contains(err.Error(), "flush ruleset") {
			t.Errorf("%s: %v", rec, err)
		}
	}
}
