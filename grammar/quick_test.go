package grammar

import (
	"fmt"
	"math/rand"
	"net/netip"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/alecthomas/participle/v2"
	"github.com/google/go-cmp/cmp"
)

// quickAgrees checks that the quick path changes nothing about src: the
// parse tree (every position and token) equals the grammar's, or both
// parsers reject the text; and Parse gives the same commands and the same
// error text either way. It returns how many rules the quick path read
// inside participle's parse, and whether it read the whole file alone.
func quickAgrees(t testing.TB, src string, parse bool) (rules int, whole bool) {
	t.Helper()
	plain, perr := parser.ParseString("q.conf", src)
	fast, ferr := quickParser.ParseString("q.conf", src)
	if (perr == nil) != (ferr == nil) {
		t.Fatalf("%q: grammar error %v, quick path error %v", src, perr, ferr)
	}
	if f := parseQuickFile("q.conf", src); f != nil {
		if perr != nil {
			t.Fatalf("%q: the quick path read the file, the grammar reports %v", src, perr)
		}
		if !reflect.DeepEqual(plain, f) {
			t.Fatalf("%q: the quick path's tree of the file differs from the grammar's (-grammar +quick):\n%s", src, cmp.Diff(plain, f))
		}
		whole = true
	}
	n := 0
	if ferr == nil {
		n = quickRules(fast)
		fast.settle()
		if !reflect.DeepEqual(plain, fast) {
			t.Fatalf("%q: the quick path's tree differs from the grammar's (-grammar +quick):\n%s", src, cmp.Diff(plain, fast))
		}
	}
	if parse {
		opts := &Options{LookupSet: testSets}
		quickPath = false
		pcmds, psrcs, perr := Parse("q.conf", src, opts)
		quickPath = true
		fcmds, fsrcs, ferr := Parse("q.conf", src, opts)
		if d := cmp.Diff(pcmds, fcmds, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }), cmp.Comparer(func(a, b netip.Addr) bool { return a == b })); d != "" {
			t.Fatalf("%q: commands differ (-grammar +quick):\n%s", src, d)
		}
		if (perr == nil) != (ferr == nil) || perr != nil && FormatError(perr, psrcs) != FormatError(ferr, fsrcs) {
			t.Fatalf("%q: errors differ:\ngrammar: %v\nquick:   %v", src, perr, ferr)
		}
	}
	return n, whole
}

func hasBadLines(f *fileSyntax) bool {
	for _, st := range f.Stmts {
		if st.Interface != nil {
			for _, h := range st.Interface.Hooks {
				for _, line := range h.Rules {
					if line.Bad != nil {
						return true
					}
				}
			}
		}
	}
	return false
}

// quickRules counts the rules the quick path read in a tree not yet settled.
func quickRules(f *fileSyntax) int {
	n := 0
	for _, st := range f.Stmts {
		if st.Quick != nil {
			n++
		}
		if st.Interface != nil {
			for _, h := range st.Interface.Hooks {
				if h.Quick != nil {
					n += len(h.Quick.lines())
				}
				for _, line := range h.Rules {
					if line.Quick != nil {
						n++
					}
				}
			}
		}
		if st.Command != nil {
			for _, rc := range st.Command.ruleCmds() {
				if rc != nil && rc.Quick != nil {
					n++
				}
			}
		}
	}
	return n
}

// contexts put rule text where rules are written: alone, in a hook
// block, after add/insert/replace rule, several to a line.
var contexts = []func(rule string) string{
	func(r string) string { return r },
	func(r string) string { return r + "\n" },
	func(r string) string { return "interface eth0 {\n\tegress {\n\t\t" + r + "\n\t}\n}\n" },
	func(r string) string { return "interface eth0 { ingress { " + r + " } }" },
	func(r string) string {
		return "interface { eth0, eth1 } {\n\tingress {\n\t\tudp dport 1 drop\n\t\t" + r + "; tcp dport 2 counter\n\t}\n\tegress {\n\t\t" + r + "\n\t}\n}\n"
	},
	func(r string) string { return "add rule eth0 ingress " + r },
	func(r string) string { return "insert rule eth0 egress position 3 " + r + "\nlist ruleset\n" },
	func(r string) string { return "replace rule eth0 egress handle 4 " + r },
	func(r string) string {
		return "delete rule eth0 ingress handle 4 " + r + "\ndelete rule eth0 egress handle 5\n"
	},
	func(r string) string { return "define p = { 1, 2 }\n" + r + "; " + r },
}

