// Package nftjson writes and reads sfunnel rulesets as JSON in the shape
// of nft's libnftables-json(5): {"nftables": [OBJECT, …]} with a metainfo
// object first, then set, chain and rule objects. A rule's matches and
// statements are an "expr" list in nft's vocabulary (match, payload, meta,
// ct, counter, mangle, accept, drop, dnat); sfunnel's own actions are the
// objects funnel, unfunnel and rewrite. The schema is schema.json in this
// directory (embedded as Schema).
//
// Where nft has tables and chains, sfunnel has interfaces and hooks: a
// chain object is one hook of one interface ({"interface": IF, "hook": H}),
// and a rule names the same two.
package nftjson

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"fmt"
	"net/netip"

	"github.com/sfunnel/sfunnel/grammar"
)

// Schema is the JSON Schema (draft 2020-12) of the documents this package
// writes and reads.
//
//go:embed schema.json
var Schema []byte

// SchemaVersion is metainfo.json_schema_version.
const SchemaVersion = 1

// Hook is the rules of one interface's hook, in order.
type Hook struct {
	Interface string
	Hook      grammar.Hook
	Rules     []*grammar.Rule
}

// Listing is what one list command shows.
type Listing struct {
	Version string // sfunnel's version, for metainfo
	Sets    []*grammar.Set
	Hooks   []Hook
	// Counter gives a rule's counter values by handle (nil: zeros).
	Counter func(handle uint64) (packets, bytes uint64)
	// LeftAlone gives, by handle, how many packets a rule matched but left
	// alone, by reason (nil or empty: none shown).
	LeftAlone func(handle uint64) map[string]uint64
}

// metainfo and counter keep nft's key order (maps would sort them).
type metainfo struct {
	Version       string `json:"version"`
	ReleaseName   string `json:"release_name"`
	SchemaVersion int    `json:"json_schema_version"`
}

type counterValue struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

// Object is one element of the nftables array: exactly one key set.
type Object map[string]any

// Document is the top level.
type Document struct {
	Nftables []Object `json:"nftables"`
}

// Encode builds the document for l.
func Encode(l *Listing) *Document {
	d := &Document{Nftables: []Object{{"metainfo": metainfo{Version: l.Version, ReleaseName: "sfunnel", SchemaVersion: SchemaVersion}}}}
	for _, s := range l.Sets {
		d.Nftables = append(d.Nftables, Object{"set": SetObject(s)})
	}
	for _, h := range l.Hooks {
		d.Nftables = append(d.Nftables, Object{"chain": map[string]any{"interface": h.Interface, "hook": h.Hook.String()}})
		for _, r := range h.Rules {
			d.Nftables = append(d.Nftables, Object{"rule": RuleObject(h.Interface, h.Hook, r, l.Counter, l.LeftAlone)})
		}
	}
	return d
}

// SetObject is a set as nft writes one: name, type, optional size, and
// "elem" with prefixes and ranges as objects.
func SetObject(s *grammar.Set) map[string]any {
	o := map[string]any{"name": s.Name, "type": s.Type.String()}
	if s.Size != 0 {
		o["size"] = s.Size
	}
	var elems []any
	for _, p := range s.Prefixes {
		elems = append(elems, prefixValue(p))
	}
	for _, r := range s.Ports {
		elems = append(elems, rangeValue(r))
	}
	if len(elems) > 0 {
		o["elem"] = elems
	}
	return o
}

func prefixValue(p netip.Prefix) any {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return map[string]any{"prefix": map[string]any{"addr": p.Addr().String(), "len": p.Bits()}}
}

func rangeValue(r grammar.PortRange) any {
	if r.Lo == r.Hi {
		return int(r.Lo)
	}
	return map[string]any{"range": []int{int(r.Lo), int(r.Hi)}}
}

// RuleObject is a rule: where it is, its handle, its expr list and comment.
func RuleObject(ifname string, hook grammar.Hook, r *grammar.Rule, counter func(uint64) (uint64, uint64), leftAlone func(uint64) map[string]uint64) map[string]any {
	o := map[string]any{"interface": ifname, "hook": hook.String(), "expr": Exprs(r, counter)}
	if r.Handle != 0 {
		o["handle"] = r.Handle
	}
	if r.Comment != "" {
		o["comment"] = r.Comment
	}
	if leftAlone != nil {
		if m := leftAlone(r.Handle); len(m) > 0 {
			o["left_alone"] = m
		}
	}
	return o
}

