package grammar

// Keyword tables: the one list of the language's words. The REPL's Tab
// completion, bash completion (contrib/bash-completion, checked against
// these by a test) and error hints all read them.

// CommandUsage has one line per command form (SPEC §3.2). Upper-case
// words are placeholders: IF an interface, HOOK a hook, NAME a set, H a
// handle, RULE a rule, TYPE a set type, ELEMENTS set elements.
var CommandUsage = []string{
	"list ruleset",
	"list interface IF [HOOK]",
	"list sets",
	"list set NAME",
	"flush ruleset",
	"flush interface IF [HOOK]",
	"add rule IF HOOK [position H] RULE",
	"insert rule IF HOOK [position H] RULE",
	"replace rule IF HOOK handle H RULE",
	"delete rule IF HOOK handle H",
	"delete interface IF",
	"add set NAME { type TYPE [; size N] [; elements = { ELEMENTS }] }",
	"delete set NAME",
	"add element NAME { ELEMENTS }",
	"delete element NAME { ELEMENTS }",
	"reset counters [IF [HOOK]]",
	"monitor [trace]",
}

// Hooks are the TC hooks a rule attaches to.
var Hooks = []string{"ingress", "egress"}

// SetTypes are the element types of named sets.
var SetTypes = []string{"ipv4_addr", "ipv6_addr", "inet_service"}

// MatchWords start a match; StatementWords a statement; ActionWords an
// action (also the nft form without `actions`).
var (
	MatchWords     = []string{"ip", "ip6", "saddr", "daddr", "tcp", "udp", "sport", "dport", "flags", "meta", "ct"}
	StatementWords = []string{"counter", "meta", "ct"}
	ActionWords    = []string{"accept", "drop", "funnel", "unfunnel", "rewrite", "dnat"}
	// RuleWords are the other words of a rule.
	RuleWords = []string{"actions", "comment", "mark", "set", "protocol", "nexthdr", "l4proto", "nfproto", "nftrace", "to"}
	// TCPFlags are the names of TCP flags, in nft's order.
	TCPFlags = []string{"fin", "syn", "rst", "psh", "ack", "urg", "ecn", "cwr"}
)

// FileWords start a statement in a file but are not commands.
var FileWords = []string{"define", "include", "interface", "set"}