// TestQuickPathKnownInputs: the quick path agrees with the grammar on every
// rule and mistake of the other tests and the fuzzer's seeds, in every
// context.
func TestQuickPathKnownInputs(t *testing.T) {
	var inputs []string
	for _, c := range ruleCases {
		inputs = append(inputs, c.in, c.want)
	}
	inputs = append(inputs, errorInputs...)
	inputs = append(inputs, fuzzSeeds...)
	read, wholes := 0, 0
	for _, in := range inputs {
		for i, c := range contexts {
			// Parse's commands and errors are compared in three contexts
			// (each costs two more parses, with their error recovery).
			n, whole := quickAgrees(t, c(in), i == 0 || i == 2 || i == 5)
			read += n
			if whole {
				wholes++
			}
		}
	}
	// Most of these are rules the quick path reads; if it read none, it
	// would prove nothing.
	if read < len(ruleCases)*len(contexts) || wholes < len(ruleCases)*len(contexts) {
		t.Errorf("the quick path read %d rules and %d whole files of %d inputs in %d contexts", read, wholes, len(inputs), len(contexts))
	}
}

// TestQuickPathRepetitionLimit: participle refuses a group repeated
// MaxIterations times; the quick path leaves such text to it rather than
// accept what the grammar refuses (checked with the limit lowered).
func TestQuickPathRepetitionLimit(t *testing.T) {
	defer func(saved int) { participle.MaxIterations = saved }(participle.MaxIterations)
	participle.MaxIterations = 12
	long := func(n int, f func(i int) string, sep string) string {
		var w []string
		for i := range n {
			w = append(w, f(i))
		}
		return strings.Join(w, sep)
	}
	rule := func(i int) string { return fmt.Sprintf("udp dport %d drop", i) }
	for _, src := range []string{
		"interface eth0 { ingress {\n" + long(20, rule, "\n") + "\n} }",
		long(20, rule, "\n"),
		"udp dport { " + long(20, func(i int) string { return fmt.Sprint(i) }, ", ") + " } drop",
		"udp dport 1 drop" + strings.Repeat("\n", 20),
		"udp dport 1 counter" + strings.Repeat(" counter", 20),
		"tcp flags " + long(20, func(int) string { return "syn" }, "|"),
		"udp dport 1 drop" + strings.Repeat(" drop", 20),
	} {
		if _, err := parser.ParseString("q.conf", src); err == nil {
			t.Errorf("%.40q: the grammar takes it with MaxIterations %d", src, participle.MaxIterations)
		}
		quickAgrees(t, src, true)
	}
}

// TestQuickPathRandom: the quick path agrees with the grammar on random
// files of generated rules — every match, statement and action, nft's
// forms, sfunnel's lenient order, lists over several lines, comments and
// continuations — and on the same rules with words dropped, repeated,
// swapped or replaced. A fixed seed in CI; SFUNNEL_LONG=1 draws a fresh
// one and runs longer.
func TestQuickPathRandom(t *testing.T) {
	seed, files := int64(1), 800
	if os.Getenv("SFUNNEL_LONG") == "1" {
		seed, files = rand.Int63(), 30000
	}
	t.Logf("seed %d", seed)
	g := &ruleGen{r: rand.New(rand.NewSource(seed))}
	var rules, read, parsed, clean, cleanWhole, cleanRules, cleanRead int
	for i := range files {
		src, n, mutated := g.file()
		got, whole := quickAgrees(t, src, i%4 == 0)
		rules += n
		read += got
		if f, err := parser.ParseString("q.conf", src); err == nil {
			parsed++
			// Lines that are not rules (a word in a list without its
			// comma, a string across a continuation) are the grammar's.
			if !mutated && !hasBadLines(f) {
				clean++
				cleanRules += n
				cleanRead += got
				if whole {
					cleanWhole++
				}
			}
		}
	}
	t.Logf("%d files (%d parse), %d rules, %d read by the quick path in participle's parse; of the files parsed and not mutated, %d of %d read whole, and %d of their %d rules in participle's parse", files, parsed, rules, read, cleanWhole, clean, cleanRead, cleanRules)
	// Generated rules are well formed (values out of range and the like
	// aside, which the lowerer reports): the quick path must read them
	// and their files.
	if cleanRead < cleanRules*9/10 || cleanWhole < clean*9/10 {
		t.Errorf("the quick path read only %d of %d rules and %d of %d files that are well formed", cleanRead, cleanRules, cleanWhole, clean)
	}
}

