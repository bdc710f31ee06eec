package datapath

import (
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// A hook detached outside sfunnel is a warning (and traffic passes), and
// committing the ruleset again attaches it (and the rule drops again).
func TestDetachedHookWarnedAndHealed(t *testing.T) {
	e := newEnv(t, Options{})
	rs := &ruleset.Ruleset{Interfaces: []*ruleset.Interface{{Name: "vb",
		Ingress: []*grammar.Rule{udpRule(1, 4739, grammar.ActDrop)}}}, NextHandle: 2}
	e.commit(t, rs)
	warnings := func() []string {
		var w []string
		e.do(t, func() (err error) { w, err = e.be.Warnings(); return err })
		return w
	}
	if w := warnings(); len(w) != 0 {
		t.Fatalf("warnings after a commit: %q", w)
	}
	if got := e.send(t, 4739, 3); got != 0 {
		t.Fatalf("%d of 3 datagrams passed the drop rule", got)
	}

	e.do(t, func() error {
		s, err := bpf.Open(bpf.Options{Root: e.root})
		if err != nil {
			return err
		}
		return s.Detach(bpf.HookID{Ifname: "vb", Hook: grammar.HookIngress})
	})
	if w := warnings(); len(w) != 1 || !strings.HasPrefix(w[0], "interface vb ingress is no longer attached") {
		t.Errorf("warnings after the detach: %q", w)
	}
	if got := e.send(t, 4739, 3); got != 3 {
		t.Errorf("detached, %d of 3 datagrams arrived", got)
	}

	e.commit(t, rs)
	if w := warnings(); len(w) != 0 {
		t.Errorf("warnings after committing again: %q", w)
	}
	if got := e.send(t, 4739, 3); got != 0 {
		t.Errorf("attached again, %d of 3 datagrams passed the drop rule", got)
	}
}
