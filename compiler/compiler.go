// Package compiler turns the rules of one interface hook into an eBPF
// SchedCLS program, generated in Go with cilium/ebpf's asm package (no C
// compiler anywhere), plus the maps the program uses.
//
// The program is a pipeline of small passes, in the spirit of cbpfc:
//
//   - a fast path for IPv4 without options (one EtherType/version/IHL test)
//     that leaves at once when every rule needs a destination port the
//     packet doesn't have;
//   - the parse guard: reads the packet once into stack slots (family,
//     addresses, transport protocol after options / extension headers,
//     ports, TCP flags, fragment and option flags) and leaves early for
//     families and protocols no rule wants;
//   - per rule the matches, cheapest first, map lookups last; runs of rules
//     that differ only in one address become one map lookup plus a
//     dispatch (see group.go); large anonymous sets become maps (IPv4
//     host addresses only: a perfect hash, see hosttable.go);
//   - the statements (counter, mark set) and the actions.
//
// The semantics are those of package refmodel, which the tests hold the
// programs to, byte for byte.
//
// Checksums: funnel makes the inner transport checksum address-neutral and
// derives the outer checksum in O(1) from what the inner one sums to once
// final; unfunnel adds the addresses back. Updates are inline according to
// skb->ip_summed (read through bpf_cast_to_kern_ctx and kernel BTF): a
// CHECKSUM_PARTIAL seed or a complete checksum; CHECKSUM_COMPLETE skbs and
// Options.ChecksumHelper use bpf_l4_csum_replace.
//
// Return codes, maps and counted events:
// the verdicts, map layouts and stats of package abi.
package compiler

import (
	"encoding/binary"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/ctmark"
	"github.com/sfunnel/sfunnel/grammar"
)

// Names from package abi, the datapath's contract, that the compiler's
// code uses unqualified. Other packages use abi directly.
const (
	VerdictNext = abi.VerdictNext
	VerdictPass = abi.VerdictPass
	VerdictDrop = abi.VerdictDrop

	DefaultCtMarkMask = abi.DefaultCtMarkMask

	ProgramName  = abi.ProgramName
	CountersMap  = abi.CountersMap
	StatsMap     = abi.StatsMap
	RuleMTUMap   = abi.RuleMTUMap
	SetMapPrefix = abi.SetMapPrefix
	anonPrefix   = "anon_" // + number: a large anonymous set or a rule table

	StatFragment        = abi.StatFragment
	StatUnfunnelInvalid = abi.StatUnfunnelInvalid
	StatMTUExceeded     = abi.StatMTUExceeded
	StatNotApplicable   = abi.StatNotApplicable
	StatNoChecksum      = abi.StatNoChecksum
	StatIPOptions       = abi.StatIPOptions
	StatGSO             = abi.StatGSO
	StatPartialChecksum = abi.StatPartialChecksum
	StatHelperFailed    = abi.StatHelperFailed
	StatSegmented       = abi.StatSegmented
	StatUrgent          = abi.StatUrgent
	StatUDPLength       = abi.StatUDPLength
	NumStats            = abi.NumStats

	MaxOptMove = abi.MaxOptMove
)

// Options say what the program is for.
type Options struct {
	L3         bool         // device without MAC header (tun, wireguard): packet data starts at the IP header
	Hook       grammar.Hook // ingress or egress (egress counts MTU overruns)
	CtMarkMask uint32       // bits of skb->mark that carry `ct mark` values; 0 = abi.DefaultCtMarkMask
	// ChecksumHelper makes every transport checksum update a
	// bpf_l4_csum_replace call. By default the program reads
	// skb->ip_summed through kernel BTF (bpf_cast_to_kern_ctx) and updates
	// inline, which is faster but ties the program to the running kernel;
	// golden listings use the helper so they don't depend on it.
	ChecksumHelper bool
	// SegIfindex is the segmentation device of an egress hook (see
	// NeedsSegmentation): GSO and CHECKSUM_PARTIAL packets that a funnel or
	// rewrite rule matches are redirected there to be segmented and
	// checksummed, and come back one segment at a time. 0: none (such
	// packets are passed untouched and counted).
	SegIfindex int
}

// Program is a compiled hook.
type Program struct {
	Spec      *ebpf.CollectionSpec // exactly one program named "sfunnel" (SchedCLS, GPL) + its maps
	Handles   []uint64             // Handles[i] = handle of rule i; index i of "counters" and "rule_mtu"
	NamedSets []string             // named sets the program references; their maps are Spec.Maps["set_"+name]
}

// Error is a compile error at a node of the rule text.
type Error struct {
	Span grammar.Span
	Msg  string
}

func (e *Error) Error() string {
	p := e.Span.Pos
	if p.Line == 0 {
		return e.Msg
	}
	if p.Filename != "" {
		return fmt.Sprintf("%s:%d:%d: %s", p.Filename, p.Line, p.Column, e.Msg)
	}
	return fmt.Sprintf("%d:%d: %s", p.Line, p.Column, e.Msg)
}

func errorf(span grammar.Span, format string, args ...any) *Error {
	return &Error{Span: span, Msg: fmt.Sprintf(format, args...)}
}

// CtMark is how `ct mark` values ride in skb->mark (package ctmark, which
// also keeps the nftables table that moves them to and from conntrack).
type CtMark = ctmark.Layout

// CtMarkLayout validates a ct mark mask (0 = DefaultCtMarkMask).
func CtMarkLayout(mask uint32) (CtMark, error) { return ctmark.NewLayout(mask) }

// Compile compiles the rules of one hook. sets holds the named sets by name.
func Compile(rules []*grammar.Rule, sets map[string]*grammar.Set, opts Options) (*Program, error) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		return nil, fmt.Errorf("compiler: big-endian hosts are not supported")
	}
	ct, err := CtMarkLayout(opts.CtMarkMask)
	if err != nil {
		return nil, err
	}
	c := &compiler{opts: opts, ct: ct, sets: sets, spec: &ebpf.CollectionSpec{Maps: map[string]*ebpf.MapSpec{}, Programs: map[string]*ebpf.ProgramSpec{}}}
	if !opts.ChecksumHelper {
		c.kern = loadKernelSkb()
	}
	if err := c.check(rules); err != nil {
		return nil, err
	}
	if err := c.program(rules); err != nil {
		return nil, err
	}
	p := &Program{Spec: c.spec, NamedSets: c.named}
	for _, r := range rules {
		p.Handles = append(p.Handles, r.Handle)
	}
	return p, nil
}
