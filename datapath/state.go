package datapath

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// The state record stored with every generation (bpf.Gen.WriteState):
// what is committed, read by `list ruleset` and by the next writer. The
// types below are what the commit works with; the bytes stored are version
// 3 (staterecord.go: a JSON header, the rules as text, a binary index), or,
// as sfunnel wrote them until 2026-11-30 and still reads them, version 2:
// one JSON document, these types' tags.
//
//	{"format": "sfunnel-state", "version": 2, "generation": N,
//	 "ct_mark_mask": M, "next_handle": H,
//	 "sets": [{"name": S, "text": "set S {\n\ttype …\n}\n"}],
//	 "interfaces": [{"name": IF, "hooks": [{"hook": "ingress"|"egress",
//	    "digest": HEX, "program_digest": HEX, "table_generation": 0|1,
//	    "sets": [S…], "counter_handles": [H…],
//	    "rules": [{"handle": H, "text": RULE, "counter_at": OFFSET}],
//	    "placement": {"prio": [P…], "slot": [S…], "segment": [G…], "table": [B…]},
//	    "base": [{"handle": H, "packets": P, "bytes": B}],
//	    "layout": {compiler.Layout}, "spare": {"delta": {TABLE: [KEY…]}}}]}],
//	 "aux_hooks": [{"interface": IF, "hook": HOOK}]}
//
// Rules and sets are kept as the canonical text `list ruleset` prints
// (which the grammar promises to read back), so a newer sfunnel reads
// what an older one wrote and `list ruleset` prints without parsing.
// counter_at is the byte offset in text where `list` inserts "packets P
// bytes B" (0: the rule has no counter). counter_handles maps the index of
// the hook's counters map to rule handles. base holds what earlier
// programs of the hook counted for rules that survived into this one: a
// rule's counter is its base plus the live map (copying into the live map
// instead would race with the program counting in it).
const stateFormat = "sfunnel-state"

type liveState struct {
	Format     string        `json:"format"`
	Version    int           `json:"version"`
	Generation uint64        `json:"generation"`
	CtMarkMask uint32        `json:"ct_mark_mask"`
	NextHandle uint64        `json:"next_handle"`
	CtMarkUsed bool          `json:"ct_mark_used,omitempty"` // the nftables table is needed
	Sets       []setRecord   `json:"sets"`
	Interfaces []ifaceRecord `json:"interfaces"`
	// Aux are hooks sfunnel attaches for itself (segmentation devices'
	// return programs), with a program in the generation but no rules.
	Aux []auxRecord `json:"aux_hooks,omitempty"`
}

type auxRecord struct {
	Interface string `json:"interface"`
	Hook      string `json:"hook"`
}

func (a auxRecord) id() bpf.HookID {
	h := grammar.HookIngress
	if a.Hook == "egress" {
		h = grammar.HookEgress
	}
	return bpf.HookID{Ifname: a.Interface, Hook: h}
}

type setRecord struct {
	Name string `json:"name"`
	Text string `json:"text"`
}

type ifaceRecord struct {
	Name  string      `json:"name"`
	Hooks []hookState `json:"hooks"`
}

type hookState struct {
	Hook           string          `json:"hook"`
	Digest         string          `json:"digest"`
	ProgDigest     string          `json:"program_digest,omitempty"`
	TableGen       uint32          `json:"table_generation,omitempty"`
	Sets           []string        `json:"sets,omitempty"`
	CounterHandles numbers[uint64] `json:"counter_handles,omitempty"`
	Rules          ruleRecords     `json:"rules"`
	Base           []baseRecord    `json:"base,omitempty"`
	// Layout is what incremental changes need of the compiled program
	// (patch.go); Spare how the spare table generation differs from the
	// live one. Absent: the next change compiles the hook.
	Layout    *compiler.Layout `json:"layout,omitempty"`
	Spare     *spareRecord     `json:"spare,omitempty"`
	Placement *placementRecord `json:"placement,omitempty"`
	// Contested are table keys ("TABLE/HEXKEY") that incremental changes
	// found held by an earlier rule: deleting that rule compiles the hook.
	Contested []string `json:"contested,omitempty"`

	ifname string // filled in by decode
	hook   grammar.Hook
}

type ruleRecord struct {
	Handle    uint64 `json:"handle"`
	Text      string `json:"text"`
	CounterAt int    `json:"counter_at,omitempty"`
	// Prio is the rule's priority in the program's tables (sparse,
	// growing with the rule's position; 0 in records of older sfunnels),
	// Slot its counter slot, Segment 1 + its table segment in the layout
	// (0: tested by code of its own), Table whether its matching is all
	// table entries.
	// Version 2 stored them as the hook's placement arrays (decoding ten
	// thousand objects' fields costs more than arrays of numbers).
	Prio    uint32 `json:"-"`
	Slot    uint32 `json:"-"`
	Segment int    `json:"-"`
	Table   bool   `json:"-"`
}

