package grammar

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/sfunnel/sfunnel/abi"
)

var update = flag.Bool("update", false, "rewrite golden files")

// astEqual compares ASTs ignoring positions.
var astEqual = []cmp.Option{
	cmpopts.IgnoreTypes(Span{}),
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmp.Comparer(func(a, b netip.Addr) bool { return a == b }),
}

func parseOneRule(t *testing.T, src string) *Rule {
	t.Helper()
	cmds, srcs, err := Parse("<cmdline>", src, &Options{LookupSet: testSets})
	if err != nil {
		t.Fatalf("%q: %s", src, FormatError(err, srcs))
	}
	if len(cmds) != 1 || cmds[0].Rule == nil {
		t.Fatalf("%q: want one rule, got %d commands", src, len(cmds))
	}
	return cmds[0].Rule
}

func testSets(name string) (SetType, bool) {
	switch name {
	case "nets4":
		return SetIPv4Addr, true
	case "nets6":
		return SetIPv6Addr, true
	case "ports":
		return SetInetService, true
	}
	return 0, false
}

// ruleCases are rules and their canonical form.
var ruleCases = []struct{ in, want string }{
	// sfunnel's docs/rules.md and src/ruleset.default.
	{"ip udp dport 2055 actions funnel encap tcp dport 179 sport 540 #Netflow", "ip udp dport 2055 actions funnel tcp dport 179 sport 540"},
	{"ip udp dport 4739 actions funnel encap tcp dport 179 sport 540 #IPFIX", "ip udp dport 4739 actions funnel tcp dport 179 sport 540"},
	{"ip udp dport 6343 actions funnel encap tcp dport 179 sport 540 #SFLOW", "ip udp dport 6343 actions funnel tcp dport 179 sport 540"},
	{"ip tcp dport 179 sport 540 actions unfunnel decap udp", "ip tcp dport 179 sport 540 actions unfunnel udp"},
	{"ip udp dport 4739 actions funnel tcp dport 179 sport 540 #IPFIX", "ip udp dport 4739 actions funnel tcp dport 179 sport 540"},
	{"ip saddr 192.0.2.0/24 tcp dport 80 actions accept", "ip saddr 192.0.2.0/24 tcp dport 80 actions accept"},
	{"tcp dport 179 sport 540 actions unfunnel udp", "tcp dport 179 sport 540 actions unfunnel udp"},
	{"ip saddr 127.0.0.1 tcp dport 80 actions drop", "ip saddr 127.0.0.1 tcp dport 80 actions drop"},
	{"ip daddr 10.0.0.0/24 udp dport 1 actions drop", "ip daddr 10.0.0.0/24 udp dport 1 actions drop"},
	{"ip saddr != 127.0.0.1 daddr 10.0.0.0/8 tcp dport 1 actions accept", "ip saddr != 127.0.0.1 ip daddr 10.0.0.0/8 tcp dport 1 actions accept"},
	{"udp dport 1000 sport != 1000 actions drop", "udp dport 1000 sport != 1000 actions drop"},
	{"ip saddr 10.0.0.1 tcp dport 80 actions funnel udp dport 8080 sport 540", "ip saddr 10.0.0.1 tcp dport 80 actions funnel udp dport 8080 sport 540"},
	{"ip saddr 127.0.0.1 daddr != 127.0.0.0/24 udp sport != 65000 dport 2055 actions funnel tcp sport 650 dport 179", "ip saddr 127.0.0.1 ip daddr != 127.0.0.0/24 udp dport 2055 sport != 65000 actions funnel tcp dport 179 sport 650"},
	// Lenient order: matches in any order.
	{"udp dport 4739 ip actions funnel tcp dport 179 sport 540", "ip udp dport 4739 actions funnel tcp dport 179 sport 540"},
	{"dport 53 udp saddr 192.0.2.1 actions drop", "ip saddr 192.0.2.1 udp dport 53 actions drop"},
	// Host bits are cleared.
	{"ip saddr 192.0.2.77/24 udp dport 1 actions drop", "ip saddr 192.0.2.0/24 udp dport 1 actions drop"},
	// Every construct of SPEC §2.
	{"ip", "ip"},
	{"ip6", "ip6"},
	{"ip6 saddr 2001:db8::/32 counter", "ip6 saddr 2001:db8::/32 counter"},
	{"ip6 daddr { 2001:db8::1, 2001:db8:1::/48 } tcp dport { 80, 443, 8000-8100 } actions drop", "ip6 daddr { 2001:db8::1, 2001:db8:1::/48 } tcp dport { 80, 443, 8000-8100 } actions drop"},
	{"saddr @nets4 udp dport @ports actions accept", "ip saddr @nets4 udp dport @ports actions accept"},
	{"ip6 daddr != @nets6 counter", "ip6 daddr != @nets6 counter"},
	{"tcp dport != { 22, 179 } actions accept", "tcp dport != { 22, 179 } actions accept"},
	{"tcp flags syn actions drop", "tcp flags syn actions drop"},
	{"tcp flags syn|ack counter", "tcp flags syn|ack counter"},
	{"tcp flags == syn counter", "tcp flags == syn counter"},
	{"tcp flags != rst|fin counter", "tcp flags != fin|rst counter"},
	{"tcp flags syn / syn,ack counter", "tcp flags syn / syn,ack counter"},
	{"tcp flags ecn|cwr|urg|psh counter", "tcp flags psh|urg|ecn|cwr counter"},
	{"meta mark 0x10 counter", "meta mark 0x10 counter"},
	{"meta mark != 5/0xff counter", "meta mark != 0x5/0xff counter"},
	{"ct mark 1 actions accept", "ct mark 0x1 actions accept"},
	{"tcp dport 179 ct mark set 7 actions unfunnel udp", "tcp dport 179 ct mark set 0x7 actions unfunnel udp"},
	{"meta mark set 0x100/0xff00 counter", "counter meta mark set 0x100/0xff00"},
	{"udp dport 4739 actions funnel tcp dport 179 sport 540 flags syn|ack seq 1 ack 0x2 window 65535", "udp dport 4739 actions funnel tcp dport 179 sport 540 flags syn|ack seq 0x00000001 ack 0x00000002 window 65535"},
	{"udp dport 4739 actions funnel udp dport 9000", "udp dport 4739 actions funnel udp dport 9000"},
	{"tcp dport 80 actions funnel udp mss 1360 dport 4739", "tcp dport 80 actions funnel udp dport 4739 mss 1360"},
	{"tcp dport 80 actions funnel tcp dport 179 mss off", "tcp dport 80 actions funnel tcp dport 179 mss off"},
	{"tcp dport 443 actions rewrite udp", "tcp dport 443 actions rewrite udp"},
	{"udp dport 443 actions rewrite tcp", "udp dport 443 actions rewrite tcp"},
	{"udp dport 53 actions dnat to 192.0.2.53", "ip udp dport 53 actions dnat to 192.0.2.53"},
	{"udp dport 53 actions dnat 192.0.2.53:5353", "ip udp dport 53 actions dnat to 192.0.2.53:5353"},
	{"ip6 tcp dport 80 actions dnat to [2001:db8::80]:8080", "ip6 tcp dport 80 actions dnat to [2001:db8::80]:8080"},
	{"ip6 tcp dport 80 actions dnat to 2001:db8::80", "ip6 tcp dport 80 actions dnat to 2001:db8::80"},
	// Stacked actions, sfunnel's space-separated form and commas.
	{"ip udp dport 2055 actions dnat 192.0.2.1 funnel tcp dport 179 sport 540", "ip udp dport 2055 actions dnat to 192.0.2.1, funnel tcp dport 179 sport 540"},
	{"ip udp dport 2055 actions dnat to 192.0.2.1, funnel tcp dport 179 sport 540", "ip udp dport 2055 actions dnat to 192.0.2.1, funnel tcp dport 179 sport 540"},
	{`udp dport 4739 counter actions funnel tcp dport 179 sport 540 comment "flows to LB"`, `udp dport 4739 counter actions funnel tcp dport 179 sport 540 comment "flows to LB"`},
	{`udp dport 1 comment "quote \" inside"`, `udp dport 1 comment "quote \" inside"`},
	// Listings with counter values read back (the values are dropped).
	{"udp dport 1 counter packets 5 bytes 300 actions accept", "udp dport 1 counter actions accept"},
	// nft's forms: actions without the word, explicit protocol and
	// family matches, tracing. The printer keeps sfunnel's form.
	{"udp dport 5 drop", "udp dport 5 actions drop"},
	{"udp dport 5 counter accept", "udp dport 5 counter actions accept"},
	{"udp dport 4739 funnel tcp dport 179 sport 540", "udp dport 4739 actions funnel tcp dport 179 sport 540"},
	{"tcp dport 179 sport 540 counter unfunnel udp", "tcp dport 179 sport 540 counter actions unfunnel udp"},
	{"tcp dport 443 rewrite udp comment \"mptcp\"", "tcp dport 443 actions rewrite udp comment \"mptcp\""},
	{"udp dport 2055 dnat to 192.0.2.1 funnel tcp dport 179", "ip udp dport 2055 actions dnat to 192.0.2.1, funnel tcp dport 179"},
	{"ip protocol udp udp dport 4739 counter", "ip udp dport 4739 counter"},
	{"ip protocol tcp accept", "ip tcp actions accept"},
	{"ip protocol 17 drop", "ip udp actions drop"},
	{"ip6 nexthdr udp counter", "ip6 udp counter"},
	{"meta l4proto udp drop", "udp actions drop"},
	{"meta l4proto tcp tcp dport 80 drop", "tcp dport 80 actions drop"},
	{"meta nfproto ipv6 meta l4proto tcp tcp dport 80 drop", "ip6 tcp dport 80 actions drop"},
	{"meta nfproto ipv4 counter", "ip counter"},
	{"udp dport 53 meta nftrace set 1 counter accept", "udp dport 53 counter meta nftrace set 1 actions accept"},
	{"meta nftrace set 1", "meta nftrace set 1"},
	// Line continuation.
	{"ip udp dport 4739 \\\n actions funnel tcp dport 179", "ip udp dport 4739 actions funnel tcp dport 179"},
}

