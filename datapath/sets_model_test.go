package datapath

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/refmodel"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Random sequences of changes to both hooks of two interfaces (vb, vc)
// and to three named sets (IPv4 and IPv6 prefixes that overlap, ports and
// port ranges that overlap): add/insert/replace/delete rule of many kinds
// (IPv4 and IPv6, `!=` and set matches, port lists and ranges, meta and
// ct marks, dnat, funnel, dnat then funnel), add/delete element, a set
// declared again, and now and then `flush interface vc [hook]` or `delete
// interface vc`; one to three commands per change, so one transaction
// often changes several hooks and a set. After every change, `list
// ruleset` in a new process shows the rules and the elements the sequence
// asked for, and IPv4 and IPv6 packets run through each hook's live
// program get what the reference model gives for the listed rules and the
// model's own sets; packets run through one hook during each change get
// the old or the new ruleset's outcome. Now and then the whole ruleset is applied
// again (`flush ruleset` and the listing), which compiles every hook:
// verdicts must not change. Fixed seed (SFUNNEL_SEED=N for another); 24
// changes in CI, 300 with SFUNNEL_LONG=1.
func TestRandomSetChangesAgainstModel(t *testing.T) {
	changes := 24
	if os.Getenv("SFUNNEL_LONG") != "" {
		changes = 300
	}
	seed := uint64(2027)
	if s, err := strconv.ParseUint(os.Getenv("SFUNNEL_SEED"), 10, 64); err == nil {
		seed = s
	}
	rng := rand.New(rand.NewPCG(11, seed))
	e := newEnv(t, Options{})
	testenv.Veth(t, e.a, "vd", "", e.b, "vc", "")
	m := &setsModel{rng: rng, sets: map[string]*modelSet{}, hooks: map[bpf.HookID][]stated{}, listedRules: map[bpf.HookID][]*grammar.Rule{}}
	for _, name := range setNames {
		s := &modelSet{typ: setTypes[name]}
		for _, el := range setPools[name] {
			if rng.IntN(3) == 0 {
				s.elems = append(s.elems, el)
			}
		}
		m.sets[name] = s
	}
	for _, id := range setHooks {
		for range 40 {
			m.hooks[id] = append(m.hooks[id], stated{0, m.canonical(t, randomSetRule(rng, id.Hook))})
		}
	}
	m.apply(t, e)
	lookup := &grammar.Options{LookupSet: func(name string) (grammar.SetType, bool) {
		typ, ok := setTypes[name]
		return typ, ok
	}}
	patched := e.be.patched
	for step := range changes {
		before := maps.Clone(m.listedRules)
		beforeSets := m.grammarSets()
		var cmds []string
		adds := map[bpf.HookID]int{}
		m.declared = map[string]bool{}
		hammered := setHooks[rng.IntN(len(setHooks))]
		if len(before[hammered]) == 0 {
			hammered = setHooks[0]
		}
		if full, viaListing := rng.IntN(12) == 0, step == changes/2; full || viaListing {
			if !viaListing && rng.IntN(2) == 0 {
				m.apply(t, e) // everything compiled again
			} else {
				// `list ruleset` is valid input and lists back the same
				// (counter values aside, which input ignores).
				listing := e.run(t, "list ruleset\n")
				m.applyText(t, e, "flush ruleset\n"+listing)
				if again := e.run(t, "list ruleset\n"); counterValues.ReplaceAllString(again, "") != counterValues.ReplaceAllString(listing, "") {
					t.Fatalf("step %d: the listing applied lists otherwise:\n%s\nwas:\n%s", step, again, listing)
				}
			}
		} else {
			for range 1 + rng.IntN(3) {
				cmds = append(cmds, m.randomCommand(t, rng, adds))
			}
			text := strings.Join(cmds, "\n") + "\n"
			stop := hammerWith(t, e, hammered, m.draw(t))
			t.Logf("step %d: %s", step, text)
			out := e.runWith(t, text, lookup)
			seen := stop()
			m.echoed(t, out, adds, text)
			what := fmt.Sprintf("step %d (%s)", step, strings.Join(cmds, "; "))
			m.check(t, e, what, step%2 == 0)
			seen.checkModels(t, [2]*refmodel.Model{
				newModel(t, before[hammered], beforeSets, hammered.Hook),
				newModel(t, m.listedRules[hammered], m.grammarSets(), hammered.Hook),
			}, what)
			continue
		}
		m.check(t, e, fmt.Sprintf("step %d (the whole ruleset applied again)", step), true)
	}
	t.Logf("%d of %d changes by table entries alone", e.be.patched-patched, changes)
	if e.be.patched == patched {
		t.Errorf("no change went in by table entries: the sequence did not test them")
	}
	for _, id := range setHooks {
		if len(m.hooks[id]) > 0 {
			checkEntries(t, e, id)
		}
	}
}