// placementRecord holds the Prio, Slot, Segment and Table of a hook's
// rules, in rule order.
type placementRecord struct {
	Prio    numbers[uint32] `json:"prio"`
	Slot    numbers[uint32] `json:"slot"`
	Segment numbers[int]    `json:"segment"`
	Table   flags           `json:"table"`
}

type baseRecord struct {
	Handle  uint64 `json:"handle"`
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

func (h *hookState) id() bpf.HookID { return bpf.HookID{Ifname: h.ifname, Hook: h.hook} }

func (h *hookState) base() map[uint64]ruleset.Counter {
	m := make(map[uint64]ruleset.Counter, len(h.Base))
	for _, b := range h.Base {
		m[b.Handle] = ruleset.Counter{Packets: b.Packets, Bytes: b.Bytes}
	}
	return m
}

func (h *hookState) setBase(m map[uint64]ruleset.Counter) {
	h.Base = h.Base[:0]
	for _, r := range h.Rules {
		if c, ok := m[r.Handle]; ok && (c.Packets != 0 || c.Bytes != 0) {
			h.Base = append(h.Base, baseRecord{Handle: r.Handle, Packets: c.Packets, Bytes: c.Bytes})
		}
	}
}

// decodeState reads a state record: version 3 (staterecord.go) or 2
// (one JSON document, as sfunnel wrote it until 2026-11-30). Unknown
// fields of a header are ignored (a newer sfunnel may add some); a record
// of another format or a newer version is refused with a message saying
// what to do.
func decodeState(data []byte) (*liveState, error) {
	if isV3(data) {
		return decodeV3(data)
	}
	var st liveState
	if err := json.Unmarshal(data, &st); err != nil {
		return nil, fmt.Errorf("stored ruleset is corrupt: %w", err)
	}
	if st.Format != stateFormat || st.Version != 2 {
		return nil, versionError(st.Format, st.Version)
	}
	for i := range st.Interfaces {
		ifc := &st.Interfaces[i]
		for j := range ifc.Hooks {
			h := &ifc.Hooks[j]
			if err := h.identify(ifc.Name); err != nil {
				return nil, err
			}
			if p := h.Placement; p != nil {
				n := len(h.Rules)
				if len(p.Prio) != n || len(p.Slot) != n || len(p.Segment) != n || len(p.Table) != n {
					return nil, fmt.Errorf("stored ruleset is corrupt: placement of %s %s", ifc.Name, h.Hook)
				}
				for k := range h.Rules {
					r := &h.Rules[k]
					r.Prio, r.Slot, r.Segment, r.Table = p.Prio[k], p.Slot[k], p.Segment[k], p.Table[k]
				}
				h.Placement = nil
			}
		}
	}
	st.Version = stateVersion // what encodeState writes of it
	return &st, nil
}

func versionError(format string, version int) error {
	return &stateVersionError{fmt.Errorf("stored ruleset has format %q version %d, this sfunnel reads %q versions 2 to %d "+
		"(run `sfunnel flush ruleset` with the sfunnel that wrote it, or remove %s)",
		format, version, stateFormat, stateVersion, bpf.DefaultRoot)}
}

// stateVersionError is a record of a format or version this sfunnel does
// not read (a newer sfunnel's): not corrupt, so not replaced by a flush.
type stateVersionError struct{ error }

func (e *stateVersionError) Unwrap() error { return e.error }

// corruptStateError is a record that does not decode. Every command that
// reads the ruleset fails on it, but `flush ruleset` (and `-f` of a file
// starting with it), which needs nothing of it, replaces it (NextHandle).
type corruptStateError struct{ error }

func (e *corruptStateError) Error() string {
	return e.error.Error() + " (`sfunnel flush ruleset`, or -f of a ruleset file that starts with it, replaces it)"
}

func (e *corruptStateError) Unwrap() error { return e.error }

// identify fills in h's interface and hook from the record.
func (h *hookState) identify(ifname string) error {
	h.ifname = ifname
	switch h.Hook {
	case "ingress":
		h.hook = grammar.HookIngress
	case "egress":
		h.hook = grammar.HookEgress
	default:
		return fmt.Errorf("stored ruleset is corrupt: interface %s has hook %q", ifname, h.Hook)
	}
	return nil
}

// encodeState writes st as a record of the current version.
func encodeState(st *liveState) ([]byte, error) {
	st.Format, st.Version = stateFormat, stateVersion
	return encodeV3(st)
}

func readGenState(g *bpf.Gen) (*liveState, error) {
	if g == nil {
		return nil, nil
	}
	data, err := g.ReadState()
	if err != nil || data == nil {
		return nil, err
	}
	st, err := decodeState(data)
	if err != nil && !errors.As(err, new(*stateVersionError)) {
		return nil, &corruptStateError{err}
	}
	return st, err
}

func writeGenState(g *bpf.Gen, st *liveState) error {
	data, err := encodeState(st)
	if err != nil {
		return err
	}
	return g.WriteState(data)
}

// hooks lists every hook of the state.
func (st *liveState) hooks() []*hookState {
	if st == nil {
		return nil
	}
	var out []*hookState
	for i := range st.Interfaces {
		for j := range st.Interfaces[i].Hooks {
			out = append(out, &st.Interfaces[i].Hooks[j])
		}
	}
	return out
}

func (st *liveState) hook(id bpf.HookID) *hookState {
	for _, h := range st.hooks() {
		if h.id() == id {
			return h
		}
	}
	return nil
}

// ruleRecordOf renders a rule for the state record.
func ruleRecordOf(r *grammar.Rule) ruleRecord {
	lr := ruleset.ListRule(r)
	return ruleRecord{Handle: lr.Handle, Text: lr.Text, CounterAt: lr.CounterAt}
}

// stateOf describes rs; hooks get their digests and counter handles from
// the compiled plans.
//
// known gives the records of rules read from the committed state (rules
// are never changed in place, so the same rule has the same record).
//
// Hooks in patches take the record their patch made. CtMarkUsed is the
// caller's to fill in (usesCtMark).
func stateOf(rs *ruleset.Ruleset, ctMask uint32, plans []*hookPlan, known func(*grammar.Rule) (ruleRecord, bool), patches map[bpf.HookID]*hookPatch) *liveState {
	st := &liveState{CtMarkMask: ctMask, NextHandle: rs.NextHandle, Sets: []setRecord{}, Interfaces: []ifaceRecord{}}
	for _, s := range rs.Sets {
		st.Sets = append(st.Sets, setRecord{Name: s.Name, Text: grammar.FormatSet(s, "")})
	}
	byID := map[bpf.HookID]*hookPlan{}
	for _, p := range plans {
		byID[p.id] = p
	}
	for _, ifc := range rs.Interfaces {
		ir := ifaceRecord{Name: ifc.Name}
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			rules := ifc.Rules(h)
			if len(rules) == 0 {
				continue
			}
			id := bpf.HookID{Ifname: ifc.Name, Hook: h}
			if p := patches[id]; p != nil {
				hs := p.hs
				hs.Hook, hs.ifname, hs.hook = h.String(), ifc.Name, h
				ir.Hooks = append(ir.Hooks, hs)
				continue
			}
			hs := hookState{Hook: h.String(), ifname: ifc.Name, hook: h, Rules: make([]ruleRecord, len(rules))}
			for i, r := range rules {
				if rec, ok := recordOr(known, r); ok && rec.Handle == r.Handle {
					hs.Rules[i] = rec
				} else {
					hs.Rules[i] = ruleRecordOf(r)
				}
			}
			if p := byID[hs.id()]; p != nil {
				hs.Digest = p.digest
				hs.ProgDigest = progDigest(p.prog)
				hs.Sets = p.prog.NamedSets
				hs.CounterHandles = p.prog.Handles
				layout, place := p.prog.Layout()
				hs.Layout = layout
				for i := range hs.Rules {
					r := &hs.Rules[i]
					r.Prio, r.Slot = p.prios[i], p.slots[i]
					r.Segment, r.Table = place[i].Segment+1, place[i].Table
				}
				if p.spareKnown {
					hs.Spare = &spareRecord{Delta: map[string][]string{}}
				}
			}
			ir.Hooks = append(ir.Hooks, hs)
		}
		st.Interfaces = append(st.Interfaces, ir)
	}
	return st
}

