package compiler

import (
	"sync"

	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/btf"
)

// skb->ip_summed values.
const (
	checksumComplete = 2
	checksumPartial  = 3
)

// kernelSkb says how to read skb->ip_summed on the running kernel: through
// the bpf_cast_to_kern_ctx kfunc (the verifier turns it into a move), at
// the bit offset kernel BTF gives. Transport checksum updates are then
// inline instead of a bpf_l4_csum_replace call per update.
type kernelSkb struct {
	ok      bool
	kfunc   int64 // BTF id of bpf_cast_to_kern_ctx in vmlinux
	byteOff int16
	shift   int32

	// mtu: skb->dev->mtu and ->hard_header_len can be read (byte offsets),
	// so the MTU check is inline instead of a bpf_check_mtu call.
	mtu                   bool
	devOff, mtuOff, hhOff int16
}

var (
	kernSkbOnce sync.Once
	kernSkb     kernelSkb
)

func loadKernelSkb() kernelSkb {
	kernSkbOnce.Do(func() {
		boot := bootID()
		if k, ok := readKernelCache(KernelCacheFile, boot); ok {
			kernSkb = k
			return
		}
		kernSkb = kernelSkbFromBTF()
		writeKernelCache(KernelCacheFile, boot, kernSkb)
	})
	return kernSkb
}

// kernelSkbFromBTF reads the offsets from kernel BTF (the zero value when
// something is missing: the compiler then uses helpers instead).
func kernelSkbFromBTF() (kernSkb kernelSkb) {
	spec, err := btf.LoadKernelSpec()
	if err != nil {
		return
	}
	var fn *btf.Func
	if spec.TypeByName("bpf_cast_to_kern_ctx", &fn) != nil {
		return
	}
	id, err := spec.TypeID(fn)
	if err != nil {
		return
	}
	var skb *btf.Struct
	if spec.TypeByName("sk_buff", &skb) != nil {
		return
	}
	off, size, _, ok := findMember(skb, "ip_summed", 0)
	if !ok || size != 2 || off%8 > 6 {
		return
	}
	kernSkb = kernelSkb{ok: true, kfunc: int64(id), byteOff: int16(off / 8), shift: int32(off % 8)}
	var dev *btf.Struct
	if spec.TypeByName("net_device", &dev) != nil {
		return
	}
	devOff, ok1 := plainMember(skb, "dev", 8)
	mtuOff, ok2 := plainMember(dev, "mtu", 4)
	hhOff, ok3 := plainMember(dev, "hard_header_len", 2)
	if ok1 && ok2 && ok3 {
		kernSkb.mtu = true
		kernSkb.devOff, kernSkb.mtuOff, kernSkb.hhOff = devOff, mtuOff, hhOff
	}
	return kernSkb
}

// findMember finds a (bit-field) member by name, through anonymous
// structs and unions, returning its bit offset, bit-field size and type.
func findMember(typ btf.Type, name string, base uint32) (uint32, uint32, btf.Type, bool) {
	var members []btf.Member
	switch s := typ.(type) {
	case *btf.Struct:
		members = s.Members
	case *btf.Union:
		members = s.Members
	default:
		return 0, 0, nil, false
	}
	for _, m := range members {
		if m.Name == name {
			return base + uint32(m.Offset), uint32(m.BitfieldSize), m.Type, true
		}
		if m.Name == "" {
			if o, sz, t, ok := findMember(m.Type, name, base+uint32(m.Offset)); ok {
				return o, sz, t, true
			}
		}
	}
	return 0, 0, nil, false
}

// plainMember returns the byte offset of a member that is not a bit-field,
// is aligned and has the given byte size.
func plainMember(typ btf.Type, name string, size int) (int16, bool) {
	off, bits, t, ok := findMember(typ, name, 0)
	if !ok || bits != 0 || off%uint32(8*size) != 0 {
		return 0, false
	}
	if n, err := btf.Sizeof(t); err != nil || n != size {
		return 0, false
	}
	return int16(off / 8), true
}

