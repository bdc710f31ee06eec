package grammar

import (
	"github.com/alecthomas/participle/v2"
	"github.com/alecthomas/participle/v2/lexer"
)

// The quick path for rules.
//
// participle parses a rule by trying, for each word, the alternatives of
// itemSyntax and actionSyntax in order, each on a copy of its parse context
// (lookahead 3): some 480 allocations and 50 KB per rule, which made
// parsing most of the time of `sfunnel -f` on a large file (2 s of CPU for
// 10 000 rules; BENCHMARKS.md, "Rule text parsing"). Yet a rule's first
// word decides its production.
//
// The quick path reads a rule by that first word and fills the same syntax
// structs, with the same positions and tokens, that the grammar would. It
// runs at three levels, each falling back to the next:
//   - parseQuickFile (quickfile.go) reads a whole file made of rules,
//     interface blocks, defines, named sets, `flush ruleset`,
//     add/insert/replace rule and add/delete element from its own token
//     array, without participle;
//   - inside participle's parse (participle.ParseTypeWith, its extension
//     point for custom productions), parseQuickLines reads the body of a
//     hook block and parseQuickRule a single rule, from participle's token
//     stream;
//   - participle's grammar parses whatever they decline.
// Each takes only text it reads with certainty: at anything else — a form
// it does not know, an unknown action (an error once lowered), a word after
// a rule that is not its end — it declines, untouched, and the next level
// parses that text as before. When a file does not parse at all, it is
// parsed again with the grammar alone (parseFile), so every syntax error is
// the grammar's. The grammar in syntax.go stays the one definition of the
// language; quick_test.go checks that the paths give identical trees
// (positions and tokens included), commands and errors, on every test input
// and on random and mutated rules, and FuzzParse does on what it finds.

// quickRule is a rule the quick path read; only *ruleSyntax implements it.
// A field of this type precedes each place a rule can start; settle moves
// what it caught into the rule field the grammar fills.
type quickRule interface{ syntax() *ruleSyntax }

func (r *ruleSyntax) syntax() *ruleSyntax { return r }

// quickLines are the rules of a hook block read by the quick path.
// Reading the whole block at once also saves participle's work around each
// line (a parse context per separator and per alternative of the line).
type quickLines interface{ lines() []*hookLineSyntax }

type hookLines []*hookLineSyntax

func (h hookLines) lines() []*hookLineSyntax { return h }

// quickParser is the grammar with the quick path in front of every hook
// block body and every rule.
var quickParser = &lazyParser{build: func() *participle.Parser[fileSyntax] {
	return buildParser(parseLexer, parseQuickRule, parseQuickLines)
}}

// declineQuickRule and declineQuickLines are the quick path of the plain
// parser: they take nothing.
func declineQuickRule(*lexer.PeekingLexer) (quickRule, error) {
	return nil, participle.NextMatch
}

func declineQuickLines(*lexer.PeekingLexer) (quickLines, error) {
	return nil, participle.NextMatch
}

// parseFile parses a whole file: quickly, and with the grammar alone when
// the text has a syntax error, so that errors do not depend on the quick
// path (participle reports the deepest error it met, which depends on
// every branch it tried).
func parseFile(filename, src string) (*fileSyntax, error) {
	if quickPath {
		if f := parseQuickFile(filename, src); f != nil {
			return f, nil
		}
	}
	return parseGrammar(filename, src)
}

// parseGrammar is parseFile for a file parseQuickFile declined: participle,
// with the quick path for rules and hook blocks inside it.
func parseGrammar(filename, src string) (*fileSyntax, error) {
	if quickPath {
		if f, err := quickParser.ParseString(filename, src); err == nil {
			f.settle()
			return f, nil
		}
	}
	return parser.ParseString(filename, src)
}

// quickPath turns the quick path on; the tests turn it off to compare.
var quickPath = true

