package compiler

import (
	"encoding/binary"
	"net/netip"
	"slices"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Host tables: an anonymous list (or a rule group) of IPv4 host addresses
// only is known in full at compile time, so instead of an LPM trie (a
// helper call that walks a bit per node) it compiles to a perfect hash
// ("hash and displace") read with direct map value access: no helper call,
// two loads from one array value and one compare, whatever the size.
//
// The value of the single-element array map is
//
//	[2^bucketBits]u32 displacements, then [2^slotBits]{addr [4]byte, value u32}
//
// bucket = (a * mulA) >> (32 - bucketBits), slot = ((a * mulB) >> (32 -
// slotBits)) ^ displacement[bucket], with a the address loaded as a native
// u32 and 32-bit multiplications. An address is in the table when the slot
// holds it with a non-zero value (empty slots are all zero).
type hostTable struct {
	mulA, mulB           uint32
	bucketBits, slotBits int
	data                 []byte
}

// maxHostTableBytes bounds the map value (the kernel allows up to
// KMALLOC_MAX_SIZE, 4 MiB here).
const maxHostTableBytes = 1 << 21

// hostAddrs returns the addresses when every prefix is an IPv4 /32.
func hostAddrs(prefixes []netip.Prefix) ([][4]byte, bool) {
	out := make([][4]byte, 0, len(prefixes))
	for _, p := range prefixes {
		if !p.Addr().Is4() || p.Bits() != 32 {
			return nil, false
		}
		out = append(out, p.Addr().As4())
	}
	return out, true
}

// bitsFor returns the smallest b ≥ 1 with 1<<b ≥ n.
func bitsFor(n int) int {
	b := 1
	for 1<<b < n {
		b++
	}
	return b
}

// buildHostTable makes the table of addrs with values vals (non-zero);
// the first of duplicate addresses wins. ok is false when no hash was
// found within a few seeds (the caller falls back to an LPM trie).
func buildHostTable(addrs [][4]byte, vals []uint32) (*hostTable, bool) {
	var keys []uint32
	var kv []uint32
	seen := map[uint32]bool{}
	for i, a := range addrs {
		k := binary.NativeEndian.Uint32(a[:])
		if !seen[k] {
			seen[k] = true
			keys = append(keys, k)
			kv = append(kv, vals[i])
		}
	}
	bb := bitsFor(max(1, len(keys)/2))
	sb := bitsFor(len(keys) + len(keys)/4)
	if 4<<bb+8<<sb > maxHostTableBytes {
		return nil, false
	}
	seed := uint64(0x9e3779b97f4a7c15) // fixed: the same list gives the same program
	next := func() uint32 {
		seed += 0x9e3779b97f4a7c15
		z := seed
		z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
		z = (z ^ z>>27) * 0x94d049bb133111eb
		return uint32(z^z>>31) | 1
	}
	for try := 0; try < 64; try++ {
		t := &hostTable{mulA: next(), mulB: next(), bucketBits: bb, slotBits: sb}
		if t.place(keys, kv) {
			return t, true
		}
	}
	return nil, false
}

func (t *hostTable) bucket(k uint32) uint32 { return k * t.mulA >> (32 - t.bucketBits) }
func (t *hostTable) hash(k uint32) uint32   { return k * t.mulB >> (32 - t.slotBits) }

// place finds a displacement per bucket, largest buckets first.
func (t *hostTable) place(keys, vals []uint32) bool {
	nb, ns := 1<<t.bucketBits, 1<<t.slotBits
	members := make([][]int, nb)
	for i, k := range keys {
		b := t.bucket(k)
		members[b] = append(members[b], i)
	}
	order := make([]int, 0, nb)
	for b := range members {
		if len(members[b]) > 0 {
			order = append(order, b)
		}
	}
	slices.SortStableFunc(order, func(x, y int) int { return len(members[y]) - len(members[x]) })
	used := make([]bool, ns)
	disp := make([]uint32, nb)
	slot := make([]uint32, len(keys))
	for _, b := range order {
		found := false
		for d := uint32(0); d < uint32(ns) && !found; d++ {
			found = true
			for j, i := range members[b] {
				s := t.hash(keys[i]) ^ d
				if used[s] || slices.ContainsFunc(members[b][:j], func(o int) bool { return t.hash(keys[o])^d == s }) {
					found = false
					break
				}
			}
			if found {
				disp[b] = d
				for _, i := range members[b] {
					s := t.hash(keys[i]) ^ d
					used[s] = true
					slot[i] = s
				}
			}
		}
		if !found {
			return false
		}
	}
	t.data = make([]byte, 4*nb+8*ns)
	for b, d := range disp {
		binary.NativeEndian.PutUint32(t.data[4*b:], d)
	}
	for i, k := range keys {
		off := 4*nb + 8*int(slot[i])
		binary.NativeEndian.PutUint32(t.data[off:], k)
		binary.NativeEndian.PutUint32(t.data[off+4:], vals[i])
	}
	return true
}

// lookup is the Go side of the emitted lookup (for tests).
func (t *hostTable) lookup(a [4]byte) (uint32, bool) {
	k := binary.NativeEndian.Uint32(a[:])
	nb := 1 << t.bucketBits
	d := binary.NativeEndian.Uint32(t.data[4*t.bucket(k):])
	off := 4*nb + 8*int((t.hash(k)^d)&(1<<t.slotBits-1))
	v := binary.NativeEndian.Uint32(t.data[off+4:])
	return v, v != 0 && binary.NativeEndian.Uint32(t.data[off:]) == k
}

func (t *hostTable) mapSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{
		Type: ebpf.Array, KeySize: 4, ValueSize: uint32(len(t.data)), MaxEntries: 1,
		Contents: []ebpf.MapKV{{Key: uint32(0), Value: t.data}},
	}
}