// TestRules: each rule parses, prints in canonical form, and the canonical
// form parses back to the same AST and prints byte-identically.
func TestRules(t *testing.T) {
	for _, tc := range ruleCases {
		r := parseOneRule(t, tc.in)
		got := FormatRule(r, nil)
		if got != tc.want {
			t.Errorf("%q\n got %q\nwant %q", tc.in, got, tc.want)
			continue
		}
		back := parseOneRule(t, got)
		if d := cmp.Diff(r, back, astEqual...); d != "" {
			t.Errorf("%q: canonical form parses to a different AST:\n%s", tc.in, d)
		}
		if again := FormatRule(back, nil); again != got {
			t.Errorf("%q: reprint %q != %q", tc.in, again, got)
		}
	}
}

func TestFunnelDefaults(t *testing.T) {
	r := parseOneRule(t, "ip udp dport 4739 actions funnel tcp dport 179 sport 540")
	f := r.Actions[0].Funnel
	if f.Flags != TCPSyn || f.Seq != 0xCAFEBABE || f.Ack != 0xBABECAFE || f.Window != 1024 || f.Sport != 540 || f.Dport != 179 {
		t.Errorf("funnel header %+v: not sfunnel v0.0.11 defaults", f)
	}
	if f.HasFlags || f.HasSeq || f.HasAck || f.HasWindow || !f.HasDport || !f.HasSport {
		t.Errorf("funnel header %+v: given-field bits wrong", f)
	}
}

