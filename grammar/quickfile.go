package grammar

import "github.com/alecthomas/participle/v2/lexer"

// The quick path for whole files.
//
// Once rules and hook blocks are read quickly (quick.go), what is left of
// participle's cost on a large file is building its token array: it
// appends the tokens one by one, copying the array as it grows (a fifth of
// the CPU of a 10 000-rule parse, and twice the array's memory at the
// peak). parseQuickFile lexes into an array of the right size and reads
// the statements large rulesets are made of — rules, interface blocks,
// `define`, named sets, `flush ruleset`, `add|insert|replace rule`,
// `add|delete element` — with the same
// structs, positions and tokens the grammar gives. At any other statement
// or anything it does not read with certainty it returns nil, and the file
// is parsed by participle (with the quick path for rules and hook blocks).

// parseQuickFile parses src, or returns nil to leave it to participle.
func parseQuickFile(filename, src string) *fileSyntax {
	return readQuickFile(filename, src, nil)
}

// readQuickFile is parseQuickFile, handing each statement to sink instead
// of keeping it when sink is not nil (the tree returned then has none).
func readQuickFile(filename, src string, sink stmtSink) *fileSyntax {
	c := &tokenCursor{toks: lexAll(filename, src)}
	c.skipElided()
	q := quick{lex: c, sink: sink}
	f := &fileSyntax{Pos: c.Peek().Pos}
	// ( EOL | ';' )* ( stmt ( ( EOL | ';' )+ stmt? )* )?
	q.endOfLine()
	var stmts []*stmtSyntax
	for n := 1; !c.Peek().EOF(); n++ {
		st := q.stmt()
		if st == nil {
			return nil
		}
		if sink != nil {
			sink.stmt(st)
		} else {
			stmts = append(stmts, st)
		}
		q.repeated(n)
		n := q.endOfLine()
		if c.Peek().EOF() {
			break
		}
		if n == 0 {
			return nil
		}
	}
	if q.tooLong {
		return nil
	}
	f.Stmts = stmts
	return f
}

// lexAll lexes src as parseLexer does for participle, EOF token included,
// into an array of the right size (counted first: lexing is cheap next to
// growing an array of tokens).
func lexAll(filename, src string) []lexer.Token {
	n := 1
	for off := 0; off < len(src); {
		typ, l := scanToken(src[off:])
		if typ != tokWhitespace {
			n++
		}
		off += l
	}
	toks := make([]lexer.Token, 0, n)
	lex := &ruleTokens{src: src, pos: lexer.Position{Filename: filename, Line: 1, Column: 1}, noBlanks: true}
	for {
		t, _ := lex.Next()
		toks = append(toks, t)
		if t.EOF() {
			return toks
		}
	}
}

// tokenCursor walks a token array as participle's PeekingLexer does, with
// comments and line continuations elided.
type tokenCursor struct {
	toks []lexer.Token
	raw  int // just past the last token consumed
	next int // the next token not elided
}

func (c *tokenCursor) skipElided() {
	for t := &c.toks[c.next]; t.Type == tokComment || t.Type == tokContinuation; t = &c.toks[c.next] {
		c.next++
	}
}

func (c *tokenCursor) Peek() *lexer.Token { return &c.toks[c.next] }

func (c *tokenCursor) Next() *lexer.Token {
	t := &c.toks[c.next]
	if t.EOF() {
		return t
	}
	c.next++
	c.raw = c.next
	c.skipElided()
	return t
}

func (c *tokenCursor) RawCursor() lexer.RawCursor { return lexer.RawCursor(c.raw) }

func (c *tokenCursor) Range(start, end lexer.RawCursor) []lexer.Token { return c.toks[start:end] }

// stmt reads a statement the quick path knows, nil otherwise.
func (q *quick) stmt() *stmtSyntax {
	start, pos := q.mark()
	st := &stmtSyntax{Pos: pos}
	switch q.peek().Value {
	case "interface":
		if st.Interface = q.interfaceBlock(); st.Interface == nil {
			return nil
		}
	case "define":
		if st.Define = q.define(); st.Define == nil {
			return nil
		}
	case "flush":
		if st.Command = q.flushRuleset(); st.Command == nil {
			return nil
		}
	case "set":
		if st.Set = q.set(); st.Set == nil {
			return nil
		}
	case "add":
		// `add set` is a set; `add rule` and `add element` commands.
		q.next()
		if q.at("set") {
			if st.Set = q.set(); st.Set == nil {
				return nil
			}
			break
		}
		if st.Command = q.addCommand(pos, start); st.Command == nil {
			return nil
		}
	case "insert", "replace":
		if st.Command = q.ruleCommand(); st.Command == nil {
			return nil
		}
	case "delete":
		if st.Command = q.deleteCommand(); st.Command == nil {
			return nil
		}
	default:
		// No other statement starts with a word a rule starts with.
		if st.Rule = q.rule(); st.Rule == nil {
			return nil
		}
	}
	st.Tokens = q.tokens(start)
	return st
}