// settle moves the rules the quick path read into the fields the grammar
// fills, so the tree has the shape the grammar alone gives.
func (f *fileSyntax) settle() {
	for _, st := range f.Stmts {
		if st.Quick != nil {
			st.Rule, st.Quick = st.Quick.syntax(), nil
		}
		switch {
		case st.Interface != nil:
			for _, h := range st.Interface.Hooks {
				if h.Quick != nil {
					h.Rules, h.Quick = h.Quick.lines(), nil
				}
				for _, line := range h.Rules {
					if line.Quick != nil {
						line.Rule, line.Quick = line.Quick.syntax(), nil
					}
				}
			}
		case st.Command != nil:
			for _, rc := range st.Command.ruleCmds() {
				if rc != nil && rc.Quick != nil {
					rc.Rule, rc.Quick = rc.Quick.syntax(), nil
				}
			}
		}
	}
}

func (c *commandSyntax) ruleCmds() []*ruleCmdSyntax {
	var out []*ruleCmdSyntax
	if c.Add != nil {
		out = append(out, c.Add.Rule)
	}
	if c.Insert != nil {
		out = append(out, c.Insert.Rule)
	}
	if c.Replace != nil {
		out = append(out, c.Replace.Rule)
	}
	if c.Delete != nil {
		out = append(out, c.Delete.Rule)
	}
	return out
}

// parseQuickRule reads one rule, or declines (participle.NextMatch) with
// the lexer where it was.
func parseQuickRule(lex *lexer.PeekingLexer) (quickRule, error) {
	at := lex.MakeCheckpoint()
	q := quick{lex: lex}
	if r := q.rule(); r != nil && !q.tooLong {
		return r, nil
	}
	lex.LoadCheckpoint(at)
	return nil, participle.NextMatch
}

// parseQuickLines reads the body of a hook block up to its closing brace,
// or declines with the lexer where it was if any line is not a rule it
// reads.
func parseQuickLines(lex *lexer.PeekingLexer) (quickLines, error) {
	at := lex.MakeCheckpoint()
	q := quick{lex: lex}
	// An empty block is left to the grammar, which gives it no lines
	// (nil, not an empty list).
	if lines, ok := q.hookBody(); ok && len(lines) > 0 && !q.tooLong {
		return lines, nil
	}
	lex.LoadCheckpoint(at)
	return nil, participle.NextMatch
}

// hookBody reads `( EOL | ';' )* ( rule ( ( EOL | ';' )+ rule? )* )?`
// up to the `}`, which it leaves.
func (q *quick) hookBody() (hookLines, bool) {
	var lines hookLines
	q.endOfLine()
	if q.at("}") {
		return nil, true
	}
	for n := 1; ; n++ {
		var at quickMark
		if q.into != nil {
			at = q.slabsAt()
		}
		r := q.rule()
		if r == nil {
			return nil, false
		}
		if q.into != nil {
			q.into(r)         // lowered now, not kept (stream.go)
			q.rewindSlabs(at) // so its syntax's memory serves the next rule
		} else {
			lines = append(lines, newIn(&q.line, hookLineSyntax{Rule: r}))
		}
		q.repeated(n)
		n := q.endOfLine()
		if q.at("}") {
			return lines, true
		}
		if n == 0 {
			return nil, false
		}
	}
}

// endOfLine skips the newlines and semicolons that end rules and counts them.
func (q *quick) endOfLine() int {
	n := 0
	for t := q.peek(); t.Type == tokEOL || t.Value == ";"; t = q.peek() {
		q.next()
		n++
	}
	q.repeated(n)
	return n
}

