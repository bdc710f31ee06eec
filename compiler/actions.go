package compiler

import (
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/grammar"
)

// Register use in actions: R6 ctx, R7 skb->data, R8 skb->data_end (reloaded
// after every helper that may move the packet), R9 transport offset; R0-R5
// scratch. Values that must survive helpers live in the slotT* slots.

// reload refreshes the packet pointers.
func (c *compiler) reload() {
	c.e.emit(
		ldx(asm.R7, asm.R6, skbData, asm.Word),
		ldx(asm.R8, asm.R6, skbDataEnd, asm.Word),
	)
}

func ipHdrLen(fam int) int32 {
	if fam == 6 {
		return 40
	}
	return 20
}

// ipBound proves the fixed IP header is in the packet (to the verifier).
func (c *compiler) ipBound(fam int, fail string) {
	c.e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(c.l3)+ipHdrLen(fam)),
		asm.JGT.Reg(asm.R1, asm.R8, fail),
	)
}

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

// l4Len sets dst to the transport length the IP header claims (host order)
// and jumps to fail when it does not fit the packet. Needs R9 and ipBound.
func (c *compiler) l4Len(fam int, dst asm.Register, fail string) {
	e := &c.e
	l3 := c.l3
	if fam == 4 {
		e.emit(ldx(dst, asm.R7, l3+2, asm.Half))
	} else {
		e.emit(ldx(dst, asm.R7, l3+4, asm.Half))
	}
	hdr := int32(l3)
	if fam == 6 {
		hdr += 40 // payload length excludes the fixed header
	}
	e.emit(
		asm.HostTo(asm.BE, dst, asm.Half),
		ldx(asm.R0, asm.R6, skbLen, asm.Word),
		asm.Sub.Imm(asm.R0, hdr),
		asm.JGT.Reg(dst, asm.R0, fail),
		mov(asm.R0, asm.R9),
		asm.Sub.Imm(asm.R0, hdr),
		asm.JLT.Reg(dst, asm.R0, fail),
		asm.Sub.Reg(dst, asm.R0),
	)
}

// guards emits the checks every header-moving action starts with.
func (c *compiler) guards(unsafe, gso bool) {
	c.guardsNoL4(unsafe, gso)
	c.e.emit(ldx(asm.R9, asm.R10, slotL4Off, asm.DWord))
}

// guardsNoL4 is guards without loading R9; it leaves the info slot in R1
// (infoInR1) for the caller's next test.
func (c *compiler) guardsNoL4(unsafe, gso bool) {
	e := &c.e
	e.emit(ldx(asm.R1, asm.R10, slotInfo, asm.DWord), asm.JSet.Imm(asm.R1, infoFrag, c.stat(StatFragment)))
	if unsafe {
		e.emit(asm.JSet.Imm(asm.R1, infoUnsafe, c.stat(StatIPOptions)))
	}
	if gso {
		e.emit(ldx(asm.R2, asm.R6, skbGSOSize, asm.Word), asm.JNE.Imm(asm.R2, 0, c.stat(StatGSO)))
	}
	if !c.fresh {
		c.reload()
	}
	c.fresh = false
	c.infoInR1 = true
}

// optsDispatch jumps to opts for packets with IPv4 options or IPv6
// extension headers.
func (c *compiler) optsDispatch(opts string) {
	e := &c.e
	if !c.infoInR1 {
		e.emit(ldx(asm.R1, asm.R10, slotInfo, asm.DWord))
	}
	c.infoInR1 = false
	e.emit(asm.JSet.Imm(asm.R1, infoOpts, opts))
}

