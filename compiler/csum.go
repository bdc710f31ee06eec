// Ones' complement checksum arithmetic for actions: address sums, folds,
// incremental L4 updates and skb->csum maintenance.

package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// fold folds the ones' complement sum in r (< 2^48) to 16 bits.
func (c *compiler) fold(r, tmp asm.Register) { c.foldBelow(r, tmp, 1<<48) }

// foldBelow folds a sum known to be below bound, with no more steps than
// that needs.
func (c *compiler) foldBelow(r, tmp asm.Register, bound uint64) {
	// b is the largest value r can hold; one step maps x to
	// (x >> 16) + (x & 0xffff), whose largest value is at b or just
	// below a multiple of 0x10000.
	for b := bound - 1; b > 0xffff; b = max(b>>16+b&0xffff, b>>16-1+0xffff) {
		c.e.emit(
			mov(tmp, r),
			asm.RSh.Imm(tmp, 16),
			asm.And.Imm(r, 0xffff),
			asm.Add.Reg(r, tmp),
		)
	}
}

// foldLow16 folds like foldBelow but leaves only the low 16 bits right:
// the last step, on a sum below 0x1ffff, is x + (x >> 16) without the mask
// (the high half is 0 or 1, and the low half then at most 0xfffe, so the
// addition does not carry out of 16 bits). For values that only a 16-bit
// store (after an xor) takes.
func (c *compiler) foldLow16(r, tmp asm.Register, bound uint64) {
	b := bound - 1
	for ; b > 0x1fffe; b = max(b>>16+b&0xffff, b>>16-1+0xffff) {
		c.e.emit(
			mov(tmp, r),
			asm.RSh.Imm(tmp, 16),
			asm.And.Imm(r, 0xffff),
			asm.Add.Reg(r, tmp),
		)
	}
	if b > 0xffff {
		c.e.emit(mov(tmp, r), asm.RSh.Imm(tmp, 16), asm.Add.Reg(r, tmp))
	}
}

// addrSum sets dst to the folded sum of saddr and daddr (R1 scratch).
func (c *compiler) addrSum(fam int, dst asm.Register) {
	e := &c.e
	words := int16(2)
	if fam == 6 {
		words = 8
	}
	off := c.l3 + 12
	if fam == 6 {
		off = c.l3 + 8
	}
	e.emit(ldx(dst, asm.R7, off, asm.Word))
	for w := int16(1); w < words; w++ {
		e.emit(ldx(asm.R1, asm.R7, off+4*w, asm.Word), asm.Add.Reg(dst, asm.R1))
	}
	c.fold(dst, asm.R1)
}

// requireUDPChecksum sends an inner UDP datagram (header at base+off)
// without a checksum to the no-checksum stat: funnel derives the outer
// checksum from the inner one.
func (c *compiler) requireUDPChecksum(inner grammar.Proto, base asm.Register, off int16) {
	if inner != grammar.ProtoUDP {
		return
	}
	c.e.emit(
		ldx(asm.R1, base, off+6, asm.Half),
		asm.JEq.Imm(asm.R1, 0, c.stat(StatNoChecksum)),
	)
}

// requireUDPLength sends an inner UDP datagram (header at base+off) whose
// length field is not the transport length (in l4len, host order) to the
// udp-length stat: funnel carries the length field as it is, and the
// receiver would see a datagram longer or shorter than what arrives.
func (c *compiler) requireUDPLength(inner grammar.Proto, base asm.Register, off int16, l4len asm.Register, sub int32) {
	if inner != grammar.ProtoUDP {
		return
	}
	c.e.emit(
		ldx(asm.R1, base, off+4, asm.Half),
		asm.HostTo(asm.BE, asm.R1, asm.Half),
	)
	if sub != 0 {
		c.e.emit(asm.Add.Imm(asm.R1, sub))
	}
	c.e.emit(asm.JNE.Reg(asm.R1, l4len, c.stat(StatUDPLength)))
}

// l4CsumReplace emits bpf_l4_csum_replace(skb, R9 + off + slotT4, from=0,
// to=diff (R4), flags): the check field offset is in slotT4, the transport
// protocol in slotT2 (UDP adds BPF_F_MARK_MANGLED_0).
func (c *compiler) l4CsumDiff(extra int32, flags int64) {
	e := &c.e
	udp := e.newLabel("csum_udp")
	e.emit(
		ldx(asm.R2, asm.R10, slotT4, asm.DWord),
		asm.Add.Reg(asm.R2, asm.R9),
		asm.Add.Imm(asm.R2, extra),
		movi(asm.R3, 0),
		asm.Mov.Imm(asm.R5, int32(flags)),
		ldx(asm.R1, asm.R10, slotT2, asm.DWord),
		asm.JNE.Imm(asm.R1, 17, udp),
		asm.Or.Imm(asm.R5, fMarkMangled0),
	)
	e.label(udp)
	e.emit(mov(asm.R1, asm.R6), asm.FnL4CsumReplace.Call())
}