// ruleGen writes random rule text.
type ruleGen struct{ r *rand.Rand }

func (g *ruleGen) pick(s ...string) string { return s[g.r.Intn(len(s))] }

func (g *ruleGen) chance(n int) bool { return g.r.Intn(n) == 0 }

func (g *ruleGen) num(max int) string {
	v := g.r.Intn(max + 1)
	if g.chance(4) {
		return fmt.Sprintf("0x%x", v)
	}
	return fmt.Sprint(v)
}

func (g *ruleGen) port() string {
	if g.chance(20) {
		return "70000"
	}
	return g.num(65535)
}

func (g *ruleGen) addr() string {
	switch g.r.Intn(6) {
	case 0:
		return fmt.Sprintf("192.0.2.%d/%d", g.r.Intn(256), g.r.Intn(34))
	case 1:
		return fmt.Sprintf("2001:db8::%x", g.r.Intn(65536))
	case 2:
		return fmt.Sprintf("2001:db8:%x::/%d", g.r.Intn(65536), 16+g.r.Intn(120))
	case 3:
		return "$a"
	}
	return fmt.Sprintf("198.51.100.%d", g.r.Intn(256))
}

// list writes a value: an element, a list (maybe over several lines, with
// trailing separators), a set or a variable.
func (g *ruleGen) list(elem func() string) string {
	switch g.r.Intn(8) {
	case 0:
		return g.pick("@nets4", "@nets6", "@ports", "@nope")
	case 1:
		return g.pick("$p", "$a", "$none")
	case 2, 3:
		n := 1 + g.r.Intn(4)
		var b strings.Builder
		b.WriteString("{")
		sep := g.pick(", ", ",", ",\n", "\n")
		for i := range n {
			if i > 0 {
				b.WriteString(sep)
			} else {
				b.WriteString(g.pick(" ", "\n", " ,"))
			}
			b.WriteString(elem())
		}
		b.WriteString(g.pick(" ", "\n", ",\n", "\n\n\n", "\n\n\n\n", ", ,,, "))
		b.WriteString("}")
		return b.String()
	}
	return elem()
}

func (g *ruleGen) portValue() string {
	return g.list(func() string {
		if g.chance(3) {
			return g.port() + "-" + g.port()
		}
		return g.port()
	})
}

func (g *ruleGen) item() string {
	neg := func() string { return g.pick("", "", "!= ") }
	switch g.r.Intn(14) {
	case 0:
		return g.pick("ip", "ip6", "tcp", "udp")
	case 1:
		return g.pick("ip protocol ", "ip6 nexthdr ", "meta l4proto ") + g.pick("udp", "tcp", "17", "6", "icmp")
	case 2:
		return "meta nfproto " + g.pick("ipv4", "ipv6", "arp")
	case 3:
		return "meta nftrace set " + g.pick("1", "0", "$one")
	case 4, 5:
		return g.pick("saddr ", "daddr ", "ip saddr ", "ip6 daddr ") + neg() + g.list(g.addr)
	case 6, 7:
		return g.pick("sport ", "dport ", "tcp dport ", "udp sport ") + neg() + g.portValue()
	case 8:
		return g.pick("tcp flags ", "flags ") + g.pick("syn", "syn|ack", "== syn", "!= rst|fin", "syn / syn,ack", "syn,ack", "bogus", "ecn|cwr / ecn|cwr|syn")
	case 9, 10:
		return g.pick("meta", "ct") + " mark " + g.pick("", "", "set ") + neg() + g.pick(g.num(0xffffffff), "$one") + g.pick("", "", "/0xff", "/$one")
	case 11:
		return g.pick("counter", "counter", "counter packets 5 bytes 300")
	}
	return g.pick("ip saddr 10.0.0.1 udp dport 1000", "ip daddr 10.0.1.0/24 tcp sport 2001", "udp dport 3002-3102", "ip6 saddr 2001:db8::4 udp dport 5")
}

