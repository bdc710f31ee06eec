package compiler

import (
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// __sk_buff field offsets.
const (
	skbLen     = 0
	skbMark    = 8
	skbData    = 76
	skbDataEnd = 80
	skbGSOSize = 176
)

const (
	infoFrag = 1 // IPv4 MF/offset or an IPv6 fragment header
	infoOpts = 2 // IPv4 options or IPv6 extension headers
	// infoUnsafe: an IPv6 routing header (the transport checksum then
	// covers the final destination, not the destination address) or AH
	// (authenticates what funnel and dnat change): not rewritten.
	infoUnsafe = 4

	absentPort  = 0x10000 // port slot value when the transport header is absent
	absentFlags = 0x100

	maxExtHeaders = 4 // IPv6 extension headers walked; more: transport absent
)

// Helper flags.
const (
	fPseudoHdr    = 1 << 4 // BPF_F_PSEUDO_HDR
	fMarkMangled0 = 1 << 5 // BPF_F_MARK_MANGLED_0
)

type compiler struct {
	opts  Options
	ct    CtMark
	sets  map[string]*grammar.Set
	spec  *ebpf.CollectionSpec
	named []string
	anon  int
	// anonByContent: anonymous set maps by a hash of their contents.
	anonByContent map[string]string
	anonSets      anonLists // large anonymous lists (anon.go)
	e             emitter
	l3            int16 // offset of the IP header

	statLabels map[int]string // by stat + NumStats*(rule+1); rule -1 (from slotRule) in table bodies
	curRule    int            // the rule whose body is being emitted
	curCounted bool           // and whether it has a counter
	gen        int            // exit generation (see exit)
	genAt      int            // instructions emitted when readGeneration ended (see there)
	genStoreAt int            // index of readGeneration's mask and store (dropUnreadGeneration)
	dynRule    bool           // emitting a group body: the rule index is in slotRule
	ruleNeeds  ruleNeeds
	kern       kernelSkb // how to read skb->ip_summed (ok false: use helpers)
	fresh      bool      // R7/R8 still hold the parse guard's packet pointers
	infoInR1   bool      // R1 holds the info slot (guardsNoL4 just ran)
	// fast: emitting a body for the fast matcher (fast.go): the packet is
	// IPv4 without options, not a fragment (fast.go: what else holds).
	fast      bool
	fastBound int16        // bytes of packet the fast path proved present
	fastPtrs  bool         // R7/R8 are still the fast path's (no reload since)
	summed    asm.Register // holds skb->ip_summed during an action (readSummed); 0: none
	// lastAction: emitting a body's last action, after which only exits
	// run (they read no parse slots).
	lastAction bool
	genStart   int  // instruction count when the generation started
	segUsed    bool // the current generation jumps to its segment exit
	tracing    bool // some rule has meta nftrace set 1 (trace.go)

	inShape    bool // emitting a shape's residual checks
	firstProbe bool // emitting a segment's first shape lookup: no hit before it
	// knownFam, knownProto: the family (4, 6) and protocol number the
	// packet is known to have where the current shape's checks are
	// emitted (lookups); 0: not known.
	knownFam, knownProto int
	nextShape            uint32              // id of the next shape placed
	tables               map[string][]*shape // shapes by table map
	bodyOf               []uint32            // body of each rule in its segment
	bodyKeys             []string            // bodyKey of each rule
	portArrays           int                 // port-array tables made
	// perfectSize: bytes of a generation of the perfect-hash tables;
	// perfectBlob: its value, built once the bodies are known.
	perfectSize   int
	perfectBlob   []byte
	perfectShapes int // shapes with perfect-hash tables (not port-indexed)
	// extraTables: maps of another path (emitLinear) whose contents are
	// per generation like the rule tables': listed in Program.Tables, their
	// contents from TableContents. Their MapSpecs are added by that path.
	extraTables map[string]func(gen uint32) []ebpf.MapKV
	segs        []segment // the classifier's segments (Layout)
	// ruleStats, usesRuleMTU: some rule counts left-alone packets / MTU
	// overruns in its slot (the per-rule parts of the maps are needed).
	ruleStats, usesRuleMTU bool
	rules                  []*grammar.Rule

	lin    *linearTable // the record scan's map (linear.go)
	over   *overBudget  // rules past the code budget (shapescan.go)
	fxDone bool         // emitting a body whose counter and mark set the scan did
	pool   []int        // rules whose bodies are shared by the segments (linscan.go)
	poolOf map[string]string

	// params: bodies read their values from the parameter map (params.go);
	// paramVals: each rule's entry (nil: none).
	params    bool
	paramVals [][]byte
	// paramCounted: emitting a parametric body, whose counter flag is in
	// its parameters (stat exits read it there).
	paramCounted  bool
	usesMSS       bool // some funnel calls mss_clamp (mss.go)
	usesTraceFunc bool // some rule or exit calls trace_record (trace.go)
	usesPrefilter bool // the early exit reads more ports from PrefilterMap (prefilter.go)
}

// ruleNeeds summarises what the rules read, so the parse guard reads no more.
type ruleNeeds struct {
	v4, v6              bool
	protos              []uint8 // nil: any protocol can match
	sport, dport, flags bool
	saddr, daddr        bool
	// dports: when every rule needs one of these destination ports
	// (positive, inline), a packet whose port is none of them can't match.
	dports []grammar.PortRange
}

func (c *compiler) needs(rules []*grammar.Rule) ruleNeeds {
	var n ruleNeeds
	anyProto := false
	for _, r := range rules {
		switch r.Family {
		case grammar.FamilyIPv4:
			n.v4 = true
		case grammar.FamilyIPv6:
			n.v6 = true
		default:
			n.v4, n.v6 = true, true
		}
		if r.Proto == grammar.ProtoAny {
			anyProto = true
		} else if !slices.Contains(n.protos, r.Proto.Number()) {
			n.protos = append(n.protos, r.Proto.Number())
		}
		n.sport = n.sport || r.Sport != nil
		n.dport = n.dport || r.Dport != nil
		n.flags = n.flags || r.TCPFlags != nil
		n.saddr = n.saddr || r.Saddr != nil
		n.daddr = n.daddr || r.Daddr != nil
	}
	if anyProto {
		n.protos = nil
	}
	for _, r := range rules {
		if r.Dport == nil || r.Dport.Neg || r.Dport.Set != "" {
			n.dports = nil
			break
		}
		n.dports = append(n.dports, r.Dport.Ranges...)
	}
	n.dports = mergeRanges(n.dports)
	if len(n.dports) > maxInlineRanges {
		n.dports = nil
	}
	return n
}

// mergeRanges sorts and merges port ranges.
func mergeRanges(rs []grammar.PortRange) []grammar.PortRange {
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(a, b grammar.PortRange) int { return int(a.Lo) - int(b.Lo) })
	var out []grammar.PortRange
	for _, r := range rs {
		if len(out) > 0 && int(r.Lo) <= int(out[len(out)-1].Hi)+1 {
			out[len(out)-1].Hi = max(out[len(out)-1].Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}

// fastV4 is the fast path for the common packet, IPv4 without options:
// one test of EtherType, version and header length, then (when every rule
// needs one of a few destination ports) an early exit for a port no rule
// wants, then a short parse with constant offsets that joins the full
// parse at the transport header. Reading the port at the fixed offset is
// safe whatever the packet turns out to be: a fragment, another protocol
// or a truncated header has no port, and then no rule matches either.
func (c *compiler) fastV4(n ruleNeeds, rules []*grammar.Rule) {
	if !n.v4 {
		return
	}
	e := &c.e
	if c.fastRules(rules) {
		c.fastMatch(rules)
		e.label("parse")
		return
	}
	l3 := c.l3
	e.comment("fast path: IPv4 without options")
	e.emit(
		ldx(asm.R2, asm.R1, skbData, asm.Word),
		ldx(asm.R3, asm.R1, skbDataEnd, asm.Word),
		mov(asm.R4, asm.R2),
		asm.Add.Imm(asm.R4, int32(l3)+24),
		asm.JGT.Reg(asm.R4, asm.R3, "parse"),
	)
	if c.opts.L3 {
		e.emit(ldx(asm.R4, asm.R2, 0, asm.Byte), asm.JNE.Imm(asm.R4, 0x45, "parse"))
	} else {
		e.emit(
			ldx(asm.R4, asm.R2, 12, asm.Word),
			asm.And.Imm32(asm.R4, 0x00ffffff),
			netImm(asm.JNE.Imm(asm.R4, 0x00450008, "parse")),
		)
	}
	if len(n.dports) > 0 {
		e.comment("destination port no rule wants: no match")
		e.emit(ldx(asm.R4, asm.R2, l3+22, asm.Half))
		single := true
		for _, r := range n.dports {
			single = single && r.Lo == r.Hi
		}
		if single {
			for _, r := range n.dports {
				e.emit(netImm(asm.JEq.Imm(asm.R4, int32(n16(r.Lo)), "fast_v4")))
			}
		} else {
			e.emit(asm.HostTo(asm.BE, asm.R4, asm.Half))
			for _, r := range n.dports {
				if r.Lo == r.Hi {
					e.emit(asm.JEq.Imm(asm.R4, int32(r.Lo), "fast_v4"))
					continue
				}
				skip := e.newLabel("range")
				e.emit(asm.JLT.Imm(asm.R4, int32(r.Lo), skip), asm.JLE.Imm(asm.R4, int32(r.Hi), "fast_v4"))
				e.label(skip)
			}
		}
		c.prefilterExtra(single)
		e.emit(movi(asm.R0, VerdictNext), asm.Return())
	}
	e.label("fast_v4")
	e.emit(
		mov(asm.R6, asm.R1),
		mov(asm.R7, asm.R2),
		mov(asm.R8, asm.R3),
		movi(asm.R3, 0),
		movi(asm.R9, int32(l3)+20),
		movi(asm.R5, int32(l3)+9),
		movi(asm.R4, 4),
		ldx(asm.R1, asm.R7, l3+6, asm.Half),
		netImm(asm.JSet.Imm(asm.R1, int32(n16(0x3fff)), "fast_frag")),
	)
	e.label("fast_proto")
	e.emit(ldx(asm.R2, asm.R7, l3+9, asm.Byte))
	c.prefilter(n)
	c.copyAddrs4(n)
	e.emit(asm.Ja.Label("l4"))
	e.label("fast_frag")
	e.emit(movi(asm.R3, infoFrag), asm.Ja.Label("fast_proto"))
	e.label("parse")
}

// copyAddrs4 copies the IPv4 addresses the rules match into their slots.
func (c *compiler) copyAddrs4(n ruleNeeds) {
	e := &c.e
	if n.saddr {
		e.emit(ldx(asm.R1, asm.R7, c.l3+12, asm.Word), stx(asm.R10, slotSaddr+4, asm.R1, asm.Word))
	}
	if n.daddr {
		e.emit(ldx(asm.R1, asm.R7, c.l3+16, asm.Word), stx(asm.R10, slotDaddr+4, asm.R1, asm.Word))
	}
}

func (c *compiler) program(rules []*grammar.Rule) error {
	if !c.opts.L3 {
		c.l3 = 14
	}
	c.statLabels = map[int]string{}
	c.tables = map[string][]*shape{}
	c.bodyOf = make([]uint32, len(rules))
	n := c.needs(rules)
	c.ruleNeeds = n
	e := &c.e

	e.comment("sfunnel %s program, %d rules, %s", c.opts.Hook, len(rules), map[bool]string{true: "L3 device", false: "Ethernet"}[c.opts.L3])
	c.traceInit(rules)
	if len(rules) > 0 {
		c.fastV4(n, rules)
	}
	e.emit(mov(asm.R6, asm.R1))
	if len(rules) == 0 {
		e.emit(asm.Ja.Label(c.exit("next")))
	} else {
		c.parse(n)
	}
	segs, err := c.classify(rules)
	if err != nil {
		return err
	}
	c.place(segs)
	c.segs, c.rules = segs, rules
	for _, seg := range segs {
		if len(seg.linear) > 0 && c.lin == nil {
			c.lin = &linearTable{}
			if c.extraTables == nil {
				c.extraTables = map[string]func(gen uint32) []ebpf.MapKV{}
			}
			c.extraTables[linearMap] = c.lin.contents
		}
	}
	if len(c.tables) > 0 || c.lin != nil {
		c.readGeneration()
	}
	if c.lin != nil {
		c.scanFill()
	}
	for _, seg := range segs {
		if err := c.segment(rules, seg); err != nil {
			return err
		}
	}
	if err := c.bodyPool(rules); err != nil {
		return err
	}
	c.exits()
	c.linearFinish()
	c.mssFunction()
	c.traceFunction()
	c.dropUnreadGeneration()

	insns := e.finish()
	c.linearFuncInfo(insns)
	c.spec.Programs[ProgramName] = &ebpf.ProgramSpec{
		Name:         ProgramName,
		Type:         ebpf.SchedCLS,
		License:      "GPL",
		Instructions: insns,
	}
	// Headroom, so that a rule added to an existing shape keeps the maps:
	// at least a quarter more (a power of two alone left a 128-rule hook
	// no room, so its first add compiled).
	used := c.slotsUsed(len(rules))
	slots := uint32(capacity(used+used/4, 16))
	c.spec.Maps[CountersMap] = &ebpf.MapSpec{Name: CountersMap, Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 16, MaxEntries: slots}
	// Per-CPU arrays cost an allocation per entry and CPU: the per-rule
	// parts only where some rule counts in them.
	mtuSlots, statSlots := uint32(1), uint32(0)
	if c.usesRuleMTU {
		mtuSlots = slots
	}
	if c.ruleStats {
		statSlots = slots
	}
	c.spec.Maps[RuleMTUMap] = &ebpf.MapSpec{Name: RuleMTUMap, Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: mtuSlots}
	if err := c.paramsMaps(rules, slots); err != nil {
		return err
	}
	c.tableMaps()
	c.prefilterMap()
	c.anonMaps()
	// The hook's events, then each rule's left-alone counts (abi.StatsMap).
	c.spec.Maps[StatsMap] = &ebpf.MapSpec{Name: StatsMap, Type: ebpf.PerCPUArray, KeySize: 4, ValueSize: 8, MaxEntries: NumStats * (1 + statSlots)}
	c.traceMaps()
	return nil
}

// parse emits the parse guard: it fills the stack slots or leaves with
// VerdictNext when the packet is not IP or no rule can match it.
func (c *compiler) parse(n ruleNeeds) {
	e := &c.e
	l3 := c.l3
	e.comment("parse guard")
	e.emit(
		ldx(asm.R7, asm.R6, skbData, asm.Word),
		ldx(asm.R8, asm.R6, skbDataEnd, asm.Word),
	)
	c.pullHeaders()
	e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, int32(l3)+20),
		asm.JGT.Reg(asm.R1, asm.R8, c.exit("next")),
	)
	if c.opts.L3 {
		e.emit(
			ldx(asm.R1, asm.R7, 0, asm.Byte),
			asm.RSh.Imm(asm.R1, 4),
		)
		if n.v4 {
			e.emit(asm.JEq.Imm(asm.R1, 4, "ip4"))
		}
		if n.v6 {
			e.emit(asm.JEq.Imm(asm.R1, 6, "ip6"))
		}
		e.emit(asm.Ja.Label(c.exit("next")))
	} else {
		e.emit(ldx(asm.R1, asm.R7, 12, asm.Half))
		if n.v4 {
			e.emit(netImm(asm.JEq.Imm(asm.R1, int32(n16(0x0800)), "ip4")))
		}
		if n.v6 {
			e.emit(netImm(asm.JEq.Imm(asm.R1, int32(n16(0x86dd)), "ip6")))
		}
		e.emit(asm.Ja.Label(c.exit("next")))
	}

	// IPv4: R9 = transport offset, R3 = info, R2 = protocol, R5 = offset of the protocol byte.
	if n.v4 {
		e.label("ip4")
		e.comment("IPv4")
		e.emit(ldx(asm.R1, asm.R7, l3, asm.Byte))
		if !c.opts.L3 {
			e.emit(
				mov(asm.R2, asm.R1),
				asm.RSh.Imm(asm.R2, 4),
				asm.JNE.Imm(asm.R2, 4, c.exit("next")),
			)
		}
		e.emit(
			asm.And.Imm(asm.R1, 0x0f),
			asm.LSh.Imm(asm.R1, 2),
			asm.JLT.Imm(asm.R1, 20, c.exit("next")),
			movi(asm.R3, 0),
			asm.JEq.Imm(asm.R1, 20, "ip4_noopt"),
			movi(asm.R3, infoOpts),
		)
		e.label("ip4_noopt")
		e.emit(
			mov(asm.R9, asm.R1),
			asm.Add.Imm(asm.R9, int32(l3)),
			ldx(asm.R1, asm.R7, l3+6, asm.Half),
			netImm(asm.JSet.Imm(asm.R1, int32(n16(0x3fff)), "ip4_frag")),
		)
		e.label("ip4_proto")
		e.emit(
			ldx(asm.R2, asm.R7, l3+9, asm.Byte),
			movi(asm.R5, int32(l3)+9),
			movi(asm.R4, 4),
		)
		c.prefilter(n)
		c.copyAddrs4(n)
		e.emit(asm.Ja.Label("l4"))
		e.label("ip4_frag")
		e.emit(asm.Or.Imm(asm.R3, infoFrag), asm.Ja.Label("ip4_proto"))
	}

	if n.v6 {
		e.label("ip6")
		e.comment("IPv6")
		e.emit(
			mov(asm.R1, asm.R7),
			asm.Add.Imm(asm.R1, int32(l3)+40),
			asm.JGT.Reg(asm.R1, asm.R8, c.exit("next")),
		)
		if !c.opts.L3 {
			e.emit(
				ldx(asm.R1, asm.R7, l3, asm.Byte),
				asm.RSh.Imm(asm.R1, 4),
				asm.JNE.Imm(asm.R1, 6, c.exit("next")),
			)
		}
		e.emit(
			movi(asm.R3, 0),
			ldx(asm.R2, asm.R7, l3+6, asm.Byte),
			movi(asm.R5, int32(l3)+6),
			movi(asm.R9, int32(l3)+40),
		)
		for i := 0; i < maxExtHeaders; i++ {
			ext, ah, route, done := fmt.Sprintf("ext%d", i), fmt.Sprintf("ext%d_ah", i), fmt.Sprintf("ext%d_route", i), fmt.Sprintf("ext%d_next", i)
			e.label(fmt.Sprintf("ext%d_type", i))
			e.emit(
				asm.JEq.Imm(asm.R2, 6, "ip6_done"),
				asm.JEq.Imm(asm.R2, 17, "ip6_done"),
				asm.JEq.Imm(asm.R2, 0, ext),
				asm.JEq.Imm(asm.R2, 60, ext),
				asm.JEq.Imm(asm.R2, 43, route),
				asm.JEq.Imm(asm.R2, 44, "ip6_frag"),
				asm.JEq.Imm(asm.R2, 51, ah),
				asm.Ja.Label("ip6_done"),
			)
			e.label(ah)
			e.emit(asm.Or.Imm(asm.R3, infoUnsafe))
			c.extHeader(2, 2, done)
			e.label(route)
			e.emit(asm.Or.Imm(asm.R3, infoUnsafe))
			e.label(ext)
			c.extHeader(1, 3, "")
			e.label(done)
		}
		// Too many extension headers: the protocol is an extension header,
		// so the transport header stays absent.
		e.emit(asm.Ja.Label("ip6_done"))

		e.label("ip6_frag")
		e.emit(
			asm.Or.Imm(asm.R3, infoOpts|infoFrag),
			mov(asm.R1, asm.R7),
			asm.Add.Reg(asm.R1, asm.R9),
			mov(asm.R4, asm.R1),
			asm.Add.Imm(asm.R4, 8),
			asm.JGT.Reg(asm.R4, asm.R8, "ip6_done"),
			ldx(asm.R2, asm.R1, 0, asm.Byte),
			mov(asm.R5, asm.R9),
			asm.Add.Imm(asm.R9, 8),
			asm.Ja.Label("ip6_done"),
		)
		e.label("ip6_done")
		e.emit(movi(asm.R4, 6))
		c.prefilter(n)
		if n.saddr {
			for w := int16(0); w < 4; w++ {
				e.emit(ldx(asm.R1, asm.R7, l3+8+4*w, asm.Word), stx(asm.R10, slotSaddr+4+4*w, asm.R1, asm.Word))
			}
		}
		if n.daddr {
			for w := int16(0); w < 4; w++ {
				e.emit(ldx(asm.R1, asm.R7, l3+24+4*w, asm.Word), stx(asm.R10, slotDaddr+4+4*w, asm.R1, asm.Word))
			}
		}
	}

	// Transport header: R2 protocol, R3 info, R9 offset.
	e.label("l4")
	e.comment("transport header")
	e.emit(
		stx(asm.R10, slotFam, asm.R4, asm.DWord),
		stx(asm.R10, slotInfo, asm.R3, asm.DWord),
		stx(asm.R10, slotProto, asm.R2, asm.DWord),
		stx(asm.R10, slotL4Off, asm.R9, asm.DWord),
		stx(asm.R10, slotNHOff, asm.R5, asm.DWord),
	)
	if !n.sport && !n.dport && !n.flags {
		e.label("rules")
		return
	}
	e.emit(
		asm.JSet.Imm(asm.R3, infoFrag, "l4_absent"),
		mov(asm.R1, asm.R7),
		asm.Add.Reg(asm.R1, asm.R9),
		mov(asm.R4, asm.R1),
		asm.JEq.Imm(asm.R2, 17, "l4_udp"),
		asm.JNE.Imm(asm.R2, 6, "l4_absent"),
		asm.Add.Imm(asm.R4, 20),
		asm.JGT.Reg(asm.R4, asm.R8, "l4_absent"),
	)
	if n.flags {
		e.emit(ldx(asm.R4, asm.R1, 13, asm.Byte), stx(asm.R10, slotFlags, asm.R4, asm.DWord))
	}
	e.emit(asm.Ja.Label("l4_ports"))
	e.label("l4_udp")
	e.emit(
		asm.Add.Imm(asm.R4, 8),
		asm.JGT.Reg(asm.R4, asm.R8, "l4_absent"),
	)
	if n.flags {
		e.emit(sti(asm.R10, slotFlags, absentFlags, asm.DWord))
	}
	e.label("l4_ports")
	if n.sport {
		e.emit(ldx(asm.R4, asm.R1, 0, asm.Half), asm.HostTo(asm.BE, asm.R4, asm.Half), stx(asm.R10, slotSport, asm.R4, asm.DWord))
	}
	if n.dport {
		e.emit(ldx(asm.R4, asm.R1, 2, asm.Half), asm.HostTo(asm.BE, asm.R4, asm.Half), stx(asm.R10, slotDport, asm.R4, asm.DWord))
	}
	e.emit(asm.Ja.Label("rules"))
	e.label("l4_absent")
	if n.sport {
		e.emit(sti(asm.R10, slotSport, absentPort, asm.DWord))
	}
	if n.dport {
		e.emit(sti(asm.R10, slotDport, absentPort, asm.DWord))
	}
	if n.flags {
		e.emit(sti(asm.R10, slotFlags, absentFlags, asm.DWord))
	}
	e.label("rules")
}

// pullLen is how much of the packet the parse guard wants in the linear
// area: Ethernet, IPv6, 64 bytes of extension headers, a funnel header
// and the inner one.
const pullLen = 14 + 40 + 64 + 20 + 8

// pullHeaders makes the first pullLen bytes (or the whole packet) linear
// when they are not: some drivers leave headers in page fragments, where
// direct packet access can't see them. Linear packets pay two tests.
func (c *compiler) pullHeaders() {
	e := &c.e
	ok, capped := e.newLabel("linear"), e.newLabel("pull_len")
	e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Imm(asm.R1, pullLen),
		asm.JLE.Reg(asm.R1, asm.R8, ok),
		ldx(asm.R2, asm.R6, skbLen, asm.Word),
		asm.JLE.Imm(asm.R2, pullLen, capped),
		movi(asm.R2, pullLen),
	)
	e.label(capped)
	e.emit(
		mov(asm.R1, asm.R7),
		asm.Add.Reg(asm.R1, asm.R2),
		asm.JLE.Reg(asm.R1, asm.R8, ok),
		mov(asm.R1, asm.R6),
		asm.FnSkbPullData.Call(),
		ldx(asm.R7, asm.R6, skbData, asm.Word),
		ldx(asm.R8, asm.R6, skbDataEnd, asm.Word),
	)
	e.label(ok)
}