// recordOr is known(r), when there is a known.
func recordOr(known func(*grammar.Rule) (ruleRecord, bool), r *grammar.Rule) (ruleRecord, bool) {
	if known == nil {
		return ruleRecord{}, false
	}
	return known(r)
}

// ruleset parses the state's text back into a ruleset (for writers, and
// listings that need the rules' structure). Only the hooks in live (nil:
// all) are kept.
func (st *liveState) ruleset(live func(*hookState) bool) (*ruleset.Ruleset, error) {
	if st == nil {
		return &ruleset.Ruleset{NextHandle: 1}, nil
	}
	rs := &ruleset.Ruleset{NextHandle: st.NextHandle}
	var b strings.Builder
	var handles []uint64
	for _, s := range st.Sets {
		b.WriteString(s.Text)
	}
	for _, ifc := range st.Interfaces {
		opened := false
		for i := range ifc.Hooks {
			h := &ifc.Hooks[i]
			if live != nil && !live(h) {
				continue
			}
			if !opened {
				fmt.Fprintf(&b, "interface %s {\n", ifc.Name)
				opened = true
			}
			fmt.Fprintf(&b, "%s {\n", h.Hook)
			for _, r := range h.Rules {
				b.WriteString(r.Text)
				b.WriteByte('\n')
				handles = append(handles, r.Handle)
			}
			b.WriteString("}\n")
		}
		if opened {
			b.WriteString("}\n")
		}
	}
	cmds, _, err := grammar.Parse("<stored ruleset>", b.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("stored ruleset does not parse: %w", err)
	}
	n := 0
	for _, c := range cmds {
		switch c.Kind {
		case grammar.CmdDefineSet:
			rs.Sets = append(rs.Sets, c.Set)
		case grammar.CmdAddRule:
			if n >= len(handles) {
				return nil, fmt.Errorf("stored ruleset does not parse back to its rules")
			}
			r := c.Rule
			r.Handle = handles[n]
			n++
			ifc := rs.Interface(c.Interface)
			if ifc == nil {
				ifc = &ruleset.Interface{Name: c.Interface}
				rs.Interfaces = append(rs.Interfaces, ifc)
			}
			if c.Hook == grammar.HookEgress {
				ifc.Egress = append(ifc.Egress, r)
			} else {
				ifc.Ingress = append(ifc.Ingress, r)
			}
		}
	}
	if n != len(handles) {
		return nil, fmt.Errorf("stored ruleset does not parse back to its rules (%d of %d)", n, len(handles))
	}
	return rs, nil
}