// TestFiles parses whole files with defines, sets, blocks and commands.
func TestFiles(t *testing.T) {
	src := `#!/usr/sbin/sfunnel -f
flush ruleset

define flow_ports = { 2055, 4739, 6343 }
define router = 192.0.2.0/24
define uplinks = eth0

set blocked { type ipv4_addr; flags interval; elements = { 198.51.100.0/24, 203.0.113.7 } }
set svc {
	type inet_service
	elements = {
		80,
		443, 8000-8100
	}
}

interface $uplinks {
	egress {
		ip daddr $router udp dport $flow_ports counter actions funnel tcp dport 179 sport 540 comment "flows to LB"
		ip saddr @blocked actions drop; tcp dport @svc counter
	}
	ingress {
		tcp dport 179 sport 540 counter actions unfunnel udp
	}
}
interface { veth0, veth1 } { ingress { udp dport 53 actions accept } }
add rule eth0 ingress position 3 udp dport 1 actions drop
add element blocked { 192.0.2.99 }
delete element svc { 80 }
list ruleset
`
	cmds, srcs, err := Parse("test.conf", src, nil)
	if err != nil {
		t.Fatal(FormatError(err, srcs))
	}
	var kinds []CmdKind
	for _, c := range cmds {
		kinds = append(kinds, c.Kind)
	}
	want := []CmdKind{CmdFlushRuleset, CmdDefineSet, CmdDefineSet, CmdAddRule, CmdAddRule, CmdAddRule, CmdAddRule, CmdAddRule, CmdAddRule, CmdAddRule, CmdAddElement, CmdDeleteElement, CmdListRuleset}
	if d := cmp.Diff(want, kinds); d != "" {
		t.Fatalf("commands (-want +got):\n%s", d)
	}
	if got := FormatRule(cmds[3].Rule, nil); got != `ip daddr 192.0.2.0/24 udp dport { 2055, 4739, 6343 } counter actions funnel tcp dport 179 sport 540 comment "flows to LB"` {
		t.Errorf("define expansion: %s", got)
	}
	if cmds[3].Interface != "eth0" || cmds[3].Hook != HookEgress {
		t.Errorf("interface from $var: %q %v", cmds[3].Interface, cmds[3].Hook)
	}
	if cmds[7].Interface != "veth0" || cmds[8].Interface != "veth1" {
		t.Errorf("interface list: %q %q", cmds[7].Interface, cmds[8].Interface)
	}
	if cmds[9].Handle != 3 || cmds[9].HandleSpan.Pos.Line != 27 {
		t.Errorf("position: %d at %+v", cmds[9].Handle, cmds[9].HandleSpan)
	}
	if s := FormatSet(cmds[2].Set, ""); s != "set svc {\n\ttype inet_service\n\telements = { 80, 443, 8000-8100 }\n}\n" {
		t.Errorf("set: %q", s)
	}
}