// define reads `define NAME = VALUE`.
func (q *quick) define() *defineSyntax {
	start, pos := q.mark()
	q.next()
	name := q.peek()
	if name.Type != tokIdent {
		return nil
	}
	q.next()
	if !q.at("=") {
		return nil
	}
	q.next()
	v := q.value()
	if v == nil {
		return nil
	}
	return &defineSyntax{Pos: pos, Name: name.Value, Value: v, Tokens: q.tokens(start)}
}

// flushRuleset reads `flush ruleset`.
func (q *quick) flushRuleset() *commandSyntax {
	start, pos := q.mark()
	q.next()
	if !q.at("ruleset") {
		return nil
	}
	q.next()
	return &commandSyntax{Pos: pos, Flush: &flushSyntax{Ruleset: true}, Tokens: q.tokens(start)}
}

// addCommand reads what follows `add` (already read; the command starts
// at start): `rule` and its rule, or `element NAME VALUE`.
func (q *quick) addCommand(pos lexer.Position, start lexer.RawCursor) *commandSyntax {
	c := &commandSyntax{Pos: pos}
	switch {
	case q.at("rule"):
		q.next()
		rc := q.ruleCmd()
		if rc == nil {
			return nil
		}
		c.Add = &addSyntax{Rule: rc}
	case q.at("element"):
		q.next()
		ec := q.elementCmd()
		if ec == nil {
			return nil
		}
		c.Add = &addSyntax{Element: ec}
	default:
		return nil
	}
	c.Tokens = q.tokens(start)
	return c
}

// ruleCommand reads `insert rule` and `replace rule` with their rule.
func (q *quick) ruleCommand() *commandSyntax {
	start, pos := q.mark()
	verb := q.next().Value
	if !q.at("rule") {
		return nil
	}
	q.next()
	rc := q.ruleCmd()
	if rc == nil {
		return nil
	}
	c := &commandSyntax{Pos: pos}
	if verb == "insert" {
		c.Insert = &insertSyntax{Rule: rc}
	} else {
		c.Replace = &replaceSyntax{Rule: rc}
	}
	c.Tokens = q.tokens(start)
	return c
}

// deleteCommand reads `delete element NAME VALUE` and `delete rule IF HOOK
// handle H` (the command a script runs most); other delete commands are
// left to the grammar.
func (q *quick) deleteCommand() *commandSyntax {
	start, pos := q.mark()
	q.next()
	d := &deleteSyntax{}
	switch {
	case q.at("element"):
		q.next()
		if d.Element = q.elementCmd(); d.Element == nil {
			return nil
		}
	case q.at("rule"):
		q.next()
		if d.Rule = q.ruleCmd(); d.Rule == nil {
			return nil
		}
	default:
		return nil
	}
	return &commandSyntax{Pos: pos, Delete: d, Tokens: q.tokens(start)}
}

// elementCmd reads `NAME VALUE` of an element command.
func (q *quick) elementCmd() *elementCmdSyntax {
	start, pos := q.mark()
	ec := &elementCmdSyntax{Pos: pos}
	if ec.Name = q.name(); ec.Name == nil {
		return nil
	}
	if ec.Value = q.value(); ec.Value == nil {
		return nil
	}
	ec.Tokens = q.tokens(start)
	return ec
}

// set reads `set NAME { type T; PROPS }`: a named set, maybe of many
// elements (a block list), which participle reads at some 35 allocations
// per element.
func (q *quick) set() *setSyntax {
	start, pos := q.mark()
	q.next()
	name := q.peek()
	if name.Type != tokIdent {
		return nil
	}
	q.next()
	if !q.at("{") {
		return nil
	}
	q.next()
	q.endOfLine()
	if !q.at("type") {
		return nil
	}
	q.next()
	typ := q.peek()
	if typ.Type != tokIdent {
		return nil
	}
	q.next()
	q.endOfLine()
	s := &setSyntax{Pos: pos, Name: name.Value, Type: typ.Value}
	for !q.at("}") {
		p := q.setProp()
		if p == nil {
			return nil
		}
		s.Props = append(s.Props, p)
		q.repeated(len(s.Props))
		q.endOfLine()
	}
	q.next()
	s.Tokens = q.tokens(start)
	return s
}