func match(op string, left, right any) map[string]any {
	return map[string]any{"match": map[string]any{"op": op, "left": left, "right": right}}
}

func payload(proto, field string) map[string]any {
	return map[string]any{"payload": map[string]any{"protocol": proto, "field": field}}
}

func metaKey(key string) map[string]any { return map[string]any{"meta": map[string]any{"key": key}} }
func ctKey(key string) map[string]any   { return map[string]any{"ct": map[string]any{"key": key}} }

func op(neg bool) string {
	if neg {
		return "!="
	}
	return "=="
}

// Exprs is the rule as nft's expression list, in the canonical printer's
// order, so the list reads back to the same rule.
func Exprs(r *grammar.Rule, counter func(uint64) (uint64, uint64)) []any {
	var e []any
	fam := map[grammar.Family]string{grammar.FamilyIPv4: "ip", grammar.FamilyIPv6: "ip6"}[r.Family]
	if r.Family != grammar.FamilyAny && r.Saddr == nil && r.Daddr == nil {
		e = append(e, match("==", metaKey("nfproto"), map[grammar.Family]string{grammar.FamilyIPv4: "ipv4", grammar.FamilyIPv6: "ipv6"}[r.Family]))
	}
	for _, a := range []struct {
		field string
		m     *grammar.AddrMatch
	}{{"saddr", r.Saddr}, {"daddr", r.Daddr}} {
		if a.m == nil {
			continue
		}
		e = append(e, match(op(a.m.Neg), payload(fam, a.field), addrRight(a.m)))
	}
	if r.Proto != grammar.ProtoAny {
		proto := r.Proto.String()
		if r.Dport == nil && r.Sport == nil && r.TCPFlags == nil {
			e = append(e, match("==", metaKey("l4proto"), proto))
		}
		for _, p := range []struct {
			field string
			m     *grammar.PortMatch
		}{{"dport", r.Dport}, {"sport", r.Sport}} {
			if p.m != nil {
				e = append(e, match(op(p.m.Neg), payload(proto, p.field), portRight(p.m)))
			}
		}
		if f := r.TCPFlags; f != nil {
			left := any(payload("tcp", "flags"))
			o := map[grammar.FlagsForm]string{grammar.FlagsAny: "in", grammar.FlagsNone: "!=", grammar.FlagsExact: "==", grammar.FlagsMasked: "=="}[f.Form]
			if f.Form == grammar.FlagsMasked {
				left = map[string]any{"&": []any{left, flagList(f.Mask)}}
			}
			e = append(e, match(o, left, flagList(f.Flags)))
		}
	}
	for _, m := range []struct {
		key any
		m   *grammar.MarkMatch
	}{{metaKey("mark"), r.MetaMark}, {ctKey("mark"), r.CtMark}} {
		if m.m == nil {
			continue
		}
		left := m.key
		if m.m.HasMask {
			left = map[string]any{"&": []any{m.key, m.m.Mask}}
		}
		e = append(e, match(op(m.m.Neg), left, m.m.Value))
	}
	if r.Counter {
		var p, b uint64
		if counter != nil {
			p, b = counter(r.Handle)
		}
		e = append(e, map[string]any{"counter": counterValue{Packets: p, Bytes: b}})
	}
	for _, s := range []struct {
		key any
		s   *grammar.MarkSet
	}{{metaKey("mark"), r.SetMetaMark}, {ctKey("mark"), r.SetCtMark}} {
		if s.s == nil {
			continue
		}
		value := any(s.s.Value)
		if s.s.HasMask {
			// nft's form of a masked set: key = (key & ~mask) | value.
			value = map[string]any{"|": []any{map[string]any{"&": []any{s.key, ^s.s.Mask}}, s.s.Value}}
		}
		e = append(e, map[string]any{"mangle": map[string]any{"key": s.key, "value": value}})
	}
	if r.Trace {
		e = append(e, map[string]any{"mangle": map[string]any{"key": metaKey("nftrace"), "value": 1}})
	}
	for _, a := range r.Actions {
		e = append(e, actionObject(a))
	}
	return e
}

