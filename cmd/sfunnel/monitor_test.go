package main

import (
	"encoding/json"
	"testing"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/grammar"
)

// The lines of `monitor` and `monitor trace`, text and -j, as the man
// page shows them.
func TestMonitorLines(t *testing.T) {
	for _, c := range []struct {
		e          monitorEvent
		text, json string
	}{
		{monitorEvent{Event: "add", Interface: "veth0", Hook: "egress", Handle: 3, Rule: "udp dport 9 actions drop"},
			"add rule veth0 egress udp dport 9 actions drop # handle 3",
			`{"event":"add","interface":"veth0","hook":"egress","handle":3,"rule":"udp dport 9 actions drop"}`},
		{monitorEvent{Event: "delete", Interface: "veth0", Hook: "egress", Handle: 3},
			"delete rule veth0 egress handle 3", `{"event":"delete","interface":"veth0","hook":"egress","handle":3}`},
		{monitorEvent{Event: "add element", Set: "flows", Elements: []string{"4739", "6343"}},
			"add element flows { 4739, 6343 }", `{"event":"add element","set":"flows","elements":["4739","6343"]}`},
		{monitorEvent{Event: "warning", Message: "nftables table inet sfunnel is missing"},
			"# warning: nftables table inet sfunnel is missing", `{"event":"warning","message":"nftables table inet sfunnel is missing"}`},
		{monitorEvent{Event: "mtu-exceeded", Interface: "veth0", Hook: "egress", Count: 1, Handle: 3},
			"veth0 egress mtu-exceeded +1 # handle 3", `{"event":"mtu-exceeded","interface":"veth0","hook":"egress","count":1,"handle":3}`},
	} {
		if got := c.e.String(); got != c.text {
			t.Errorf("text %q, want %q", got, c.text)
		}
		if got, _ := json.Marshal(c.e); string(got) != c.json {
			t.Errorf("json %s, want %s", got, c.json)
		}
	}

	src := &datapath.TraceSource{Ifname: "veth0", Hook: grammar.HookEgress, Rules: []datapath.TraceRule{{Handle: 7, Text: "udp meta nftrace set 1 actions funnel tcp dport 179 sport 540"}}}
	// IPv4 fragment (MF) of UDP 192.0.2.1:40000 > 198.51.100.7:4739.
	pkt := []byte{0x45, 0, 0, 28, 0x12, 0x34, 0x20, 0, 64, 17, 0, 0, 192, 0, 2, 1, 198, 51, 100, 7, 0x9c, 0x40, 0x12, 0x83, 0, 8, 0, 0}
	started := map[string]bool{}
	var lines []string
	for _, r := range []abi.TraceRecord{
		{ID: 0xabc, Kind: abi.TraceRule, Rule: 0, Len: 42, Mark: 0x10000, Data: pkt},
		{ID: 0xabc, Kind: abi.TraceVerdict, Verdict: abi.TraceLeft, Reason: abi.StatFragment + 1, Len: 42, Data: pkt},
	} {
		for _, e := range traceEvents(traceItem{src, r}, started) {
			lines = append(lines, e.String())
		}
	}
	want := []string{
		"trace id 00000abc veth0 egress packet: ip saddr 192.0.2.1 ip daddr 198.51.100.7 ip protocol udp ip frag-off 0 udp sport 40000 udp dport 4739 length 42 meta mark 0x00010000",
		"trace id 00000abc veth0 egress rule udp meta nftrace set 1 actions funnel tcp dport 179 sport 540 (handle 7)",
		"trace id 00000abc veth0 egress verdict left alone (fragment)",
	}
	if len(lines) != len(want) {
		t.Fatalf("trace lines:\n%q\nwant\n%q", lines, want)
	}
	for i := range want {
		if lines[i] != want[i] {
			t.Errorf("trace line %d:\n%s\nwant\n%s", i, lines[i], want[i])
		}
	}
	if len(started) != 0 {
		t.Errorf("trace %v still open after its verdict", started)
	}
}