// addrSumRaw sets dst to the plain sum of the address words (below 2^33
// for IPv4, 2^35 for IPv6; R1 scratch); the IP header must be proven in
// bounds.
func (c *compiler) addrSumRaw(fam int, dst asm.Register) {
	e := &c.e
	words, off := int16(2), c.l3+12
	if fam == 6 {
		words, off = 8, c.l3+8
	}
	e.emit(ldx(dst, asm.R7, off, asm.Word))
	for w := int16(1); w < words; w++ {
		e.emit(ldx(asm.R1, asm.R7, off+4*w, asm.Word), asm.Add.Reg(dst, asm.R1))
	}
}

// negAddrSum turns a raw address sum in r into a non-negative value
// congruent to its negation: K - r with K a multiple of 0xffff above any
// sum.
func (c *compiler) negAddrSum(fam int, r asm.Register) {
	k := int64(0xffff * 0x20002) // >= 2 * (2^32 - 1)
	if fam == 6 {
		k = 0xffff * 0x80008 // >= 8 * (2^32 - 1)
	}
	c.e.emit(
		asm.LoadImm(asm.R1, k, asm.DWord),
		asm.Sub.Reg(asm.R1, r),
		mov(r, asm.R1),
	)
}

// addrSum32 sets dst to saddr+daddr folded to 32 bits (R1 scratch); the
// IP header must be proven in bounds.
func (c *compiler) addrSum32(fam int, dst asm.Register) {
	e := &c.e
	words, off := int16(2), c.l3+12
	if fam == 6 {
		words, off = 8, c.l3+8
	}
	e.emit(ldx(dst, asm.R7, off, asm.Word))
	for w := int16(1); w < words; w++ {
		e.emit(ldx(asm.R1, asm.R7, off+4*w, asm.Word), asm.Add.Reg(dst, asm.R1))
	}
	for i := 0; i < 2; i++ {
		e.emit(
			mov(asm.R1, dst),
			asm.RSh.Imm(asm.R1, 32),
			asm.Mov.Reg32(dst, dst),
			asm.Add.Reg(dst, asm.R1),
		)
	}
}

// headerSum adds the bytes of a pushed header (h bytes at base+off) to
// skb->csum of a CHECKSUM_COMPLETE skb at ingress (the gap adjust_room
// opened was zeros).
func (c *compiler) headerSum(base asm.Register, off, h int16) {
	if c.opts.Hook != grammar.HookIngress {
		return
	}
	e := &c.e
	c.whenComplete(func() {
		e.emit(ldx(asm.R2, base, off, asm.Word))
		for w := int16(4); w < h; w += 4 {
			e.emit(ldx(asm.R1, base, off+w, asm.Word), asm.Add.Reg(asm.R2, asm.R1))
		}
		c.foldBelow(asm.R2, asm.R1, 8<<32)
		c.csumUpdate()
	})
}

// whenComplete emits body so that it runs only for CHECKSUM_COMPLETE skbs
// when ip_summed can be read (kernel BTF): the other skbs skip the sum and
// the helper call. Without BTF body always runs (bpf_csum_update ignores
// other skbs). Clobbers R0-R5.
func (c *compiler) whenComplete(body func()) {
	if !c.kern.ok {
		body()
		return
	}
	skip := c.e.newLabel("not_complete")
	summed := c.summed
	if summed == 0 {
		c.ipSummed(asm.R3)
		summed = asm.R3
	}
	if c.fast {
		// Out of line: the other skbs run on without a taken jump.
		run := c.e.newLabel("complete")
		c.e.emit(asm.JEq.Imm(summed, c.summedIs(checksumComplete), run))
		c.e.label(skip)
		c.e.cold = append(c.e.cold, func(bool) {
			c.e.label(run)
			body()
			c.e.emit(asm.Ja.Label(skip))
		})
		return
	}
	c.e.emit(asm.JNE.Imm(summed, c.summedIs(checksumComplete), skip))
	body()
	c.e.label(skip)
}

// csumUpdate adds R2 (a ones' complement difference of packet bytes) to
// skb->csum when the skb is CHECKSUM_COMPLETE (bpf_csum_update does
// nothing to other skbs). R0-R5 are clobbered; packet pointers stay.
func (c *compiler) csumUpdate() {
	c.e.emit(mov(asm.R1, asm.R6), asm.FnCsumUpdate.Call())
}

// fold16 folds a ones' complement sum at compile time.
func fold16(v uint64) uint16 {
	for v > 0xffff {
		v = v&0xffff + v>>16
	}
	return uint16(v)
}

// addrSumBound bounds addrSumRaw's sum (exclusive).
func addrSumBound(fam int) uint64 {
	if fam == 6 {
		return 8 << 32
	}
	return 2 << 32
}