// extHeader walks one IPv6 extension header whose length is
// (len+add) << shift bytes; then falls through (or jumps to next).
func (c *compiler) extHeader(add, shift int32, next string) {
	e := &c.e
	e.emit(
		asm.Or.Imm(asm.R3, infoOpts),
		mov(asm.R1, asm.R7),
		asm.Add.Reg(asm.R1, asm.R9),
		mov(asm.R4, asm.R1),
		asm.Add.Imm(asm.R4, 8),
		asm.JGT.Reg(asm.R4, asm.R8, "ip6_done"),
		mov(asm.R5, asm.R9),
		ldx(asm.R2, asm.R1, 0, asm.Byte),
		ldx(asm.R4, asm.R1, 1, asm.Byte),
		asm.Add.Imm(asm.R4, add),
		asm.LSh.Imm(asm.R4, shift),
		asm.Add.Reg(asm.R9, asm.R4),
	)
	if next != "" {
		e.emit(asm.Ja.Label(next))
	}
}

// prefilter leaves early when no rule can match the protocol in R2.
func (c *compiler) prefilter(n ruleNeeds) {
	if n.protos == nil {
		return
	}
	e := &c.e
	ok := e.newLabel("proto_ok")
	for i, p := range n.protos {
		if i == len(n.protos)-1 {
			e.emit(asm.JNE.Imm(asm.R2, int32(p), c.exit("next")))
		} else {
			e.emit(asm.JEq.Imm(asm.R2, int32(p), ok))
		}
	}
	e.label(ok)
}

