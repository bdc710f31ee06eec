package grammar

import (
	"io"
	"regexp"
	"strings"
	"unicode/utf8"

	"github.com/alecthomas/participle/v2/lexer"
)

// The lexer, written out by hand. It produces exactly the tokens
// of these rules, tried in this order at each position (the first that
// matches wins, as in a regexp alternation); lexer_test.go checks it
// against participle's regexp lexer built from the same rules.
//
//	Comment      #[^\n]*
//	Continuation \\\r?\n
//	EOL          \r?\n
//	Whitespace   [ \t\r]+
//	String       "(?:\\.|[^"\\\n])*"
//	Var          \$[A-Za-z_][A-Za-z0-9_]*
//	SetRef       @[A-Za-z_][A-Za-z0-9_.\-]*
//	IPv6         (?:[0-9a-fA-F]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9a-fA-F]{1,4})?
//	IPv4         \d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}
//	Number       0[xX][0-9a-fA-F]+|\d+
//	Ident        [A-Za-z_][A-Za-z0-9_.\-]*
//	Punct        !=|==|[{}(),;=|/\-:\[\]*]
//	Bad          .  (any other single character, so the parser can point at it)
//
// Why not participle's regexp lexer: on a 10 000-rule file (BenchmarkParse10k,
// 2026-11-30, kernel 6.18, loaded 2-core VM, 7 interleaved rounds, medians)
// Parse took 2.05 s CPU with this lexer and 1.22x that with the regexp one
// (median of per-round ratios); lexing alone took 55 ms against 1.33 s wall.
//
// Why not a lexer generated from the same rules by participle's generator
// (`participle gen lexer`, module github.com/alecthomas/participle/v2/cmd/participle):
// speed is not the reason: in the same rounds Parse with it took 0.96x the
// CPU of this one (lexing alone 67 ms wall). The reasons are these:
//   - the generator is its own module, which the Go module proxy the project
//     builds from does not serve, so a go:generate step could not be run
//     here or in CI;
//   - its current source generates code that does not compile for these
//     rules (goto labels declared and not used);
//   - the generator of participle v2.1.4's time (the one whose output v2.1.4
//     ships as lexer/internal/basiclexer.go), built outside the tree for the
//     measurement, generates code that
//     panics (index out of range) on a string ending in a backslash at the
//     end of the input, e.g. `comment "x\`, and returns an error instead of a
//     Bad token for any other character at the end of the input (`!`, `$`):
//     `.` is taken to need a character after it. Compared like ruleLexer on
//     TestLexerMatchesRegexp's 20 000 random inputs (seed 1), 2 618 differed
//     (93 panics), all at the end; with a newline appended to each input,
//     none of 200 000 differed.
// A thin wrapper could turn its errors and panics into Bad tokens; the
// generator being out of reach decides it. If it becomes available, generate
// from json.Marshal(regexpLexer) and keep lexer_test.go as the check.

var tokenNames = []string{"EOF", "Comment", "Continuation", "EOL", "Whitespace", "String", "Var", "SetRef", "IPv6", "IPv4", "Number", "Ident", "Punct", "Bad"}

const (
	tokComment lexer.TokenType = -2 - iota
	tokContinuation
	tokEOL
	tokWhitespace
	tokString
	tokVar
	tokSetRef
	tokIPv6
	tokIPv4
	tokNumber
	tokIdent
	tokPunct
	tokBad
)

// ipv6Pattern is the IPv6 rule; scanIPv6 matches what it matches
// (lexer_test.go checks), without a regexp engine: it was a tenth of the
// parse of a file with a few thousand IPv6 addresses.
var ipv6Pattern = regexp.MustCompile(`^(?:[0-9a-fA-F]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9a-fA-F]{1,4})?`)

type ruleLexerDef struct{}

var ruleLexer = ruleLexerDef{}

func (ruleLexerDef) Symbols() map[string]lexer.TokenType {
	m := make(map[string]lexer.TokenType, len(tokenNames))
	for i, n := range tokenNames {
		m[n] = lexer.TokenType(-1 - i)
	}
	return m
}

func (d ruleLexerDef) Lex(filename string, r io.Reader) (lexer.Lexer, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return d.LexString(filename, string(data))
}

func (ruleLexerDef) LexString(filename, src string) (lexer.Lexer, error) {
	return &ruleTokens{src: src, pos: lexer.Position{Filename: filename, Line: 1, Column: 1}}, nil
}

func (d ruleLexerDef) LexBytes(filename string, src []byte) (lexer.Lexer, error) {
	return d.LexString(filename, string(src))
}

// parseLexer is ruleLexer without the Whitespace tokens, for the parser.
// participle elides them anyway, but keeps every token it is given in one
// array for the whole parse: dropping the blanks up front halves that
// array and what the garbage collector scans. Nothing reads them: errors
// point at other tokens, and spanOf skips blanks.
var parseLexer = parseLexerDef{}

type parseLexerDef struct{ ruleLexerDef }

func (d parseLexerDef) Lex(filename string, r io.Reader) (lexer.Lexer, error) {
	data, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	return d.LexString(filename, string(data))
}

func (parseLexerDef) LexString(filename, src string) (lexer.Lexer, error) {
	return &ruleTokens{src: src, pos: lexer.Position{Filename: filename, Line: 1, Column: 1}, noBlanks: true}, nil
}

func (d parseLexerDef) LexBytes(filename string, src []byte) (lexer.Lexer, error) {
	return d.LexString(filename, string(src))
}

type ruleTokens struct {
	src      string
	off      int
	pos      lexer.Position
	noBlanks bool // leave out Whitespace tokens (parseLexer)
}