// hostLookup emits the lookup of the IPv4 address at slot+4 in host table
// name: R1 = the value, or a jump to miss when the address isn't there.
func (c *compiler) hostLookup(name string, t *hostTable, slot int16, miss string) {
	nb := 1 << t.bucketBits
	c.e.emit(
		ldx(asm.R3, asm.R10, slot+4, asm.Word),
		mov(asm.R2, asm.R3),
		asm.Mul.Imm32(asm.R2, int32(t.mulA)),
		asm.RSh.Imm32(asm.R2, int32(32-t.bucketBits)),
		asm.LSh.Imm(asm.R2, 2),
		asm.LoadMapValue(asm.R0, 0, 0).WithReference(name),
		asm.Add.Reg(asm.R0, asm.R2),
		ldx(asm.R1, asm.R0, 0, asm.Word),
		mov(asm.R2, asm.R3),
		asm.Mul.Imm32(asm.R2, int32(t.mulB)),
		asm.RSh.Imm32(asm.R2, int32(32-t.slotBits)),
		asm.Xor.Reg32(asm.R2, asm.R1),
		asm.And.Imm32(asm.R2, int32(1<<t.slotBits-1)),
		asm.LSh.Imm(asm.R2, 3),
		asm.LoadMapValue(asm.R0, 0, uint32(4*nb)).WithReference(name),
		asm.Add.Reg(asm.R0, asm.R2),
		ldx(asm.R1, asm.R0, 0, asm.Word),
		asm.JNE.Reg(asm.R1, asm.R3, miss),
		ldx(asm.R1, asm.R0, 4, asm.Word),
		asm.JEq.Imm(asm.R1, 0, miss),
	)
}

// hostTableOf returns the host table of prefixes when they are all IPv4
// host addresses (values nil: every value 1), else nil.
func hostTableOf(prefixes []netip.Prefix, values []uint32) *hostTable {
	addrs, ok := hostAddrs(prefixes)
	if !ok {
		return nil
	}
	if values == nil {
		values = make([]uint32, len(addrs))
		for i := range values {
			values[i] = 1
		}
	}
	t, ok := buildHostTable(addrs, values)
	if !ok {
		return nil
	}
	return t
}

// hostMatch tests the address in slot against a host table (an anonymous
// list of IPv4 host addresses).
func (c *compiler) hostMatch(r *grammar.Rule, m *grammar.AddrMatch, t *hostTable, slot int16, fail string) error {
	if r.Family == grammar.FamilyIPv6 {
		return errorf(m.Span, "address family conflicts with the rule's family")
	}
	e := &c.e
	if r.Family == grammar.FamilyAny {
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, 4, fail))
	}
	name := c.anonMap(t.mapSpec())
	if !m.Neg {
		c.hostLookup(name, t, slot, fail)
		return nil
	}
	ok := e.newLabel("addr_ok")
	c.hostLookup(name, t, slot, ok)
	e.emit(asm.Ja.Label(fail))
	e.label(ok)
	return nil
}