// counterValues are a listing's counter values.
var counterValues = regexp.MustCompile(` packets \d+ bytes \d+`)

// stated is a rule as the test expects it listed: its handle (or
// pendingHandle+i for the ith rule a change adds) and canonical text.
type stated struct {
	handle uint64
	text   string
}

// setsModel is what the sequence asked for: the rules of each hook and
// the elements of each named set, in the order they were added.
type setsModel struct {
	rng   *rand.Rand
	hooks map[bpf.HookID][]stated
	sets  map[string]*modelSet
	// declared: the sets the change being drawn declares (a set is
	// declared once per input).
	declared map[string]bool
	// listedRules and counters are what the last check read back.
	listedRules map[bpf.HookID][]*grammar.Rule
	counters    map[uint64]ruleset.Counter
}

// setHooks are the hooks the sequence changes.
var setHooks = []bpf.HookID{{Ifname: "vb", Hook: grammar.HookIngress}, {Ifname: "vb", Hook: grammar.HookEgress},
	{Ifname: "vc", Hook: grammar.HookIngress}, {Ifname: "vc", Hook: grammar.HookEgress}}

type modelSet struct {
	typ   grammar.SetType
	elems []string
}

var (
	setNames = []string{"h4", "h6", "ports"}
	setTypes = map[string]grammar.SetType{"h4": grammar.SetIPv4Addr, "h6": grammar.SetIPv6Addr, "ports": grammar.SetInetService}
	// setPools are the elements the sets are drawn from: prefixes inside
	// others, an address and the prefix holding it, the default route;
	// ranges holding ports and other ranges.
	setPools = map[string][]string{
		"h4": {"192.0.2.1", "192.0.2.5", "192.0.2.0/28", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3",
			"198.51.100.0/24", "198.51.100.7", "192.0.2.2", "0.0.0.0/0", "203.0.113.0/25"},
		"h6": {"2001:db8::1", "2001:db8::/64", "2001:db8:1::/48", "2001:db8:1::5", "2001:db8::/32",
			"2001:db8::2", "2001:db8:2::1", "::/0", "2001:db8:1:0:8000::/65"},
		"ports": {"7000", "7001", "7003-7008", "7005", "7010-7012", "7011", "9", "100", "5000-7002", "65535", "0"},
	}
	// Packets' addresses: in none, one or several of the pools' prefixes.
	setSrc4 = []string{"192.0.2.1", "192.0.2.5", "192.0.2.20", "10.1.2.3", "10.9.9.9", "198.51.100.7", "203.0.113.9", "203.0.113.200"}
	setSrc6 = []string{"2001:db8::1", "2001:db8::7", "2001:db8:1::5", "2001:db8:1::8000:0:0:9", "2001:db8:2::1", "2001:db9::1"}
	setDst4 = []string{"192.0.2.2", "198.51.100.7"}
	setDst6 = []string{"2001:db8::2", "2001:db8:1::5"}
)