// quick reads the productions of a rule as participle would: a struct's
// Pos is the position of its first token, its Tokens run from the raw
// cursor where it starts (elided comments and continuations before its
// first token included) to the end of its last token. Each method returns
// nil when it declines; the caller then declines the whole rule.
type quick struct {
	lex tokenStream
	// tooLong is set when a repetition nears participle.MaxIterations,
	// past which the grammar refuses the text: it is left to the grammar.
	tooLong bool

	// sink, when set, takes each statement of a whole file as soon as it
	// is read (parseQuickFile keeps none), and into each rule of the hook
	// block being read when the sink asked for them (stream.go).
	sink   stmtSink
	stream func(Hook, *ruleSyntax) // the sink's, for the interface block being read
	into   func(*ruleSyntax)       // stream, for the hook block being read

	// The structs of a rule come from blocks allocated together: a rule
	// is a dozen small structs, and a block per kind for many rules is
	// far fewer objects to allocate and for the collector to scan.
	line     slab[hookLineSyntax]
	rules    slab[ruleSyntax]
	items    slab[itemSyntax]
	itemPtr  slab[*itemSyntax]
	addr     slab[addrSyntax]
	port     slab[portSyntax]
	values   slab[valueSyntax]
	elems    slab[elemSyntax]
	elemPtr  slab[*elemSyntax]
	numbers  slab[numberSyntax]
	words    slab[wordSyntax]
	marks    slab[markSyntax]
	flagSet  slab[flagsSyntax]
	count    slab[counterSyntax]
	kw       slab[keywordSyntax]
	str      slab[stringSyntax]
	act      slab[actionSyntax]
	actPtr   slab[*actionSyntax]
	protos   slab[protoSyntax]
	funnel   slab[funnelSyntax]
	field    slab[funnelFieldSyntax]
	fieldPtr slab[*funnelFieldSyntax]
	dnats    slab[dnatSyntax]
}

// repeated notes that a repetition has reached n.
func (q *quick) repeated(n int) {
	if n >= participle.MaxIterations/2 {
		q.tooLong = true
	}
}

// tokenStream is what the quick path reads: participle's PeekingLexer
// inside a parse, or a tokenCursor for a whole file (quickfile.go).
type tokenStream interface {
	// Peek is the next token that is not elided (a comment or a line
	// continuation).
	Peek() *lexer.Token
	// Next consumes it.
	Next() *lexer.Token
	// RawCursor is the index just past the last token consumed.
	RawCursor() lexer.RawCursor
	// Range is the tokens from one raw cursor to another.
	Range(start, end lexer.RawCursor) []lexer.Token
}

// slab hands out values of T from blocks that grow up to maxSlab values.
// Every value handed out is written whole by its taker (newIn, keep): a
// rewound slab hands out used memory again.
type slab[T any] struct {
	free  []T
	size  int
	block []T // the block free is the end of
	gen   int // blocks made
}

const maxSlab = 256

func (s *slab[T]) grow(n int) {
	s.size = min(max(2*s.size, 4, n), maxSlab)
	s.block = make([]T, s.size)
	s.free = s.block
	s.gen++
}

func (s *slab[T]) new() *T {
	if len(s.free) == 0 {
		s.grow(1)
	}
	p := &s.free[0]
	s.free = s.free[1:]
	return p
}

// take is a slice of n values from the slab (one of its own beyond
// maxSlab); appending to it copies.
func (s *slab[T]) take(n int) []T {
	if n > maxSlab {
		return make([]T, n)
	}
	if len(s.free) < n {
		s.grow(n)
	}
	out := s.free[:n:n]
	s.free = s.free[n:]
	return out
}

// slabMark is where a slab stood.
type slabMark struct{ gen, free int }

func (s *slab[T]) mark() slabMark { return slabMark{s.gen, len(s.free)} }

// rewind hands out again what the slab handed out since m: the values
// from m on in the same block, or the whole of a block made since.
func (s *slab[T]) rewind(m slabMark) {
	if s.gen == m.gen {
		s.free = s.block[len(s.block)-m.free:]
	} else {
		s.free = s.block
	}
}

// rewinder is a slab of any type.
type rewinder interface {
	mark() slabMark
	rewind(slabMark)
}

// quickMark is where each slab of a quick reader stood.
type quickMark [numSlabs]slabMark

const numSlabs = 23