// setProp reads a set's `flags`, `size` or `elements` line.
func (q *quick) setProp() *setPropSyntax {
	start, pos := q.mark()
	p := &setPropSyntax{Pos: pos}
	switch q.next().Value {
	case "flags":
		for {
			t := q.peek()
			if t.Type != tokIdent {
				return nil
			}
			q.next()
			p.Flags = append(p.Flags, t.Value)
			q.repeated(len(p.Flags))
			if !q.at(",") {
				break
			}
			q.next()
		}
	case "size":
		if p.Size = q.number(); p.Size == nil {
			return nil
		}
	case "elements":
		if !q.at("=") {
			return nil
		}
		q.next()
		if p.Elements = q.value(); p.Elements == nil {
			return nil
		}
	default:
		return nil
	}
	p.Tokens = q.tokens(start)
	return p
}

// ruleCmd reads `IF HOOK [position N | handle N] RULE`; a command without
// its rule is left to the grammar.
func (q *quick) ruleCmd() *ruleCmdSyntax {
	start, pos := q.mark()
	rc := &ruleCmdSyntax{Pos: pos}
	if rc.Name = q.name(); rc.Name == nil {
		return nil
	}
	if rc.Hook = q.hookName(); rc.Hook == nil {
		return nil
	}
	switch {
	case q.at("position"):
		q.next()
		if rc.Position = q.number(); rc.Position == nil {
			return nil
		}
	case q.at("handle"):
		q.next()
		if rc.Handle = q.number(); rc.Handle == nil {
			return nil
		}
	}
	// The rule is optional in the grammar: `delete rule` has none (and
	// the lowerer reports one missing or one too many).
	if !ruleEnd(q.peek()) {
		if rc.Rule = q.rule(); rc.Rule == nil {
			return nil
		}
	}
	rc.Tokens = q.tokens(start)
	return rc
}

func (q *quick) name() *nameSyntax {
	start, pos := q.mark()
	t := q.peek()
	if t.Type != tokIdent && t.Type != tokVar {
		return nil
	}
	q.next()
	return &nameSyntax{Pos: pos, Name: t.Value, Tokens: q.tokens(start)}
}

func (q *quick) hookName() *hookName {
	start, pos := q.mark()
	t := q.peek()
	if t.Value != "ingress" && t.Value != "egress" {
		return nil
	}
	q.next()
	return &hookName{Pos: pos, Hook: t.Value, Tokens: q.tokens(start)}
}

// interfaceBlock reads `interface NAMES { HOOK { … } … }`.
func (q *quick) interfaceBlock() *interfaceSyntax {
	start, pos := q.mark()
	q.next()
	ib := &interfaceSyntax{Pos: pos}
	if q.at("{") {
		// '{' EOL* name ( ',' EOL* name )* EOL* '}'
		q.next()
		for {
			q.newlines()
			n := q.name()
			if n == nil {
				return nil
			}
			ib.Names = append(ib.Names, n)
			q.repeated(len(ib.Names))
			if !q.at(",") {
				break
			}
			q.next()
		}
		q.newlines()
		if !q.at("}") {
			return nil
		}
		q.next()
	} else {
		n := q.name()
		if n == nil {
			return nil
		}
		ib.Names = []*nameSyntax{n}
	}
	if !q.at("{") {
		return nil
	}
	q.next()
	if q.sink != nil {
		q.stream = q.sink.interfaceRules(ib)
		defer func() { q.stream = nil }()
	}
	// ( EOL | ';' )* ( hook ( EOL | ';' )* )* '}'
	q.endOfLine()
	for !q.at("}") {
		h := q.hook()
		if h == nil {
			return nil
		}
		ib.Hooks = append(ib.Hooks, h)
		q.repeated(len(ib.Hooks))
		q.endOfLine()
	}
	q.next()
	ib.Tokens = q.tokens(start)
	return ib
}

// newlines skips EOL tokens.
func (q *quick) newlines() {
	n := 0
	for q.peek().Type == tokEOL {
		q.next()
		n++
	}
	q.repeated(n)
}

// hook reads `ingress|egress { RULES }`.
func (q *quick) hook() *hookSyntax {
	start, pos := q.mark()
	t := q.peek()
	if t.Value != "ingress" && t.Value != "egress" {
		return nil
	}
	q.next()
	if !q.at("{") {
		return nil
	}
	q.next()
	if q.stream != nil {
		hook := HookIngress
		if t.Value == "egress" {
			hook = HookEgress
		}
		q.into = func(r *ruleSyntax) { q.stream(hook, r) }
		defer func() { q.into = nil }()
	}
	lines, ok := q.hookBody()
	if !ok || !q.at("}") {
		return nil
	}
	q.next()
	h := &hookSyntax{Pos: pos, Hook: t.Value, Tokens: q.tokens(start)}
	if len(lines) > 0 {
		h.Rules = lines
	}
	return h
}
