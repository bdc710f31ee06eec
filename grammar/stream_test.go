package grammar

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// parseBoth parses src with rules lowered as they are read and with the
// tree lowered after it is read whole, and fails if the commands or the
// errors differ. It returns the errors' text.
func parseBoth(t *testing.T, src string) string {
	t.Helper()
	opts := &Options{LookupSet: testSets, Defines: map[string]string{"cli": "{ 7, 8 }"}}
	streamLowering = false
	tcmds, tsrcs, terr := Parse("s.conf", src, opts)
	streamLowering = true
	scmds, ssrcs, serr := Parse("s.conf", src, opts)
	if d := cmp.Diff(tcmds, scmds, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
		t.Fatalf("%q: commands differ (-whole tree +streamed):\n%s", src, d)
	}
	terrs, serrs := "", ""
	if terr != nil {
		terrs = FormatError(terr, tsrcs)
	}
	if serr != nil {
		serrs = FormatError(serr, ssrcs)
	}
	if terrs != serrs {
		t.Fatalf("%q: errors differ:\nwhole tree: %s\nstreamed:   %s", src, terrs, serrs)
	}
	return serrs
}

// TestStreamedLowering: lowering each statement and each rule as the quick
// path reads it gives the commands and errors of lowering the whole tree,
// including when the quick path gives up on the file after lowering part
// of it (what was lowered is undone, and not reported twice).
func TestStreamedLowering(t *testing.T) {
	head := "define p = { 1, 2 }\nset s { type ipv4_addr; elements = { 192.0.2.1 } }\n"
	block := "interface eth0 {\n\tingress {\n\t\tudp dport $p counter drop\n\t\tip saddr @s tcp dport $cli accept\n\t\tudp dport 70000 drop\n\t}\n\tegress {\n\t\tudp dport 4739 actions funnel tcp dport 179 sport 540\n\t}\n}\n"
	several := "interface { eth0, eth1 } {\n\tingress {\n\t\tudp dport 1 drop\n\t\tudp dport $nope drop\n\t}\n}\n"
	for _, src := range []string{
		head + block,
		head + block + several,
		block + head, // $p undefined in the block: errors
		"interface $undefined {\n\tingress {\n\t\tudp dport 1 drop\n\t\tudp dport 70000 drop\n\t}\n}\n",
		// Lowered, then declined (list ruleset is not a quick
		// statement): once, from participle's reading.
		head + block + "list ruleset\n",
		head + block + "include \"/nonexistent/*.conf\"\n" + block,
		// A syntax error after lowered statements.
		head + block + "udp dport 1 drop drop }\n",
		"define p = 1\ndefine p = 2\nudp dport $p drop\ndefine cli = 9\nudp dport $cli drop\n",
	} {
		parseBoth(t, src)
	}
	// The undone statements are not reported twice.
	errs := parseBoth(t, head+block+"list ruleset\n")
	if n := strings.Count(errs, "is out of range"); n != 1 {
		t.Fatalf("the port error is reported %d times:\n%s", n, errs)
	}
}

// A hook block's rules read into rewound slabs (each streamed rule's syntax
// memory serves the next) lower as the whole tree does, over rules of every
// syntax kind, and lists longer than a slab's block.
func TestStreamedSlabsReused(t *testing.T) {
	forms := []string{
		"ip saddr 10.0.%d.1 udp dport %d counter actions drop",
		"ip daddr { 10.1.%d.0/24, 10.2.%d.0/24 } tcp sport %d-65000 accept comment \"r%d\"",
		"ip6 daddr 2001:db8::%x/128 tcp flags syn / syn,ack meta mark set 0x1/0xff actions dnat to [2001:db8::1]:%d",
		"tcp flags != rst|fin tcp dport %d ct mark set %d actions unfunnel udp",
		"udp dport %d actions funnel tcp dport 179 sport 540 flags syn|ack seq %d ack 0x2 window 65535",
		"meta mark 0x%x/0xff counter meta mark set 0x100/0xff00",
		"ip protocol udp udp sport != %d dport { 53, 853, 1%d } counter drop",
	}
	var b strings.Builder
	b.WriteString("interface eth0 {\n\tingress {\n")
	for i := range 700 {
		f := forms[i%len(forms)]
		args := []any{i % 250, i%250 + 1, i + 2, i + 3}[:strings.Count(f, "%")]
		fmt.Fprintf(&b, "\t\t"+f+"\n", args...)
	}
	// A set longer than a block of elements.
	b.WriteString("\t\tudp dport {")
	for p := range 600 {
		fmt.Fprintf(&b, " %d,", 2000+p)
	}
	b.WriteString(" 1 } drop\n\t\tudp dport 9 accept\n\t}\n}\n")
	if errs := parseBoth(t, b.String()); errs != "" {
		t.Fatalf("errors: %s", errs)
	}
}

// slabs lists every slab of the quick reader (one left out would only not
// be reused; this keeps the list whole).
func TestQuickSlabsListed(t *testing.T) {
	var q quick
	typ := reflect.TypeOf(q)
	n := 0
	for i := range typ.NumField() {
		if strings.HasPrefix(typ.Field(i).Type.Name(), "slab[") {
			n++
		}
	}
	seen := map[any]bool{}
	for _, s := range q.slabs() {
		seen[s] = true
	}
	if n != numSlabs || len(seen) != numSlabs {
		t.Fatalf("quick has %d slabs, slabs() lists %d distinct of %d", n, len(seen), numSlabs)
	}
}
