package compiler_test

import (
	"testing"

	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/controlrules"
)

// controlRules are the rules of one of bench/control's 10 000-rule hooks
// ("host": IPv4 host + port; "mixed": five shapes, one a 101-port range),
// parsed as `sfunnel -f` parses them.
func controlRules(tb testing.TB, workload string) []*grammar.Rule {
	cmds, _, err := grammar.Parse("bench", controlrules.File(workload, 10000), nil)
	if err != nil {
		tb.Fatal(err)
	}
	var rules []*grammar.Rule
	for _, c := range cmds {
		if c.Kind == grammar.CmdAddRule {
			c.Rule.Handle = uint64(len(rules) + 1)
			rules = append(rules, c.Rule)
		}
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
