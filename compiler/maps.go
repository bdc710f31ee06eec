package compiler

import (
	"crypto/sha256"
	"fmt"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// SetOuter returns the map a program looks a named set up through (abi:
// an ARRAY_OF_MAPS of one entry, the elements map); Spec.Maps["set_"+name]
// of any program that references the set has its shape.
func SetOuter(s *grammar.Set) *ebpf.MapSpec {
	inner := SetMap(s)
	inner.Contents = nil
	return &ebpf.MapSpec{
		Name: objName(SetMapPrefix + s.Name), Type: ebpf.ArrayOfMaps, KeySize: 4, ValueSize: 4, MaxEntries: 1,
		InnerMap: inner,
		Contents: []ebpf.MapKV{{Key: uint32(0), Value: SetMapPrefix + s.Name + abi.SetElements}},
	}
}

// SetMap returns the elements map of a named set, with its elements as
// Contents, in the layout of package abi (Spec.Maps["set_"+name+
// abi.SetElements]).
func SetMap(s *grammar.Set) *ebpf.MapSpec {
	var m *ebpf.MapSpec
	switch s.Type {
	case grammar.SetInetService:
		m = portBitmap(s.Ports)
	case grammar.SetIPv4Addr:
		m = lpmMap(4, s.Prefixes)
	default:
		m = lpmMap(6, s.Prefixes)
	}
	if m.Type == ebpf.LPMTrie {
		m.MaxEntries = abi.NamedAddrSetCapacity
	}
	m.Name = objName(SetMapPrefix + s.Name)
	return m
}

// objName makes a kernel object name: at most 15 characters of
// [A-Za-z0-9_.] (the spec's map key keeps the full name).
func objName(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.') {
			b[i] = '_'
		}
	}
	if len(b) > 15 {
		b = b[:15]
	}
	return string(b)
}

// PortBitmap returns the bitmap value of a port set.
func PortBitmap(ranges []grammar.PortRange) []byte {
	b := make([]byte, abi.PortBitmapSize)
	for _, r := range ranges {
		for p := int(r.Lo); p <= int(r.Hi); p++ {
			b[p>>3] |= 1 << (p & 7)
		}
	}
	return b
}

func portBitmap(ranges []grammar.PortRange) *ebpf.MapSpec {
	return &ebpf.MapSpec{
		Type: ebpf.Array, KeySize: 4, ValueSize: abi.PortBitmapSize, MaxEntries: 1,
		Contents: []ebpf.MapKV{{Key: uint32(0), Value: PortBitmap(ranges)}},
	}
}

// LPMKey returns the LPM trie key of a prefix.
func LPMKey(p netip.Prefix) []byte {
	a := p.Addr().AsSlice()
	k := make([]byte, 4+len(a))
	k[0], k[1], k[2], k[3] = byte(p.Bits()), byte(p.Bits()>>8), 0, 0
	copy(k[4:], a)
	return k
}

func lpmMap(fam int, prefixes []netip.Prefix) *ebpf.MapSpec {
	size := uint32(4)
	if fam == 6 {
		size = 16
	}
	m := &ebpf.MapSpec{
		Type: ebpf.LPMTrie, KeySize: 4 + size, ValueSize: 1,
		MaxEntries: uint32(max(1, len(prefixes))), Flags: 1, // BPF_F_NO_PREALLOC
	}
	for _, p := range prefixes {
		m.Contents = append(m.Contents, ebpf.MapKV{Key: LPMKey(p.Masked()), Value: []byte{1}})
	}
	return m
}

// anonMap adds a map for a large anonymous set and returns its name; sets
// with the same elements share one map (a program may use at most 64).
func (c *compiler) anonMap(m *ebpf.MapSpec) string {
	h := sha256.New()
	fmt.Fprintf(h, "%v %d %d %d %d\n", m.Type, m.KeySize, m.ValueSize, m.MaxEntries, m.Flags)
	for _, kv := range m.Contents {
		fmt.Fprintf(h, "%v %v\n", kv.Key, kv.Value)
	}
	sum := string(h.Sum(nil))
	if name, ok := c.anonByContent[sum]; ok {
		return name
	}
	name := fmt.Sprintf("%s%d", anonPrefix, c.anon)
	c.anon++
	m.Name = name
	c.spec.Maps[name] = m
	if c.anonByContent == nil {
		c.anonByContent = map[string]string{}
	}
	c.anonByContent[sum] = name
	return name
}

