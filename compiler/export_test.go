package compiler

import (
	"encoding/binary"
	"net/netip"
)

// MaxCodeShapes is the code budget of a large hook (shapescan.go).
const MaxCodeShapes = maxCodeShapes

// ShapeRecordRules returns the rules of a compiled hook whose entries are
// in shape records (shapescan.go): tests check that packets reach them.
func ShapeRecordRules(p *Program) map[int]bool {
	out := map[int]bool{}
	for _, seg := range p.c.segs {
		for _, sh := range seg.scanShapes {
			for _, en := range sh.ents {
				out[en.rule] = true
			}
		}
	}
	return out
}

// ScanRecords returns the number of records of a compiled hook's record
// scan (a packet that matches none reads them all).
func ScanRecords(p *Program) int {
	if p.c.lin == nil {
		return 0
	}
	n := 0
	for _, lists := range p.c.lin.segs {
		for _, recs := range lists {
			n += len(recs) / recSize
		}
	}
	return n
}

// BucketedRules returns the rules (by index, for programs compiled without
// Options.Prios) whose records are in a bucket's list: "dport", "sport",
// "saddr" or "daddr", the field that put them there.
func BucketedRules(p *Program) map[int]string {
	out := map[int]string{}
	if p.c.lin == nil {
		return out
	}
	for s, lists := range p.c.lin.segs {
		for l := linGroups; l < len(lists); l++ {
			for k := 0; k < len(lists[l]); k += recSize {
				out[int(nativeU32(lists[l][k+recPrio:]))-1] = []string{"dport", "sport", "saddr", "daddr"}[(l-linGroups)/p.c.lin.buckets[s]]
			}
		}
	}
	return out
}

// PacketListRecords returns how many records the lists hold that a packet
// of protocol proto, ports sport, dport and addresses saddr, daddr reads
// (linScan: its family/protocol lists and its fields' buckets).
func PacketListRecords(p *Program, proto uint8, sport, dport uint16, saddr, daddr netip.Addr) int {
	if p.c.lin == nil {
		return 0
	}
	fi := map[bool]int{true: 1, false: 2}[saddr.Is4()]
	pi := map[uint8]int{6: 1, 17: 2}[proto]
	key := func(a netip.Addr) uint32 {
		b := a.As16()
		if a.Is4() {
			return binary.BigEndian.Uint32(b[12:])
		}
		var k uint32
		for w := 0; w < 4; w++ {
			k ^= binary.BigEndian.Uint32(b[4*w:])
		}
		return k
	}
	n := 0
	for s, lists := range p.c.lin.segs {
		read := []int{0}
		if p.c.lin.grouped[s] {
			read = append(read, 3*fi, pi, 3*fi+pi)
			if b := p.c.lin.buckets[s]; b > 0 {
				if pi > 0 {
					read = append(read, linGroups+portBucket(dport, b), linGroups+b+portBucket(sport, b))
				}
				read = append(read, linGroups+2*b+addrBucket(key(saddr), b), linGroups+3*b+addrBucket(key(daddr), b))
			}
		}
		seen := map[int]bool{}
		for _, l := range read {
			if !seen[l] {
				seen[l] = true
				n += len(lists[l]) / recSize
			}
		}
	}
	return n
}