// randomSetRule is a rule of one of many kinds for hook h (TCP funnels
// only at ingress: at egress they go through the segmentation device).
func randomSetRule(rng *rand.Rand, h grammar.Hook) string {
	pick := func(s ...string) string { return s[rng.IntN(len(s))] }
	port := func() int { return 7000 + rng.IntN(14) }
	proto := pick("udp", "tcp")
	verdict := pick("accept", "drop", "counter accept", "counter drop")
	net4 := func() string { return pick(setPools["h4"][:9]...) }
	net6 := func() string { return pick(setPools["h6"][:7]...) }
	funnel := "funnel udp dport 4789"
	if h == grammar.HookIngress && rng.IntN(2) == 0 {
		funnel = "funnel tcp dport 179 sport 540"
	}
	switch rng.IntN(22) {
	case 0:
		return fmt.Sprintf("ip saddr @h4 %s dport %d %s", proto, port(), verdict)
	case 1:
		return fmt.Sprintf("ip saddr != @h4 %s dport %d %s", proto, port(), verdict)
	case 2:
		return fmt.Sprintf("ip6 saddr @h6 %s dport %d %s", proto, port(), verdict)
	case 3:
		return fmt.Sprintf("ip6 saddr != @h6 %s dport %d %s", proto, port(), verdict)
	case 4:
		return fmt.Sprintf("%s dport @ports %s", proto, verdict)
	case 5:
		return fmt.Sprintf("ip saddr %s %s dport != @ports %s", net4(), proto, verdict)
	case 6:
		return fmt.Sprintf("ip6 saddr %s %s dport %d %s", net6(), proto, port(), verdict)
	case 7:
		a, b := net6(), net6()
		if a == b {
			b = setPools["h6"][(slices.Index(setPools["h6"], a)+1)%7]
		}
		return fmt.Sprintf("ip6 saddr { %s, %s } %s dport { %d, %d } %s", a, b, proto, port(), port()+20, verdict)
	case 8:
		return fmt.Sprintf("%s sport @ports dport %d %s", proto, port(), verdict)
	case 9:
		return fmt.Sprintf("meta mark 0x%x %s dport %d meta mark set 0x%x", 0x10+rng.IntN(2), proto, port(), 0x100+rng.IntN(4))
	case 10:
		return fmt.Sprintf("ct mark 0x%x %s dport %d %s", 0x10000<<rng.IntN(2), proto, port(), verdict)
	case 11:
		return fmt.Sprintf("%s dport %d ct mark set 0x%x", proto, port(), 0x10000<<rng.IntN(2))
	case 12:
		return fmt.Sprintf("ip saddr %s udp dport %d counter actions dnat to 192.0.2.9:%d", net4(), port(), 8000+rng.IntN(3))
	case 13:
		return fmt.Sprintf("ip6 saddr @h6 %s dport %d actions dnat to [2001:db8::9]:8001", proto, port())
	case 14:
		return fmt.Sprintf("udp dport %d counter actions %s", port(), funnel)
	case 15:
		return fmt.Sprintf("ip daddr 192.0.2.2 udp dport %d actions dnat to 198.51.100.10, %s", port(), funnel)
	case 16:
		return fmt.Sprintf("ip daddr @h4 %s dport %d %s", proto, port(), verdict)
	case 17:
		lo := port()
		return fmt.Sprintf("%s dport %s%d-%d %s", proto, pick("", "!= "), lo, lo+rng.IntN(5), verdict)
	case 18:
		return fmt.Sprintf("%s dport %d counter", proto, port())
	case 19:
		return fmt.Sprintf("ip6 daddr 2001:db8::2 %s sport %s dport %d %s", proto, pick("9", "100", "5000"), port(), verdict)
	case 20:
		return fmt.Sprintf("ip6 daddr @h6 %s sport != @ports dport %d %s", proto, port(), verdict)
	default:
		return fmt.Sprintf("%s dport %d %s", proto, port(), verdict)
	}
}