// Exits (verdicts and stat counting) are emitted in generations: a
// generation's stubs follow at most stubDistance instructions of code, so
// every jump to an exit stays within the 16-bit jump offsets however many
// rules there are.
const stubDistance = 8000

// exit returns the label of an exit of the current generation.
func (c *compiler) exit(name string) string {
	return fmt.Sprintf("%s_%d", name, c.gen)
}

// maybeStubs emits the current generation's exits when the code since the
// last ones is long, jumping over them.
func (c *compiler) maybeStubs() {
	if len(c.e.insns)-c.genStart < stubDistance {
		return
	}
	over := c.e.newLabel("after_exits")
	c.e.emit(asm.Ja.Label(over))
	c.exits()
	c.e.label(over)
}

// exits emits the exits of the current generation and starts a new one.
func (c *compiler) exits() {
	e := &c.e
	e.label(c.exit("next"))
	c.traceExit(abi.TraceNext, false)
	e.emit(movi(asm.R0, VerdictNext), asm.Return())
	e.label(c.exit("pass"))
	c.traceExit(abi.TracePass, false)
	e.emit(movi(asm.R0, VerdictPass), asm.Return())
	e.label(c.exit("drop"))
	c.traceExit(abi.TraceDrop, false)
	e.emit(movi(asm.R0, VerdictDrop), asm.Return())
	if c.segUsed {
		c.segExit()
		c.segUsed = false
	}
	if len(c.statLabels) > 0 {
		for _, k := range slices.Sorted(maps.Keys(c.statLabels)) {
			e.label(c.statLabels[k])
			counted, pcounted := k&statCounted != 0, k&statParamCounted != 0
			k &^= statCounted | statParamCounted
			s, rule := k%NumStats, k/NumStats-1
			e.emit(sti(asm.R10, slotKey, int64(s), asm.Word))
			if pcounted {
				c.param(asm.R1, parFlags, asm.Word)
				e.emit(asm.And.Imm(asm.R1, parCount), stx(asm.R10, slotT4, asm.R1, asm.DWord))
			} else {
				e.emit(sti(asm.R10, slotT4, int64(map[bool]int{true: 1}[counted]), asm.DWord))
			}
			// The rule's own count of what it left alone, in the same map
			// after the hook's: key (slot+1)*NumStats + s.
			if rule < 0 {
				e.emit(
					ldx(asm.R1, asm.R10, slotRule, asm.DWord),
					asm.Add.Imm(asm.R1, 1),
					asm.Mul.Imm(asm.R1, NumStats),
					asm.Add.Imm(asm.R1, int32(s)),
					stx(asm.R10, slotT3, asm.R1, asm.DWord),
				)
			} else {
				e.emit(sti(asm.R10, slotT3, int64((rule+1)*NumStats+s), asm.DWord))
			}
			e.emit(asm.Ja.Label(c.exit("count_stat")))
		}
		e.label(c.exit("count_stat"))
		c.traceExit(abi.TraceLeft, true)
		e.comment("stats[key]++, stats[(rule+1)*NumStats+key]++, pass untouched")
		c.lookup(StatsMap, slotKey)
		ruleStats := e.newLabel("rule_stats")
		e.emit(bump(ruleStats)...)
		e.label(ruleStats)
		e.emit(ldx(asm.R1, asm.R10, slotT3, asm.DWord), stx(asm.R10, slotKey, asm.R1, asm.Word))
		c.lookup(StatsMap, slotKey)
		counted := e.newLabel("rule_counted")
		e.emit(bump(counted)...)
		e.label(counted)
		e.comment("the rule's counter counts what it transformed: take the packet back")
		e.emit(
			ldx(asm.R1, asm.R10, slotT4, asm.DWord),
			asm.JEq.Imm(asm.R1, 0, c.exit("pass")),
			ldx(asm.R1, asm.R10, slotT3, asm.DWord),
			asm.Div.Imm(asm.R1, NumStats),
			asm.Sub.Imm(asm.R1, 1),
			stx(asm.R10, slotKey, asm.R1, asm.Word),
		)
		c.lookup(CountersMap, slotKey)
		e.emit(
			asm.JEq.Imm(asm.R0, 0, c.exit("pass")),
			ldx(asm.R1, asm.R0, 0, asm.DWord),
			asm.Sub.Imm(asm.R1, 1),
			stx(asm.R0, 0, asm.R1, asm.DWord),
			ldx(asm.R1, asm.R0, 8, asm.DWord),
			ldx(asm.R2, asm.R6, skbLen, asm.Word),
			asm.Sub.Reg(asm.R1, asm.R2),
			stx(asm.R0, 8, asm.R1, asm.DWord),
			asm.Ja.Label(c.exit("pass")),
		)
	}
	c.gen++
	c.genStart = len(e.insns)
	c.statLabels = map[int]string{}
}