// digest identifies a compiled program: instructions, map shapes, contents
// of its own maps (not of named sets, which change live) and handle order.
// Equal digests mean the running program can stay.
//
// The text is hashed on another goroutine while the next chunk is written
// (each took about half of the 23 ms of 10 000 mixed rules; now 15 ms).
func digest(spec *ebpf.CollectionSpec, handles []uint64) string {
	const chunk = 64 << 10
	full, free := make(chan []byte, 2), make(chan []byte, 3)
	for range cap(free) {
		free <- make([]byte, 0, chunk+256)
	}
	sum := make(chan []byte)
	go func() {
		h := sha256.New()
		for b := range full {
			h.Write(b)
			free <- b[:0]
		}
		binary.Write(h, binary.LittleEndian, handles)
		sum <- h.Sum(nil)
	}()
	buf := <-free
	w := func(vs ...any) {
		for _, v := range vs {
			buf = appendDigestValue(buf, v)
		}
		if len(buf) >= chunk {
			full <- buf
			buf = <-free
		}
	}
	names := make([]string, 0, len(spec.Programs))
	for n := range spec.Programs {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		p := spec.Programs[n]
		w("prog", n, p.Type, p.AttachType)
		for _, ins := range p.Instructions {
			w(uint8(ins.OpCode), uint8(ins.Dst), uint8(ins.Src), ins.Offset, ins.Constant, ins.Reference(), ins.Symbol())
		}
	}
	names = names[:0]
	for n := range spec.Maps {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		m := spec.Maps[n]
		w("map", n, m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
		if !isSetMap(n) {
			for _, kv := range m.Contents {
				w(kv.Key, kv.Value)
			}
		}
	}
	full <- buf
	close(full)
	return hex.EncodeToString(<-sum)
}

// appendDigestValue appends v as fmt.Fprint(v, "\x00") writes it, so
// digests stay equal to those older versions stored. The kinds a program
// holds per instruction and per map entry are formatted here (fmt spent
// 20 ms of `sfunnel -f` of 10 000 rules on their tables); others go through fmt.
func appendDigestValue(b []byte, v any) []byte {
	switch v := v.(type) {
	case string:
		b = append(b, v...)
	case uint8:
		b = strconv.AppendUint(b, uint64(v), 10)
	case int16:
		b = strconv.AppendInt(b, int64(v), 10)
	case uint32:
		b = strconv.AppendUint(b, uint64(v), 10)
	case int64:
		b = strconv.AppendInt(b, v, 10)
	case []byte:
		b = slices.Grow(b, 4*len(v)+2)
		b = append(b, '[')
		for i, x := range v {
			if i > 0 {
				b = append(b, ' ')
			}
			switch {
			case x >= 100:
				b = append(b, '0'+x/100, '0'+x/10%10, '0'+x%10)
			case x >= 10:
				b = append(b, '0'+x/10, '0'+x%10)
			default:
				b = append(b, '0'+x)
			}
		}
		b = append(b, ']')
	default:
		b = fmt.Append(b, v)
	}
	return append(b, 0)
}

func isSetMap(name string) bool { return strings.HasPrefix(name, bpf.SetMapPrefix) }