// draw returns a function drawing IPv4 and IPv6 packets (TCP ACKs, SYNs,
// UDP) between the pools' addresses, and their skb marks.
func (m *setsModel) draw(t *testing.T) func() ([]byte, uint32) {
	return func() ([]byte, uint32) {
		rng := m.rng
		pick := func(s []string) net.IP { return net.ParseIP(s[rng.IntN(len(s))]) }
		src, dst := pick(setSrc4), pick(setDst4)
		if rng.IntN(2) == 0 {
			src, dst = pick(setSrc6), pick(setDst6)
		}
		sport := uint16([]int{9, 100, 5000, 7004, 40000}[rng.IntN(5)])
		dport := uint16(6998 + rng.IntN(40))
		if rng.IntN(8) == 0 {
			dport = uint16([]int{0, 9, 100, 65535}[rng.IntN(4)])
		}
		// Marks: none, the meta mark rules' values, ct mark values (in
		// the default mask) and both.
		mark := []uint32{0, 0x10, 0x11, 0x101, 0x10000, 0x20000, 0x10011}[rng.IntN(7)]
		return craftPacket(t, src, dst, rng.IntN(2) == 0, rng.IntN(4) == 0, sport, dport), mark
	}
}

// craftPacket is an Ethernet frame from src to dst (IPv4 or IPv6), UDP or
// TCP (a SYN or an ACK), sport to dport, with a short payload.
func craftPacket(t *testing.T, src, dst net.IP, udp, syn bool, sport, dport uint16) []byte {
	t.Helper()
	eth := &layers.Ethernet{SrcMAC: net.HardwareAddr{2, 0, 0, 0, 0, 1}, DstMAC: net.HardwareAddr{2, 0, 0, 0, 0, 2}}
	var ip gopacket.NetworkLayer
	var ipl gopacket.SerializableLayer
	proto := layers.IPProtocolTCP
	if udp {
		proto = layers.IPProtocolUDP
	}
	if src.To4() != nil {
		eth.EthernetType = layers.EthernetTypeIPv4
		v4 := &layers.IPv4{Version: 4, TTL: 64, SrcIP: src.To4(), DstIP: dst.To4(), Protocol: proto}
		ip, ipl = v4, v4
	} else {
		eth.EthernetType = layers.EthernetTypeIPv6
		v6 := &layers.IPv6{Version: 6, HopLimit: 64, SrcIP: src, DstIP: dst, NextHeader: proto}
		ip, ipl = v6, v6
	}
	var l4 gopacket.SerializableLayer
	if udp {
		u := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: layers.UDPPort(dport)}
		u.SetNetworkLayerForChecksum(ip)
		l4 = u
	} else {
		c := &layers.TCP{SrcPort: layers.TCPPort(sport), DstPort: layers.TCPPort(dport), Seq: 1, Ack: 2, ACK: !syn, SYN: syn, Window: 512}
		c.SetNetworkLayerForChecksum(ip)
		l4 = c
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, eth, ipl, l4, gopacket.Payload("set changes")); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// canonical is text as `list ruleset` prints it.
func (m *setsModel) canonical(t *testing.T, text string) string {
	t.Helper()
	r, err := grammar.ParseRule("<test>", text, &grammar.Options{LookupSet: func(name string) (grammar.SetType, bool) {
		typ, ok := setTypes[name]
		return typ, ok
	}})
	if err != nil {
		t.Fatalf("%s: %v", text, err)
	}
	return grammar.FormatRule(r, nil)
}

// text is the model as a ruleset file.
func (m *setsModel) text() string {
	var b strings.Builder
	b.WriteString("flush ruleset\n")
	for _, name := range setNames {
		s := m.sets[name]
		fmt.Fprintf(&b, "set %s {\n\ttype %s\n", name, s.typ)
		if len(s.elems) > 0 {
			fmt.Fprintf(&b, "\telements = { %s }\n", strings.Join(s.elems, ", "))
		}
		b.WriteString("}\n")
	}
	for _, ifc := range []string{"vb", "vc"} {
		fmt.Fprintf(&b, "interface %s {\n", ifc)
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			fmt.Fprintf(&b, "\t%s {\n", h)
			for _, r := range m.hooks[bpf.HookID{Ifname: ifc, Hook: h}] {
				fmt.Fprintf(&b, "\t\t%s\n", r.text)
			}
			b.WriteString("\t}\n")
		}
		b.WriteString("}\n")
	}
	return b.String()
}

