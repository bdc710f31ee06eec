package grammar

import (
	"fmt"
	"strings"
	"syscall"
	"testing"

	"github.com/alecthomas/participle/v2"
	"github.com/alecthomas/participle/v2/lexer"

	"github.com/sfunnel/sfunnel/internal/controlrules"
)

// ruleset10k is a 10 000-rule file of the shapes bench/control applies.
func ruleset10k() string {
	var b strings.Builder
	b.WriteString("interface veth0 {\n\tegress {\n")
	for i := range 10000 {
		var m string
		switch i % 5 {
		case 0:
			m = fmt.Sprintf("ip saddr 10.%d.%d.1 udp dport %d", i/250%250, i%250, 1000+i%60000)
		case 1:
			m = fmt.Sprintf("ip daddr 10.%d.%d.0/24 tcp sport %d", i/250%250, i%250, 2000+i%5000)
		case 2:
			m = fmt.Sprintf("udp dport %d-%d", 3000+i%1000, 3100+i%1000)
		case 3:
			m = fmt.Sprintf("meta mark 0x%x/0xffff # rule %d", i, i)
		default:
			m = fmt.Sprintf("ip6 saddr 2001:db8::%x udp dport %d", i, i%60000+1)
		}
		fmt.Fprintf(&b, "\t\t%s counter actions funnel encap tcp dport 179 sport 540\n", m)
	}
	b.WriteString("\t}\n}\n")
	return b.String()
}

// controlRuleset10k is a 10 000-rule hook of one of bench/control's
// workloads ("host" or "mixed"), as `make bench-control` applies it.
func controlRuleset10k(workload string) string { return controlrules.File(workload, 10000) }

// benchLexers are the lexers the benchmarks compare.
var benchLexers = []struct {
	name string
	def  lexer.Definition
}{{"lexer=hand", parseLexer}, {"lexer=regexp", regexpLexer}}

// withLexer builds the parser with another lexer definition, for the
// in-run reference.
func withLexer(def lexer.Definition) *participle.Parser[fileSyntax] {
	return buildParser(def, declineQuickRule, declineQuickLines)
}

// BenchmarkParse10k: Parse (parse and lower) of 10 000-rule files — the
// shapes of the control-plane benchmark (file=host, file=mixed) and a file
// of funnel rules with comments (file=funnel) — with the quick path
// (path=quick, what sfunnel runs) and, as the in-run references, with the
// grammar alone (path=grammar) and the grammar with participle's regexp
// lexer (path=grammar,lexer=regexp).
// Run: go test ./grammar -run '^$' -bench Parse10k -count 5
func BenchmarkParse10k(b *testing.B) {
	files := []struct{ name, src string }{
		{"file=host", controlRuleset10k("host")},
		{"file=mixed", controlRuleset10k("mixed")},
		{"file=funnel", ruleset10k()},
	}
	variants := []struct {
		name  string
		quick bool
		lex   lexer.Definition
	}{
		{"path=quick", true, nil},
		{"path=grammar", false, nil},
		{"path=grammar,lexer=regexp", false, regexpLexer},
	}
	for _, f := range files {
		for _, v := range variants {
			b.Run(f.name+"/"+v.name, func(b *testing.B) {
				quickPath = v.quick
				defer func() { quickPath = true }()
				if v.lex != nil {
					saved := parser
					parser = &lazyParser{p: withLexer(v.lex)}
					defer func() { parser = saved }()
				}
				b.SetBytes(int64(len(f.src)))
				b.ReportAllocs()
				cpu0 := processCPU(b)
				for b.Loop() {
					if _, _, err := Parse("bench.conf", f.src, nil); err != nil {
						b.Fatal(err)
					}
				}
				// CPU time (user + system, GC workers included) reads truer
				// than wall time on a loaded machine.
				b.ReportMetric(float64(processCPU(b)-cpu0)/float64(b.N), "cpu-ns/op")
			})
		}
	}
}

// BenchmarkFormatRule10k: the canonical printer on the rules of the
// control-plane benchmark's mixed 10 000-rule file (the compiler prints
// every rule for its shape keys, the state keeps every rule's text).
func BenchmarkFormatRule10k(b *testing.B) {
	cmds, _, err := Parse("bench.conf", controlRuleset10k("mixed"), nil)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		for _, c := range cmds {
			if c.Rule != nil {
				FormatRule(c.Rule, nil)
			}
		}
	}
}

// processCPU is the process's user + system CPU time so far, in ns.
func processCPU(b *testing.B) int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// BenchmarkLex10k: the lexers alone on the same file.
func BenchmarkLex10k(b *testing.B) {
	src := ruleset10k()
	for _, c := range benchLexers {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(src)))
			for b.Loop() {
				l, err := c.def.(lexer.StringDefinition).LexString("bench.conf", src)
				if err != nil {
					b.Fatal(err)
				}
				for {
					t, err := l.Next()
					if err != nil {
						b.Fatal(err)
					}
					if t.EOF() {
						break
					}
				}
			}
		})
	}
}
