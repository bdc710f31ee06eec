package nftjson

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/sfunnel/sfunnel/grammar"
)

// IsJSON reports whether src is a JSON document rather than rule text: no
// statement of the rule language starts with '{'.
func IsJSON(src []byte) bool {
	s := bytes.TrimLeft(bytes.TrimPrefix(src, []byte("\uFEFF")), " \t\r\n")
	return len(s) > 0 && s[0] == '{'
}

// Parse reads a document in the shape Encode writes (and nft's command
// wrappers {"add": {…}}, {"flush": {"ruleset": null}}) into commands.
// Each object is turned into the rule language and parsed by the grammar,
// so JSON input is checked exactly as text is; an error in an object is
// shown on that object's text, named FILE[INDEX]. Structural mistakes are
// located in the JSON itself.
func Parse(filename string, src []byte, opts *grammar.Options) ([]*grammar.Command, grammar.Sources, error) {
	if opts == nil {
		opts = &grammar.Options{}
	}
	srcs := grammar.Sources{filename: string(src)}
	elems, err := splitDocument(filename, src)
	if err != nil {
		return nil, srcs, err
	}
	declared := map[string]grammar.SetType{}
	popts := *opts
	popts.LookupSet = func(name string) (grammar.SetType, bool) {
		if t, ok := declared[name]; ok {
			return t, true
		}
		if opts.LookupSet != nil {
			return opts.LookupSet(name)
		}
		return 0, false
	}
	var cmds []*grammar.Command
	var errs grammar.ErrorList
	for i, el := range elems {
		text, err := objectText(el.raw)
		if err != nil {
			errs = append(errs, &grammar.Error{Span: el.span(src, filename), Msg: err.Error()})
			continue
		}
		if text == "" {
			continue
		}
		name := fmt.Sprintf("%s[%d]", filename, i)
		got, s, err := grammar.Parse(name, text, &popts)
		for k, v := range s {
			srcs[k] = v
		}
		if err != nil {
			if list, ok := err.(grammar.ErrorList); ok {
				errs = append(errs, list...)
			} else if e, ok := err.(*grammar.Error); ok {
				errs = append(errs, e)
			} else {
				errs = append(errs, &grammar.Error{Span: el.span(src, filename), Msg: err.Error()})
			}
			continue
		}
		for _, c := range got {
			if c.Kind == grammar.CmdDefineSet {
				declared[c.Set.Name] = c.Set.Type
			}
		}
		cmds = append(cmds, got...)
	}
	if len(errs) > 0 {
		return nil, srcs, errs
	}
	return cmds, srcs, nil
}

type element struct {
	raw    json.RawMessage
	offset int
}

// span locates an element's first byte in the JSON text.
func (e element) span(src []byte, filename string) grammar.Span {
	return spanAt(src, filename, e.offset)
}

func spanAt(src []byte, filename string, off int) grammar.Span {
	if off > len(src) {
		off = len(src)
	}
	line := 1 + bytes.Count(src[:off], []byte("\n"))
	col := off - bytes.LastIndexByte(src[:off], '\n')
	p := grammar.Pos{Filename: filename, Offset: off, Line: line, Column: col}
	end := p
	end.Offset++
	end.Column++
	return grammar.Span{Pos: p, End: end}
}