// apply applies the whole model as a file (every hook compiled) and
// learns the handles it got.
func (m *setsModel) apply(t *testing.T, e *env) {
	t.Helper()
	m.applyText(t, e, m.text())
}

// applyText applies a ruleset file of the model's rules and sets and
// learns the handles it got.
func (m *setsModel) applyText(t *testing.T, e *env, text string) {
	t.Helper()
	e.run(t, text)
	rs, _ := e.fresh(t)
	for id, want := range m.hooks {
		var rules []*grammar.Rule
		if ifc := rs.Interface(id.Ifname); ifc != nil {
			rules = ifc.Rules(id.Hook)
		}
		if len(rules) != len(want) {
			t.Fatalf("the file's %d rules of %s listed as %d", len(want), id, len(rules))
		}
		for i, r := range rules {
			want[i].handle = r.Handle
		}
	}
	m.check(t, e, "the file applied", true)
}

// randomCommand is one change: a rule command on any hook (new rules
// counted in adds), elements added or deleted, a set declared again, or
// vc's rules removed.
func (m *setsModel) randomCommand(t *testing.T, rng *rand.Rand, adds map[bpf.HookID]int) string {
	t.Helper()
	id := setHooks[rng.IntN(len(setHooks))]
	h := id.Hook
	where := id.Ifname + " " + id.Hook.String()
	rules := new([]stated)
	*rules = m.hooks[id]
	defer func() { m.hooks[id] = *rules }()
	vcRules := len(m.hooks[bpf.HookID{Ifname: "vc", Hook: grammar.HookIngress}]) + len(m.hooks[bpf.HookID{Ifname: "vc", Hook: grammar.HookEgress}])
	switch op := rng.IntN(40); {
	case op >= 38 && vcRules == 0: // (an interface without rules is not in the ruleset)
	case op == 39:
		m.hooks[bpf.HookID{Ifname: "vc", Hook: grammar.HookIngress}] = nil
		m.hooks[bpf.HookID{Ifname: "vc", Hook: grammar.HookEgress}] = nil
		*rules = m.hooks[id]
		return []string{"flush interface vc", "delete interface vc"}[rng.IntN(2)]
	case op == 38:
		vc := bpf.HookID{Ifname: "vc", Hook: grammar.Hook(rng.IntN(2))}
		m.hooks[vc] = nil
		*rules = m.hooks[id]
		return "flush interface " + vc.Ifname + " " + vc.Hook.String()
	case op < 10: // elements
		name := setNames[rng.IntN(len(setNames))]
		s := m.sets[name]
		var absent []string
		for _, el := range setPools[name] {
			if !slices.Contains(s.elems, el) {
				absent = append(absent, el)
			}
		}
		if op < 5 && len(absent) > 0 || len(s.elems) == 0 {
			if len(absent) == 0 {
				break
			}
			var add []string
			for _, k := range rng.Perm(len(absent))[:1+rng.IntN(min(3, len(absent)))] {
				add = append(add, absent[k])
			}
			s.elems = append(s.elems, add...)
			return fmt.Sprintf("add element %s { %s }", name, strings.Join(add, ", "))
		}
		var del []string
		for _, k := range rng.Perm(len(s.elems))[:1+rng.IntN(min(2, len(s.elems)))] {
			del = append(del, s.elems[k])
		}
		s.elems = slices.DeleteFunc(s.elems, func(el string) bool { return slices.Contains(del, el) })
		return fmt.Sprintf("delete element %s { %s }", name, strings.Join(del, ", "))
	case op < 12: // a set declared again: its elements replaced
		name := setNames[rng.IntN(len(setNames))]
		if m.declared[name] {
			break // (once per input)
		}
		m.declared[name] = true
		s := m.sets[name]
		s.elems = nil
		for _, el := range setPools[name] {
			if rng.IntN(2) == 0 {
				s.elems = append(s.elems, el)
			}
		}
		if len(s.elems) == 0 {
			return fmt.Sprintf("add set %s { type %s }", name, s.typ)
		}
		return fmt.Sprintf("add set %s { type %s; elements = { %s } }", name, s.typ, strings.Join(s.elems, ", "))
	}
	// A rule command; a committed rule to place it by.
	text := randomSetRule(rng, h)
	var committed []int
	for i, r := range *rules {
		if r.handle < pendingHandle {
			committed = append(committed, i)
		}
	}
	if len(committed) == 0 || len(*rules) < 20 {
		*rules = append(*rules, stated{pendingHandle + uint64(adds[id]), m.canonical(t, text)})
		adds[id]++
		return fmt.Sprintf("add rule %s %s", where, text)
	}
	at := committed[rng.IntN(len(committed))]
	handle := (*rules)[at].handle
	switch op := rng.IntN(10); {
	case op < 3:
		*rules = append(*rules, stated{pendingHandle + uint64(adds[id]), m.canonical(t, text)})
		adds[id]++
		return fmt.Sprintf("add rule %s %s", where, text)
	case op < 5:
		*rules = slices.Insert(*rules, at, stated{pendingHandle + uint64(adds[id]), m.canonical(t, text)})
		adds[id]++
		return fmt.Sprintf("insert rule %s position %d %s", where, handle, text)
	case op < 6:
		*rules = slices.Insert(*rules, at+1, stated{pendingHandle + uint64(adds[id]), m.canonical(t, text)})
		adds[id]++
		return fmt.Sprintf("add rule %s position %d %s", where, handle, text)
	case op < 8:
		(*rules)[at].text = m.canonical(t, text)
		return fmt.Sprintf("replace rule %s handle %d %s", where, handle, text)
	default:
		*rules = slices.Delete(*rules, at, at+1)
		return fmt.Sprintf("delete rule %s handle %d", where, handle)
	}
}