func (g *ruleGen) action() string {
	switch g.r.Intn(7) {
	case 0:
		return "accept"
	case 1:
		return "drop"
	case 2, 3:
		var b strings.Builder
		b.WriteString("funnel " + g.pick("", "encap ") + g.pick("tcp", "udp"))
		for _, f := range g.r.Perm(7)[:g.r.Intn(5)] {
			switch f {
			case 0, 1:
				b.WriteString(g.pick(" dport ", " sport ") + g.pick(g.port(), "179", "$one"))
			case 2:
				b.WriteString(" flags " + g.pick("syn", "syn|ack", "fin|psh|ack"))
			case 3:
				b.WriteString(g.pick(" seq ", " ack ") + g.num(0xffffffff))
			case 4:
				b.WriteString(" window " + g.port())
			case 5:
				b.WriteString(" mss " + g.pick("1360", "off", "100"))
			}
		}
		return b.String()
	case 4:
		return "unfunnel " + g.pick("", "decap ") + g.pick("udp", "tcp")
	case 5:
		return "rewrite " + g.pick("udp", "tcp")
	}
	return "dnat " + g.pick("", "to ") + g.pick("192.0.2.1", "192.0.2.1:53", "[2001:db8::1]:80", "2001:db8::1", "$a", "$a:$one")
}

// rule writes a rule: items in any order, then actions in sfunnel's or
// nft's form, then maybe a comment.
func (g *ruleGen) rule() string {
	var parts []string
	for range g.r.Intn(5) {
		parts = append(parts, g.item())
	}
	if n := g.r.Intn(4); n > 0 {
		if g.chance(2) {
			parts = append(parts, "actions")
		}
		for i := range n {
			a := g.action()
			if i > 0 && g.chance(2) {
				a = ", " + a
			}
			parts = append(parts, a)
		}
	}
	if g.chance(5) {
		parts = append(parts, "comment "+g.pick(`"flows"`, `"a \" b"`, `""`))
	}
	if len(parts) == 0 {
		parts = append(parts, "counter")
	}
	return strings.Join(parts, " ")
}

// vocabulary is what mutations insert.
var vocabulary = strings.Fields(`ip ip6 tcp udp saddr daddr sport dport flags meta ct mark set counter packets bytes
	actions accept drop funnel unfunnel rewrite dnat to encap decap comment off mss seq ack window protocol nexthdr
	l4proto nfproto nftrace , / - { } != == | : [ ] ; 5 0x10 70000 192.0.2.1 2001:db8::1 $p $a @ports "c" foo reject ~ #x`)

// mutate drops, repeats, swaps or replaces a word or two.
func (g *ruleGen) mutate(rule string) string {
	w := strings.Fields(rule)
	for range 1 + g.r.Intn(2) {
		i := g.r.Intn(len(w))
		switch g.r.Intn(5) {
		case 0:
			if len(w) > 1 {
				w = append(w[:i], w[i+1:]...)
			}
		case 1:
			w = append(w[:i+1], w[i:]...)
		case 2:
			if i+1 < len(w) {
				w[i], w[i+1] = w[i+1], w[i]
			}
		case 3:
			w[i] = g.pick(vocabulary...)
		default:
			w = append(w[:i], append([]string{g.pick(vocabulary...)}, w[i:]...)...)
		}
	}
	return strings.Join(w, " ")
}

// spacing writes a rule's words apart with spaces, tabs, continuations
// and, at its end, a comment.
func (g *ruleGen) spacing(rule string) string {
	w := strings.Fields(rule)
	var b strings.Builder
	for i, x := range w {
		if i > 0 {
			b.WriteString(g.pick(" ", " ", " ", "\t", " \\\n\t", "  "))
		}
		b.WriteString(x)
	}
	if g.chance(6) {
		b.WriteString(" # note")
	}
	return b.String()
}

