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
	for _, h := range st.hooks() {
		if !b.attached(s, h.id()) {
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
