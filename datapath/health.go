package datapath

import (
	"fmt"

	"github.com/sfunnel/sfunnel/bpf"

	"github.com/sfunnel/sfunnel/ruleset"
)

var _ ruleset.Warner = (*Backend)(nil)

// Warnings describes where the kernel no longer holds what sfunnel
// committed: hooks detached by someone else (their rules are no longer
// listed) and a missing nftables table while rules use ct mark. The next
// commit repairs both.
func (b *Backend) Warnings() ([]string, error) {
	var out []string
	err := b.readLive(func(s *bpf.Store, _ *bpf.Gen, st *liveState) error {
		var err error
		out, err = b.warningsOf(s, st)
		return err
	})
	return out, err
}

// warningsOf are the warnings about st's hooks (a concurrent commit may
// detach one: readLive reads again).
func (b *Backend) warningsOf(s *bpf.Store, st *liveState) ([]string, error) {
	var out []string
	next := pendingState(s)
	for _, h := range st.hooks() {
		if !b.attached(s, h.id()) && !next.detaches(h.id()) {
			out = append(out, fmt.Sprintf("interface %s %s is no longer attached (program detached or interface removed outside sfunnel): its rules are gone from the kernel until the ruleset is applied again", h.ifname, h.Hook))
		}
	}
	if st.CtMarkUsed {
		problem, err := b.table(b.ctMarkMask(st)).Check()
		if err != nil {
			return nil, err
		}
		if problem != "" {
			out = append(out, problem+": ct mark rules do not work until the ruleset is applied again")
		}
	}
	return out, nil
}

// pendingState reads, lazily, the state record of the generation a commit
// past its commit point is rolling forward to (none: no commit in flight).
func pendingState(s *bpf.Store) *pending { return &pending{s: s} }

type pending struct {
	s    *bpf.Store
	read bool
	st   *liveState
}

// detaches reports whether the commit in flight removes hook id: its
// writer detaches the hook (step 3) before it publishes (step 4), so a
// reader of the generation before sees it detached by sfunnel itself, not
// by someone else. The transaction is decided (a dead writer's is rolled
// forward by the next command), so that is no warning. A writer that
// publishes meanwhile makes readLive read the new generation.
func (p *pending) detaches(id bpf.HookID) bool {
	if !p.read {
		p.read = true
		if g, err := p.s.Pending(); err == nil && g != nil {
			p.st, _ = readGenState(g)
		}
	}
	return p.st != nil && p.st.hook(id) == nil
}
