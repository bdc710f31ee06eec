package datapath

import (
	"fmt"

	"github.com/sfunnel/sfunnel/ruleset"
)

var _ ruleset.Warner = (*Backend)(nil)

// Warnings describes where the kernel no longer holds what sfunnel
// committed: hooks detached by someone else (their rules are no longer
// listed) and a missing nftables table while rules use ct mark. The next
// commit repairs both.
func (b *Backend) Warnings() ([]string, error) {
	s, _, st, err := b.snapshot()
	if err != nil || st == nil {
		return nil, err
	}
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
