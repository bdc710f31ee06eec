package compiler_test

import (
	"sort"
	"testing"

	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// BenchmarkTraceOverhead: what a packet that no traced rule matched pays
// for the tracing code of a traced program, as a ratio to the same program
// without `meta nftrace set 1` (medians of 9 runs of BPF_PROG_TEST_RUN).
func BenchmarkTraceOverhead(b *testing.B) {
	parse := func(text string) *grammar.Rule {
		r, err := grammar.ParseRule("<bench>", text, nil)
		if err != nil {
			b.Fatal(err)
		}
		return r
	}
	plain := []*grammar.Rule{parse("udp dport 5000 counter"), parse("udp dport 4739 counter actions accept")}
	traced := []*grammar.Rule{parse("udp dport 5000 counter meta nftrace set 1"), parse("udp dport 4739 counter actions accept")}
	pkt := craft(b, pktSpec{l4: udpLayer(40000, 4739)})
	lp, lt := compileLoad(b, plain, nil, compiler.Options{}), compileLoad(b, traced, nil, compiler.Options{})
	median := func(l *loaded) float64 {
		var ns []float64
		for k := 0; k < 9; k++ {
			_, d, err := l.coll.Programs[compiler.ProgramName].Benchmark(pkt, 200000, nil)
			if err != nil {
				b.Fatal(err)
			}
			ns = append(ns, float64(d.Nanoseconds()))
		}
		sort.Float64s(ns)
		return ns[4]
	}
	for i := 0; i < b.N; i++ {
		p, t := median(lp), median(lt)
		b.ReportMetric(p, "plain-ns/pkt")
		b.ReportMetric(t, "traced-ns/pkt")
		b.ReportMetric(t/p, "ratio")
	}
}