// ipProto rewrites the transport protocol in the IP header (and the IPv4
// checksum) and the proto slot. Needs ipBound.
func (c *compiler) ipProto(fam int, proto uint8) {
	e := &c.e
	l3 := c.l3
	if fam == 4 {
		e.emit(
			ldx(asm.R1, asm.R7, l3+8, asm.Half),
			mov(asm.R2, asm.R1),
			asm.And.Imm(asm.R2, 0xff),
			asm.Or.Imm(asm.R2, int32(proto)<<8),
		)
		c.ipv4Replace16(8)
	} else {
		done := e.newLabel("nh_done")
		e.emit(
			ldx(asm.R1, asm.R10, slotNHOff, asm.DWord),
			asm.JGT.Imm(asm.R1, 0xffff, done),
			mov(asm.R2, asm.R7),
			asm.Add.Reg(asm.R2, asm.R1),
			mov(asm.R3, asm.R2),
			asm.Add.Imm(asm.R3, 1),
			asm.JGT.Reg(asm.R3, asm.R8, done),
			sti(asm.R2, 0, int64(proto), asm.Byte),
		)
		e.label(done)
	}
	e.emit(sti(asm.R10, slotProto, int64(proto), asm.DWord))
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

// growNet opens h bytes after the network header:
// bpf_skb_adjust_room(skb, h, BPF_ADJ_ROOM_NET, 0), or the helper-failed stat.
func (c *compiler) growNet(h int16) {
	c.e.emit(
		mov(asm.R1, asm.R6),
		movi(asm.R2, int32(h)),
		movi(asm.R3, 0), // BPF_ADJ_ROOM_NET
		movi(asm.R4, 0),
		asm.FnSkbAdjustRoom.Call(),
		asm.JNE.Imm(asm.R0, 0, c.stat(StatHelperFailed)),
	)
}

// ipLen adds delta (in R3, may be negative) to the IP length field and
// fixes the IPv4 checksum. Needs ipBound.
func (c *compiler) ipLen(fam int) {
	e := &c.e
	l3 := c.l3
	if fam == 6 {
		e.emit(
			ldx(asm.R1, asm.R7, l3+4, asm.Half),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.Add.Reg(asm.R1, asm.R3),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			stx(asm.R7, l3+4, asm.R1, asm.Half),
		)
		return
	}
	e.emit(
		ldx(asm.R1, asm.R7, l3+2, asm.Half),
		mov(asm.R2, asm.R1),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
		asm.Add.Reg(asm.R2, asm.R3),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
	)
	c.ipv4Replace16(2)
}

// ipv4Replace16 stores R2 over the 16-bit IPv4 header word at offset off,
// whose old value is in R1 (both in network order), and updates the
// header checksum incrementally: HC' = ~(~HC + ~old + new) (RFC 1624).
func (c *compiler) ipv4Replace16(off int16) {
	e := &c.e
	l3 := c.l3
	e.emit(
		ldx(asm.R0, asm.R7, l3+10, asm.Half),
		asm.Xor.Imm(asm.R0, 0xffff),
		asm.Xor.Imm(asm.R1, 0xffff),
		asm.Add.Reg(asm.R0, asm.R1),
		asm.Add.Reg(asm.R0, asm.R2),
	)
	c.fold(asm.R0, asm.R1)
	e.emit(
		asm.Xor.Imm(asm.R0, 0xffff),
		stx(asm.R7, l3+off, asm.R2, asm.Half),
		stx(asm.R7, l3+10, asm.R0, asm.Half),
	)
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

// transport sets slotT2 = protocol, slotT4 = check field offset, R3 = the
// minimal header length, or jumps to fail when neither TCP nor UDP.
func (c *compiler) transport(fail string) {
	e := &c.e
	ok := e.newLabel("l4_ok")
	e.emit(
		ldx(asm.R2, asm.R10, slotProto, asm.DWord),
		movi(asm.R3, 8),
		movi(asm.R4, 6),
		asm.JEq.Imm(asm.R2, 17, ok),
		asm.JNE.Imm(asm.R2, 6, fail),
		movi(asm.R3, 20),
		movi(asm.R4, 16),
	)
	e.label(ok)
	e.emit(
		stx(asm.R10, slotT2, asm.R2, asm.DWord),
		stx(asm.R10, slotT4, asm.R4, asm.DWord),
		asm.JGT.Imm(asm.R9, 0xffff, fail),
		mov(asm.R5, asm.R7),
		asm.Add.Reg(asm.R5, asm.R9),
		mov(asm.R1, asm.R5),
		asm.Add.Reg(asm.R1, asm.R3),
		asm.JGT.Reg(asm.R1, asm.R8, fail),
	)
}

// byProto emits gen for the transport protocol the packet has at this
// point: known at compile time, or dispatched on the proto slot (other
// protocols go to fail).
func (c *compiler) byProto(known grammar.Proto, fail string, gen func(p grammar.Proto)) {
	if known != grammar.ProtoAny {
		gen(known)
		return
	}
	e := &c.e
	c.infoInR1 = false
	tcp, done := e.newLabel("tcp"), e.newLabel("proto_done")
	e.emit(
		ldx(asm.R1, asm.R10, slotProto, asm.DWord),
		asm.JEq.Imm(asm.R1, 6, tcp),
		asm.JNE.Imm(asm.R1, 17, fail),
	)
	gen(grammar.ProtoUDP)
	e.emit(asm.Ja.Label(done))
	e.label(tcp)
	gen(grammar.ProtoTCP)
	e.label(done)
}

// hdrInfo gives the minimal header length and check field offset.
func hdrInfo(p grammar.Proto) (min, check int16) {
	if p == grammar.ProtoTCP {
		return 20, 16
	}
	return 8, 6
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

// ipHeader rewrites the IP length (slotT1, host order, plus delta, or
// minus the value in slotT2 when delta is negative) and the transport
// protocol (from, known at compile time, to proto). The IPv4 checksum
// changes by exactly the length delta plus the protocol delta.
func (c *compiler) ipHeader(fam int, delta int32, from, proto uint8, ext bool) {
	e := &c.e
	l3 := c.l3
	e.emit(ldx(asm.R1, asm.R10, slotT1, asm.DWord))
	if delta >= 0 {
		e.emit(asm.Add.Imm(asm.R1, delta))
	} else {
		e.emit(ldx(asm.R2, asm.R10, slotT2, asm.DWord), asm.Sub.Reg(asm.R1, asm.R2))
	}
	e.emit(asm.HostTo(asm.BE, asm.R1, asm.Half))
	if fam == 6 {
		// IPv6 has no header checksum: on a CHECKSUM_COMPLETE skb at
		// ingress, skb->csum must follow the length and next-header change
		// (the next-header byte sits at an even offset: a low byte).
		complete := c.opts.Hook == grammar.HookIngress
		if complete {
			e.emit(
				ldx(asm.R3, asm.R7, l3+4, asm.Half),
				asm.Xor.Imm(asm.R3, 0xffff),
				asm.Add.Reg(asm.R3, asm.R1),
				asm.Add.Imm(asm.R3, int32((int64(proto)-int64(from)+0xffff)%0xffff)),
				stx(asm.R10, slotDiff, asm.R3, asm.DWord),
			)
		}
		e.emit(stx(asm.R7, l3+4, asm.R1, asm.Half))
		if ext {
			c.ipProto(6, proto) // the last extension header names it
		} else {
			e.emit(
				sti(asm.R7, l3+6, int64(proto), asm.Byte),
				sti(asm.R10, slotProto, int64(proto), asm.DWord),
			)
		}
		if complete {
			c.whenComplete(func() {
				e.emit(ldx(asm.R2, asm.R10, slotDiff, asm.DWord))
				c.csumUpdate()
			})
		}
		return
	}
	// Checksum delta in network order: length + protocol (the low byte of
	// the TTL/protocol word), made positive modulo 0xffff.
	d := (int64(proto) - int64(from) + 0xffff) % 0xffff
	bound := uint64(0x10000 + 0xffff)
	if delta >= 0 {
		d = (d + int64(delta)) % 0xffff
	}
	e.emit(
		stx(asm.R7, l3+2, asm.R1, asm.Half),
		sti(asm.R7, l3+9, int64(proto), asm.Byte),
		ldx(asm.R0, asm.R7, l3+10, asm.Half),
		asm.Xor.Imm(asm.R0, 0xffff),
		asm.Add.Imm(asm.R0, int32(n16(uint16(d)))),
	)
	if delta < 0 {
		e.emit(
			asm.HostTo(asm.BE, asm.R2, asm.Half),
			asm.Xor.Imm(asm.R2, 0xffff),
			asm.Add.Reg(asm.R0, asm.R2),
		)
		bound += 0xffff
	}
	c.foldBelow(asm.R0, asm.R1, bound)
	e.emit(
		asm.Xor.Imm(asm.R0, 0xffff),
		stx(asm.R7, l3+10, asm.R0, asm.Half),
		sti(asm.R10, slotProto, int64(proto), asm.DWord),
	)
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
	c.ipSummed(asm.R3)
	c.e.emit(asm.JNE.Imm(asm.R3, checksumComplete, skip))
	body()
	c.e.label(skip)
}

// csumUpdate adds R2 (a ones' complement difference of packet bytes) to
// skb->csum when the skb is CHECKSUM_COMPLETE (bpf_csum_update does
// nothing to other skbs). R0-R5 are clobbered; packet pointers stay.
func (c *compiler) csumUpdate() {
	c.e.emit(mov(asm.R1, asm.R6), asm.FnCsumUpdate.Call())
}

// ipLength loads the IP length field (total length for IPv4, payload
// length for IPv6) in host order into dst, checks that it fits the packet
// (skb->len) and is at least min bytes of transport, and stores it in
// slotT1. Without options the transport header is at a fixed offset.
func (c *compiler) ipLength(fam int, dst asm.Register, min int32, max int32, fail string) {
	e := &c.e
	l3 := c.l3
	hdr := int32(l3)
	lenOff := l3 + 2
	if fam == 6 {
		hdr += 40
		lenOff = l3 + 4
		min -= 0
	} else {
		min += 20
		max += 20
	}
	e.emit(
		ldx(dst, asm.R7, lenOff, asm.Half),
		asm.HostTo(asm.BE, dst, asm.Half),
		ldx(asm.R0, asm.R6, skbLen, asm.Word),
		asm.Sub.Imm(asm.R0, hdr),
		asm.JGT.Reg(dst, asm.R0, fail),
		asm.JLT.Imm(dst, min, fail),
	)
	if max < 0xffff {
		e.emit(asm.JGT.Imm(dst, max, fail))
	}
	e.emit(stx(asm.R10, slotT1, dst, asm.DWord))
}

// funnel pushes a TCP or UDP header between the IP and transport headers
// (packets without IPv4 options or IPv6 extension headers, so every offset
// is a constant).
func (c *compiler) funnel(rule, fam int, known grammar.Proto, a *grammar.Action) {
	notApp := c.stat(StatNotApplicable)
	c.guardsNoL4(true, true)
	c.byProto(known, notApp, func(inner grammar.Proto) { c.funnelFrom(rule, fam, inner, a) })
}

func (c *compiler) funnelFrom(rule, fam int, inner grammar.Proto, a *grammar.Action) {
	e := &c.e
	f := a.Funnel
	outer := a.Proto.Number()
	h, _ := hdrInfo(a.Proto)
	minIn, checkIn := hdrInfo(inner)
	notApp := c.stat(StatNotApplicable)
	l4 := c.l3 + int16(ipHdrLen(fam))
	iphl := int32(ipHdrLen(fam))
	if fam == 6 {
		iphl = 0 // the IPv6 length field excludes the fixed header
	}
	e.comment("funnel %s in %s", inner, a.Proto)
	opts, done := e.newLabel("funnel_opts"), e.newLabel("funnel_done")
	c.optsDispatch(opts)
	e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(l4+minIn)),
		asm.JGT.Reg(asm.R1, asm.R8, notApp),
	)
	c.ipLength(fam, asm.R4, int32(minIn), 0xffff-int32(h)-iphl, notApp)
	c.requireUDPChecksum(inner, asm.R7, l4)
	e.comment("grow by the funnel header")
	c.growNet(h)
	c.reload()
	e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(l4+h+checkIn+2)),
		asm.JGT.Reg(asm.R1, asm.R8, c.exit("pass")),
	)
	c.addrSumRaw(fam, asm.R4)
	e.emit(stx(asm.R10, slotT3, asm.R4, asm.DWord))
	e.comment("funnel header")
	if f.HasSport && f.HasDport {
		e.emit(sti(asm.R7, l4, int64(int32(uint32(n16(f.Sport))|uint32(n16(f.Dport))<<16)), asm.Word))
	} else {
		e.emit(ldx(asm.R1, asm.R7, l4+h, asm.Word), stx(asm.R7, l4, asm.R1, asm.Word))
	}
	e.emit(
		ldx(asm.R2, asm.R10, slotT1, asm.DWord),
		asm.Sub.Imm(asm.R2, int32(ipHdrLen(fam))-map[bool]int32{true: 40, false: 0}[fam == 6]),
	)
	c.funnelHeader(asm.R7, l4, a, inner)
	e.comment("IP header")
	c.ipHeader(fam, int32(h), inner.Number(), outer, false)
	// Last, as it may move the packet: no direct access after it.
	e.comment("inner checksum without addresses")
	e.emit(ldx(asm.R4, asm.R10, slotT3, asm.DWord))
	c.negAddrSum(fam, asm.R4)
	c.pseudoCsum(l4+h+checkIn, inner == grammar.ProtoUDP)
	if c.opts.Hook == grammar.HookEgress {
		c.mtuCheck(rule)
	}
	e.emit(asm.Ja.Label(done))
	e.label(opts)
	c.funnelOpts(rule, fam, inner, a)
	e.label(done)
}

