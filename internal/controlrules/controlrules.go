// Package controlrules writes the rules of the control-plane benchmark
// (bench/control, `make bench-control`), so that the compiler's and the
// grammar's benchmarks measure the same hooks.
package controlrules

import (
	"fmt"
	"strings"
)

// HostPort is the match of rule i of the "IPv4 host + port" hook.
func HostPort(i int) string {
	return fmt.Sprintf("ip saddr 10.%d.%d.1 udp dport %d", i/250%250, i%250, 1000+i%60000)
}

// Mixed is the match of rule i of the "mixed shapes" hook: host + port,
// /24 + port, a 101-port range, a meta mark, IPv6 host + port, in turn.
func Mixed(i int) string {
	switch i % 5 {
	case 1:
		return fmt.Sprintf("ip daddr 10.%d.%d.0/24 tcp sport %d", i/250%250, i%250, 2000+i%5000)
	case 2:
		return fmt.Sprintf("udp dport %d-%d", 3000+i%1000, 3100+i%1000)
	case 3:
		return fmt.Sprintf("meta mark %d", i)
	case 4:
		return fmt.Sprintf("ip6 saddr 2001:db8::%x udp dport %d", i, i%60000+1)
	}
	return HostPort(i)
}

// File is sfunnel's ruleset file of n rules of workload "host" or "mixed"
// (each `MATCH counter actions drop`) on vb's ingress, as bench/control
// applies it.
func File(workload string, n int) string {
	match := HostPort
	if workload == "mixed" {
		match = Mixed
	}
	var b strings.Builder
	b.WriteString("flush ruleset\ninterface vb {\n ingress {\n")
	for i := range n {
		b.WriteString("  " + match(i) + " counter actions drop\n")
	}
	b.WriteString(" }\n}\n")
	return b.String()
}