// slabs are q's slabs.
func (q *quick) slabs() [numSlabs]rewinder {
	return [numSlabs]rewinder{&q.line, &q.rules, &q.items, &q.itemPtr, &q.addr, &q.port, &q.values, &q.elems, &q.elemPtr,
		&q.numbers, &q.words, &q.marks, &q.flagSet, &q.count, &q.kw, &q.str, &q.act, &q.actPtr, &q.protos, &q.funnel,
		&q.field, &q.fieldPtr, &q.dnats}
}

func (q *quick) slabsAt() (m quickMark) {
	for i, s := range q.slabs() {
		m[i] = s.mark()
	}
	return m
}

// rewindSlabs hands out again what the slabs handed out since m: the
// syntax read since is garbage.
func (q *quick) rewindSlabs(m quickMark) {
	for i, s := range q.slabs() {
		s.rewind(m[i])
	}
}

// newIn puts v in the slab.
func newIn[T any](s *slab[T], v T) *T {
	p := s.new()
	*p = v
	return p
}

// keep copies a scratch list into the slab.
func keep[T any](s *slab[T], scratch []T) []T {
	if len(scratch) == 0 {
		return nil
	}
	out := s.take(len(scratch))
	copy(out, scratch)
	return out
}

func (q *quick) peek() *lexer.Token { return q.lex.Peek() }

// at tells whether the next token is the literal w (a grammar literal
// matches the token's text whatever its type).
func (q *quick) at(w string) bool { return q.lex.Peek().Value == w }

func (q *quick) next() *lexer.Token { return q.lex.Next() }

// mark is where a struct starts: its raw cursor and position.
func (q *quick) mark() (lexer.RawCursor, lexer.Position) {
	return q.lex.RawCursor(), q.lex.Peek().Pos
}

// tokens are the tokens from start to the cursor.
func (q *quick) tokens(start lexer.RawCursor) []lexer.Token {
	return q.lex.Range(start, q.lex.RawCursor())
}

// ruleEnd tells whether t may follow a rule: the end of the line or
// statement, or of a hook block.
func ruleEnd(t *lexer.Token) bool {
	return t.EOF() || t.Type == tokEOL || t.Value == ";" || t.Value == "}"
}

func isActionWord(w string) bool {
	switch w {
	case "accept", "drop", "funnel", "unfunnel", "rewrite", "dnat":
		return true
	}
	return false
}

// rule: items, then `actions` and actions or nft's bare actions, then a
// comment, and the end of the rule.
func (q *quick) rule() *ruleSyntax {
	start, pos := q.mark()
	r := newIn(&q.rules, ruleSyntax{Pos: pos})
	var scratch [8]*itemSyntax
	items := scratch[:0]
	for {
		it, more := q.item()
		if !more {
			break
		}
		if it == nil {
			return nil
		}
		items = append(items, it)
		q.repeated(len(items))
	}
	r.Items = keep(&q.itemPtr, items)
	switch {
	case q.at("actions"):
		kstart, kpos := q.mark()
		q.next()
		r.ActionsKw = newIn(&q.kw, keywordSyntax{Pos: kpos, Word: "actions", Tokens: q.tokens(kstart)})
		// `actions` with nothing after it, or with an unknown word, is
		// the lowerer's error to report.
		if !isActionWord(q.peek().Value) {
			return nil
		}
		if r.Actions = q.actions(); r.Actions == nil {
			return nil
		}
	case isActionWord(q.peek().Value):
		if r.NftForm = q.actions(); r.NftForm == nil {
			return nil
		}
	}
	if q.at("comment") {
		q.next()
		cstart, cpos := q.mark()
		t := q.peek()
		if t.Type != tokString {
			return nil
		}
		q.next()
		r.Comment = newIn(&q.str, stringSyntax{Pos: cpos, Value: t.Value, Tokens: q.tokens(cstart)})
	}
	if q.lex.RawCursor() == start || !ruleEnd(q.peek()) {
		return nil
	}
	r.Tokens = q.tokens(start)
	return r
}