// stat returns the label that counts s and passes the packet.
func (c *compiler) stat(s int) string {
	k, name := s, "stat_"+strings.ReplaceAll(abi.StatNames[s], "-", "_")
	if !c.dynRule {
		k += NumStats * (int(c.slot(c.curRule)) + 1)
		name += fmt.Sprintf("_r%d", c.curRule)
	}
	switch {
	case c.paramCounted:
		k |= statParamCounted
		name += "_pcounted"
	case c.curCounted:
		k |= statCounted
		name += "_counted"
	}
	c.ruleStats = true
	if l, ok := c.statLabels[k]; ok {
		return l
	}
	l := c.exit(name)
	c.statLabels[k] = l
	return l
}

// statCounted marks a statLabels key whose rule counts packets: leaving a
// packet alone takes it back out of the rule's counter; statParamCounted,
// one whose rule says so in its parameters (params.go).
const (
	statCounted      = 1 << 30
	statParamCounted = 1 << 29
)

// lookup emits R0 = bpf_map_lookup_elem(map, fp+slot).
func (c *compiler) lookup(m string, slot int16) {
	if m == RuleMTUMap {
		c.usesRuleMTU = true
	}
	c.e.emit(
		asm.LoadMapPtr(asm.R1, 0).WithReference(m),
		mov(asm.R2, asm.R10),
		asm.Add.Imm(asm.R2, int32(slot)),
		asm.FnMapLookupElem.Call(),
	)
}
