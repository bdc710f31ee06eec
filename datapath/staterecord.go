package datapath

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"strconv"

	"github.com/sfunnel/sfunnel/compiler"
)

// The state record, version 3: the rules as text, and a fixed-width index
// into it, so that reading and writing a record of ten thousand rules is
// copying, not parsing (version 2 was one JSON document holding every
// rule's text, and decoding it was a third of `delete rule`).
//
//	sfunnel-state 3 H T X C\n  the first line: format, version, the byte
//	                           lengths of the three parts that follow, and
//	                           their CRC-32C (hexadecimal)
//	header (H bytes)           JSON, ends with "\n": everything but the
//	                           rules (headerV3)
//	text (T bytes)             the ruleset as a ruleset file: every set's
//	                           canonical text, then per interface and hook
//	                           "\t\tRULE # handle H\n"
//	index (X bytes)            little-endian, per hook in header order:
//	                           its rules (ruleEntrySize bytes each), its
//	                           counter slots (8: the handle counting in
//	                           that slot, 0 free), its counter bases (24:
//	                           handle, packets, bytes)
//
// A rule's index entry holds its handle, where its text is (offset and
// length in the text part), counter_at, priority, counter slot, and
// segment (1 + its table segment, 0: tested by code of its own) with bit
// 31 set when its matching is all table entries. The text part is for
// people reading the record and for `list`, which prints it without
// parsing; the reader checks that every entry's text is followed by its
// " # handle H", and the checksum.
//
// The header's JSON is explicit schema types (headerV3), not the Go types
// the commit works with, so changing those does not change the format.
// Any change of the bytes this writes needs a new version number and a
// reader for the old one (TestStoredStateV3 fails otherwise).
const (
	stateVersion  = 3
	ruleEntrySize = 32
	baseEntrySize = 24
	tableBit      = 1 << 31
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

type headerV3 struct {
	Generation uint64      `json:"generation"`
	CtMarkMask uint32      `json:"ct_mark_mask"`
	NextHandle uint64      `json:"next_handle"`
	CtMarkUsed bool        `json:"ct_mark_used,omitempty"`
	Sets       []setV3     `json:"sets"`
	Interfaces []ifaceV3   `json:"interfaces"`
	Aux        []auxRecord `json:"aux_hooks,omitempty"`
}

// setV3 is a set's text in the text part.
type setV3 struct {
	Name string `json:"name"`
	At   int    `json:"at"`
	Len  int    `json:"len"`
}

type ifaceV3 struct {
	Name  string   `json:"name"`
	Hooks []hookV3 `json:"hooks"`
}

// hookV3 is a hook's header: what hookState holds besides its rules,
// counter handles and bases, and how many of those the index has.
type hookV3 struct {
	Hook       string           `json:"hook"`
	Digest     string           `json:"digest"`
	ProgDigest string           `json:"program_digest,omitempty"`
	TableGen   uint32           `json:"table_generation,omitempty"`
	Sets       []string         `json:"sets,omitempty"`
	Layout     *compiler.Layout `json:"layout,omitempty"`
	Spare      *spareRecord     `json:"spare,omitempty"`
	Contested  []string         `json:"contested,omitempty"`
	Rules      int              `json:"rules"`
	Slots      int              `json:"counter_slots,omitempty"`
	Bases      int              `json:"bases,omitempty"`
}

// encodeV3 writes st as a version 3 record.
func encodeV3(st *liveState) ([]byte, error) {
	hd := headerV3{Generation: st.Generation, CtMarkMask: st.CtMarkMask, NextHandle: st.NextHandle,
		CtMarkUsed: st.CtMarkUsed, Sets: []setV3{}, Interfaces: []ifaceV3{}, Aux: st.Aux}
	textLen, indexLen := 0, 0
	for _, s := range st.Sets {
		textLen += len(s.Text)
	}
	for _, h := range st.hooks() {
		for _, r := range h.Rules {
			textLen += len(r.Text) + 32
		}
		indexLen += len(h.Rules)*ruleEntrySize + len(h.CounterHandles)*8 + len(h.Base)*baseEntrySize
	}
	text := make([]byte, 0, textLen+64*len(st.Interfaces))
	index := make([]byte, 0, indexLen)
	le := binary.LittleEndian
	for _, s := range st.Sets {
		hd.Sets = append(hd.Sets, setV3{Name: s.Name, At: len(text), Len: len(s.Text)})
		text = append(text, s.Text...)
	}
	for _, ifc := range st.Interfaces {
		iv := ifaceV3{Name: ifc.Name, Hooks: []hookV3{}}
		text = append(text, "interface "...)
		text = append(text, ifc.Name...)
		text = append(text, " {\n"...)
		for i := range ifc.Hooks {
			h := &ifc.Hooks[i]
			iv.Hooks = append(iv.Hooks, hookV3{Hook: h.Hook, Digest: h.Digest, ProgDigest: h.ProgDigest,
				TableGen: h.TableGen, Sets: h.Sets, Layout: h.Layout, Spare: h.Spare, Contested: h.Contested,
				Rules: len(h.Rules), Slots: len(h.CounterHandles), Bases: len(h.Base)})
			text = append(text, '\t')
			text = append(text, h.Hook...)
			text = append(text, " {\n"...)
			for _, r := range h.Rules {
				text = append(text, "\t\t"...)
				at := len(text)
				text = append(text, r.Text...)
				text = appendHandle(text, r.Handle)
				seg := uint32(r.Segment)
				if r.Table {
					seg |= tableBit
				}
				if r.Segment < 0 || r.Segment >= tableBit || r.CounterAt < 0 || r.CounterAt > len(r.Text) {
					return nil, fmt.Errorf("encode ruleset: rule %d has segment %d, counter at %d", r.Handle, r.Segment, r.CounterAt)
				}
				index = le.AppendUint64(index, r.Handle)
				index = le.AppendUint32(index, uint32(at))
				index = le.AppendUint32(index, uint32(len(r.Text)))
				index = le.AppendUint32(index, uint32(r.CounterAt))
				index = le.AppendUint32(index, r.Prio)
				index = le.AppendUint32(index, r.Slot)
				index = le.AppendUint32(index, seg)
			}
			text = append(text, "\t}\n"...)
			for _, handle := range h.CounterHandles {
				index = le.AppendUint64(index, handle)
			}
			for _, b := range h.Base {
				index = le.AppendUint64(index, b.Handle)
				index = le.AppendUint64(index, b.Packets)
				index = le.AppendUint64(index, b.Bytes)
			}
		}
		text = append(text, "}\n"...)
		hd.Interfaces = append(hd.Interfaces, iv)
	}
	if len(text) >= 1<<32 {
		return nil, fmt.Errorf("encode ruleset: %d bytes of rule text", len(text))
	}
	header, err := json.Marshal(&hd)
	if err != nil {
		return nil, fmt.Errorf("encode ruleset: %w", err)
	}
	header = append(header, '\n')
	sum := crc32.Update(crc32.Update(crc32.Checksum(header, castagnoli), castagnoli, text), castagnoli, index)
	out := fmt.Appendf(make([]byte, 0, 80+len(header)+len(text)+len(index)),
		"%s %d %d %d %d %08x\n", stateFormat, stateVersion, len(header), len(text), len(index), sum)
	out = append(out, header...)
	out = append(out, text...)
	return append(out, index...), nil
}

// appendHandle appends " # handle H\n".
func appendHandle(b []byte, handle uint64) []byte {
	b = append(b, " # handle "...)
	b = strconv.AppendUint(b, handle, 10)
	return append(b, '\n')
}

// isV3 reports whether data starts like a record of version 3 or later
// (version 2 and older are JSON).
func isV3(data []byte) bool { return bytes.HasPrefix(data, []byte(stateFormat+" ")) }

// decodeV3 reads a version 3 record. The rules' texts are substrings of
// the record's text part (one copy for all of them); nothing is parsed
// but the header.
func decodeV3(data []byte) (*liveState, error) {
	corrupt := func(what string, args ...any) error {
		return fmt.Errorf("stored ruleset is corrupt: "+what, args...)
	}
	nl := bytes.IndexByte(data, '\n')
	if nl < 0 {
		return nil, corrupt("no first line")
	}
	var version, hlen, tlen, xlen int
	var sum uint32
	if _, err := fmt.Sscanf(string(data[:nl]), stateFormat+" %d %d %d %d %x", &version, &hlen, &tlen, &xlen, &sum); err != nil {
		var v int
		if _, verr := fmt.Sscanf(string(data[:nl]), stateFormat+" %d", &v); verr == nil && v != stateVersion {
			return nil, versionError(stateFormat, v)
		}
		return nil, corrupt("first line %q", data[:nl])
	}
	if version != stateVersion {
		return nil, versionError(stateFormat, version)
	}
	rest := data[nl+1:]
	// (Each part within the record first: their sum could wrap around.)
	if hlen < 0 || tlen < 0 || xlen < 0 || hlen > len(rest) || tlen > len(rest) || xlen > len(rest) || hlen+tlen+xlen != len(rest) {
		return nil, corrupt("parts of %d, %d and %d bytes in %d", hlen, tlen, xlen, len(rest))
	}
	if crc32.Checksum(rest, castagnoli) != sum {
		return nil, corrupt("checksum")
	}
	var hd headerV3
	if err := json.Unmarshal(rest[:hlen], &hd); err != nil {
		return nil, corrupt("%v", err)
	}
	text := string(rest[hlen : hlen+tlen])
	index := rest[hlen+tlen:]
	st := &liveState{Format: stateFormat, Version: stateVersion, Generation: hd.Generation, CtMarkMask: hd.CtMarkMask,
		NextHandle: hd.NextHandle, CtMarkUsed: hd.CtMarkUsed, Aux: hd.Aux,
		Sets: make([]setRecord, len(hd.Sets)), Interfaces: make([]ifaceRecord, len(hd.Interfaces))}
	for i, s := range hd.Sets {
		if s.At < 0 || s.Len < 0 || s.At > len(text)-s.Len {
			return nil, corrupt("set %s", s.Name)
		}
		st.Sets[i] = setRecord{Name: s.Name, Text: text[s.At : s.At+s.Len]}
	}
	le := binary.LittleEndian
	var tail []byte // " # handle H\n" of each rule
	for i, iv := range hd.Interfaces {
		ifc := &st.Interfaces[i]
		ifc.Name, ifc.Hooks = iv.Name, make([]hookState, len(iv.Hooks))
		for j, hv := range iv.Hooks {
			h := &ifc.Hooks[j]
			*h = hookState{Hook: hv.Hook, Digest: hv.Digest, ProgDigest: hv.ProgDigest, TableGen: hv.TableGen,
				Sets: hv.Sets, Layout: hv.Layout, Spare: hv.Spare, Contested: hv.Contested}
			if err := h.identify(iv.Name); err != nil {
				return nil, err
			}
			if hv.Rules < 0 || hv.Slots < 0 || hv.Bases < 0 ||
				len(index)/ruleEntrySize < hv.Rules || (len(index)-hv.Rules*ruleEntrySize)/8 < hv.Slots ||
				(len(index)-hv.Rules*ruleEntrySize-hv.Slots*8)/baseEntrySize < hv.Bases {
				return nil, corrupt("index of %s %s is short", iv.Name, hv.Hook)
			}
			h.Rules = make([]ruleRecord, hv.Rules)
			for k := range h.Rules {
				e := index[k*ruleEntrySize:]
				handle, at, n := le.Uint64(e), int(le.Uint32(e[8:])), int(le.Uint32(e[12:]))
				counterAt, seg := int(le.Uint32(e[16:])), le.Uint32(e[28:])
				tail = appendHandle(tail[:0], handle)
				if at > len(text)-n || counterAt > n || text[at+n:min(len(text), at+n+len(tail))] != string(tail) {
					return nil, corrupt("rule %d of %s %s", handle, iv.Name, hv.Hook)
				}
				h.Rules[k] = ruleRecord{Handle: handle, Text: text[at : at+n], CounterAt: counterAt,
					Prio: le.Uint32(e[20:]), Slot: le.Uint32(e[24:]), Segment: int(seg &^ tableBit), Table: seg&tableBit != 0}
			}
			index = index[hv.Rules*ruleEntrySize:]
			if hv.Slots > 0 {
				h.CounterHandles = make(numbers[uint64], hv.Slots)
				for k := range h.CounterHandles {
					h.CounterHandles[k] = le.Uint64(index[k*8:])
				}
			}
			index = index[hv.Slots*8:]
			if hv.Bases > 0 {
				h.Base = make([]baseRecord, hv.Bases)
				for k := range h.Base {
					e := index[k*baseEntrySize:]
					h.Base[k] = baseRecord{Handle: le.Uint64(e), Packets: le.Uint64(e[8:]), Bytes: le.Uint64(e[16:])}
				}
			}
			index = index[hv.Bases*baseEntrySize:]
		}
	}
	if len(index) != 0 {
		return nil, corrupt("%d bytes left in the index", len(index))
	}
	return st, nil
}