// TestBlankLines: blank and comment lines before a closing brace or the
// end of the file are allowed however many there are (four or more were a
// syntax error: participle gave up past its lookahead).
func TestBlankLines(t *testing.T) {
	for _, src := range []string{
		"interface eth0 {\n\tegress {\n\t\tudp dport 1 drop\n\t\t# a\n\t\t# b\n\t\t# c\n\t}\n}\n",
		"interface eth0 {\n\tegress {\n\t\tudp dport 1 drop;;;;;;\n\n\n\n\n\t}\n}\n\n\n\n\n",
		"udp dport 1 drop\n# a\n# b\n# c\n# d\n",
		"udp dport { 1,\n\t2,\n\n\n\n} drop\n",
		"define p = { 1, 2,,,, }\nudp dport $p drop",
	} {
		for _, quick := range []bool{true, false} {
			quickPath = quick
			cmds, srcs, err := Parse("blank.conf", src, nil)
			quickPath = true
			if err != nil {
				t.Errorf("%q (quick path %v): %s", src, quick, FormatError(err, srcs))
				continue
			}
			if len(cmds) != 1 || !strings.HasPrefix(FormatRule(cmds[0].Rule, nil), "udp dport ") {
				t.Errorf("%q (quick path %v): %d commands", src, quick, len(cmds))
			}
		}
	}
}

func TestDefineFromCommandLine(t *testing.T) {
	cmds, srcs, err := Parse("f", "define p = 1\nudp dport $p actions drop\n", &Options{Defines: map[string]string{"p": "{ 7, 9 }"}})
	if err != nil {
		t.Fatal(FormatError(err, srcs))
	}
	if got := FormatRule(cmds[0].Rule, nil); got != "udp dport { 7, 9 } actions drop" {
		t.Errorf("-D should override the file: %s", got)
	}
}

