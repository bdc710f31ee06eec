package refmodel

import (
	"net/netip"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// Run evaluates the rules on one packet. The input is not modified.
func (m *Model) Run(in Input) Result {
	st := &state{m: m, p: append([]byte(nil), in.Packet...), in: in, res: Result{Verdict: abi.VerdictNext, Mark: in.Mark, Counters: map[int]abi.Counter{}, Rule: -1}}
	st.l3 = 14
	if m.opts.L3 {
		st.l3 = 0
	}
	s, ok := m.parse(st.p)
	if ok {
		st.s = s
		st.run()
	}
	st.res.Packet = st.p
	return st.res
}

type state struct {
	m   *Model
	p   []byte
	in  Input
	s   parsed
	l3  int
	res Result
}

func (st *state) run() {
	for i, r := range st.m.rules {
		if !st.matches(r) {
			continue
		}
		if r.Counter {
			c := st.res.Counters[i]
			c.Packets++
			c.Bytes += uint64(len(st.p))
			st.res.Counters[i] = c
		}
		if s := r.SetMetaMark; s != nil {
			st.res.Mark = st.res.Mark&^s.Mask | s.Value&s.Mask
		}
		if s := r.SetCtMark; s != nil {
			if mask, value, ok := st.m.ct.setBits(s); ok {
				st.res.Mark = st.res.Mark&^mask | value
			}
		}
		if len(r.Actions) == 0 {
			continue
		}
		st.res.Verdict = abi.VerdictPass
		st.res.Rule = i
		for _, a := range r.Actions {
			var stat int
			switch a.Kind {
			case grammar.ActAccept:
				return
			case grammar.ActDrop:
				st.res.Verdict = abi.VerdictDrop
				return
			case grammar.ActFunnel:
				stat = st.funnel(a)
			case grammar.ActUnfunnel:
				stat = st.unfunnel(a.Proto)
			case grammar.ActRewrite:
				stat = st.rewrite(a.Proto)
			case grammar.ActDNAT:
				stat = st.dnat(r, a)
			}
			if stat >= 0 {
				st.res.Stats[stat]++
				// Left alone: the rule's counter counts what it transformed.
				if r.Counter {
					c := st.res.Counters[i]
					c.Packets--
					c.Bytes -= uint64(len(st.p))
					st.res.Counters[i] = c
				}
				return
			}
		}
		return
	}
}

func (st *state) matches(r *grammar.Rule) bool {
	s := &st.s
	switch r.Family {
	case grammar.FamilyIPv4:
		if s.fam != 4 {
			return false
		}
	case grammar.FamilyIPv6:
		if s.fam != 6 {
			return false
		}
	}
	if r.Proto != grammar.ProtoAny && s.proto != uint32(r.Proto.Number()) {
		return false
	}
	if r.Dport != nil && !st.portMatch(r.Dport, s.dport) {
		return false
	}
	if r.Sport != nil && !st.portMatch(r.Sport, s.sport) {
		return false
	}
	if f := r.TCPFlags; f != nil {
		if s.flags > 0xff || !f.Test(uint8(s.flags)) {
			return false
		}
	}
	if mm := r.MetaMark; mm != nil {
		if (st.res.Mark&mm.Mask == mm.Value&mm.Mask) == mm.Neg {
			return false
		}
	}
	if mm := r.CtMark; mm != nil {
		mask, value, ok := st.m.ct.matchBits(mm)
		if !ok || (st.res.Mark&mask == value) == mm.Neg {
			return false
		}
	}
	if r.Saddr != nil && !st.addrMatch(r.Saddr, s.saddr) {
		return false
	}
	if r.Daddr != nil && !st.addrMatch(r.Daddr, s.daddr) {
		return false
	}
	return true
}

func (st *state) portMatch(m *grammar.PortMatch, port uint32) bool {
	if port > 0xffff {
		return false
	}
	ranges := m.Ranges
	if m.Set != "" {
		ranges = st.m.sets[m.Set].Ports
	}
	in := false
	for _, r := range ranges {
		if port >= uint32(r.Lo) && port <= uint32(r.Hi) {
			in = true
		}
	}
	return in != m.Neg
}

func (st *state) addrMatch(m *grammar.AddrMatch, a netip.Addr) bool {
	prefixes := m.Prefixes
	fam := 4
	if m.Set != "" {
		set := st.m.sets[m.Set]
		prefixes = set.Prefixes
		if set.Type == grammar.SetIPv6Addr {
			fam = 6
		}
	} else if len(prefixes) > 0 && prefixes[0].Addr().Is6() {
		fam = 6
	}
	if st.s.fam != fam {
		return false
	}
	in := false
	for _, p := range prefixes {
		if p.Contains(a) {
			in = true
		}
	}
	return in != m.Neg
}
