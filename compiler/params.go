// Action parameters as data: bodies shared by what they do, not by the
// values they write.

package compiler

import (
	"encoding/binary"
	"net/netip"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// Every distinct action list used to be code of its own, and the verifier
// walks each body once per way the segments reach it: a few hundred funnel
// headers or dnat addresses in one hook were enough to exceed its budget.
// A hook with more than maxConstBodies distinct bodies therefore gets
// parametric bodies (c.params): a body is shared by the rules of one
// *kind* (bodyKind: the actions and the protocols they depend on, and
// whether the rule traces), and reads the rest from the rule's entry in
// the parameter map — funnel ports, flags, seq, ack, window and mss, the
// dnat address and port, the meta and ct mark set, whether the rule
// counts.
// The entry is indexed by the rule's counter slot (slotRule, which every
// placement sets before a shared body runs) and the live table generation
// (slotGen): a commit writes the spare generation and flips, as for the
// rule tables. Checksum constants that depend on the values are summed in
// Go and stored with them, so a parametric body does the same arithmetic
// as a constant one, with loads where it had immediates; which funnel
// ports a rule gives and whether dnat changes the port are masks.
//
// Hooks with few bodies keep the immediates (constant-folded code is a
// little shorter per packet, and small hooks are where that shows); so
// do rules compiled one by one (their code is theirs alone) and the fast
// matcher.

// maxConstBodies: hooks with more distinct bodies get parametric ones.
const maxConstBodies = 16

// paramsMap is the parameter map (abi.ActionParams): ARRAY, key
// slot<<1 | generation, value ParamsSize bytes.
const paramsMap = abi.ActionParams

// ParamsSize is the size of a parameter entry.
const ParamsSize = 64

// Parameter entry layout. Packet fields are stored as they are written
// into the packet (network order); sums as native u16.
const (
	parPresent  = 0  // u32 1: the slot holds parameters (0: none)
	parDNATAddr = 4  // 4 or 16 bytes: the dnat address
	parDNATPort = 20 // u16: the dnat port
	parDNATSum  = 22 // u16: the address words' ones' complement sum, folded
	parFunPorts = 24 // u16 sport, u16 dport: the funnel header's ports the rule gives (0 where not)
	parFunSeq   = 28 // u32 (TCP funnel)
	parFunAck   = 32 // u32
	parFunW12   = 36 // data offset, flags, window: bytes 12-15 of a TCP header
	parFunSum   = 40 // u16: parFunSeq..parFunW12 summed, folded
	parMSS      = 42 // u16 host order: `mss N`
	parFunKeep  = 44 // u32: the inner ports word's bits the funnel header keeps (ports not given)
	parMarkKeep = 48 // u32: meta mark set, then ct mark set: mark = mark & keep | value
	parMarkVal  = 52
	parDNATKeep = 56 // u16: 0xffff when dnat keeps the port
	parFlags    = 60 // u32 par* bits
)

// parFlags bits.
const (
	parCount = 1 << iota // counter
)

// ParamsKey is the parameter map's key of counter slot slot in
// generation gen.
func ParamsKey(slot, gen uint32) []byte {
	return binary.NativeEndian.AppendUint32(nil, slot<<1|gen&1)
}

// chooseBodies decides whether the hook's bodies are parametric (more than
// maxConstBodies distinct body keys), and then makes each rule's body key
// its kind.
func (c *compiler) chooseBodies(rules []*grammar.Rule) {
	distinct := map[string]bool{}
	for _, k := range c.bodyKeys {
		distinct[k] = true
		if len(distinct) > maxConstBodies {
			c.params = true
			break
		}
	}
	if !c.params {
		return
	}
	memo := map[string]string{}
	for i, r := range rules {
		full := c.bodyKeys[i]
		k, ok := memo[full]
		if !ok {
			k = bodyKind(r)
			memo[full] = k
		}
		c.bodyKeys[i] = k
	}
}

// bodyKeyOf is rule r's body key in this hook: rules with the same key
// share one body.
func (c *compiler) bodyKeyOf(r *grammar.Rule) string {
	if c.params {
		return bodyKind(r)
	}
	return bodyKey(r)
}

// kindPrefix starts a kind key: bodyRule emits such a body from kindRule.
const kindPrefix = "kind: "

// bodyKind is the body key of a parametric hook.
func bodyKind(r *grammar.Rule) string { return kindPrefix + bodyKey(kindRule(r)) }

// kindRule is rule r with what a parametric body reads from the parameter
// map blanked: what stays is what its code depends on — the actions with
// their protocols, the dnat address family, whether mss is given or off,
// the rule's protocol where an action depends on it (funnel, unfunnel and
// rewrite act on it), and whether it traces (a trace id costs a branch the
// verifier would walk in every body). The family goes too: the body is emitted for
// either family, and a packet of the rule's family runs it the same way.
func kindRule(r *grammar.Rule) *grammar.Rule {
	b := *r
	b.Family, b.Counter, b.SetMetaMark, b.SetCtMark = grammar.FamilyAny, false, nil, nil
	protoMatters := false
	b.Actions = make([]*grammar.Action, len(r.Actions))
	for j, a := range r.Actions {
		k := *a
		k.Span = grammar.Span{}
		switch a.Kind {
		case grammar.ActFunnel:
			k.Funnel = &grammar.FunnelHeader{
				HasMSS: a.Funnel.HasMSS, MSSOff: a.Funnel.MSSOff,
				Flags: grammar.DefaultFunnelFlags, Seq: grammar.DefaultFunnelSeq, Ack: grammar.DefaultFunnelAck, Window: grammar.DefaultFunnelWindow,
			}
			if a.Funnel.HasMSS {
				k.Funnel.MSS = grammar.MinFunnelMSS
			}
			protoMatters = true
		case grammar.ActUnfunnel, grammar.ActRewrite:
			protoMatters = true
		case grammar.ActDNAT:
			k.DNATAddr, k.DNATPort = netip.IPv4Unspecified(), 0
			if !a.DNATAddr.Is4() {
				k.DNATAddr = netip.IPv6Unspecified()
			}
		}
		b.Actions[j] = &k
	}
	if !protoMatters {
		b.Proto = grammar.ProtoAny
	}
	return &b
}

// paramsOf returns rule r's parameter entry.
func (c *compiler) paramsOf(r *grammar.Rule) ([]byte, error) {
	v := make([]byte, ParamsSize)
	ne := binary.NativeEndian
	ne.PutUint32(v[parPresent:], 1)
	for _, a := range r.Actions {
		switch a.Kind {
		case grammar.ActDNAT:
			addr := a.DNATAddr.AsSlice()
			copy(v[parDNATAddr:], addr)
			ne.PutUint16(v[parDNATSum:], fold16(wordSum(addr)))
			binary.BigEndian.PutUint16(v[parDNATPort:], a.DNATPort)
			if a.DNATPort == 0 {
				ne.PutUint16(v[parDNATKeep:], 0xffff)
			}
		case grammar.ActFunnel:
			f := a.Funnel
			for j, p := range []struct {
				has  bool
				port uint16
			}{{f.HasSport, f.Sport}, {f.HasDport, f.Dport}} {
				if p.has {
					binary.BigEndian.PutUint16(v[parFunPorts+2*j:], p.port)
				} else {
					ne.PutUint16(v[parFunKeep+2*j:], 0xffff)
				}
			}
			if a.Proto == grammar.ProtoTCP {
				binary.BigEndian.PutUint32(v[parFunSeq:], f.Seq)
				binary.BigEndian.PutUint32(v[parFunAck:], f.Ack)
				v[parFunW12], v[parFunW12+1] = 0x50, f.Flags
				binary.BigEndian.PutUint16(v[parFunW12+2:], f.Window)
				ne.PutUint16(v[parFunSum:], fold16(wordSum(v[parFunSeq:parFunW12+4])))
			}
			ne.PutUint16(v[parMSS:], f.MSS)
		}
	}
	// mark = (mark & k1 | v1) & k2 | v2 = mark & (k1 & k2) | (v1 & k2 | v2)
	keep, val := ^uint32(0), uint32(0)
	if s := r.SetMetaMark; s != nil {
		keep, val = ^s.Mask, s.Value&s.Mask
	}
	if s := r.SetCtMark; s != nil {
		mask, value, err := c.ct.SetBits(s)
		if err != nil {
			return nil, &Error{Span: s.Span, Msg: err.Error()}
		}
		keep, val = keep&^mask, val&^mask|value
	}
	ne.PutUint32(v[parMarkKeep:], keep)
	ne.PutUint32(v[parMarkVal:], val)
	var flags uint32
	if r.Counter {
		flags |= parCount
	}
	ne.PutUint32(v[parFlags:], flags)
	return v, nil
}

// wordSum adds b's native 32-bit words (len(b) a multiple of 4).
func wordSum(b []byte) uint64 {
	var s uint64
	for w := 0; w+4 <= len(b); w += 4 {
		s += uint64(binary.NativeEndian.Uint32(b[w:]))
	}
	return s
}

// parametric reports whether the body being emitted reads its values from
// the parameter map.
func (c *compiler) parametric() bool { return c.params && c.dynRule && !c.fast }

// loadParams looks up the parameters of the rule whose body runs (its
// slot in slotRule, the generation in slotGen) and keeps the value's
// address in slotParam.
func (c *compiler) loadParams() {
	e := &c.e
	e.comment("the rule's parameters: entry slot<<1 | generation")
	e.emit(
		ldx(asm.R1, asm.R10, slotRule, asm.DWord),
		asm.LSh.Imm(asm.R1, 1),
		ldx(asm.R2, asm.R10, slotGen, asm.DWord),
		asm.Or.Reg(asm.R1, asm.R2),
		stx(asm.R10, slotKey, asm.R1, asm.Word),
	)
	c.lookup(paramsMap, slotKey)
	e.emit(
		asm.JEq.Imm(asm.R0, 0, c.exit("next")), // never: the slot is below max_entries
		stx(asm.R10, slotParam, asm.R0, asm.DWord),
	)
}

// markSetParams does the rule's meta and ct mark set: mark = mark & keep |
// value.
func (c *compiler) markSetParams() {
	e := &c.e
	e.comment("meta / ct mark set")
	e.emit(ldx(asm.R1, asm.R6, skbMark, asm.Word))
	c.param(asm.R2, parMarkKeep, asm.Word)
	e.emit(asm.And.Reg(asm.R1, asm.R2))
	c.param(asm.R2, parMarkVal, asm.Word)
	e.emit(asm.Or.Reg(asm.R1, asm.R2), stx(asm.R6, skbMark, asm.R1, asm.Word))
}

// param loads the parameter at off into dst (only dst is written).
func (c *compiler) param(dst asm.Register, off int16, size asm.Size) {
	c.e.emit(ldx(dst, asm.R10, slotParam, asm.DWord), ldx(dst, dst, off, size))
}

// paramsContents is generation gen's entries of the parameter map: one
// per rule.
func (c *compiler) paramsContents(gen uint32) []ebpf.MapKV {
	var out []ebpf.MapKV
	for i, v := range c.paramVals {
		if v != nil {
			out = append(out, ebpf.MapKV{Key: ParamsKey(c.slot(i), gen), Value: v})
		}
	}
	return out
}

// paramsMaps computes every rule's parameters and adds the map (slots:
// the counters map's capacity).
func (c *compiler) paramsMaps(rules []*grammar.Rule, slots uint32) error {
	if !c.params {
		return nil
	}
	c.paramVals = make([][]byte, len(rules)) // every rule: its body may be parametric
	for i, r := range rules {
		v, err := c.paramsOf(r)
		if err != nil {
			return err
		}
		c.paramVals[i] = v
	}
	if c.extraTables == nil {
		c.extraTables = map[string]func(gen uint32) []ebpf.MapKV{}
	}
	c.extraTables[paramsMap] = c.paramsContents
	c.spec.Maps[paramsMap] = &ebpf.MapSpec{
		Name: paramsMap, Type: ebpf.Array, KeySize: 4, ValueSize: ParamsSize, MaxEntries: 2 * slots,
		Contents: c.paramsContents(0),
	}
	return nil
}
