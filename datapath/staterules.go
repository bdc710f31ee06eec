package datapath

import (
	"encoding/json"
	"unicode/utf8"
)

// ruleRecords is a hook's rules in a version 2 state record, in that
// record's JSON form ([{"handle": H, "text": RULE, "counter_at": OFFSET},
// …]) with a reader of its own: encoding/json's reflection over ten
// thousand small objects was the largest part of a rule change on a large
// hook, and this reads them in half the time. What it does not expect
// (another key, a number in another form) goes to encoding/json, so what
// it reads is exactly the record's format. (Version 3, which sfunnel
// writes now, keeps rules out of JSON: staterecord.go.)
type ruleRecords []ruleRecord

func (rr *ruleRecords) UnmarshalJSON(data []byte) error {
	out, err := readOr(data, func() ([]ruleRecord, bool) { return readRuleRecords(data) })
	*rr = out
	return err
}

// readOr returns what fast reads of data, or when it declines what
// encoding/json reads.
func readOr[T any](data []byte, fast func() ([]T, bool)) ([]T, error) {
	if out, ok := fast(); ok {
		return out, nil
	}
	var plain []T
	err := json.Unmarshal(data, &plain)
	return plain, err
}

// readRuleRecords reads the array the way MarshalJSON writes it (any
// key order, white space, counter_at absent, any string); false for
// anything else.
func readRuleRecords(data []byte) ([]ruleRecord, bool) {
	p := jsonCursor{b: data}
	if !p.byte('[') {
		return nil, false
	}
	out := []ruleRecord{}
	if p.byte(']') {
		return out, p.end()
	}
	for {
		var r ruleRecord
		if !p.byte('{') {
			return nil, false
		}
		for first := true; !p.byte('}'); first = false {
			if !first && !p.byte(',') {
				return nil, false
			}
			key, ok := p.key()
			if !ok || !p.byte(':') {
				return nil, false
			}
			switch string(key) { // compared without a copy
			case "handle":
				if r.Handle, ok = p.uint(); !ok {
					return nil, false
				}
			case "counter_at":
				n, ok := p.uint()
				if !ok || n > 1<<31 {
					return nil, false
				}
				r.CounterAt = int(n)
			case "text":
				if r.Text, ok = p.string(); !ok {
					return nil, false
				}
			default:
				return nil, false
			}
		}
		out = append(out, r)
		if p.byte(']') {
			return out, p.end()
		}
		if !p.byte(',') {
			return nil, false
		}
	}
}

// jsonCursor reads the few JSON forms readRuleRecords accepts.
type jsonCursor struct {
	b []byte
	i int
}

func (p *jsonCursor) space() {
	for p.i < len(p.b) && (p.b[p.i] == ' ' || p.b[p.i] == '\t' || p.b[p.i] == '\n' || p.b[p.i] == '\r') {
		p.i++
	}
}

// byte consumes c (after white space) if it is next.
func (p *jsonCursor) byte(c byte) bool {
	p.space()
	if p.i < len(p.b) && p.b[p.i] == c {
		p.i++
		return true
	}
	return false
}

func (p *jsonCursor) end() bool {
	p.space()
	return p.i == len(p.b)
}

// key reads a string without escapes or bytes outside ASCII.
func (p *jsonCursor) key() ([]byte, bool) {
	if !p.byte('"') {
		return nil, false
	}
	start := p.i
	for ; p.i < len(p.b); p.i++ {
		switch c := p.b[p.i]; {
		case c == '"':
			p.i++
			return p.b[start : p.i-1], true
		case c < 0x20 || c == '\\' || c >= utf8.RuneSelf:
			return nil, false
		}
	}
	return nil, false
}

// string reads a string; one with escapes or other than ASCII is decoded
// by encoding/json.
func (p *jsonCursor) string() (string, bool) {
	s, plain, ok := p.stringToken()
	if !ok || plain {
		return s, ok
	}
	if err := json.Unmarshal([]byte(s), &s); err != nil {
		return "", false
	}
	return s, true
}

// stringToken reads a string: its contents when plain, else the token
// with its quotes.
func (p *jsonCursor) stringToken() (s string, plain, ok bool) {
	if !p.byte('"') {
		return "", false, false
	}
	start, plain := p.i, true
	for ; p.i < len(p.b); p.i++ {
		switch c := p.b[p.i]; {
		case c == '"':
			p.i++
			if plain {
				return string(p.b[start : p.i-1]), true, true
			}
			return string(p.b[start-1 : p.i]), false, true
		case c == '\\':
			plain = false
			p.i++ // the escaped byte
		case c < 0x20:
			return "", false, false
		case c >= utf8.RuneSelf:
			plain = false
		}
	}
	return "", false, false
}

// uint reads a non-negative integer without sign, fraction or exponent.
func (p *jsonCursor) uint() (uint64, bool) {
	p.space()
	start := p.i
	var n uint64
	for ; p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9'; p.i++ {
		if p.i-start >= 19 {
			return 0, false
		}
		n = n*10 + uint64(p.b[p.i]-'0')
	}
	if p.i == start || p.b[start] == '0' && p.i-start > 1 {
		return 0, false
	}
	if p.i < len(p.b) && (p.b[p.i] == '.' || p.b[p.i] == 'e' || p.b[p.i] == 'E') {
		return 0, false
	}
	return n, true
}

// numbers and flags are the record's arrays of numbers and booleans
// (placement, counter handles: five per rule), read without reflection
// like ruleRecords.
type numbers[T uint32 | uint64 | int] []T

func (n *numbers[T]) UnmarshalJSON(data []byte) error {
	out, err := readOr(data, func() ([]T, bool) {
		p := jsonCursor{b: data}
		return readArray(&p, func() (T, bool) {
			v, ok := p.uint()
			return T(v), ok && uint64(T(v)) == v && T(v) >= 0
		})
	})
	*n = out
	return err
}

type flags []bool

func (f *flags) UnmarshalJSON(data []byte) error {
	out, err := readOr(data, func() ([]bool, bool) {
		p := jsonCursor{b: data}
		return readArray(&p, func() (bool, bool) {
			switch {
			case p.word("true"):
				return true, true
			case p.word("false"):
				return false, true
			}
			return false, false
		})
	})
	*f = out
	return err
}

// readArray reads `[ elem, … ]` (null: nil) with elem; false for anything
// else.
func readArray[T any](p *jsonCursor, elem func() (T, bool)) ([]T, bool) {
	if p.word("null") {
		return nil, p.end()
	}
	if !p.byte('[') {
		return nil, false
	}
	out := []T{}
	if p.byte(']') {
		return out, p.end()
	}
	for {
		v, ok := elem()
		if !ok {
			return nil, false
		}
		out = append(out, v)
		if p.byte(']') {
			return out, p.end()
		}
		if !p.byte(',') {
			return nil, false
		}
	}
}

// word consumes w (after white space) if it is next.
func (p *jsonCursor) word(w string) bool {
	p.space()
	if len(p.b)-p.i >= len(w) && string(p.b[p.i:p.i+len(w)]) == w {
		p.i += len(w)
		return true
	}
	return false
}