// funnelHeader fills the funnel header at base+off, whose ports already
// hold the inner header's, and its checksum. R2 holds the inner transport
// length (host order), slotT3 the raw address sum.
func (c *compiler) funnelHeader(base asm.Register, off int16, a *grammar.Action, inner grammar.Proto) {
	e := &c.e
	f := a.Funnel
	h, checkOut := hdrInfo(a.Proto)
	if !(f.HasSport && f.HasDport) {
		if f.HasSport {
			e.emit(sti(base, off, int64(n16(f.Sport)), asm.Half))
		}
		if f.HasDport {
			e.emit(sti(base, off+2, int64(n16(f.Dport)), asm.Half))
		}
	}
	// The inner segment sums to -(proto + length) once its checksum is
	// final: 0x1fffe (≡ 0) minus both keeps the sum positive.
	hdrConst := uint64(a.Proto.Number())<<8 + 0x1fffe - uint64(inner.Number())<<8
	if a.Proto == grammar.ProtoTCP {
		w12 := uint32(0x50) | uint32(f.Flags)<<8 | uint32(n16(f.Window))<<16
		e.emit(
			sti(base, off+4, int64(int32(n32(f.Seq))), asm.Word),
			sti(base, off+8, int64(int32(n32(f.Ack))), asm.Word),
			sti(base, off+12, int64(int32(w12)), asm.Word),
			sti(base, off+16, 0, asm.Word),
		)
		hdrConst += uint64(n32(f.Seq)) + uint64(n32(f.Ack)) + uint64(w12)
	}
	e.comment("outer checksum: pseudo header + header + inner segment")
	e.emit(
		mov(asm.R1, asm.R2),
		asm.Add.Imm(asm.R1, int32(h)),
		asm.HostTo(asm.BE, asm.R1, asm.Half),
		asm.HostTo(asm.BE, asm.R2, asm.Half),
		ldx(asm.R3, asm.R10, slotT3, asm.DWord),
		asm.Add.Imm(asm.R3, int32(fold16(hdrConst))),
		asm.Add.Reg(asm.R3, asm.R1),
		asm.Sub.Reg(asm.R3, asm.R2),
	)
	if a.Proto == grammar.ProtoUDP {
		e.emit(
			asm.Add.Reg(asm.R3, asm.R1), // the length field
			stx(base, off+4, asm.R1, asm.Half),
			sti(base, off+6, 0, asm.Half),
		)
	}
	e.emit(
		ldx(asm.R1, base, off, asm.Word),
		asm.Add.Reg(asm.R3, asm.R1),
	)
	c.foldBelow(asm.R3, asm.R1, 1<<36)
	e.emit(asm.Xor.Imm(asm.R3, 0xffff))
	if a.Proto == grammar.ProtoUDP {
		nz := e.newLabel("nonzero")
		e.emit(asm.JNE.Imm(asm.R3, 0, nz), movi(asm.R3, 0xffff))
		e.label(nz)
	}
	e.emit(stx(base, off+checkOut, asm.R3, asm.Half))
	c.headerSum(base, off, h)
}