// file writes a file of a few rules in one of the contexts, and returns
// it with the number of rules and whether any was mutated.
func (g *ruleGen) file() (src string, rules int, mutated bool) {
	n := 1 + g.r.Intn(6)
	mutated = g.chance(2)
	lines := make([]string, n)
	for i := range lines {
		r := g.rule()
		if mutated && g.chance(2) {
			r = g.mutate(r)
		}
		lines[i] = g.spacing(r)
	}
	var b strings.Builder
	if g.chance(2) {
		b.WriteString("define p = { 1, 2-3 }\ndefine a = 192.0.2.1\ndefine one = 1\ndefine none = { }\n")
	}
	if g.chance(3) {
		set := g.set()
		if mutated && g.chance(2) {
			set = g.mutate(set)
		}
		b.WriteString(set + g.pick("\n", "; ", "\n\n"))
	}
	end := func() string { return g.pick("\n", "\n", "; ", "\n\n", "\n# c\n", "\n\n\n\n") }
	switch g.r.Intn(4) {
	case 0:
		for _, r := range lines {
			b.WriteString(r + end())
		}
	case 1:
		b.WriteString("interface eth0 {\n\t" + g.pick("egress", "ingress") + " {" + g.pick("\n", " ", "\n\n"))
		for _, r := range lines {
			b.WriteString("\t\t" + r + end())
		}
		b.WriteString(g.pick("\t}\n}\n", "}}", "\t}\n\tingress {\n\t}\n}\n"))
	case 2:
		for _, r := range lines {
			b.WriteString(g.pick("add rule eth0 ingress ", "insert rule eth0 egress ", "replace rule eth0 egress handle 3 ", "add rule eth0 egress position 2 ") + r + end())
		}
	default:
		b.WriteString("interface { eth0, eth1 } {\n")
		for i, r := range lines {
			b.WriteString("\t" + g.pick("egress", "ingress") + " { " + r + g.pick(" }\n", "\n\t}\n"))
			if i%2 == 1 {
				b.WriteString("\tingress {\n\t\tudp dport 1 drop; tcp dport 2 accept\n\t}\n")
				n += 2
			}
		}
		b.WriteString("}\n")
	}
	if g.chance(4) {
		el := g.pick("add", "delete") + " element " + g.pick("s4", "ports", "$a") + " " + g.list(g.addr)
		if mutated && g.chance(2) {
			el = g.mutate(el)
		}
		b.WriteString(g.pick("\n", "; ") + el + "\n")
	}
	return b.String(), n, mutated
}

// set writes a named set declaration, its lines in any order.
func (g *ruleGen) set() string {
	typ, elem := "ipv4_addr", func() string { return fmt.Sprintf("192.0.%d.%d", g.r.Intn(256), g.r.Intn(256)) }
	switch g.r.Intn(3) {
	case 1:
		typ, elem = "inet_service", g.port
	case 2:
		typ, elem = "ipv6_addr", func() string { return fmt.Sprintf("2001:db8::%x", g.r.Intn(65536)) }
	}
	props := []string{"type " + typ}
	for _, p := range g.r.Perm(3)[:g.r.Intn(4)] {
		switch p {
		case 0:
			props = append(props, "flags "+g.pick("interval", "interval, constant", "timeout"))
		case 1:
			props = append(props, "size "+g.pick("100", "0", "70000", "$one"))
		default:
			props = append(props, "elements = "+g.list(elem))
		}
	}
	sep := g.pick("; ", "\n\t", ";\n")
	return g.pick("", "add ") + "set " + g.pick("s4", "blk") + " {" + g.pick(" ", "\n\t") + strings.Join(props, sep) + g.pick(" }", "\n}", ";\n\n}")
}

// TestQuickDeleteRule: `delete rule`, the command scripts run most, is
// read by the quick path alone (no participle parser is built for it),
// with the grammar's tree, commands and errors, with and without the
// rule text it must not have.
func TestQuickDeleteRule(t *testing.T) {
	for _, src := range []string{
		"delete rule eth0 ingress handle 4",
		"delete rule eth0 egress handle 4 # why\n",
		"delete rule eth0 ingress handle 4 udp dport 5 drop",
		"delete rule eth0 ingress",
		"delete rule eth0 ingress position 4",
		"add rule eth0 ingress",
		"delete rule $ifc ingress handle 4",
	} {
		if _, whole := quickAgrees(t, src, true); !whole {
			t.Errorf("%q: the quick path did not read it", src)
		}
	}
}