// namedSet resolves a set reference and adds its map to the spec.
func (c *compiler) namedSet(name string, span grammar.Span, types ...grammar.SetType) (*grammar.Set, error) {
	s, ok := c.sets[name]
	if !ok || s == nil {
		return nil, errorf(span, "set @%s does not exist", name)
	}
	if !slices.Contains(types, s.Type) {
		return nil, errorf(span, "set @%s has type %s, which does not fit here", name, s.Type)
	}
	if !slices.Contains(c.named, name) {
		c.named = append(c.named, name)
		c.spec.Maps[SetMapPrefix+name] = SetOuter(s)
		c.spec.Maps[SetMapPrefix+name+abi.SetElements] = SetMap(s)
	}
	return s, nil
}

// check validates what the program generator relies on.
func (c *compiler) check(rules []*grammar.Rule) error {
	for _, r := range rules {
		if r == nil {
			return fmt.Errorf("compiler: nil rule")
		}
		for _, pm := range []*grammar.PortMatch{r.Sport, r.Dport} {
			if pm != nil && r.Proto == grammar.ProtoAny {
				return errorf(pm.Span, "port match without tcp or udp")
			}
			if pm != nil {
				for _, rg := range pm.Ranges {
					if rg.Lo > rg.Hi {
						return errorf(pm.Span, "port range %d-%d is empty", rg.Lo, rg.Hi)
					}
				}
			}
		}
		if r.TCPFlags != nil && r.Proto != grammar.ProtoTCP {
			return errorf(r.TCPFlags.Span, "tcp flags on a rule that does not match tcp")
		}
		for _, a := range r.Actions {
			switch a.Kind {
			case grammar.ActFunnel:
				if a.Proto != grammar.ProtoTCP && a.Proto != grammar.ProtoUDP {
					return errorf(a.Span, "funnel needs tcp or udp")
				}
				if a.Funnel == nil {
					return errorf(a.Span, "funnel without header fields")
				}
			case grammar.ActUnfunnel:
				if a.Proto != grammar.ProtoTCP && a.Proto != grammar.ProtoUDP {
					return errorf(a.Span, "unfunnel needs tcp or udp")
				}
			case grammar.ActRewrite:
				want := grammar.ProtoTCP // rewrite udp turns TCP into UDP
				if a.Proto == grammar.ProtoTCP {
					want = grammar.ProtoUDP
				} else if a.Proto != grammar.ProtoUDP {
					return errorf(a.Span, "rewrite needs udp or tcp")
				}
				if r.Proto != want {
					return errorf(a.Span, "rewrite %s on a rule that does not match %s", a.Proto, want)
				}
			case grammar.ActDNAT:
				if !a.DNATAddr.IsValid() {
					return errorf(a.Span, "dnat without address")
				}
				is4 := a.DNATAddr.Is4()
				if (r.Family == grammar.FamilyIPv4 && !is4) || (r.Family == grammar.FamilyIPv6 && is4) {
					return errorf(a.Span, "dnat address family conflicts with the rule's family")
				}
			}
		}
	}
	return nil
}

// addrLookup emits R0 = lookup of the address in slot (an LPM key: prefix
// length, then the address) in an address map.
func (c *compiler) addrLookup(name string, fam int, slot int16) {
	bits := int64(32)
	if fam == 6 {
		bits = 128
	}
	c.e.emit(sti(asm.R10, slot, bits, asm.Word))
	c.setLookup(name, slot)
}

// setLookup emits R0 = the element at fp+slot of named set map name
// (through its outer map: abi), 0 when absent.
func (c *compiler) setLookup(name string, slot int16) {
	e := &c.e
	done := e.newLabel("set_done")
	e.emit(sti(asm.R10, slotKey, 0, asm.Word))
	c.lookup(name, slotKey)
	e.emit(
		asm.JEq.Imm(asm.R0, 0, done),
		mov(asm.R1, asm.R0),
		mov(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, int32(slot)),
		asm.FnMapLookupElem.Call(),
	)
	e.label(done)
}
