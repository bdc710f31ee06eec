package datapath

import (
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
)

// A state record read ahead is not used once another commit has been
// published: the reader sees the new ruleset.
func TestPrefetchedStateNotStale(t *testing.T) {
	e := newEnv(t, Options{})
	e.run(t, "flush ruleset\ninterface vb {\n\tingress {\n\t\tudp dport 7000 counter actions drop\n\t}\n}\n")
	reader := New(Options{Root: e.root})
	e.do(t, func() error {
		reader.Prefetch()
		return nil
	})
	e.run(t, "add rule vb ingress udp dport 7001 counter actions accept")
	e.do(t, func() error {
		rs, err := reader.Load()
		if err != nil {
			return err
		}
		var got []string
		for _, r := range rs.Interface("vb").Ingress {
			got = append(got, grammar.FormatRule(r, nil))
		}
		if len(got) != 2 {
			t.Errorf("a reader that read ahead before a commit sees %q", got)
		}
		return nil
	})
	// Read ahead with nothing committed since: the same ruleset.
	e.do(t, func() error {
		reader.Prefetch()
		rs, err := reader.Load()
		if err == nil && len(rs.Interface("vb").Ingress) != 2 {
			t.Errorf("the record read ahead lists %d rules, want 2", len(rs.Interface("vb").Ingress))
		}
		return err
	})
}