// ipSummed sets dst to skb->ip_summed's bits where they are in their byte
// (compare with summedIs; clobbers R0-R5 but dst when dst is R6-R9;
// callers pass R3 and reload what they need).
func (c *compiler) ipSummed(dst asm.Register) {
	c.e.emit(
		mov(asm.R1, asm.R6),
		asm.Instruction{OpCode: asm.OpCode(asm.JumpClass).SetJumpOp(asm.Call), Src: asm.PseudoKfuncCall, Constant: c.kern.kfunc},
		ldx(dst, asm.R0, c.kern.byteOff, asm.Byte),
		asm.And.Imm(dst, 3<<c.kern.shift),
	)
}

// summedIs is the value ipSummed leaves for skb->ip_summed == v: the bits
// stay in place, which saves a shift.
func (c *compiler) summedIs(v int32) int32 { return v << c.kern.shift }

// pseudoCsum adds the pseudo-header difference that diff leaves in R4 (a
// ones' complement value below 2^36; diff may use R0 and R1) to the
// transport checksum at R7+off, as bpf_l4_csum_replace(skb, off, 0, R4,
// BPF_F_PSEUDO_HDR [| BPF_F_MARK_MANGLED_0]) does: a final checksum
// (CHECKSUM_NONE, UNNECESSARY) or a CHECKSUM_PARTIAL seed is updated
// inline; CHECKSUM_COMPLETE (whose skb->csum must follow) and kernels
// without BTF use the helper. R7+off+2 must be proven in bounds; packet
// pointers are invalid afterwards.
func (c *compiler) pseudoCsum(off int16, mangled bool, diff func()) {
	e := &c.e
	flags := int32(fPseudoHdr)
	if mangled {
		flags |= fMarkMangled0
	}
	helper := func() {
		for i := 0; i < 2; i++ { // the helper takes 32 bits
			e.emit(
				mov(asm.R1, asm.R4),
				asm.RSh.Imm(asm.R1, 32),
				asm.Mov.Reg32(asm.R4, asm.R4),
				asm.Add.Reg(asm.R4, asm.R1),
			)
		}
		e.emit(
			mov(asm.R1, asm.R6),
			movi(asm.R2, int32(off)),
			movi(asm.R3, 0),
			movi(asm.R5, flags),
			asm.FnL4CsumReplace.Call(),
		)
	}
	if !c.kern.ok {
		diff()
		helper()
		return
	}
	viaHelper, partial, store, done := e.newLabel("csum_helper"), e.newLabel("csum_partial"), e.newLabel("csum_store"), e.newLabel("csum_done")
	summed := c.summed
	if summed == 0 {
		c.ipSummed(asm.R3)
		summed = asm.R3
	}
	diff()
	e.emit(
		asm.JEq.Imm(summed, c.summedIs(checksumComplete), viaHelper),
		ldx(asm.R2, asm.R7, off, asm.Half),
	)
	if mangled {
		e.emit(asm.JEq.Imm(asm.R2, 0, done))
	}
	// A mangled (UDP) checksum is tested for 0 before the store: it needs
	// every bit of the fold; otherwise the low 16 bits the store takes.
	fold := c.foldLow16
	if mangled {
		fold = c.foldBelow
	}
	e.emit(
		asm.JEq.Imm(summed, c.summedIs(checksumPartial), partial),
		// Final checksum: ~(~C + diff), kept positive with 0xffff (≡ 0).
		asm.Xor.Imm(asm.R2, 0xffff),
		asm.Add.Imm(asm.R2, 0xffff),
		asm.Add.Reg(asm.R2, asm.R4),
	)
	fold(asm.R2, asm.R1, 1<<37)
	e.emit(asm.Xor.Imm(asm.R2, 0xffff))
	e.label(store)
	switch {
	case mangled && c.fast:
		// 0 becomes 0xffff out of line: a nonzero sum runs on.
		zero, st := e.newLabel("csum_zero"), e.newLabel("csum_st")
		e.emit(asm.JEq.Imm(asm.R2, 0, zero))
		e.label(st)
		e.cold = append(e.cold, func(bool) {
			e.label(zero)
			e.emit(movi(asm.R2, 0xffff), asm.Ja.Label(st))
		})
	case mangled:
		nz := e.newLabel("nonzero")
		e.emit(asm.JNE.Imm(asm.R2, 0, nz), movi(asm.R2, 0xffff))
		e.label(nz)
	}
	e.emit(stx(asm.R7, off, asm.R2, asm.Half))
	c.outOfLine(done, func(cold bool) {
		e.label(partial)
		// The seed is the uncomplemented pseudo-header sum.
		e.emit(asm.Add.Reg(asm.R2, asm.R4))
		fold(asm.R2, asm.R1, 1<<37)
		e.emit(asm.Ja.Label(store))
		e.label(viaHelper)
		helper()
		if cold {
			e.emit(asm.Ja.Label(done))
		}
	})
	e.label(done)
}