// echoed gives the change's new rules the handles `-e` echoed: they are
// echoed in command order, and the rules of each hook were numbered in
// that order too.
func (m *setsModel) echoed(t *testing.T, out string, adds map[bpf.HookID]int, text string) {
	t.Helper()
	handles := echoedAll(out)
	total := 0
	for _, n := range adds {
		total += n
	}
	if len(handles) != total {
		t.Fatalf("%d handles echoed for %d new rules:\n%s\n%s", len(handles), total, text, out)
	}
	// Which hook each echoed handle belongs to, in command order.
	byHook := map[bpf.HookID][]uint64{}
	k := 0
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) > 3 && (f[0] == "add" || f[0] == "insert") && f[1] == "rule" {
			id := bpf.HookID{Ifname: f[2], Hook: map[string]grammar.Hook{"ingress": grammar.HookIngress, "egress": grammar.HookEgress}[f[3]]}
			byHook[id] = append(byHook[id], handles[k])
			k++
		}
	}
	for id, rules := range m.hooks {
		for i := range rules {
			if p := rules[i].handle; p >= pendingHandle {
				rules[i].handle = byHook[id][p-pendingHandle]
			}
		}
	}
}

// grammarSets are the model's sets, for the reference model: built from
// the element strings, not from anything sfunnel parsed.
func (m *setsModel) grammarSets() map[string]*grammar.Set {
	out := map[string]*grammar.Set{}
	for name, s := range m.sets {
		g := &grammar.Set{Name: name, Type: s.typ}
		for _, el := range s.elems {
			if s.typ == grammar.SetInetService {
				lo, hi, _ := strings.Cut(el, "-")
				l, _ := strconv.Atoi(lo)
				h := l
				if hi != "" {
					h, _ = strconv.Atoi(hi)
				}
				g.Ports = append(g.Ports, grammar.PortRange{Lo: uint16(l), Hi: uint16(h)})
				continue
			}
			p, err := netip.ParsePrefix(el)
			if err != nil {
				a := netip.MustParseAddr(el)
				p = netip.PrefixFrom(a, a.BitLen())
			}
			g.Prefixes = append(g.Prefixes, p)
		}
		out[name] = g
	}
	return out
}