func TestIncludes(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "conf.d"), 0o755)
	os.MkdirAll(filepath.Join(dir, "lib"), 0o755)
	os.WriteFile(filepath.Join(dir, "conf.d", "b.conf"), []byte("add rule eth0 egress udp dport 2 actions drop\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "conf.d", "a.conf"), []byte("define port = 1\nadd rule eth0 egress udp dport $port actions drop\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "lib", "bad.conf"), []byte("\nudp dport 70000 actions drop\n"), 0o644)
	main := "include \"conf.d/*.conf\"\ninclude \"none/*.conf\"\nadd rule eth0 egress udp dport $port actions accept\n"
	cmds, srcs, err := Parse(filepath.Join(dir, "main.conf"), main, nil)
	if err != nil {
		t.Fatal(FormatError(err, srcs))
	}
	var got []string
	for _, c := range cmds {
		got = append(got, FormatRule(c.Rule, nil))
	}
	want := []string{"udp dport 1 actions drop", "udp dport 2 actions drop", "udp dport 1 actions accept"}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("glob includes are sorted and share defines (-want +got):\n%s", d)
	}
	// -I search path, and errors inside an included file name the include.
	_, srcs, err = Parse(filepath.Join(dir, "x", "main.conf"), "\n  include \"bad.conf\"\n", &Options{IncludeDirs: []string{filepath.Join(dir, "lib")}})
	if err == nil {
		t.Fatal("error in included file not reported")
	}
	msg := FormatError(err, srcs)
	wantMsg := "In file included from " + filepath.Join(dir, "x", "main.conf") + ":2:3-20:\n" +
		filepath.Join(dir, "lib", "bad.conf") + ":2:11-15: Error: port 70000 is out of range (0-65535)\n" +
		"udp dport 70000 actions drop\n" +
		"          ^^^^^\n"
	if msg != wantMsg {
		t.Errorf("got:\n%s\nwant:\n%s", msg, wantMsg)
	}
	// A cycle is one error, not a cascade; directories matched by a glob are skipped.
	os.WriteFile(filepath.Join(dir, "lib", "loop.conf"), []byte("include \"loop.conf\"\n"), 0o644)
	_, _, err = Parse(filepath.Join(dir, "lib", "loop.conf"), "include \"loop.conf\"\n", nil)
	if list, ok := err.(ErrorList); !ok || len(list) != 1 || !strings.Contains(list[0].Msg, "include cycle") {
		t.Errorf("include cycle: %v", err)
	}
	if _, srcs, err := Parse(filepath.Join(dir, "g.conf"), "include \"*\"\n", nil); err != nil {
		t.Errorf("glob matching only directories: %s", FormatError(err, srcs))
	}
	_, srcs, err = Parse(filepath.Join(dir, "main.conf"), "include \"missing.conf\"\n", nil)
	if err == nil || !strings.Contains(FormatError(err, srcs), "include file \"missing.conf\" not found") {
		t.Errorf("missing include: %v", err)
	}
}

