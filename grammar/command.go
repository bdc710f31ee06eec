package grammar

// CmdKind names a command of the command language (SPEC §3.2).
type CmdKind uint8

const (
	CmdListRuleset CmdKind = iota
	CmdListInterface
	CmdListSets
	CmdListSet
	CmdFlushRuleset
	CmdFlushInterface
	CmdAddRule
	CmdInsertRule
	CmdReplaceRule
	CmdDeleteRule
	CmdDeleteInterface
	CmdAddElement
	CmdDeleteElement
	CmdResetCounters
	CmdMonitor
	// CmdDefineSet declares a named set (a `set NAME { … }` block).
	CmdDefineSet
	// CmdDeleteSet removes a named set no rule uses.
	CmdDeleteSet
	// CmdBareRule is a rule outside any interface block, as in sfunnel's own
	// ruleset files; it needs --interface and --hook to say where it goes.
	CmdBareRule
)

// Command is one resolved command. Interface blocks in files become one
// CmdAddRule per rule.
type Command struct {
	Span
	Kind CmdKind

	Interface     string // "" when not given
	InterfaceSpan Span
	Hook          Hook
	HasHook       bool

	Handle     uint64 // replace/delete: the rule; insert: position (0 = start)
	HandleSpan Span
	Rule       *Rule

	// Set is the set for CmdDefineSet, and the set name plus the elements
	// to add or remove for CmdAddElement/CmdDeleteElement/CmdListSet
	// (Type is unknown there until the ruleset looks the set up; elements
	// are then checked against it, see CheckElements).
	Set *Set
	// Trace is set for `monitor trace` (rule hits of packets a
	// `meta nftrace set 1` rule marked), CmdMonitor only.
	Trace bool

	// Elements keeps the element values as written, for element commands,
	// to be typed against the set's type.
	Elements []Value
}

// Value is one element as written, before it is typed by its use.
type Value struct {
	Span
	Addr   string // address text, with Len for a prefix
	Len    string
	Lo, Hi string // port or range
	Name   string // an identifier (an interface name in a define)
}
