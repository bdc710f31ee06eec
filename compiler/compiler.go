// Package compiler turns the rules of one interface hook into an eBPF
// SchedCLS program, generated in Go with cilium/ebpf's asm package (no C
// compiler anywhere), plus the maps the program uses.
//
// The program is a pipeline of small passes, in the spirit of cbpfc:
//
//   - a fast path for IPv4 without options (one EtherType/version/IHL test)
//     that leaves at once when every rule needs a destination port the
//     packet doesn't have; for small rulesets on protocol and ports it also
//     matches the rules and runs their bodies, specialised (fast.go);
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
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"maps"
	"slices"
	"strings"

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
	// SegReturnIfindex is the device's return end: segments received there
	// are back from segmentation and are rewritten without another detour.
	SegReturnIfindex int
	// Prios and Slots, when set, give rule i its priority (increasing with
	// i, below 1<<31: the lowest matching one wins) and its counter slot
	// (index of its counters, rule_mtu, stats and trace entries). Nil:
	// i+1 and i. The datapath keeps them stable across changes, so a rule
	// added between two others needs no new program (see Layout).
	Prios, Slots []uint32
}

// Program is a compiled hook: the program with its maps (Spec), and apart
// from it the contents of its rule tables, so that a change that only
// changes contents can be applied to the live maps (see Digest and
// TableContents).
type Program struct {
	Spec      *ebpf.CollectionSpec // exactly one program named "sfunnel" (SchedCLS, GPL) + its maps
	Handles   []uint64             // Handles[slot] = handle of the rule counted at slot (0: free); index of "counters" and "rule_mtu"
	NamedSets []string             // named sets the program references; their maps are Spec.Maps["set_"+name]
	// Tables names the maps of Spec whose contents are rule tables
	// (abi.TablePrefix), sorted. Spec holds their generation 0 entries.
	Tables []string
	// Digest identifies the program and the shapes of its maps, not the
	// contents of its tables: two compilations with the same digest differ
	// at most in TableContents (and named set elements).
	Digest [32]byte

	c *compiler
}

// TableContents returns every entry of every table map for generation gen
// (0 or 1): the live program uses the generation abi.ControlMap holds.
func (p *Program) TableContents(gen uint32) map[string][]ebpf.MapKV {
	out := map[string][]ebpf.MapKV{}
	for _, name := range p.Tables {
		out[name] = p.tableContents(name, gen, true)
	}
	return out
}

// TableEntries returns the entries of table name for generation gen
// without the empty slots of port arrays, which a new map holds already
// (a generation of a port array is 65 536 slots).
func (p *Program) TableEntries(name string, gen uint32) []ebpf.MapKV {
	return p.tableContents(name, gen, false)
}

func (p *Program) tableContents(name string, gen uint32, emptySlots bool) []ebpf.MapKV {
	if f := p.c.extraTables[name]; f != nil {
		return f(gen & 1)
	}
	if abi.IsPerfectGen(name) {
		// Each generation's map holds only that generation.
		if name != abi.PerfectGen(gen) {
			return nil
		}
		return p.c.perfectContents(gen & 1)
	}
	shapes := p.c.tables[name]
	kvs := p.c.entries(shapes, gen&1)
	if shapes[0].array && emptySlots {
		// Every slot of the generation: an array has no deletes.
		have := map[uint32]bool{}
		for _, kv := range kvs {
			have[binary.NativeEndian.Uint32(kv.Key.([]byte))] = true
		}
		for port := uint32(0); port < 1<<16; port++ {
			if k := gen&1<<16 | port; !have[k] {
				kvs = append(kvs, ebpf.MapKV{Key: binary.NativeEndian.AppendUint32(nil, k), Value: make([]byte, tableValueSize)})
			}
		}
	}
	return kvs
}

// digest hashes the listing of the instructions and the map shapes.
func digest(spec *ebpf.CollectionSpec) [32]byte {
	h := sha256.New()
	// Not the listing: its comments name rules and count entries.
	for _, ins := range spec.Programs[ProgramName].Instructions {
		fmt.Fprintf(h, "%v %v %v %d %d %s %s\n", ins.OpCode, ins.Dst, ins.Src, ins.Offset, ins.Constant, ins.Reference(), ins.Symbol())
	}
	names := slices.Sorted(maps.Keys(spec.Maps))
	for _, n := range names {
		m := spec.Maps[n]
		fmt.Fprintf(h, "map %s %v %d %d %d %#x\n", n, m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
		if !strings.HasPrefix(n, abi.TablePrefix) && n != abi.ControlMap && !strings.HasPrefix(n, SetMapPrefix) {
			// Anonymous sets and host tables are part of the program.
			for _, kv := range m.Contents {
				// Bytes as they are (formatting 8 KiB bitmaps was most of
				// compiling 100 000 rules with lists).
				k, kok := kv.Key.([]byte)
				v, vok := kv.Value.([]byte)
				if kok && vok {
					fmt.Fprintf(h, "%d %d\n", len(k), len(v))
					h.Write(k)
					h.Write(v)
					continue
				}
				fmt.Fprintf(h, "%v %v\n", kv.Key, kv.Value)
			}
		}
	}
	var d [32]byte
	h.Sum(d[:0])
	return d
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
	if err := c.checkPrios(len(rules)); err != nil {
		return nil, err
	}
	if err := c.check(rules); err != nil {
		return nil, err
	}
	if err := c.program(rules); err != nil {
		return nil, err
	}
	p := &Program{Spec: c.spec, NamedSets: c.named, c: c, Digest: digest(c.spec)}
	p.Handles = make([]uint64, c.slotsUsed(len(rules)))
	for i, r := range rules {
		p.Handles[c.slot(i)] = r.Handle
	}
	for name := range c.tables {
		if name == perfectMap {
			p.Tables = append(p.Tables, abi.PerfectGen(0), abi.PerfectGen(1))
			continue
		}
		p.Tables = append(p.Tables, name)
	}
	for name := range c.extraTables {
		p.Tables = append(p.Tables, name)
	}
	slices.Sort(p.Tables)
	return p, nil
}