func addrRight(m *grammar.AddrMatch) any {
	if m.Set != "" {
		return "@" + m.Set
	}
	if len(m.Prefixes) == 1 {
		return prefixValue(m.Prefixes[0])
	}
	var s []any
	for _, p := range m.Prefixes {
		s = append(s, prefixValue(p))
	}
	return map[string]any{"set": s}
}

func portRight(m *grammar.PortMatch) any {
	if m.Set != "" {
		return "@" + m.Set
	}
	if len(m.Ranges) == 1 {
		return rangeValue(m.Ranges[0])
	}
	var s []any
	for _, r := range m.Ranges {
		s = append(s, rangeValue(r))
	}
	return map[string]any{"set": s}
}

var flagOrder = []struct {
	bit  uint8
	name string
}{{grammar.TCPFin, "fin"}, {grammar.TCPSyn, "syn"}, {grammar.TCPRst, "rst"}, {grammar.TCPPsh, "psh"}, {grammar.TCPAck, "ack"}, {grammar.TCPUrg, "urg"}, {grammar.TCPEce, "ecn"}, {grammar.TCPCwr, "cwr"}}

func flagList(bits uint8) []string {
	out := []string{}
	for _, f := range flagOrder {
		if bits&f.bit != 0 {
			out = append(out, f.name)
		}
	}
	return out
}

func actionObject(a *grammar.Action) map[string]any {
	switch a.Kind {
	case grammar.ActAccept:
		return map[string]any{"accept": nil}
	case grammar.ActDrop:
		return map[string]any{"drop": nil}
	case grammar.ActUnfunnel:
		return map[string]any{"unfunnel": map[string]any{"protocol": a.Proto.String()}}
	case grammar.ActRewrite:
		return map[string]any{"rewrite": map[string]any{"protocol": a.Proto.String()}}
	case grammar.ActDNAT:
		o := map[string]any{"addr": a.DNATAddr.String()}
		if a.DNATPort != 0 {
			o["port"] = a.DNATPort
		}
		return map[string]any{"dnat": o}
	case grammar.ActFunnel:
		o := map[string]any{"protocol": a.Proto.String()}
		if h := a.Funnel; h != nil {
			if h.HasDport {
				o["dport"] = h.Dport
			}
			if h.HasSport {
				o["sport"] = h.Sport
			}
			if h.HasFlags {
				o["flags"] = flagList(h.Flags)
			}
			if h.HasSeq {
				o["seq"] = h.Seq
			}
			if h.HasAck {
				o["ack"] = h.Ack
			}
			if h.HasWindow {
				o["window"] = h.Window
			}
			if h.MSSOff {
				o["mss"] = "off"
			} else if h.HasMSS {
				o["mss"] = h.MSS
			}
		}
		return map[string]any{"funnel": o}
	}
	panic(fmt.Sprintf("nftjson: action kind %d", a.Kind))
}

// Marshal encodes d on one line, as nft -j prints (with & and < as
// themselves: "&" is an operator here, not HTML).
func Marshal(d *Document) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// FromCommands lists what a batch of set declarations and added rules
// holds, in their order: the document a listing of their result would be,
// without handles. Tests use it to read a listing back and compare.
func FromCommands(version string, cmds []*grammar.Command) *Document {
	l := &Listing{Version: version}
	at := map[string]int{}
	for _, c := range cmds {
		switch c.Kind {
		case grammar.CmdDefineSet:
			l.Sets = append(l.Sets, c.Set)
		case grammar.CmdAddRule:
			key := c.Interface + " " + c.Hook.String()
			i, ok := at[key]
			if !ok {
				i = len(l.Hooks)
				at[key] = i
				l.Hooks = append(l.Hooks, Hook{Interface: c.Interface, Hook: c.Hook})
			}
			l.Hooks[i].Rules = append(l.Hooks[i].Rules, c.Rule)
		}
	}
	return Encode(l)
}