// splitDocument checks the top level {"nftables": [ … ]} and returns its
// elements with their offsets.
func splitDocument(filename string, src []byte) ([]element, error) {
	src = bytes.TrimPrefix(src, []byte("\uFEFF"))
	fail := func(off int, format string, args ...any) error {
		return &grammar.Error{Span: spanAt(src, filename, off), Msg: fmt.Sprintf(format, args...)}
	}
	jsonErr := func(err error, dec *json.Decoder) error {
		off := int(dec.InputOffset())
		if se, ok := err.(*json.SyntaxError); ok {
			off = int(se.Offset) - 1
		}
		if off < 0 {
			off = 0
		}
		return fail(off, "JSON: %v", err)
	}
	dec := json.NewDecoder(bytes.NewReader(src))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, jsonErr(err, dec)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, fail(0, `JSON input must be an object {"nftables": [ … ]}`)
	}
	var out []element
	seen := false
	for dec.More() {
		keyOff := int(dec.InputOffset())
		tok, err := dec.Token()
		if err != nil {
			return nil, jsonErr(err, dec)
		}
		if tok != "nftables" {
			return nil, fail(skipSpace(src, keyOff), `unknown key %q at the top level (want "nftables")`, tok)
		}
		seen = true
		tok, err = dec.Token()
		if err != nil {
			return nil, jsonErr(err, dec)
		}
		if d, ok := tok.(json.Delim); !ok || d != '[' {
			return nil, fail(int(dec.InputOffset())-1, `"nftables" must be an array of objects`)
		}
		for dec.More() {
			off := skipSpace(src, int(dec.InputOffset()))
			var raw json.RawMessage
			if err := dec.Decode(&raw); err != nil {
				return nil, jsonErr(err, dec)
			}
			out = append(out, element{raw: raw, offset: off})
		}
		if _, err := dec.Token(); err != nil { // ]
			return nil, jsonErr(err, dec)
		}
	}
	if _, err := dec.Token(); err != nil { // }
		return nil, jsonErr(err, dec)
	}
	if !seen {
		return nil, fail(0, `JSON input has no "nftables" array`)
	}
	if _, err := dec.Token(); err == nil {
		return nil, fail(int(dec.InputOffset())-1, "JSON input has more after the document")
	}
	return out, nil
}

// skipSpace moves past whitespace and the comma between elements.
func skipSpace(src []byte, off int) int {
	for off < len(src) && strings.IndexByte(" \t\r\n,:", src[off]) >= 0 {
		off++
	}
	return off
}

// objectText turns one array element into rule-language text ("" for
// objects that carry nothing to apply: metainfo, chain).
func objectText(raw json.RawMessage) (string, error) {
	var obj map[string]json.RawMessage
	if err := unmarshal(raw, &obj); err != nil {
		return "", fmt.Errorf("an element of \"nftables\" must be an object: %v", err)
	}
	if len(obj) != 1 {
		return "", fmt.Errorf("an element of \"nftables\" must have exactly one key (metainfo, set, chain, rule, add, flush), has %d", len(obj))
	}
	for k, v := range obj {
		switch k {
		case "metainfo", "chain":
			return "", nil
		case "set":
			return setText(v, "")
		case "rule":
			return ruleText(v, "add")
		case "add", "insert", "replace", "delete", "flush":
			return commandText(k, v)
		}
		return "", fmt.Errorf("unknown object %q (want metainfo, set, chain, rule, add, insert, replace, delete or flush)", k)
	}
	return "", nil
}

func unmarshal(raw json.RawMessage, v any) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	return dec.Decode(v)
}

