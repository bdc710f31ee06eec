package grammar

import (
	"errors"
	"testing"
)

// fuzzSeeds start FuzzParse.
var fuzzSeeds = []string{
	"ip udp dport 4739 actions funnel encap tcp dport 179 sport 540 #IPFIX\n",
	"tcp dport 179 sport 540 actions unfunnel udp",
	"define p = { 1, 2-3 }\ninterface eth0 { egress { udp dport $p counter actions drop } }\n",
	"set s { type ipv4_addr; elements = { 192.0.2.0/24 } }\nadd rule eth0 ingress ip saddr @s actions accept",
	"ip6 daddr 2001:db8::/32 tcp flags syn / syn,ack meta mark set 0x1/0xff actions dnat to [2001:db8::1]:80",
	"replace rule eth0 egress handle 4 ct mark 1 actions rewrite udp comment \"x\"",
	"include \"nothing/*.conf\"; list ruleset; flush interface eth0 egress",
	// Every kind of match, negated and not, and stacked actions: their
	// canonical forms must read back as the same rules.
	"add rule eth0 ingress ip saddr != { 192.0.2.0/24, 10.0.0.1 } daddr 198.51.100.7 udp sport != { 1, 5-9 } dport != 7000-7010 counter actions drop",
	"add rule eth0 ingress ip6 saddr != @nets6 daddr { 2001:db8::/32, ::1 } tcp dport != @ports sport @ports flags != fin,rst counter",
	"add rule eth0 egress tcp flags == syn|ack meta mark != 0x10/0xf0 ct mark != 0x10000 meta mark set 0x5 ct mark set 0x20000/0x30000 meta nftrace set 1 actions accept",
	"add rule eth0 egress ip daddr 192.0.2.2 udp dport 53 actions dnat to 198.51.100.10:5353, funnel tcp sport 1 dport 179 flags syn|ack seq 7 ack 9 window 2 mss 1400 comment \"a \\\"b\\\"\"",
	"add rule eth0 egress ip6 tcp dport 80 actions funnel udp dport 4789 mss off",
	"add rule eth0 ingress meta nfproto ipv6 meta l4proto 17 udp dport 4789 actions unfunnel tcp",
	"add rule eth0 ingress ip protocol 6 tcp sport 0 dport 65535 actions rewrite udp",
}

// FuzzParse: no input panics the parser; the quick path (quick.go) gives
// the grammar's tree and errors; lowering while reading (stream.go, its
// rules' syntax memory reused) gives the whole tree's commands and errors;
// every error carries a position; every rule that parses prints
// canonically, reprints identically, and its canonical form reads back as
// the same rule (a printer that dropped a `!=` would reprint identically).
// Run: go test ./grammar -run '^$' -fuzz FuzzParse -fuzztime 10m
func FuzzParse(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, src string) {
		quickAgrees(t, src, true)
		parseBoth(t, src)
		cmds, _, err := Parse("fuzz", src, &Options{LookupSet: testSets})
		if err != nil {
			var list ErrorList
			var one *Error
			switch {
			case errors.As(err, &list):
				for _, e := range list {
					if e.Span.Pos.Line < 1 {
						t.Fatalf("error without position: %v", e)
					}
				}
			case errors.As(err, &one):
				if one.Span.Pos.Line < 1 {
					t.Fatalf("error without position: %v", one)
				}
			default:
				t.Fatalf("unlocated error %T: %v", err, err)
			}
			return
		}
		declared := map[string]SetType{}
		for _, c := range cmds {
			if c.Kind == CmdDefineSet {
				declared[c.Set.Name] = c.Set.Type
			}
		}
		lookup := func(name string) (SetType, bool) {
			if t, ok := declared[name]; ok {
				return t, true
			}
			return testSets(name)
		}
		for _, c := range cmds {
			if c.Rule == nil {
				continue
			}
			text := FormatRule(c.Rule, nil)
			back, _, err := Parse("reprint", text, &Options{LookupSet: lookup})
			if err != nil {
				t.Fatalf("canonical form %q of %q does not parse: %v", text, src, err)
			}
			if len(back) != 1 || back[0].Rule == nil {
				t.Fatalf("canonical form %q is not one rule", text)
			}
			if again := FormatRule(back[0].Rule, nil); again != text {
				t.Fatalf("reprint differs:\n%q\n%q", text, again)
			}
			if r := *back[0].Rule; true {
				r.Handle = c.Rule.Handle
				if !sameMeaning(c.Rule, &r) {
					t.Fatalf("canonical form %q of %q reads back as another rule", text, src)
				}
			}
		}
	})
}