// mtuCheck counts a funneled packet that exceeds the device MTU.
func (c *compiler) mtuCheck(rule int) {
	e := &c.e
	ok := e.newLabel("mtu_ok")
	e.comment("MTU check")
	if c.kern.mtu {
		// bpf_check_mtu(skb, 0, &0, 0, 0) inline: skb->len against
		// dev->mtu + dev->hard_header_len (GSO skbs never get here).
		e.emit(
			mov(asm.R1, asm.R6),
			asm.Instruction{OpCode: asm.OpCode(asm.JumpClass).SetJumpOp(asm.Call), Src: asm.PseudoKfuncCall, Constant: c.kern.kfunc},
			ldx(asm.R1, asm.R0, c.kern.devOff, asm.DWord),
			ldx(asm.R2, asm.R1, c.kern.mtuOff, asm.Word),
			ldx(asm.R3, asm.R1, c.kern.hhOff, asm.Half),
			asm.Add.Reg(asm.R2, asm.R3),
			ldx(asm.R4, asm.R6, skbLen, asm.Word),
			asm.JLE.Reg(asm.R4, asm.R2, ok),
		)
	} else {
		c.mtuHelper(ok)
	}
	c.ruleKey(rule)
	c.lookup(RuleMTUMap, slotKey)
	skip := e.newLabel("mtu_rule")
	e.emit(
		asm.JEq.Imm(asm.R0, 0, skip),
		ldx(asm.R1, asm.R0, 0, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		stx(asm.R0, 0, asm.R1, asm.DWord),
	)
	e.label(skip)
	e.emit(sti(asm.R10, slotKey, StatMTUExceeded, asm.Word))
	c.lookup(StatsMap, slotKey)
	e.emit(
		asm.JEq.Imm(asm.R0, 0, ok),
		ldx(asm.R1, asm.R0, 0, asm.DWord),
		asm.Add.Imm(asm.R1, 1),
		stx(asm.R0, 0, asm.R1, asm.DWord),
	)
	e.label(ok)
}

// mtuHelper jumps to ok when bpf_check_mtu(skb, 0, &0, 0, 0) passes.
func (c *compiler) mtuHelper(ok string) {
	c.e.emit(
		sti(asm.R10, slotT4, 0, asm.Word),
		mov(asm.R1, asm.R6),
		movi(asm.R2, 0),
		mov(asm.R3, asm.R10),
		asm.Add.Imm(asm.R3, slotT4),
		movi(asm.R4, 0),
		movi(asm.R5, 0),
		asm.FnCheckMtu.Call(),
		asm.JEq.Imm(asm.R0, 0, ok),
	)
}

// outerHdrLen sets R3 to the length of the outer header at base+off and
// checks it against the transport length in R4: a UDP length field must
// equal it, a TCP data offset must be at least 20 bytes.
func (c *compiler) outerHdrLen(outer grammar.Proto, base asm.Register, off int16, bad string) {
	if outer == grammar.ProtoUDP {
		c.e.emit(
			movi(asm.R3, 8),
			ldx(asm.R1, base, off+4, asm.Half),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.JNE.Reg(asm.R1, asm.R4, bad),
		)
		return
	}
	c.e.emit(
		ldx(asm.R3, base, off+12, asm.Byte),
		asm.RSh.Imm(asm.R3, 4),
		asm.LSh.Imm(asm.R3, 2),
		asm.JLT.Imm(asm.R3, 20, bad),
	)
}

// innerHdrCheck checks the inner header at base+off against the inner
// segment length in R4: a UDP length field must equal it, a TCP header
// must be 20 bytes or more and fit.
func (c *compiler) innerHdrCheck(inner grammar.Proto, base asm.Register, off int16, bad string) {
	if inner == grammar.ProtoUDP {
		c.e.emit(
			ldx(asm.R1, base, off+4, asm.Half),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.JNE.Reg(asm.R1, asm.R4, bad),
		)
		return
	}
	c.e.emit(
		ldx(asm.R1, base, off+12, asm.Byte),
		asm.RSh.Imm(asm.R1, 4),
		asm.LSh.Imm(asm.R1, 2),
		asm.JLT.Imm(asm.R1, 20, bad),
		asm.JGT.Reg(asm.R1, asm.R4, bad),
	)
}

// unfunnel pops the outer header when the inner one is consistent
// (packets without IPv4 options or IPv6 extension headers).
func (c *compiler) unfunnel(fam int, known grammar.Proto, inner grammar.Proto) {
	bad := c.stat(StatUnfunnelInvalid)
	c.guardsNoL4(true, true)
	c.byProto(known, bad, func(outer grammar.Proto) { c.unfunnelFrom(fam, outer, inner) })
}

func (c *compiler) unfunnelFrom(fam int, outer, inner grammar.Proto) {
	e := &c.e
	bad := c.stat(StatUnfunnelInvalid)
	minIn, checkIn := hdrInfo(inner)
	minOut, _ := hdrInfo(outer)
	l4 := c.l3 + int16(ipHdrLen(fam))
	e.comment("unfunnel %s from %s", inner, outer)
	opts, done := e.newLabel("unfunnel_opts"), e.newLabel("unfunnel_done")
	c.optsDispatch(opts)
	e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(l4+minOut)),
		asm.JGT.Reg(asm.R1, asm.R8, bad),
	)
	c.ipLength(fam, asm.R4, int32(minOut+minIn), 0xffff, bad)
	if fam == 4 {
		e.emit(asm.Sub.Imm(asm.R4, 20)) // transport length
	}
	e.emit(mov(asm.R5, asm.R7))
	c.outerHdrLen(outer, asm.R7, l4, bad)
	e.comment("inner %s header consistent", inner)
	e.emit(
		mov(asm.R1, asm.R3),
		asm.Add.Imm(asm.R1, int32(minIn)),
		asm.JGT.Reg(asm.R1, asm.R4, bad),
		asm.Sub.Reg(asm.R4, asm.R3),
		asm.Add.Reg(asm.R5, asm.R3),
		mov(asm.R1, asm.R5),
		asm.Add.Imm(asm.R1, int32(l4+minIn)),
		asm.JGT.Reg(asm.R1, asm.R8, bad),
	)
	c.innerHdrCheck(inner, asm.R5, l4, bad)
	e.comment("pop the outer header")
	e.emit(
		stx(asm.R10, slotT2, asm.R3, asm.DWord),
		movi(asm.R2, 0),
		asm.Sub.Reg(asm.R2, asm.R3),
		mov(asm.R1, asm.R6),
		movi(asm.R3, 0), // BPF_ADJ_ROOM_NET
		movi(asm.R4, 0),
		asm.FnSkbAdjustRoom.Call(),
		asm.JNE.Imm(asm.R0, 0, c.stat(StatHelperFailed)),
	)
	c.reload()
	e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(l4+checkIn+2)),
		asm.JGT.Reg(asm.R1, asm.R8, c.exit("pass")),
	)
	c.ipHeader(fam, -1, outer.Number(), inner.Number(), false)
	e.comment("inner checksum gets the addresses back (last: it may move the packet)")
	c.addrSumRaw(fam, asm.R4)
	c.pseudoCsum(l4+checkIn, inner == grammar.ProtoUDP)
	e.emit(asm.Ja.Label(done))
	e.label(opts)
	c.unfunnelOpts(fam, outer, inner)
	e.label(done)
}