// item reads one match or statement. more is false when the next word
// starts none (the items end); it is nil when the quick path declines.
func (q *quick) item() (it *itemSyntax, more bool) {
	t := q.peek()
	switch t.Value {
	case "ip", "ip6", "meta", "saddr", "daddr", "tcp", "udp", "sport", "dport", "flags", "ct", "counter":
	default:
		return nil, false
	}
	start, pos := q.mark()
	it = newIn(&q.items, itemSyntax{Pos: pos})
	word := q.next().Value
	switch word {
	case "ip", "ip6":
		proto := "protocol"
		if word == "ip6" {
			proto = "nexthdr"
		}
		if !q.at(proto) {
			it.Family = word
			break
		}
		q.next()
		w := q.word()
		if w == nil {
			return nil, true
		}
		if word == "ip" {
			it.IPProto = w
		} else {
			it.IP6Proto = w
		}
	case "meta":
		switch q.peek().Value {
		case "l4proto":
			q.next()
			if it.L4Proto = q.word(); it.L4Proto == nil {
				return nil, true
			}
		case "nfproto":
			q.next()
			if it.NFProto = q.word(); it.NFProto == nil {
				return nil, true
			}
		case "nftrace":
			q.next()
			if !q.at("set") {
				return nil, true
			}
			q.next()
			if it.Trace = q.number(); it.Trace == nil {
				return nil, true
			}
		case "mark":
			if it.Mark = q.markItem(start, word); it.Mark == nil {
				return nil, true
			}
		default:
			return nil, true
		}
	case "ct":
		if it.Mark = q.markItem(start, word); it.Mark == nil {
			return nil, true
		}
	case "saddr", "daddr":
		a := newIn(&q.addr, addrSyntax{Field: word})
		if q.at("!=") {
			q.next()
			a.Neg = true
		}
		if a.Value = q.value(); a.Value == nil {
			return nil, true
		}
		a.Tokens = q.tokens(start)
		it.Addr = a
	case "tcp", "udp":
		it.Proto = word
	case "sport", "dport":
		p := newIn(&q.port, portSyntax{Field: word})
		if q.at("!=") {
			q.next()
			p.Neg = true
		}
		if p.Value = q.value(); p.Value == nil {
			return nil, true
		}
		p.Tokens = q.tokens(start)
		it.Port = p
	case "flags":
		if it.Flags = q.flags(); it.Flags == nil {
			return nil, true
		}
	case "counter":
		c := newIn(&q.count, counterSyntax{Counter: true})
		if q.at("packets") {
			q.next()
			if c.Packets = q.number(); c.Packets == nil || !q.at("bytes") {
				return nil, true
			}
			q.next()
			if c.Bytes = q.number(); c.Bytes == nil {
				return nil, true
			}
		}
		it.Counter = c
	}
	it.Tokens = q.tokens(start)
	return it, true
}

// markItem reads `meta|ct mark [set] [!=] V[/MASK]` after its first word;
// it starts where the item does.
func (q *quick) markItem(start lexer.RawCursor, kind string) *markSyntax {
	if !q.at("mark") {
		return nil
	}
	q.next()
	m := newIn(&q.marks, markSyntax{Kind: kind})
	if q.at("set") {
		q.next()
		m.Set = true
	}
	if q.at("!=") {
		q.next()
		m.Neg = true
	}
	if m.Value = q.number(); m.Value == nil {
		return nil
	}
	if q.at("/") {
		q.next()
		if m.Mask = q.number(); m.Mask == nil {
			return nil
		}
	}
	m.Tokens = q.tokens(start)
	return m
}