// errorInputs are mistakes, each reported in testdata/errors.golden.
var errorInputs = []string{
	// The mistakes sfunnel accepted silently (SPEC §2.2).
	"tcp udp dport 80 actions drop",
	"ip udp dport 4739 actions funnel tcp dport 179 sport 540, unfunnel udp",
	"ip udp dport 70000 actions drop",
	"ip udp dport 4739 actions funnel tcp dport 179 sport 65536",
	"ip saddr 192.0.2.1 actions unfunnel udp",
	"udp dport 443 actions rewrite udp",
	"tcp dport 443 actions rewrite tcp",
	"ip saddr 2001:db8::1 udp dport 1 actions drop",
	"ip6 ip udp dport 1 actions drop",
	"ip saddr 192.0.2.1 daddr 2001:db8::1 counter",
	// Other contradictions.
	"udp dport $nope actions drop",
	"ip saddr @nope actions drop",
	"ip saddr @ports actions drop",
	"udp dport @nets4 actions drop",
	"ip saddr 192.0.2.0/33 actions drop",
	"ip saddr 300.1.1.1 actions drop",
	"udp dport 2000-1000 actions drop",
	"udp dport { 53, 80, 53 } actions drop",
	"ip saddr { 192.0.2.1, 192.0.2.1/32 } counter",
	"dport 80 actions drop",
	"udp flags syn actions drop",
	"tcp flags bogus actions drop",
	"tcp flags syn / ack counter",
	"meta mark 0x100000000 counter",
	"meta mark set 0x100/0xff counter",
	"udp dport 1 actions accept, drop",
	"udp dport 1 actions funnel udp dport 1 seq 5",
	"udp dport 1 actions funnel tcp dport 1 dport 2",
	"udp dport 1 actions funnel tcp sport off",
	"actions funnel tcp dport 179",
	"ip udp dport 1 actions dnat to 192.0.2.1:0",
	"ip6 udp dport 1 actions dnat to 192.0.2.1",
	"actions dnat to 192.0.2.1:53",
	"udp dport 1 actions funnel tcp dport 1, funnel udp dport 2",
	"udp dport 1 actions funnel tcp dport 179, rewrite tcp",
	"udp dport 1 actiosn drop",
	"udp dport 1 actions frobnicate",
	"udp dport 1 comment \"unterminated",
	"ip saddr 192.0.2.1 ~ drop",
	"add rule eth0 sideways udp dport 1",
	"delete rule eth0 egress",
	"replace rule eth0 egress position 4 udp dport 1 actions drop",
	"add rule eth0 egress",
	"set s { type ether_addr }",
	"set s { type inet_service; elements = { 1, 1 } }",
	"set s { type ipv4_addr; elements = { 2001:db8::1 } }",
	"define a = $b\ndefine b = $a\nudp dport $a actions drop",
	"udp dport 1 actions drop\n\tip6 saddr 10.0.0.1 counter",
	// Empty lists match nothing; nft refuses them, so does sfunnel.
	"udp dport { } actions drop",
	"ip daddr { } actions drop",
	"define none = { }\nudp dport $none actions drop",
	"define none = {\n}\nip saddr $none counter",
	"add element s { }",
	// nft's forms, and what has no counterpart.
	"ip protocol icmp drop",
	"meta l4proto sctp drop",
	"ip6 nexthdr tcp ip protocol udp",
	"meta nfproto arp counter",
	"meta nftrace set 2",
	"udp dport 5 actions",
	"udp dport 5 actions reject",
	"udp dport 5 log",
	"udp dport 5 drop counter",
	"udp dport 5 actions counter drop",
	"udp dport 5 jump flows",
	"add frob x",
	"delete frob x",
	"reset frob",
	"monitor frob",
	"ct state established accept",
	"iifname eth0 udp dport 1 drop",
	"icmp type echo-request drop",
	// Syntax errors inside blocks are as specific as on the command line.
	"interface eth0 {\n\tegress {\n\t\tudp dport 1 actions frob\n\t}\n}",
	"interface eth0 {\n\tegress {\n\t\tudp dport 1 frob\n\t}\n}",
	"interface eth0 {\n\tegress {\n\t\tudp dport\n\t\tudp dport 1 actions funnel\n\t\tudp dport 1 dnat to\n\t\ttcp flags\n\t\tudp dport 1 comment\n\t}\n}",
	"interface eth0 { egress { meta mark set } }",
	// Several syntax errors, one per bad line.
	"udp dport 1 actions drop ~\nudp dport 2 actions drop\nudp sport ( 3 )\nlist rules\nudp dport 4 drop",
	// Options belong on the command line.
	"list ruleset -a",
	"list ruleset --json",
	// Set sizes.
	"set s { type ipv4_addr; size 2; elements = { 192.0.2.1, 192.0.2.2, 192.0.2.3 } }",
	"set s { type ipv4_addr; size 70000 }",
	"set s { type inet_service; size 0 }",
	"set s { type inet_service\n\tsize 2\n\tsize 3\n}",
	// Text that is not UTF-8.
	"udp dport 1 actions drop # caf\xe9 cr\xe8me",
	"udp dport 1 actions drop\nudp dport 2 comment \"na\xefve\"",
}