// rewrite turns TCP into UDP (to == udp) or back, in place, following
// draft-cheshire-tcp-over-udp as multipath-tcp/tcp-in-udp lays it out:
//
//	TCP: ports | seq | ack | doff,flags,window | check,urg | options
//	UDP: ports | len,check | doff,flags(URG=0),window | seq | ack | options
func (c *compiler) rewrite(fam int, to grammar.Proto) {
	e := &c.e
	notApp := c.stat(StatNotApplicable)
	c.guards(false, false)
	c.ipBound(fam, notApp)
	e.emit(
		asm.JGT.Imm(asm.R9, 0xffff, notApp),
		mov(asm.R5, asm.R7),
		asm.Add.Reg(asm.R5, asm.R9),
		mov(asm.R1, asm.R5),
		asm.Add.Imm(asm.R1, 20),
		asm.JGT.Reg(asm.R1, asm.R8, notApp),
	)
	c.l4Len(fam, asm.R4, notApp)
	e.emit(asm.JLT.Imm(asm.R4, 20, notApp))
	// probe is the field used to tell a CHECKSUM_PARTIAL skb: it is
	// overwritten by the rewrite anyway.
	probe := int16(18)
	if to == grammar.ProtoUDP {
		e.emit(
			ldx(asm.R1, asm.R5, 12, asm.Byte),
			asm.RSh.Imm(asm.R1, 4),
			asm.LSh.Imm(asm.R1, 2),
			asm.JLT.Imm(asm.R1, 20, notApp),
			asm.JGT.Reg(asm.R1, asm.R4, notApp),
		)
	} else {
		probe = 4
		e.emit(
			ldx(asm.R1, asm.R5, 4, asm.Half),
			asm.HostTo(asm.BE, asm.R1, asm.Half),
			asm.JNE.Reg(asm.R1, asm.R4, notApp),
			ldx(asm.R1, asm.R5, 8, asm.Byte),
			asm.RSh.Imm(asm.R1, 4),
			asm.LSh.Imm(asm.R1, 2),
			asm.JLT.Imm(asm.R1, 20, notApp),
			asm.JGT.Reg(asm.R1, asm.R4, notApp),
			ldx(asm.R1, asm.R5, 6, asm.Half),
			asm.JEq.Imm(asm.R1, 0, c.stat(StatNoChecksum)),
		)
	}
	full := e.newLabel("csum_complete")
	e.emit(
		stx(asm.R10, slotT1, asm.R4, asm.DWord),
		ldx(asm.R1, asm.R5, probe, asm.Half),
		stx(asm.R10, slotT2, asm.R1, asm.DWord),
	)
	if c.kern.ok {
		e.comment("CHECKSUM_PARTIAL: the finaliser would write into the moved fields")
		c.ipSummed(asm.R3)
		e.emit(asm.JEq.Imm(asm.R3, checksumPartial, c.stat(StatPartialChecksum)))
	} else {
		e.comment("CHECKSUM_PARTIAL probe: l4_csum_replace without pseudo flag changes only complete checksums")
		e.emit(
			sti(asm.R5, probe, 0, asm.Half),
			mov(asm.R1, asm.R6),
			mov(asm.R2, asm.R9),
			asm.Add.Imm(asm.R2, int32(probe)),
			movi(asm.R3, 0),
			movi(asm.R4, 1),
			movi(asm.R5, 2),
			asm.FnL4CsumReplace.Call(),
		)
		c.reload()
		c.ipBound(fam, c.exit("pass"))
	}
	e.emit(
		mov(asm.R5, asm.R7),
		asm.Add.Reg(asm.R5, asm.R9),
		mov(asm.R1, asm.R5),
		asm.Add.Imm(asm.R1, 20),
		asm.JGT.Reg(asm.R1, asm.R8, c.exit("pass")),
	)
	if !c.kern.ok {
		e.emit(
			ldx(asm.R1, asm.R5, probe, asm.Half),
			asm.JNE.Imm(asm.R1, 0, full),
			ldx(asm.R1, asm.R10, slotT2, asm.DWord),
			stx(asm.R5, probe, asm.R1, asm.Half),
			asm.Ja.Label(c.stat(StatPartialChecksum)),
		)
	}
	e.label(full)
	if to == grammar.ProtoUDP {
		e.comment("TCP -> UDP")
		e.emit(
			ldx(asm.R0, asm.R5, 16, asm.Half),
			asm.Xor.Imm(asm.R0, 0xffff),
			asm.Add.Imm(asm.R0, int32(n16(17-6))),
			ldx(asm.R1, asm.R10, slotT2, asm.DWord), // urgent pointer
			asm.Xor.Imm(asm.R1, 0xffff),
			asm.Add.Reg(asm.R0, asm.R1),
			ldx(asm.R2, asm.R10, slotT1, asm.DWord),
			asm.HostTo(asm.BE, asm.R2, asm.Half),
			asm.Add.Reg(asm.R0, asm.R2),
			ldx(asm.R3, asm.R5, 12, asm.Word),
			mov(asm.R1, asm.R3),
			asm.And.Imm(asm.R1, 0xffff),
			asm.Xor.Imm(asm.R1, 0xffff),
			asm.Add.Reg(asm.R0, asm.R1),
			asm.And.Imm32(asm.R3, ^int32(uint32(grammar.TCPUrg)<<8)),
			mov(asm.R1, asm.R3),
			asm.And.Imm(asm.R1, 0xffff),
			asm.Add.Reg(asm.R0, asm.R1),
		)
		c.fold(asm.R0, asm.R1)
		nz := e.newLabel("nonzero")
		e.emit(
			asm.Xor.Imm(asm.R0, 0xffff),
			asm.JNE.Imm(asm.R0, 0, nz),
			movi(asm.R0, 0xffff),
		)
		e.label(nz)
		e.emit(
			ldx(asm.R1, asm.R5, 4, asm.Word),
			ldx(asm.R4, asm.R5, 8, asm.Word),
			stx(asm.R5, 4, asm.R2, asm.Half),
			stx(asm.R5, 6, asm.R0, asm.Half),
			stx(asm.R5, 8, asm.R3, asm.Word),
			stx(asm.R5, 12, asm.R1, asm.Word),
			stx(asm.R5, 16, asm.R4, asm.Word),
		)
	} else {
		e.comment("UDP -> TCP")
		e.emit(
			ldx(asm.R0, asm.R5, 6, asm.Half),
			asm.Xor.Imm(asm.R0, 0xffff),
			asm.Add.Imm(asm.R0, int32(n16(17-6)^0xffff)),
			ldx(asm.R1, asm.R10, slotT2, asm.DWord), // length field
			asm.Xor.Imm(asm.R1, 0xffff),
			asm.Add.Reg(asm.R0, asm.R1),
		)
		c.fold(asm.R0, asm.R1)
		e.emit(
			asm.Xor.Imm(asm.R0, 0xffff),
			ldx(asm.R1, asm.R5, 8, asm.Word),
			ldx(asm.R2, asm.R5, 12, asm.Word),
			ldx(asm.R3, asm.R5, 16, asm.Word),
			stx(asm.R5, 4, asm.R2, asm.Word),
			stx(asm.R5, 8, asm.R3, asm.Word),
			stx(asm.R5, 12, asm.R1, asm.Word),
			stx(asm.R5, 16, asm.R0, asm.Half),
			sti(asm.R5, 18, 0, asm.Half),
		)
	}
	c.ipProto(fam, to.Number())
	if c.opts.Hook == grammar.HookIngress {
		// CHECKSUM_COMPLETE: the segment's sum moves opposite to its
		// pseudo-header protocol; IPv6's next-header byte (a low byte) too.
		seg := int64(n16(17 - 6)) // TCP -> UDP: the segment loses this
		nh := int64(17 - 6)
		d := 0xffff - seg
		if to == grammar.ProtoTCP {
			d, nh = seg, 0xffff-nh
		}
		if fam == 6 {
			d = (d + nh) % 0xffff
		}
		c.whenComplete(func() {
			e.emit(movi(asm.R2, int32(d)))
			c.csumUpdate()
		})
	}
}

