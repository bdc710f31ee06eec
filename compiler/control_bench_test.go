package compiler_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// controlRules are the rules of one of bench/control's 10 000-rule hooks
// ("host": IPv4 host + port; "mixed": five shapes, one a 101-port range),
// parsed as `sfunnel -f` parses them.
func controlRules(tb testing.TB, workload string) []*grammar.Rule {
	var b strings.Builder
	b.WriteString("interface vb {\n ingress {\n")
	for i := range 10000 {
		m := fmt.Sprintf("ip saddr 10.%d.%d.1 udp dport %d", i/250%250, i%250, 1000+i%60000)
		if workload == "mixed" {
			switch i % 5 {
			case 1:
				m = fmt.Sprintf("ip daddr 10.%d.%d.0/24 tcp sport %d", i/250%250, i%250, 2000+i%5000)
			case 2:
				m = fmt.Sprintf("udp dport %d-%d", 3000+i%1000, 3100+i%1000)
			case 3:
				m = fmt.Sprintf("meta mark %d", i)
			case 4:
				m = fmt.Sprintf("ip6 saddr 2001:db8::%x udp dport %d", i, i%60000+1)
			}
		}
		fmt.Fprintf(&b, "  %s counter actions drop\n", m)
	}
	b.WriteString(" }\n}\n")
	cmds, _, err := grammar.Parse("bench", b.String(), nil)
	if err != nil {
		tb.Fatal(err)
	}
	rules := make([]*grammar.Rule, 0, len(cmds))
	for i, c := range cmds {
		c.Rule.Handle = uint64(i + 1)
		rules = append(rules, c.Rule)
	}
	return rules
}

// BenchmarkCompileControl is the compiler's share of `sfunnel -f` of
// bench/control's hooks (make bench-control).
// Run: go test ./compiler -run '^$' -bench CompileControl -benchmem -count 5
func BenchmarkCompileControl(b *testing.B) {
	for _, w := range []string{"host", "mixed"} {
		b.Run("file="+w, func(b *testing.B) {
			rules := controlRules(b, w)
			b.ResetTimer()
			for range b.N {
				if _, err := compiler.Compile(rules, nil, compiler.Options{Hook: grammar.HookIngress}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
