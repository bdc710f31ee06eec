package compiler

import (
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Large anonymous lists (in rules tested inline, and in shapes' residual
// checks) share a few maps, so that a program stays under the kernel's
// 64 maps whatever the rules: every list has an id, and
//
//   - anon_ports: ARRAY, value a port bitmap (PortBitmapSize), index = id;
//   - anon_v4 / anon_v6: LPM_TRIE, key {prefix length u32; id u32 (big
//     endian, so it is the first 32 bits matched); address}, value 1.
//
// Lists with the same elements share an id. IPv4 host lists keep their own
// perfect-hash table (hosttable.go) up to maxHostTables of them.
const (
	anonPortsMap  = anonPrefix + "ports"
	anonV4Map     = anonPrefix + "v4"
	anonV6Map     = anonPrefix + "v6"
	maxHostTables = 8
)

// anonLists collects the shared lists of one program.
type anonLists struct {
	ports    [][]byte          // bitmaps by id
	prefixes [2][]netip.Prefix // v4, v6: every list's prefixes
	ids      [2][]uint32       // the id of each prefix
	next     [2]uint32         // next id per family
	byKey    map[string]uint32 // list id by content
	hosts    int               // host tables made
}

func (a *anonLists) id(kind string, content []byte, add func(id uint32)) uint32 {
	h := sha256.Sum256(append([]byte(kind), content...))
	if a.byKey == nil {
		a.byKey = map[string]uint32{}
	}
	if id, ok := a.byKey[string(h[:])]; ok {
		return id
	}
	var id uint32
	switch kind {
	case "ports":
		id = uint32(len(a.ports))
	case "v4":
		id = a.next[0]
		a.next[0]++
	default:
		id = a.next[1]
		a.next[1]++
	}
	a.byKey[string(h[:])] = id
	add(id)
	return id
}

// portList returns the id of a port list in anon_ports.
func (c *compiler) portList(ranges []grammar.PortRange) uint32 {
	bm := PortBitmap(ranges)
	return c.anonSets.id("ports", bm, func(uint32) { c.anonSets.ports = append(c.anonSets.ports, bm) })
}

// prefixList returns the id of an address list in anon_v4 / anon_v6.
func (c *compiler) prefixList(fam int, prefixes []netip.Prefix) uint32 {
	f := 0
	if fam == 6 {
		f = 1
	}
	var content []byte
	for _, p := range prefixes {
		content = append(content, LPMKey(p.Masked())...)
	}
	return c.anonSets.id(fmt.Sprint("v", fam), content, func(id uint32) {
		for _, p := range prefixes {
			c.anonSets.prefixes[f] = append(c.anonSets.prefixes[f], p.Masked())
			c.anonSets.ids[f] = append(c.anonSets.ids[f], id)
		}
	})
}

// prefixLookup emits R0 = lookup of the address in slot (an address slot
// of the parse guard) in list id of the shared trie; the key is built at
// slotTKey (free outside a shape's key building).
func (c *compiler) prefixLookup(fam int, id uint32, slot int16) {
	e := &c.e
	words, name := 1, anonV4Map
	if fam == 6 {
		words, name = 4, anonV6Map
	}
	var be [4]byte
	binary.BigEndian.PutUint32(be[:], id)
	e.emit(
		sti(asm.R10, slotTKey, int64(32+32*words), asm.Word),
		sti(asm.R10, slotTKey+4, int64(int32(binary.NativeEndian.Uint32(be[:]))), asm.Word),
	)
	for w := 0; w < words; w++ {
		e.emit(ldx(asm.R1, asm.R10, slot+4+int16(4*w), asm.Word), stx(asm.R10, slotTKey+8+int16(4*w), asm.R1, asm.Word))
	}
	c.lookup(name, slotTKey)
}

// anonMaps adds the shared list maps the program uses.
func (c *compiler) anonMaps() {
	a := &c.anonSets
	if len(a.ports) > 0 {
		// Headroom: a record added with a port list of its own takes a
		// free id (Layout.PlaceRecordLists).
		m := &ebpf.MapSpec{Name: anonPortsMap, Type: ebpf.Array, KeySize: 4, ValueSize: uint32(len(a.ports[0])), MaxEntries: uint32(len(a.ports) + anonPortsHeadroom)}
		for i, bm := range a.ports {
			m.Contents = append(m.Contents, ebpf.MapKV{Key: uint32(i), Value: bm})
		}
		c.spec.Maps[anonPortsMap] = m
	}
	for f, name := range []string{anonV4Map, anonV6Map} {
		if len(a.prefixes[f]) == 0 {
			continue
		}
		size := 4 // address bytes
		if f == 1 {
			size = 16
		}
		m := &ebpf.MapSpec{Name: name, Type: ebpf.LPMTrie, KeySize: uint32(8 + size), ValueSize: 1, Flags: 1} // BPF_F_NO_PREALLOC
		seen := map[string]bool{}
		for i, p := range a.prefixes[f] {
			k := anonKey(p, a.ids[f][i])
			if seen[string(k)] {
				continue
			}
			seen[string(k)] = true
			m.Contents = append(m.Contents, ebpf.MapKV{Key: k, Value: []byte{1}})
		}
		// Headroom for lists added to records (no preallocation: a
		// limit, not memory).
		m.MaxEntries = uint32(2*len(m.Contents) + anonTrieHeadroom)
		c.spec.Maps[name] = m
	}
}

// Room the list maps keep for lists of records added without compiling.
const (
	anonPortsHeadroom = 4   // bitmaps of 8 KiB
	anonTrieHeadroom  = 256 // prefixes
)

// anonKey is the key of prefix p of list id in anon_v4 / anon_v6.
func anonKey(p netip.Prefix, id uint32) []byte {
	a := p.Addr().AsSlice()
	k := make([]byte, 8+len(a))
	binary.NativeEndian.PutUint32(k, uint32(32+p.Bits()))
	binary.BigEndian.PutUint32(k[4:], id)
	copy(k[8:], a)
	return k
}