// elementKeys are a set's elements as sorted strings (addresses as /32 or
// /128 prefixes), to compare a listing with the model.
func elementKeys(s *grammar.Set) []string {
	var out []string
	for _, p := range s.Prefixes {
		out = append(out, p.String())
	}
	for _, r := range s.Ports {
		out = append(out, fmt.Sprintf("%d-%d", r.Lo, r.Hi))
	}
	slices.Sort(out)
	return out
}

func newModel(t *testing.T, rules []*grammar.Rule, sets map[string]*grammar.Set, h grammar.Hook) *refmodel.Model {
	t.Helper()
	model, err := refmodel.New(rules, sets, refmodel.Options{Hook: h})
	if err != nil {
		t.Fatal(err)
	}
	return model
}

// check compares the listing in a new process with the model, then runs
// 150 packets through each hook against the reference model (and, with
// counters, checks what each rule counted).
func (m *setsModel) check(t *testing.T, e *env, what string, counters bool) {
	t.Helper()
	rs, before := e.fresh(t)
	// A rule keeps its counter across changes (replace rule too):
	// packets only add to it.
	for h, c := range m.counters {
		if now, ok := before[h]; ok && (now.Packets < c.Packets || now.Bytes < c.Bytes) {
			t.Fatalf("%s: the counter of handle %d went from %d packets to %d", what, h, c.Packets, now.Packets)
		}
	}
	m.counters = before
	sets := m.grammarSets()
	for _, name := range setNames {
		got := rs.Set(name)
		if got == nil {
			t.Fatalf("%s: set %s not listed", what, name)
		}
		if g, w := elementKeys(got), elementKeys(sets[name]); !slices.Equal(g, w) {
			t.Fatalf("%s: set %s lists %v, want %v", what, name, g, w)
		}
	}
	counted := map[uint64]uint64{}
	for _, id := range setHooks {
		var rules []*grammar.Rule
		if ifc := rs.Interface(id.Ifname); ifc != nil {
			rules = ifc.Rules(id.Hook)
		}
		want := m.hooks[id]
		if len(rules) != len(want) {
			t.Fatalf("%s: %s lists %d rules, want %d", what, id, len(rules), len(want))
		}
		for i, r := range rules {
			if r.Handle != want[i].handle || grammar.FormatRule(r, nil) != want[i].text {
				t.Fatalf("%s: %s rule %d is %q # handle %d, want %q # handle %d", what, id, i, grammar.FormatRule(r, nil), r.Handle, want[i].text, want[i].handle)
			}
		}
		m.listedRules[id] = rules
		if len(rules) == 0 {
			continue
		}
		for i, n := range agreeRuns(t, e, id, newModel(t, rules, sets, id.Hook), len(rules), 150, m.draw(t), what) {
			counted[rules[i].Handle] = n // handles are unique across hooks
		}
	}
	if !counters {
		return
	}
	_, after := e.fresh(t)
	m.counters = after
	for _, id := range setHooks {
		for i, r := range m.listedRules[id] {
			if got := after[r.Handle].Packets - before[r.Handle].Packets; got != counted[r.Handle] {
				t.Fatalf("%s: %s rule %d (%s # handle %d) counted %d of the packets, the model %d", what, id, i, grammar.FormatRule(r, nil), r.Handle, got, counted[r.Handle])
			}
		}
	}
}
