// Package ruleset is sfunnel's ruleset model: interfaces, their hooks, the
// rules with stable handles, and named sets; the commands of the command
// language as transactions on that model; and the Backend that makes a
// ruleset live (a state file, or the eBPF datapath).
package ruleset

import (
	"github.com/sfunnel/sfunnel/grammar"
)

// Ruleset is the whole configuration sfunnel manages.
type Ruleset struct {
	// Interfaces in the order they were first configured.
	Interfaces []*Interface
	// Sets in the order they were defined.
	Sets []*grammar.Set
	// NextHandle is the handle the next added rule gets; handles are unique
	// across the ruleset and never reused while it lives.
	NextHandle uint64
}

// Interface holds the two hooks of one network interface.
type Interface struct {
	Name    string
	Ingress []*grammar.Rule
	Egress  []*grammar.Rule
}

// Rules returns the rules of one hook.
func (i *Interface) Rules(h grammar.Hook) []*grammar.Rule {
	if h == grammar.HookEgress {
		return i.Egress
	}
	return i.Ingress
}

// Counter is a rule counter as the datapath reports it.
type Counter struct {
	Packets, Bytes uint64
}

// Backend makes a ruleset live. The kernel is the source of truth: Load
// reflects what is really attached.
type Backend interface {
	// Load returns the live ruleset; an empty one when nothing is live.
	Load() (*Ruleset, error)
	// Check compiles rs and loads every program through the verifier
	// without attaching or changing anything live.
	Check(rs *Ruleset) error
	// Commit makes rs live as one transaction: everything is compiled and
	// verified first, then swapped in; on error nothing live has changed.
	Commit(rs *Ruleset) error
	// Counters returns the counters of the live rules by handle.
	Counters() (map[uint64]Counter, error)
	// ResetCounters zeroes the counters of the given handles (all if nil).
	ResetCounters(handles []uint64) error
}

// Warner is a Backend that can tell where the kernel no longer holds what
// was committed (a hook detached by someone else, sfunnel's nftables table
// flushed). `list ruleset` prints the warnings as comments, so the listing
// stays valid input.
type Warner interface {
	Warnings() ([]string, error)
}

// Noter is a Backend with facts about the live datapath worth a comment
// line in a text listing (devices it created, ...).
type Noter interface {
	Notes() ([]string, error)
}

// LeftAloner is a Backend that counts, per rule, the packets a rule matched
// but did not transform, by reason (shown beside the rule in listings).
type LeftAloner interface {
	LeftAlone() (map[uint64]map[string]uint64, error)
}

// Locker is a Backend whose writers serialise on a lock that readers never
// take (readers see the last committed ruleset). A batch that changes the
// ruleset holds it from reading the live ruleset until its commit, so no
// other writer's change is lost in between; Commit and ResetCounters
// called meanwhile must not take it again.
type Locker interface {
	Lock() (unlock func(), err error)
}

// Flusher is a Backend that can tell the next handle without loading the
// live rules: a batch that starts with `flush ruleset` needs nothing else
// of them.
type Flusher interface {
	NextHandle() (uint64, error)
}

// Outliner is a Backend that can load the live ruleset in outline: sets
// whole, rules as placeholders that carry their handle and nothing else.
// A batch of add, insert, replace and delete rule commands needs no more
// of the rules it does not touch (their place and handle), and the
// backend's Commit reads the syntax of the stored rules it needs itself;
// parsing ten thousand rules to change one is most of such a command.
type Outliner interface {
	LoadOutline() (*Ruleset, error)
}