// fields decodes an object and reports keys not in allowed.
func fields(what string, raw json.RawMessage, allowed ...string) (map[string]json.RawMessage, error) {
	var m map[string]json.RawMessage
	if err := unmarshal(raw, &m); err != nil {
		return nil, fmt.Errorf("%s must be an object: %v", what, err)
	}
	var unknown []string
	for k := range m {
		if !contains(allowed, k) {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return nil, fmt.Errorf("%s has unknown key %q (known: %s)", what, unknown[0], strings.Join(allowed, ", "))
	}
	return m, nil
}

func contains(list []string, s string) bool {
	for _, l := range list {
		if l == s {
			return true
		}
	}
	return false
}

func str(what string, raw json.RawMessage) (string, error) {
	var s string
	if err := unmarshal(raw, &s); err != nil {
		return "", fmt.Errorf("%s must be a string", what)
	}
	return s, nil
}

func num(what string, raw json.RawMessage, max uint64) (uint64, error) {
	var n json.Number
	if err := unmarshal(raw, &n); err != nil {
		return 0, fmt.Errorf("%s must be a number", what)
	}
	v, err := strconv.ParseUint(n.String(), 10, 64)
	if err != nil || v > max {
		return 0, fmt.Errorf("%s: %s is not a whole number in 0-%d", what, n, max)
	}
	return v, nil
}

// word checks that a string is a single word, so JSON cannot smuggle
// other rule text into the generated line.
// wordField reads a JSON string that must be a single word of rule text.
func wordField(what string, raw json.RawMessage) (string, error) {
	s, err := str(what, raw)
	if err != nil {
		return "", err
	}
	return word(what, s)
}

func word(what, s string) (string, error) {
	if s == "" || strings.ContainsAny(s, " \t\r\n;#{}\"\\,") {
		return "", fmt.Errorf("%s %q is not a single word", what, s)
	}
	return s, nil
}

func setText(raw json.RawMessage, verb string) (string, error) {
	m, err := fields("set", raw, "name", "type", "size", "flags", "elem", "family", "table", "handle")
	if err != nil {
		return "", err
	}
	name, err := wordField("set name", m["name"])
	if err != nil {
		return "", err
	}
	typ, err := wordField("set type", m["type"])
	if err != nil {
		return "", err
	}
	parts := []string{"type " + typ}
	if v, ok := m["size"]; ok {
		n, err := num("set size", v, math.MaxUint32)
		if err != nil {
			return "", err
		}
		parts = append(parts, "size "+strconv.FormatUint(n, 10))
	}
	if v, ok := m["elem"]; ok {
		var elems []json.RawMessage
		if err := unmarshal(v, &elems); err != nil {
			return "", fmt.Errorf(`set "elem" must be an array`)
		}
		var vals []string
		for _, e := range elems {
			t, err := valueText(e)
			if err != nil {
				return "", err
			}
			vals = append(vals, t)
		}
		if len(vals) > 0 {
			parts = append(parts, "elements = { "+strings.Join(vals, ", ")+" }")
		}
	}
	s := "set " + name + " { " + strings.Join(parts, "; ") + " }"
	if verb != "" {
		s = verb + " " + s
	}
	return s, nil
}

func commandText(verb string, raw json.RawMessage) (string, error) {
	var obj map[string]json.RawMessage
	if err := unmarshal(raw, &obj); err != nil || len(obj) != 1 {
		return "", fmt.Errorf("%q must hold one object (rule, set, element or ruleset)", verb)
	}
	for k, v := range obj {
		switch {
		case verb == "flush" && k == "ruleset":
			return "flush ruleset", nil
		case verb == "add" && k == "set":
			return setText(v, "add")
		case verb == "delete" && k == "set":
			m, err := fields("set", v, "name", "family", "table", "handle", "type")
			if err != nil {
				return "", err
			}
			name, err := wordField("set name", m["name"])
			return "delete set " + name, err
		case (verb == "add" || verb == "delete") && k == "element":
			m, err := fields("element", v, "name", "elem", "family", "table")
			if err != nil {
				return "", err
			}
			name, err := str("element name", m["name"])
			if err != nil {
				return "", err
			}
			if name, err = word("set name", name); err != nil {
				return "", err
			}
			var elems []json.RawMessage
			if err := unmarshal(m["elem"], &elems); err != nil {
				return "", fmt.Errorf(`element "elem" must be an array`)
			}
			var vals []string
			for _, e := range elems {
				t, err := valueText(e)
				if err != nil {
					return "", err
				}
				vals = append(vals, t)
			}
			return verb + " element " + name + " { " + strings.Join(vals, ", ") + " }", nil
		case k == "rule":
			return ruleText(v, verb)
		}
		return "", fmt.Errorf("%q of %q is not supported", verb, k)
	}
	return "", nil
}

// ruleText turns a rule object into `VERB rule IF HOOK [handle H] RULE`.
func ruleText(raw json.RawMessage, verb string) (string, error) {
	m, err := fields("rule", raw, "interface", "hook", "handle", "position", "expr", "comment", "left_alone", "family", "table", "chain")
	if err != nil {
		return "", err
	}
	ifname, err := str("rule interface", m["interface"])
	if err != nil {
		return "", err
	}
	if ifname, err = word("interface", ifname); err != nil {
		return "", err
	}
	hook, err := str("rule hook", m["hook"])
	if err != nil {
		return "", err
	}
	if hook, err = word("hook", hook); err != nil {
		return "", err
	}
	w := []string{verb, "rule", ifname, hook}
	switch verb {
	case "replace", "delete":
		h, err := num("rule handle", m["handle"], 1<<53)
		if err != nil {
			return "", err
		}
		w = append(w, "handle", strconv.FormatUint(h, 10))
	case "insert", "add":
		if v, ok := m["position"]; ok {
			h, err := num("rule position", v, 1<<53)
			if err != nil {
				return "", err
			}
			w = append(w, "position", strconv.FormatUint(h, 10))
		}
	}
	if verb == "delete" {
		return strings.Join(w, " "), nil
	}
	var exprs []json.RawMessage
	if err := unmarshal(m["expr"], &exprs); err != nil {
		return "", fmt.Errorf(`rule "expr" must be an array`)
	}
	actions := false
	for _, e := range exprs {
		t, isAction, err := exprText(e)
		if err != nil {
			return "", err
		}
		if isAction && !actions {
			w = append(w, "actions")
			actions = true
		} else if isAction {
			w[len(w)-1] += ","
		}
		w = append(w, t)
	}
	if v, ok := m["comment"]; ok {
		c, err := str("rule comment", v)
		if err != nil {
			return "", err
		}
		w = append(w, "comment", strconv.Quote(c))
	}
	return strings.Join(w, " "), nil
}

// one decodes an object with exactly one key.
func one(what string, raw json.RawMessage) (string, json.RawMessage, error) {
	var m map[string]json.RawMessage
	if err := unmarshal(raw, &m); err != nil || len(m) != 1 {
		return "", nil, fmt.Errorf("%s must be an object with one key", what)
	}
	for k, v := range m {
		return k, v, nil
	}
	return "", nil, nil
}

// exprText turns one expression into rule text; isAction for the actions.
func exprText(raw json.RawMessage) (string, bool, error) {
	k, v, err := one("an expression", raw)
	if err != nil {
		return "", false, err
	}
	switch k {
	case "match":
		t, err := matchText(v)
		return t, false, err
	case "counter":
		return "counter", false, nil
	case "mangle":
		t, err := mangleText(v)
		return t, false, err
	case "accept", "drop":
		return k, true, nil
	case "funnel":
		m, err := fields("funnel", v, "protocol", "dport", "sport", "flags", "seq", "ack", "window", "mss")
		if err != nil {
			return "", true, err
		}
		p, err := wordField("funnel protocol", m["protocol"])
		if err != nil {
			return "", true, err
		}
		w := []string{"funnel", p}
		for _, f := range []struct {
			name string
			max  uint64
			hex  bool
		}{{"dport", 65535, false}, {"sport", 65535, false}, {"flags", 0, false}, {"seq", math.MaxUint32, true}, {"ack", math.MaxUint32, true}, {"window", 65535, false}} {
			fv, ok := m[f.name]
			if !ok {
				continue
			}
			if f.name == "flags" {
				fl, err := flagsText(fv, "|")
				if err != nil {
					return "", true, err
				}
				w = append(w, "flags", fl)
				continue
			}
			n, err := num("funnel "+f.name, fv, f.max)
			if err != nil {
				return "", true, err
			}
			w = append(w, f.name, strconv.FormatUint(n, 10))
		}
		if mv, ok := m["mss"]; ok {
			var off string
			if unmarshal(mv, &off) == nil {
				if off != "off" {
					return "", true, fmt.Errorf(`funnel mss is a number or "off"`)
				}
				w = append(w, "mss", "off")
			} else {
				n, err := num("funnel mss", mv, 65535)
				if err != nil {
					return "", true, err
				}
				w = append(w, "mss", strconv.FormatUint(n, 10))
			}
		}
		return strings.Join(w, " "), true, nil
	case "unfunnel", "rewrite":
		m, err := fields(k, v, "protocol")
		if err != nil {
			return "", true, err
		}
		p, err := str(k+" protocol", m["protocol"])
		if err != nil {
			return "", true, err
		}
		p, err = word(k+" protocol", p)
		return k + " " + p, true, err
	case "dnat":
		m, err := fields("dnat", v, "addr", "port", "family")
		if err != nil {
			return "", true, err
		}
		a, err := str("dnat addr", m["addr"])
		if err != nil {
			return "", true, err
		}
		addr, err := netip.ParseAddr(a)
		if err != nil {
			return "", true, fmt.Errorf("dnat addr %q is not an address", a)
		}
		t := addr.String()
		if pv, ok := m["port"]; ok {
			p, err := num("dnat port", pv, 65535)
			if err != nil {
				return "", true, err
			}
			if addr.Is6() {
				t = "[" + t + "]"
			}
			t += ":" + strconv.FormatUint(p, 10)
		}
		return "dnat to " + t, true, nil
	}
	return "", false, fmt.Errorf("unknown expression %q (sfunnel reads match, counter, mangle, accept, drop, funnel, unfunnel, rewrite, dnat)", k)
}

// keyText reads a meta/ct/payload left-hand side.
func keyText(raw json.RawMessage) (kind, text string, err error) {
	k, v, err := one("a match's left side", raw)
	if err != nil {
		return "", "", err
	}
	switch k {
	case "meta", "ct":
		m, err := fields(k, v, "key")
		if err != nil {
			return "", "", err
		}
		key, err := str(k+" key", m["key"])
		if err != nil {
			return "", "", err
		}
		if key, err = word(k+" key", key); err != nil {
			return "", "", err
		}
		return k, k + " " + key, nil
	case "payload":
		m, err := fields("payload", v, "protocol", "field")
		if err != nil {
			return "", "", err
		}
		p, err := str("payload protocol", m["protocol"])
		if err != nil {
			return "", "", err
		}
		f, err := str("payload field", m["field"])
		if err != nil {
			return "", "", err
		}
		if p, err = word("payload protocol", p); err != nil {
			return "", "", err
		}
		if f, err = word("payload field", f); err != nil {
			return "", "", err
		}
		return "payload", p + " " + f, nil
	}
	return "", "", fmt.Errorf("unknown left side %q (want meta, ct or payload)", k)
}

func matchText(raw json.RawMessage) (string, error) {
	m, err := fields("match", raw, "op", "left", "right")
	if err != nil {
		return "", err
	}
	o, err := str("match op", m["op"])
	if err != nil {
		return "", err
	}
	left := m["left"]
	var mask json.RawMessage
	if k, v, err := one("left", left); err == nil && k == "&" {
		var pair []json.RawMessage
		if err := unmarshal(v, &pair); err != nil || len(pair) != 2 {
			return "", fmt.Errorf(`"&" takes [KEY, MASK]`)
		}
		left, mask = pair[0], pair[1]
	}
	_, key, err := keyText(left)
	if err != nil {
		return "", err
	}
	if key == "tcp flags" {
		fl, err := flagsText(m["right"], "|")
		if err != nil {
			return "", err
		}
		switch {
		case mask != nil && o == "==":
			ml, err := flagsText(mask, ",")
			return "tcp flags " + fl + " / " + ml, err
		case mask == nil && o == "in":
			return "tcp flags " + fl, nil
		case mask == nil && (o == "==" || o == "!="):
			return "tcp flags " + o + " " + fl, nil
		}
		return "", fmt.Errorf("tcp flags take op in, == or != (== with a mask)")
	}
	neg := ""
	switch o {
	case "==":
	case "!=":
		neg = "!= "
	default:
		return "", fmt.Errorf("match op %q: sfunnel reads == and != (in for tcp flags)", o)
	}
	if strings.HasSuffix(key, " mark") {
		v, err := num(key+" value", m["right"], math.MaxUint32)
		if err != nil {
			return "", err
		}
		t := key + " " + neg + fmt.Sprintf("0x%x", v)
		if mask != nil {
			mv, err := num(key+" mask", mask, math.MaxUint32)
			if err != nil {
				return "", err
			}
			t += fmt.Sprintf("/0x%x", mv)
		}
		return t, nil
	}
	if mask != nil {
		return "", fmt.Errorf("a mask (&) applies to marks and tcp flags only")
	}
	switch key {
	case "meta nfproto", "meta l4proto":
		if neg != "" {
			return "", fmt.Errorf("%s != is not supported", key)
		}
		v, err := str(key+" value", m["right"])
		if err != nil {
			return "", err
		}
		v, err = word(key, v)
		return key + " " + v, err
	}
	v, err := valueText(m["right"])
	if err != nil {
		return "", err
	}
	return key + " " + neg + v, nil
}

func mangleText(raw json.RawMessage) (string, error) {
	m, err := fields("mangle", raw, "key", "value")
	if err != nil {
		return "", err
	}
	_, key, err := keyText(m["key"])
	if err != nil {
		return "", err
	}
	if key == "meta nftrace" {
		v, err := num("meta nftrace value", m["value"], math.MaxUint32)
		return "meta nftrace set " + strconv.FormatUint(v, 10), err
	}
	if k, v, err := one("mangle value", m["value"]); err == nil && k == "|" {
		// (KEY & ~MASK) | VALUE
		var pair []json.RawMessage
		if err := unmarshal(v, &pair); err != nil || len(pair) != 2 {
			return "", fmt.Errorf(`"|" takes [{"&": [KEY, ~MASK]}, VALUE]`)
		}
		k2, v2, err := one(`"|" operand`, pair[0])
		var inner []json.RawMessage
		if err != nil || k2 != "&" || unmarshal(v2, &inner) != nil || len(inner) != 2 {
			return "", fmt.Errorf(`"|" takes [{"&": [KEY, ~MASK]}, VALUE]`)
		}
		notMask, err := num(key+" mask", inner[1], math.MaxUint32)
		if err != nil {
			return "", err
		}
		val, err := num(key+" value", pair[1], math.MaxUint32)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%s set 0x%x/0x%x", key, val, ^uint32(notMask)), nil
	}
	v, err := num(key+" value", m["value"], math.MaxUint32)
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("%s set 0x%x", key, v), nil
}

func flagsText(raw json.RawMessage, sep string) (string, error) {
	var list []string
	if err := unmarshal(raw, &list); err != nil {
		var one string
		if err := unmarshal(raw, &one); err != nil {
			return "", fmt.Errorf("tcp flags must be a name or a list of names")
		}
		list = []string{one}
	}
	if len(list) == 0 {
		return "", fmt.Errorf("an empty list of tcp flags")
	}
	for _, f := range list {
		if _, err := word("tcp flag", f); err != nil {
			return "", err
		}
	}
	return strings.Join(list, sep), nil
}

// valueText reads a right-hand side: address, number, "@set",
// {"prefix"}, {"range"} or {"set": [ … ]}.
func valueText(raw json.RawMessage) (string, error) {
	var s string
	if unmarshal(raw, &s) == nil {
		if strings.HasPrefix(s, "@") {
			return word("set reference", s)
		}
		if _, err := netip.ParseAddr(s); err == nil {
			return s, nil
		}
		if _, err := netip.ParsePrefix(s); err == nil {
			return s, nil
		}
		if _, err := strconv.ParseUint(s, 10, 16); err == nil {
			return s, nil
		}
		return "", fmt.Errorf("value %q is not an address, prefix, port or @set", s)
	}
	var n json.Number
	if unmarshal(raw, &n) == nil {
		v, err := strconv.ParseUint(n.String(), 10, 64)
		if err != nil {
			return "", fmt.Errorf("value %s is not a whole number", n)
		}
		return strconv.FormatUint(v, 10), nil
	}
	k, v, err := one("a value", raw)
	if err != nil {
		return "", fmt.Errorf("a value must be a string, a number or an object (prefix, range, set)")
	}
	switch k {
	case "prefix":
		m, err := fields("prefix", v, "addr", "len")
		if err != nil {
			return "", err
		}
		a, err := str("prefix addr", m["addr"])
		if err != nil {
			return "", err
		}
		if _, err := netip.ParseAddr(a); err != nil {
			return "", fmt.Errorf("prefix addr %q is not an address", a)
		}
		l, err := num("prefix len", m["len"], 128)
		if err != nil {
			return "", err
		}
		return a + "/" + strconv.FormatUint(l, 10), nil
	case "range":
		var pair []json.RawMessage
		if err := unmarshal(v, &pair); err != nil || len(pair) != 2 {
			return "", fmt.Errorf(`"range" takes [LOW, HIGH]`)
		}
		lo, err := num("range low", pair[0], math.MaxUint32)
		if err != nil {
			return "", err
		}
		hi, err := num("range high", pair[1], math.MaxUint32)
		if err != nil {
			return "", err
		}
		return fmt.Sprintf("%d-%d", lo, hi), nil
	case "set":
		var elems []json.RawMessage
		if err := unmarshal(v, &elems); err != nil {
			return "", fmt.Errorf(`"set" takes an array`)
		}
		var out []string
		for _, e := range elems {
			t, err := valueText(e)
			if err != nil {
				return "", err
			}
			out = append(out, t)
		}
		return "{ " + strings.Join(out, ", ") + " }", nil
	}
	return "", fmt.Errorf("unknown value object %q (want prefix, range or set)", k)
}