// TestErrors: each mistake is reported at its token, in nft's format; the
// golden file holds the exact messages with their caret lines.
func TestErrors(t *testing.T) {
	inputs := errorInputs
	var out strings.Builder
	for _, in := range inputs {
		out.WriteString("=== " + strings.ReplaceAll(in, "\n", `\n`) + "\n")
		_, srcs, err := Parse("<cmdline>", in, &Options{LookupSet: testSets})
		if err == nil {
			t.Errorf("%q: no error", in)
			continue
		}
		list, ok := err.(ErrorList)
		if !ok {
			t.Errorf("%q: error %T is not located", in, err)
			continue
		}
		for _, e := range list {
			if e.Span.Pos.Line < 1 || e.Span.Pos.Column < 1 {
				t.Errorf("%q: error without position: %v", in, e)
			}
		}
		out.WriteString(FormatError(err, srcs))
	}
	golden := filepath.Join("testdata", "errors.golden")
	if *update {
		os.WriteFile(golden, []byte(out.String()), 0o644)
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test ./grammar -update)", err)
	}
	if d := cmp.Diff(string(want), out.String()); d != "" {
		t.Errorf("error messages differ from %s (-want +got):\n%s", golden, d)
	}
}

func TestMonitorTrace(t *testing.T) {
	for src, trace := range map[string]bool{"monitor": false, "monitor trace": true} {
		cmds, srcs, err := Parse("<cmdline>", src, nil)
		if err != nil {
			t.Fatal(FormatError(err, srcs))
		}
		if len(cmds) != 1 || cmds[0].Kind != CmdMonitor || cmds[0].Trace != trace {
			t.Errorf("%q: %+v", src, cmds[0])
		}
	}
}