// dnat rewrites the destination address (and port) with checksum updates.
func (c *compiler) dnat(r *grammar.Rule, a *grammar.Action) {
	e := &c.e
	fam := 4
	if !a.DNATAddr.Is4() {
		fam = 6
	}
	notApp := c.stat(StatNotApplicable)
	if r.Family == grammar.FamilyAny {
		e.emit(ldx(asm.R1, asm.R10, slotFam, asm.DWord), asm.JNE.Imm(asm.R1, int32(fam), notApp))
	}
	l3 := c.l3
	c.guards(true, false)
	c.ipBound(fam, notApp)
	c.transport(notApp)
	addr := a.DNATAddr.AsSlice()
	var newSum uint64
	for w := 0; w < len(addr); w += 4 {
		newSum += uint64(uint32(addr[w]) | uint32(addr[w+1])<<8 | uint32(addr[w+2])<<16 | uint32(addr[w+3])<<24)
	}
	daddr := l3 + 16
	if fam == 6 {
		daddr = l3 + 24
	}
	e.comment("address difference")
	e.emit(ldx(asm.R4, asm.R7, daddr, asm.Word))
	for w := int16(1); w < int16(len(addr)/4); w++ {
		e.emit(ldx(asm.R1, asm.R7, daddr+4*w, asm.Word), asm.Add.Reg(asm.R4, asm.R1))
	}
	c.fold(asm.R4, asm.R1)
	e.emit(
		asm.Xor.Imm(asm.R4, 0xffff),
		asm.Add.Imm(asm.R4, int32(fold16(newSum))),
	)
	c.fold(asm.R4, asm.R1)
	e.emit(stx(asm.R10, slotT3, asm.R4, asm.DWord))
	c.l4CsumDiff(0, fPseudoHdr)
	if a.DNATPort != 0 {
		e.comment("port")
		c.reload()
		e.emit(
			mov(asm.R5, asm.R7),
			asm.Add.Reg(asm.R5, asm.R9),
			mov(asm.R1, asm.R5),
			asm.Add.Imm(asm.R1, 4),
			asm.JGT.Reg(asm.R1, asm.R8, c.exit("pass")),
			ldx(asm.R3, asm.R5, 2, asm.Half),
			movi(asm.R4, int32(n16(a.DNATPort))),
		)
		udp := e.newLabel("csum_udp")
		e.emit(
			ldx(asm.R2, asm.R10, slotT4, asm.DWord),
			asm.Add.Reg(asm.R2, asm.R9),
			movi(asm.R5, 2),
			ldx(asm.R1, asm.R10, slotT2, asm.DWord),
			asm.JNE.Imm(asm.R1, 17, udp),
			asm.Or.Imm(asm.R5, fMarkMangled0),
		)
		e.label(udp)
		e.emit(mov(asm.R1, asm.R6), asm.FnL4CsumReplace.Call())
	}
	c.reload()
	c.ipBound(fam, c.exit("pass"))
	e.emit(
		mov(asm.R5, asm.R7),
		asm.Add.Reg(asm.R5, asm.R9),
		mov(asm.R1, asm.R5),
		asm.Add.Imm(asm.R1, 4),
		asm.JGT.Reg(asm.R1, asm.R8, c.exit("pass")),
	)
	for w := 0; w < len(addr); w += 4 {
		v := uint32(addr[w]) | uint32(addr[w+1])<<8 | uint32(addr[w+2])<<16 | uint32(addr[w+3])<<24
		e.emit(sti(asm.R7, daddr+int16(w), int64(int32(v)), asm.Word))
	}
	if a.DNATPort != 0 {
		e.emit(sti(asm.R5, 2, int64(n16(a.DNATPort)), asm.Half))
	}
	if fam == 4 {
		e.emit(
			ldx(asm.R0, asm.R7, l3+10, asm.Half),
			asm.Xor.Imm(asm.R0, 0xffff),
			ldx(asm.R1, asm.R10, slotT3, asm.DWord),
			asm.Add.Reg(asm.R0, asm.R1),
		)
		c.fold(asm.R0, asm.R1)
		e.emit(asm.Xor.Imm(asm.R0, 0xffff), stx(asm.R7, l3+10, asm.R0, asm.Half))
	} else if c.opts.Hook == grammar.HookIngress {
		// CHECKSUM_COMPLETE: the destination address is covered by skb->csum.
		c.whenComplete(func() {
			e.emit(ldx(asm.R2, asm.R10, slotT3, asm.DWord))
			c.csumUpdate()
		})
	}
}

// fold16 folds a ones' complement sum at compile time.
func fold16(v uint64) uint16 {
	for v > 0xffff {
		v = v&0xffff + v>>16
	}
	return uint16(v)
}
