package nftjson_test

import (
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/jsonaudit"
	"github.com/sfunnel/sfunnel/nftjson"
)

// TestRulesRoundTrip: every rule form lists as JSON that validates against
// the schema and reads back to the same rule (same canonical text).
func TestRulesRoundTrip(t *testing.T) {
	sets := `set nets4 { type ipv4_addr; size 10; elements = { 192.0.2.0/24 } }
set nets6 { type ipv6_addr }
set ports { type inet_service; elements = { 80, 1000-2000 } }
`
	rules := []string{
		"ip udp dport 4739 actions funnel tcp dport 179 sport 540",
		"ip saddr 192.0.2.0/24 tcp dport 80 actions accept",
		"tcp dport 179 sport 540 actions unfunnel udp",
		"ip saddr != 127.0.0.1 ip daddr 10.0.0.0/8 tcp dport 1 actions accept",
		"ip",
		"ip6",
		"udp",
		"ip6 tcp",
		"counter",
		"ip6 daddr { 2001:db8::1, 2001:db8:1::/48 } tcp dport { 80, 443, 8000-8100 } actions drop",
		"ip saddr @nets4 udp dport @ports actions accept",
		"ip6 daddr != @nets6 counter",
		"tcp dport != { 22, 179 } actions accept",
		"tcp flags syn actions drop",
		"tcp flags syn|ack counter",
		"tcp flags == syn counter",
		"tcp flags != fin|rst counter",
		"tcp flags syn / syn,ack counter",
		"meta mark 0x10 counter",
		"meta mark != 0x5/0xff counter",
		"ct mark 0x1 actions accept",
		"tcp dport 179 ct mark set 0x7 actions unfunnel udp",
		"counter meta mark set 0x100/0xff00",
		"udp dport 4739 actions funnel tcp dport 179 sport 540 flags syn|ack seq 0x00000001 ack 0x00000002 window 65535",
		"udp dport 4739 actions funnel udp dport 9000",
		"udp dport 4739 actions funnel tcp dport 179 sport 540 mss 1360",
		"tcp dport 80 actions funnel udp dport 9000 mss off",
		"tcp dport 443 actions rewrite udp",
		"udp dport 443 actions rewrite tcp",
		"ip udp dport 53 actions dnat to 192.0.2.53:5353",
		"ip6 tcp dport 80 actions dnat to [2001:db8::80]:8080",
		"ip6 tcp dport 80 actions dnat to 2001:db8::80",
		"ip udp dport 2055 actions dnat to 192.0.2.1, funnel tcp dport 179 sport 540",
		`udp dport 4739 counter actions funnel tcp dport 179 sport 540 comment "flows \"to\" LB"`,
		"udp dport 53 counter meta nftrace set 1 actions accept",
		"ct mark 0x0 ct mark set 0x0 actions accept",
	}
	text := sets
	for _, r := range rules {
		text += "add rule eth0 egress " + r + "\n"
	}
	cmds, srcs, err := grammar.Parse("rules.conf", text, nil)
	if err != nil {
		t.Fatal(grammar.FormatError(err, srcs))
	}
	doc, err := nftjson.Marshal(nftjson.FromCommands("test", cmds))
	if err != nil {
		t.Fatal(err)
	}
	if err := jsonaudit.Validate(doc); err != nil {
		t.Fatalf("schema: %v\n%s", err, doc)
	}
	if err := jsonaudit.RoundTrip(doc, nil); err != nil {
		t.Fatal(err)
	}
	back, srcs, err := nftjson.Parse("doc.json", doc, nil)
	if err != nil {
		t.Fatal(grammar.FormatError(err, srcs))
	}
	var got []string
	for _, c := range back {
		if c.Rule != nil {
			got = append(got, grammar.FormatRule(c.Rule, nil))
		}
	}
	if len(got) != len(rules) {
		t.Fatalf("read back %d rules, want %d", len(got), len(rules))
	}
	for i := range rules {
		if got[i] != rules[i] {
			t.Errorf("rule %d read back as\n %s\nwant\n %s", i, got[i], rules[i])
		}
	}
}

// TestSchemaRejects: documents the schema must refuse.
func TestSchemaRejects(t *testing.T) {
	for _, doc := range []string{
		`{"nftables": [{"rule": {"interface": "lo", "hook": "forward", "expr": []}}]}`,
		`{"nftables": [{"rule": {"interface": "lo", "hook": "egress", "expr": [{"log": null}]}}]}`,
		`{"nftables": [{"set": {"name": "s", "type": "ether_addr"}}]}`,
		`{"nftables": [{"rule": {"interface": "lo", "hook": "egress", "expr": [{"funnel": {"protocol": "sctp"}}]}}]}`,
		`{"nftables": [{"rule": {"interface": "lo", "hook": "egress", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": {"set": []}}}]}}]}`,
		`{"nftables": [], "extra": 1}`,
	} {
		if err := jsonaudit.Validate([]byte(doc)); err == nil {
			t.Errorf("schema accepts %s", doc)
		}
	}
}