// TestSourceText: a UTF-8 BOM is dropped; includes of devices and FIFOs are
// refused instead of read without end; sizes are bounded.
func TestSourceText(t *testing.T) {
	cmds, srcs, err := Parse("bom.conf", "\uFEFFudp dport 5 drop\n", nil)
	if err != nil {
		t.Fatalf("BOM: %s", FormatError(err, srcs))
	}
	if got := FormatRule(cmds[0].Rule, nil); got != "udp dport 5 actions drop" {
		t.Errorf("BOM: %s", got)
	}
	// Error columns after a BOM count from the first character after it.
	_, srcs, err = Parse("bom.conf", "\uFEFFudp dport 70000 drop\n", nil)
	if err == nil || !strings.HasPrefix(FormatError(err, srcs), "bom.conf:1:11-15: Error: port 70000") {
		t.Errorf("BOM error position: %v", err)
	}

	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for path, want := range map[string]string{
		"/dev/zero": "cannot include: /dev/zero: not a regular file (a character device cannot hold a ruleset)",
		fifo:        "cannot include: " + fifo + ": not a regular file (a FIFO cannot hold a ruleset)",
	} {
		done := make(chan error, 1)
		go func() {
			_, _, err := Parse(filepath.Join(dir, "main.conf"), "include \""+path+"\"\n", nil)
			done <- err
		}()
		select {
		case err := <-done:
			list, ok := err.(ErrorList)
			if !ok || len(list) != 1 || list[0].Msg != want || list[0].Span.Pos.Line != 1 {
				t.Errorf("include %s: %v\nwant %s", path, err, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("include %s: still reading after 10s", path)
		}
	}
	big := filepath.Join(dir, "big.conf")
	if err := os.Truncate(big, 0); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	f, _ := os.Create(big)
	f.Truncate(MaxSourceBytes + 1)
	f.Close()
	if _, err := ReadSource(big); err == nil || !strings.Contains(err.Error(), "more than the") {
		t.Errorf("oversized file: %v", err)
	}
	if _, err := ReadBounded(io.LimitReader(zeros{}, MaxSourceBytes+10), "/dev/stdin"); err == nil {
		t.Errorf("oversized stdin read without error")
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// TestSetCapacity: the element past a set's capacity (MaxSetElements when
// no size is declared) is a located error before anything reaches a map.
func TestSetCapacity(t *testing.T) {
	set := &Set{Name: "big", Type: SetIPv4Addr}
	for i := 0; i < MaxSetElements; i++ {
		set.Prefixes = append(set.Prefixes, netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}), 32))
	}
	span := Span{Pos: Pos{Filename: "<cmdline>", Line: 1, Column: 17}, End: Pos{Filename: "<cmdline>", Line: 1, Column: 26}}
	_, err := CheckElements(set, []Value{{Span: span, Addr: "192.0.2.1"}}, true)
	list, ok := err.(ErrorList)
	if !ok || len(list) != 1 || list[0].Span != span ||
		list[0].Msg != `set "big" is full: it holds at most 65536 elements (the default and maximum size is 65536)` {
		t.Fatalf("element 65537: %v", err)
	}
	set.Prefixes = set.Prefixes[:MaxSetElements-1]
	if _, err := CheckElements(set, []Value{{Span: span, Addr: "192.0.2.1"}}, true); err != nil {
		t.Errorf("element 65536: %v", err)
	}
}

func TestSetCapacityMatchesDatapath(t *testing.T) {
	if MaxSetElements != abi.NamedAddrSetCapacity {
		t.Errorf("grammar.MaxSetElements %d != abi.NamedAddrSetCapacity %d: the check-time limit must be the map's", MaxSetElements, abi.NamedAddrSetCapacity)
	}
}

// An error in a long line (a generated element list) quotes a window of
// the line around the error, carets under the bad element, not the whole
// line twice.
func TestErrorQuotesLongLine(t *testing.T) {
	var b strings.Builder
	b.WriteString("set s { type inet_service; elements = { ")
	for p := range 5000 {
		fmt.Fprintf(&b, "%d, ", p)
	}
	b.WriteString("99999, 65000 } }\n")
	src := b.String()
	_, _, err := Parse("long.conf", src, nil)
	if err == nil {
		t.Fatal("port 99999 accepted")
	}
	lines := strings.Split(strings.TrimRight(FormatError(err, Sources{"long.conf": src}), "\n"), "\n")
	if len(lines) != 3 {
		t.Fatalf("want message, quote, carets; got %q", lines)
	}
	quote, carets := lines[1], lines[2]
	if len(quote) > 166 || !strings.HasPrefix(quote, "...") {
		t.Errorf("quoted %d bytes: %q", len(quote), quote)
	}
	at := strings.Index(carets, "^")
	if at < 0 || !strings.HasPrefix(quote[at:], "99999") || strings.Count(carets, "^") != 5 {
		t.Errorf("carets do not point at 99999:\n%s\n%s", quote, carets)
	}
	// A short line is quoted whole.
	_, _, err = Parse("short.conf", "set s { type inet_service; elements = { 99999 } }\n", nil)
	if got := FormatError(err, Sources{"short.conf": "set s { type inet_service; elements = { 99999 } }\n"}); !strings.Contains(got, "\nset s { type inet_service; elements = { 99999 } }\n") {
		t.Errorf("short line not quoted whole:\n%s", got)
	}
}

// Numbers with a leading 0 are octal, as in nft (the man page says so): a
// zero-padded port is another port, and one with an 8 or 9 is an error
// that says why.
func TestLeadingZeroIsOctal(t *testing.T) {
	r, err := ParseRule("<test>", "udp dport 0443 meta mark 010 drop", nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := FormatRule(r, nil); got != "udp dport 291 meta mark 0x8 actions drop" {
		t.Errorf("read as %q", got)
	}
	for _, text := range []string{"udp dport 08 drop", "udp dport 1-0999 drop", "meta mark 09 drop"} {
		_, err := ParseRule("<test>", text, nil)
		if err == nil || !strings.Contains(err.Error(), "a leading 0 makes a number octal") {
			t.Errorf("%s: %v", text, err)
		}
	}
}

// A mark set or match whose mask masks prints it, even in a rule built in
// code without HasMask: the compiler keys bodies and shapes by printed
// rules, and two mark sets that differ only in their mask once shared one
// body (a generated "meta mark set 0x0/0xff00ff00" ran as "set 0x0").
func TestMaskAlwaysPrinted(t *testing.T) {
	r := &Rule{SetMetaMark: &MarkSet{Value: 0, Mask: 0xff00ff00}, MetaMark: &MarkMatch{Value: 1, Mask: 0xff}}
	got := FormatRule(r, nil)
	for _, want := range []string{"meta mark set 0x0/0xff00ff00", "meta mark 0x1/0xff"} {
		if !strings.Contains(got, want) {
			t.Errorf("FormatRule = %q, want it to contain %q", got, want)
		}
	}
	r = &Rule{SetMetaMark: &MarkSet{Value: 5, Mask: 0xffffffff}}
	if got := FormatRule(r, nil); !strings.Contains(got, "meta mark set 0x5") || strings.Contains(got, "/") {
		t.Errorf("FormatRule = %q, want meta mark set 0x5 without a mask", got)
	}
}