// flags reads what follows `tcp flags`, greedily as the grammar does (a
// `,` followed by any word continues the list).
func (q *quick) flags() *flagsSyntax {
	start, pos := q.mark()
	f := newIn(&q.flagSet, flagsSyntax{Pos: pos})
	if q.at("==") || q.at("!=") {
		f.Op = q.next().Value
	}
	var ok bool
	if f.Flags, ok = q.flagList(true); !ok {
		return nil
	}
	if q.at("/") {
		q.next()
		if f.Mask, ok = q.flagList(true); !ok {
			return nil
		}
	}
	f.Tokens = q.tokens(start)
	return f
}

// flagList reads `WORD ( | WORD )*`, with `,` too when comma is set.
func (q *quick) flagList(comma bool) ([]string, bool) {
	var words []string
	for {
		t := q.peek()
		if t.Type != tokIdent {
			return nil, false
		}
		q.next()
		words = append(words, t.Value)
		q.repeated(len(words))
		if !q.at("|") && !(comma && q.at(",")) {
			return words, true
		}
		q.next()
	}
}

// value reads an element, a `{ list }` or an @set.
func (q *quick) value() *valueSyntax {
	start, pos := q.mark()
	v := newIn(&q.values, valueSyntax{Pos: pos})
	t := q.peek()
	switch {
	case t.Value == "{":
		q.next()
		q.separators()
		var scratch [8]*elemSyntax
		list := scratch[:0]
		for !q.at("}") {
			e := q.elem()
			if e == nil {
				return nil
			}
			list = append(list, e)
			q.repeated(len(list))
			n := q.separators()
			if q.at("}") {
				break
			}
			if n == 0 {
				return nil
			}
		}
		q.next()
		v.List = keep(&q.elemPtr, list)
	case t.Type == tokSetRef:
		q.next()
		v.SetRef = t.Value
	default:
		if v.Elem = q.elem(); v.Elem == nil {
			return nil
		}
	}
	v.Tokens = q.tokens(start)
	return v
}

// separators skips the newlines and commas between list elements and
// counts them.
func (q *quick) separators() int {
	n := 0
	for t := q.peek(); t.Type == tokEOL || t.Value == ","; t = q.peek() {
		q.next()
		n++
	}
	q.repeated(n)
	return n
}

// elem reads an address or prefix, a port or range, a $var or a name.
func (q *quick) elem() *elemSyntax {
	start, pos := q.mark()
	e := newIn(&q.elems, elemSyntax{Pos: pos})
	t := q.peek()
	switch t.Type {
	case tokIPv4, tokIPv6:
		q.next()
		e.Addr = t.Value
		if q.at("/") {
			q.next()
			n := q.peek()
			if n.Type != tokNumber {
				return nil
			}
			q.next()
			e.Len = n.Value
		}
	case tokNumber:
		q.next()
		e.Lo = t.Value
		if q.at("-") {
			q.next()
			n := q.peek()
			if n.Type != tokNumber {
				return nil
			}
			q.next()
			e.Hi = n.Value
		}
	case tokVar:
		q.next()
		e.Var = t.Value
	case tokIdent:
		q.next()
		e.Name = t.Value
	default:
		return nil
	}
	e.Tokens = q.tokens(start)
	return e
}

// word reads a word or number (`ip protocol udp`).
func (q *quick) word() *wordSyntax {
	start, pos := q.mark()
	t := q.peek()
	if t.Type != tokIdent && t.Type != tokNumber {
		return nil
	}
	q.next()
	return newIn(&q.words, wordSyntax{Pos: pos, Word: t.Value, Tokens: q.tokens(start)})
}

// number reads a number or a $var.
func (q *quick) number() *numberSyntax {
	start, pos := q.mark()
	t := q.peek()
	n := newIn(&q.numbers, numberSyntax{Pos: pos})
	switch t.Type {
	case tokNumber:
		n.Num = t.Value
	case tokVar:
		n.Var = t.Value
	default:
		return nil
	}
	q.next()
	n.Tokens = q.tokens(start)
	return n
}