// outOfLine emits blocks the common path skips (other ip_summed cases):
// in a fast-path body after the body's end, so that the common path runs
// on without a taken jump; elsewhere here, after a jump to done. blocks
// end with their own jumps back (cold: the last one too).
func (c *compiler) outOfLine(done string, blocks func(cold bool)) {
	if c.fast {
		c.e.cold = append(c.e.cold, blocks)
		return
	}
	c.e.emit(asm.Ja.Label(done))
	blocks(false)
}

// flushCold emits the blocks outOfLine deferred (after a fast-path body).
func (c *compiler) flushCold() {
	for len(c.e.cold) > 0 {
		f := c.e.cold[0]
		c.e.cold = c.e.cold[1:]
		f(true)
	}
}

// readSummed reads skb->ip_summed into R9 once for the rest of an action
// that no longer needs R9 (c.summed; clobbers R0-R5), when it can be read.
func (c *compiler) readSummed() {
	if !c.kern.ok {
		return
	}
	c.ipSummed(asm.R9)
	c.summed = asm.R9
}

// csumSub16 takes the 16-bit folded sum in reg (not R0-R3) out of the
// transport checksum at R7+off, as pseudoCsum does with the difference
// -reg, to the bit: a final checksum becomes C + reg (ones' complement;
// for TCP 0xffff is written 0x0000 as ~fold(~C - reg) gives it), a
// CHECKSUM_PARTIAL seed seed - reg. Packet pointers are invalid afterwards.
func (c *compiler) csumSub16(off int16, mangled bool, reg asm.Register) {
	e := &c.e
	neg := func() { // R4 = a positive value congruent to -reg
		e.emit(movi(asm.R4, 0x1fffe), asm.Sub.Reg(asm.R4, reg))
	}
	if !c.kern.ok {
		c.pseudoCsum(off, mangled, neg)
		return
	}
	viaHelper, partial, store, done := e.newLabel("csum_helper"), e.newLabel("csum_partial"), e.newLabel("csum_store"), e.newLabel("csum_done")
	summed := c.summed
	if summed == 0 {
		c.ipSummed(asm.R3)
		summed = asm.R3
	}
	e.emit(
		asm.JEq.Imm(summed, c.summedIs(checksumComplete), viaHelper),
		ldx(asm.R2, asm.R7, off, asm.Half),
	)
	if mangled {
		e.emit(asm.JEq.Imm(asm.R2, 0, done))
	}
	e.emit(
		asm.JEq.Imm(summed, c.summedIs(checksumPartial), partial),
		asm.Add.Reg(asm.R2, reg),
	)
	if mangled {
		c.foldLow16(asm.R2, asm.R1, 2*0xffff+1)
	} else {
		c.foldBelow(asm.R2, asm.R1, 2*0xffff+1)
		// A sum of 0 (mod 0xffff): what the helper writes.
		e.emit(asm.JNE.Imm(asm.R2, 0xffff, store), movi(asm.R2, 0))
	}
	e.label(store)
	e.emit(stx(asm.R7, off, asm.R2, asm.Half))
	c.outOfLine(done, func(cold bool) {
		e.label(partial)
		// The seed is the uncomplemented pseudo-header sum: seed - reg, kept
		// positive with 0x1fffe (≡ 0); never 0, so never the mangled 0.
		e.emit(asm.Add.Imm(asm.R2, 0x1fffe), asm.Sub.Reg(asm.R2, reg))
		c.foldLow16(asm.R2, asm.R1, 0xffff+0x1fffe+1)
		e.emit(asm.Ja.Label(store))
		e.label(viaHelper)
		was := c.summed
		c.summed, c.kern.ok = 0, false
		c.pseudoCsum(off, mangled, neg)
		c.summed, c.kern.ok = was, true
		if cold {
			e.emit(asm.Ja.Label(done))
		}
	})
	if summed == asm.R3 {
		c.summed = 0
	}
	e.label(done)
}