func (l *ruleTokens) Next() (lexer.Token, error) {
	if l.off >= len(l.src) {
		return lexer.EOFToken(l.pos), nil
	}
	typ, n := scanToken(l.src[l.off:])
	if typ == tokWhitespace && l.noBlanks {
		advance(&l.pos, l.src[l.off:l.off+n])
		l.off += n
		return l.Next()
	}
	tok := lexer.Token{Type: typ, Value: l.src[l.off : l.off+n], Pos: l.pos}
	advance(&l.pos, tok.Value)
	l.off += n
	return tok, nil
}

// advance is p.Advance(span) (participle's: columns count runes) without
// its calls for a span of ASCII on one line, which most tokens are (a
// third of lexing was Advance).
func advance(p *lexer.Position, span string) {
	for i := 0; i < len(span); i++ {
		if c := span[i]; c == '\n' || c >= utf8.RuneSelf {
			p.Advance(span)
			return
		}
	}
	p.Offset += len(span)
	p.Column += len(span)
}

func isDigit(c byte) bool  { return c >= '0' && c <= '9' }
func isHex(c byte) bool    { return isDigit(c) || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F' }
func isAlpha(c byte) bool  { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' }
func isNameCh(c byte) bool { return isAlpha(c) || isDigit(c) || c == '.' || c == '-' }

// run is the length of the prefix of s whose bytes satisfy ok.
func run(s string, ok func(byte) bool) int {
	i := 0
	for i < len(s) && ok(s[i]) {
		i++
	}
	return i
}

// scanToken returns the type and length of the token at the start of s
// (len(s) > 0).
func scanToken(s string) (lexer.TokenType, int) {
	c := s[0]
	switch c {
	case '#':
		if n := strings.IndexByte(s, '\n'); n >= 0 {
			return tokComment, n
		}
		return tokComment, len(s)
	case '\\':
		if strings.HasPrefix(s[1:], "\n") {
			return tokContinuation, 2
		}
		if strings.HasPrefix(s[1:], "\r\n") {
			return tokContinuation, 3
		}
	case '\n':
		return tokEOL, 1
	case '\r':
		if strings.HasPrefix(s[1:], "\n") {
			return tokEOL, 2
		}
		return tokWhitespace, run(s, func(b byte) bool { return b == ' ' || b == '\t' || b == '\r' })
	case ' ', '\t':
		return tokWhitespace, run(s, func(b byte) bool { return b == ' ' || b == '\t' || b == '\r' })
	case '"':
		if n := scanString(s); n > 0 {
			return tokString, n
		}
	case '$':
		if len(s) > 1 && isAlpha(s[1]) {
			return tokVar, 2 + run(s[2:], func(b byte) bool { return isAlpha(b) || isDigit(b) })
		}
	case '@':
		if len(s) > 1 && isAlpha(s[1]) {
			return tokSetRef, 2 + run(s[2:], isNameCh)
		}
	}
	if isHex(c) || c == ':' {
		if h := run(s[:min(len(s), 5)], isHex); h < len(s) && h <= 4 && s[h] == ':' {
			if n := scanIPv6(s); n > 0 {
				return tokIPv6, n
			}
		}
	}
	if isDigit(c) {
		if n := scanIPv4(s); n > 0 {
			return tokIPv4, n
		}
		if c == '0' && len(s) > 2 && (s[1] == 'x' || s[1] == 'X') && isHex(s[2]) {
			return tokNumber, 2 + run(s[2:], isHex)
		}
		return tokNumber, run(s, isDigit)
	}
	if isAlpha(c) {
		return tokIdent, 1 + run(s[1:], isNameCh)
	}
	if strings.HasPrefix(s, "!=") || strings.HasPrefix(s, "==") {
		return tokPunct, 2
	}
	if strings.IndexByte("{}(),;=|/-:[]*", c) >= 0 {
		return tokPunct, 1
	}
	_, n := utf8.DecodeRuneInString(s)
	return tokBad, n
}

// scanString is the length of the string literal at the start of s, 0 if
// it is not closed on its line.
func scanString(s string) int {
	for i := 1; i < len(s); {
		switch s[i] {
		case '"':
			return i + 1
		case '\n':
			return 0
		case '\\':
			if i+1 >= len(s) || s[i+1] == '\n' {
				return 0
			}
			_, n := utf8.DecodeRuneInString(s[i+1:])
			i += 1 + n
			continue
		}
		i++
	}
	return 0
}

// scanIPv6 is the length of the match of ipv6Pattern at the start of s, or
// 0. The pattern's choices are forced, so no backtracking is needed: each
// of up to seven groups is up to four hex digits and a ':' (fewer digits
// cannot be followed by a ':' where more could not), at least two are
// needed, and the optional tail is a dotted quad if one follows, else up to
// four hex digits (leftmost-first, as Go's regexp picks).
func scanIPv6(s string) int {
	i, groups := 0, 0
	for groups < 7 {
		h := run(s[i:min(len(s), i+5)], isHex)
		if h > 4 || i+h >= len(s) || s[i+h] != ':' {
			break
		}
		i += h + 1
		groups++
	}
	if groups < 2 {
		return 0
	}
	if n := scanIPv4(s[i:]); n > 0 {
		return i + n
	}
	return i + run(s[i:min(len(s), i+4)], isHex)
}

// scanIPv4 is the length of a dotted quad at the start of s, or 0.
func scanIPv4(s string) int {
	i := 0
	for part := 0; part < 4; part++ {
		d := run(s[i:min(len(s), i+3)], isDigit)
		if d == 0 {
			return 0
		}
		i += d
		if part < 3 {
			if i >= len(s) || s[i] != '.' {
				return 0
			}
			i++
		}
	}
	return i
}