// actions reads one or more actions, separated by spaces or commas.
func (q *quick) actions() []*actionSyntax {
	var scratch [4]*actionSyntax
	acts := scratch[:0]
	for {
		a := q.action()
		if a == nil {
			return nil
		}
		acts = append(acts, a)
		q.repeated(len(acts))
		if q.at(",") {
			q.next()
			if !isActionWord(q.peek().Value) {
				return nil
			}
			continue
		}
		if !isActionWord(q.peek().Value) {
			return keep(&q.actPtr, acts)
		}
	}
}

func (q *quick) action() *actionSyntax {
	start, pos := q.mark()
	a := newIn(&q.act, actionSyntax{Pos: pos})
	switch q.next().Value {
	case "accept":
		a.Accept = true
	case "drop":
		a.Drop = true
	case "funnel":
		if q.at("encap") {
			q.next()
		}
		f := newIn(&q.funnel, funnelSyntax{})
		if f.Proto = q.proto(); f.Proto == nil {
			return nil
		}
		var scratch [6]*funnelFieldSyntax
		fields := scratch[:0]
		for {
			fld, more := q.funnelField()
			if !more {
				break
			}
			if fld == nil {
				return nil
			}
			fields = append(fields, fld)
			q.repeated(len(fields))
		}
		f.Fields = keep(&q.fieldPtr, fields)
		a.Funnel = f
	case "unfunnel":
		if q.at("decap") {
			q.next()
		}
		if a.Unfunnel = q.proto(); a.Unfunnel == nil {
			return nil
		}
	case "rewrite":
		if a.Rewrite = q.proto(); a.Rewrite == nil {
			return nil
		}
	case "dnat":
		if q.at("to") {
			q.next()
		}
		if a.DNAT = q.dnat(); a.DNAT == nil {
			return nil
		}
	default:
		return nil
	}
	a.Tokens = q.tokens(start)
	return a
}

func (q *quick) proto() *protoSyntax {
	start, pos := q.mark()
	t := q.peek()
	if t.Value != "tcp" && t.Value != "udp" {
		return nil
	}
	q.next()
	return newIn(&q.protos, protoSyntax{Pos: pos, Proto: t.Value, Tokens: q.tokens(start)})
}

// funnelField reads one field of a funnel header; more is false when the
// next word is not one.
func (q *quick) funnelField() (f *funnelFieldSyntax, more bool) {
	start, pos := q.mark()
	switch name := q.peek().Value; name {
	case "sport", "dport", "seq", "ack", "window", "mss":
		f = newIn(&q.field, funnelFieldSyntax{Pos: pos})
		q.next()
		f.Name = name
		if q.at("off") {
			// Only mss takes off; the lowerer reports the others.
			if name != "mss" {
				return nil, true
			}
			q.next()
			f.Off = true
		} else if f.Value = q.number(); f.Value == nil {
			return nil, true
		}
	case "flags":
		f = newIn(&q.field, funnelFieldSyntax{Pos: pos})
		q.next()
		var ok bool
		if f.Flags, ok = q.flagList(false); !ok {
			return nil, true
		}
	default:
		return nil, false
	}
	f.Tokens = q.tokens(start)
	return f, true
}

// dnat reads `ADDR[:PORT]`, `[IPV6]:PORT` or a $var after `dnat [to]`.
func (q *quick) dnat() *dnatSyntax {
	start, pos := q.mark()
	d := newIn(&q.dnats, dnatSyntax{Pos: pos})
	t := q.peek()
	switch {
	case t.Value == "[":
		q.next()
		if t = q.peek(); t.Type != tokIPv6 {
			return nil
		}
		q.next()
		d.Addr6B = t.Value
		if !q.at("]") {
			return nil
		}
		q.next()
	case t.Type == tokIPv4 || t.Type == tokIPv6 || t.Type == tokVar:
		q.next()
		d.Addr = t.Value
	default:
		return nil
	}
	if q.at(":") {
		q.next()
		if d.Port = q.number(); d.Port == nil {
			return nil
		}
	}
	d.Tokens = q.tokens(start)
	return d
}
