package refmodel

import (
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

const applied = -1

func (st *state) ipHdrLen() int {
	if st.s.fam == 6 {
		return 40
	}
	return 20
}

// addrSum is the folded sum of the address wire words.
func (st *state) addrSum() uint32 {
	var acc uint64
	off, n := st.l3+12, 2
	if st.s.fam == 6 {
		off, n = st.l3+8, 8
	}
	for w := 0; w < n; w++ {
		acc += uint64(le32(st.p[off+4*w:]))
	}
	return fold(acc)
}

// l4Len is the transport length the IP header claims.
func (st *state) l4Len() (uint32, bool) {
	hdr := st.l3
	var l uint32
	if st.s.fam == 4 {
		l = be16(st.p[st.l3+2:])
	} else {
		hdr += 40
		l = be16(st.p[st.l3+4:])
	}
	if l > uint32(len(st.p)-hdr) {
		return 0, false
	}
	ext := uint32(st.s.l4off - hdr)
	if l < ext {
		return 0, false
	}
	return l - ext, true
}

// protoInfo returns the minimal header length and check offset of the
// transport protocol.
func (st *state) protoInfo() (min, check int, ok bool) {
	switch st.s.proto {
	case 17:
		return 8, 6, true
	case 6:
		return 20, 16, true
	}
	return 0, 0, false
}

// inBuffer reports whether n bytes of transport header are in the packet.
func (st *state) inBuffer(n int) bool {
	return st.s.l4off <= 0xffff && st.s.l4off+n <= len(st.p)
}

// transport returns the minimal header length and check offset.
func (st *state) transport() (min, check int, ok bool) {
	min, check, ok = st.protoInfo()
	if !ok || !st.inBuffer(min) {
		return 0, 0, false
	}
	return min, check, true
}

// optsTooLong mirrors the limit on moved options (0 when none).
func (st *state) optsTooLong() bool {
	if !st.s.opts {
		return false
	}
	o := st.s.l4off - st.l3 - st.ipHdrLen()
	return o == 0 || o > abi.MaxOptMove
}

// guards mirrors the checks actions start with.
func (st *state) guards(unsafe, gso bool) int {
	if st.s.frag {
		return abi.StatFragment
	}
	if unsafe && st.s.unsafe {
		return abi.StatIPOptions
	}
	if gso && st.in.GSOSize != 0 {
		return abi.StatGSO
	}
	return applied
}

// setIPLen adds delta to the IP length (fixing the IPv4 checksum).
func (st *state) setIPLen(delta int) {
	l3 := st.l3
	if st.s.fam == 6 {
		put16(st.p[l3+4:], swap16(uint32(int(be16(st.p[l3+4:]))+delta)&0xffff))
		return
	}
	old := le16(st.p[l3+2:])
	nw := swap16(uint32(int(swap16(old))+delta) & 0xffff)
	c := fold(uint64(le16(st.p[l3+10:])^0xffff) + uint64(old^0xffff) + uint64(nw))
	put16(st.p[l3+2:], nw)
	put16(st.p[l3+10:], c^0xffff)
}

// setIPProto rewrites the transport protocol number.
func (st *state) setIPProto(proto uint8) {
	l3 := st.l3
	if st.s.fam == 4 {
		old := le16(st.p[l3+8:])
		nw := old&0xff | uint32(proto)<<8
		c := fold(uint64(le16(st.p[l3+10:])^0xffff) + uint64(old^0xffff) + uint64(nw))
		put16(st.p[l3+8:], nw)
		put16(st.p[l3+10:], c^0xffff)
	} else if st.s.nhoff <= 0xffff && st.s.nhoff+1 <= len(st.p) {
		st.p[st.s.nhoff] = proto
	}
	st.s.proto = uint32(proto)
}

func insert(p []byte, at, n int) []byte {
	out := make([]byte, 0, len(p)+n)
	out = append(out, p[:at]...)
	out = append(out, make([]byte, n)...)
	return append(out, p[at:]...)
}

func (st *state) funnel(a *grammar.Action) int {
	f := a.Funnel
	outer := a.Proto.Number()
	h, checkOut := 8, 6
	if a.Proto == grammar.ProtoTCP {
		h, checkOut = 20, 16
	}
	if s := st.guards(true, true); s != applied {
		return s
	}
	min, checkIn, ok := st.protoInfo()
	if !ok {
		return abi.StatNotApplicable
	}
	if st.s.proto == 6 {
		st.mssClamp(f, h)
	}
	if st.optsTooLong() {
		return abi.StatIPOptions
	}
	if !st.inBuffer(min) {
		return abi.StatNotApplicable
	}
	l, ok := st.l4Len()
	if !ok || l < uint32(min) {
		return abi.StatNotApplicable
	}
	ipHdr := uint32(st.s.l4off - st.l3) // IPv4: the IP length counts the header
	if st.s.fam == 6 {
		ipHdr -= 40
	}
	if l+ipHdr+uint32(h) > 0xffff {
		return abi.StatNotApplicable
	}
	inner := st.s.proto
	if inner == 17 && be16(st.p[st.s.l4off+4:]) != l {
		return abi.StatUDPLength
	}
	if inner == 17 && le16(st.p[st.s.l4off+6:]) == 0 {
		return abi.StatNoChecksum
	}
	// The header goes between the options and the transport header (the
	// datapath grows after the fixed header and moves the options).
	st.p = insert(st.p, st.s.l4off, h)
	l4 := st.s.l4off
	sum := st.addrSum()
	l4CsumReplace(st.p[l4+h+checkIn:], 0, sum^0xffff, 0, inner == 17)

	hdr := st.p[l4 : l4+h]
	ports := le32(st.p[l4+h:])
	put32(hdr, ports)
	if f.HasSport {
		put16(hdr[0:], swap16(uint32(f.Sport)))
	}
	if f.HasDport {
		put16(hdr[2:], swap16(uint32(f.Dport)))
	}
	hdrConst := uint64(outer) << 8
	if a.Proto == grammar.ProtoTCP {
		w12 := 0x50 | uint32(f.Flags)<<8 | swap16(uint32(f.Window))<<16
		seq, ack := bswap32(f.Seq), bswap32(f.Ack)
		put32(hdr[4:], seq)
		put32(hdr[8:], ack)
		put32(hdr[12:], w12)
		put32(hdr[16:], 0)
		hdrConst += uint64(seq) + uint64(ack) + uint64(w12)
	}
	lenw := swap16((l + uint32(h)) & 0xffff)
	if a.Proto == grammar.ProtoUDP {
		put16(hdr[4:], lenw)
		put16(hdr[6:], 0)
	}
	acc := uint64(sum) + uint64(lenw)
	if a.Proto == grammar.ProtoUDP {
		acc += uint64(lenw)
	}
	acc += uint64(fold(hdrConst)) + uint64(le32(hdr))
	acc += uint64(fold(uint64(swap16(l)+inner<<8)) ^ 0xffff)
	c := fold(acc) ^ 0xffff
	if a.Proto == grammar.ProtoUDP && c == 0 {
		c = 0xffff
	}
	put16(hdr[checkOut:], c)
	st.setIPLen(h)
	st.setIPProto(outer)
	return applied
}

func bswap32(v uint32) uint32 {
	return v>>24 | (v>>8)&0xff00 | (v<<8)&0xff0000 | v<<24
}

func (st *state) unfunnel(innerProto grammar.Proto) int {
	bad := abi.StatUnfunnelInvalid
	minIn, checkIn := 8, 6
	if innerProto == grammar.ProtoTCP {
		minIn, checkIn = 20, 16
	}
	if s := st.guards(true, true); s != applied {
		return s
	}
	minOut, _, ok := st.protoInfo()
	if !ok {
		return bad
	}
	if st.optsTooLong() {
		return abi.StatIPOptions
	}
	if !st.inBuffer(minOut) {
		return bad
	}
	l, ok := st.l4Len()
	if !ok {
		return bad
	}
	l4 := st.s.l4off
	var h uint32
	if st.s.proto == 17 {
		h = 8
		if be16(st.p[l4+4:]) != l {
			return bad
		}
	} else {
		h = uint32(st.p[l4+12]>>4) * 4
		if h < 20 {
			return bad
		}
	}
	if h+uint32(minIn) > l {
		return bad
	}
	r := l - h
	in := l4 + int(h)
	if in+minIn > len(st.p) {
		return bad
	}
	if innerProto == grammar.ProtoUDP {
		if be16(st.p[in+4:]) != r {
			return bad
		}
	} else {
		d := uint32(st.p[in+12]>>4) * 4
		if d < 20 || d > r {
			return bad
		}
	}
	st.p = append(st.p[:l4:l4], st.p[l4+int(h):]...)
	l4CsumReplace(st.p[l4+checkIn:], 0, st.addrSum(), 0, innerProto == grammar.ProtoUDP)
	st.setIPLen(-int(h))
	st.setIPProto(innerProto.Number())
	return applied
}

func (st *state) rewrite(to grammar.Proto) int {
	notApp := abi.StatNotApplicable
	if s := st.guards(false, true); s != applied {
		return s
	}
	l4 := st.s.l4off
	if l4 > 0xffff || l4+20 > len(st.p) {
		return notApp
	}
	l, ok := st.l4Len()
	if !ok || l < 20 {
		return notApp
	}
	p := st.p[l4:]
	probe := 18
	if to == grammar.ProtoUDP {
		if d := uint32(p[12]>>4) * 4; d < 20 || d > l {
			return notApp
		}
		if p[13]&grammar.TCPUrg != 0 {
			return abi.StatUrgent
		}
	} else {
		probe = 4
		if be16(p[4:]) != l {
			return notApp
		}
		if d := uint32(p[8]>>4) * 4; d < 20 || d > l {
			return notApp
		}
		if le16(p[6:]) == 0 {
			return abi.StatNoChecksum
		}
	}
	if st.in.Partial {
		return abi.StatPartialChecksum
	}
	saved := le16(p[probe:])
	if to == grammar.ProtoUDP {
		urg := saved
		lenw := swap16(l)
		w12 := le32(p[12:])
		w12n := w12 &^ (uint32(grammar.TCPUrg) << 8)
		acc := uint64(le16(p[16:])^0xffff) + uint64(swap16(17-6)) + uint64(urg^0xffff) + uint64(lenw) +
			uint64(w12&0xffff^0xffff) + uint64(w12n&0xffff)
		c := fold(acc) ^ 0xffff
		if c == 0 {
			c = 0xffff
		}
		seq, ack := le32(p[4:]), le32(p[8:])
		put16(p[4:], lenw)
		put16(p[6:], c)
		put32(p[8:], w12n)
		put32(p[12:], seq)
		put32(p[16:], ack)
	} else {
		acc := uint64(le16(p[6:])^0xffff) + uint64(swap16(17-6)^0xffff) + uint64(saved^0xffff)
		c := fold(acc) ^ 0xffff
		w, seq, ack := le32(p[8:]), le32(p[12:]), le32(p[16:])
		put32(p[4:], seq)
		put32(p[8:], ack)
		put32(p[12:], w)
		put16(p[16:], c)
		put16(p[18:], 0)
	}
	st.setIPProto(to.Number())
	return applied
}

func (st *state) dnat(r *grammar.Rule, a *grammar.Action) int {
	fam := 4
	if !a.DNATAddr.Is4() {
		fam = 6
	}
	if r.Family == grammar.FamilyAny && st.s.fam != fam {
		return abi.StatNotApplicable
	}
	if s := st.guards(true, false); s != applied {
		return s
	}
	_, check, ok := st.transport()
	if !ok {
		return abi.StatNotApplicable
	}
	udp := st.s.proto == 17
	addr := a.DNATAddr.AsSlice()
	daddr := st.l3 + 16
	if fam == 6 {
		daddr = st.l3 + 24
	}
	var oldSum, newSum uint64
	for w := 0; w < len(addr); w += 4 {
		oldSum += uint64(le32(st.p[daddr+w:]))
		newSum += uint64(le32(addr[w:]))
	}
	d := fold(uint64(fold(oldSum)^0xffff) + uint64(fold(newSum)))
	l4 := st.s.l4off
	l4CsumReplace(st.p[l4+check:], 0, d, 0, udp)
	if a.DNATPort != 0 {
		l4CsumReplace(st.p[l4+check:], le16(st.p[l4+2:]), swap16(uint32(a.DNATPort)), 2, udp)
	}
	copy(st.p[daddr:], addr)
	if a.DNATPort != 0 {
		put16(st.p[l4+2:], swap16(uint32(a.DNATPort)))
	}
	if fam == 4 {
		c := fold(uint64(le16(st.p[st.l3+10:])^0xffff) + uint64(d))
		put16(st.p[st.l3+10:], c^0xffff)
	}
	return applied
}

// mssClamp lowers the MSS option of a TCP SYN about to be funneled behind
// an h-byte header: to the rule's mss, or to the MTU minus the IP header,
// 20 and h. It looks at the first 8 options only, as the datapath does.
func (st *state) mssClamp(f *grammar.FunnelHeader, h int) {
	if f.MSSOff {
		return
	}
	l4 := st.s.l4off
	if l4 > 0xffff || l4+20 > len(st.p) || st.p[l4+13]&grammar.TCPSyn == 0 {
		return
	}
	clamp := int(f.MSS)
	if !f.HasMSS {
		mtu := st.m.opts.MTU
		if mtu == 0 {
			mtu = 65536 // loopback, where BPF_PROG_TEST_RUN runs
		}
		if clamp = mtu - (l4 - st.l3) - 20 - h; clamp < grammar.MinFunnelMSS {
			return
		}
	}
	doff := int(st.p[l4+12]>>4) * 4
	if doff <= 20 {
		return
	}
	cur, end := l4+20, l4+doff
	for i := 0; i < 8; i++ {
		if cur >= end || cur+2 > len(st.p) {
			return
		}
		kind, n := st.p[cur], int(st.p[cur+1])
		switch {
		case kind == 0:
			return
		case kind == 1:
			cur++
			continue
		case kind == 2:
			if n != 4 || cur+4 > len(st.p) {
				return
			}
			if int(st.p[cur+2])<<8|int(st.p[cur+3]) <= clamp {
				return
			}
			from := le16(st.p[cur+2:])
			st.p[cur+2], st.p[cur+3] = byte(clamp>>8), byte(clamp)
			l4CsumReplace(st.p[l4+16:], from, le16(st.p[cur+2:]), 2, false)
			return
		case n < 2:
			return
		}
		cur += n
	}
}
