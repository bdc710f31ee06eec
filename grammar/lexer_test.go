package grammar

import (
	"math/rand"
	"strings"
	"testing"

	"github.com/alecthomas/participle/v2/lexer"
)

// regexpLexer is the lexer as participle rules, the oracle for ruleLexer.
var regexpLexer = lexer.MustSimple([]lexer.SimpleRule{
	{Name: "Comment", Pattern: `#[^\n]*`},
	{Name: "Continuation", Pattern: `\\\r?\n`},
	{Name: "EOL", Pattern: `\r?\n`},
	{Name: "Whitespace", Pattern: `[ \t\r]+`},
	{Name: "String", Pattern: `"(?:\\.|[^"\\\n])*"`},
	{Name: "Var", Pattern: `\$[A-Za-z_][A-Za-z0-9_]*`},
	{Name: "SetRef", Pattern: `@[A-Za-z_][A-Za-z0-9_.\-]*`},
	{Name: "IPv6", Pattern: `(?:[0-9a-fA-F]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9a-fA-F]{1,4})?`},
	{Name: "IPv4", Pattern: `\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}`},
	{Name: "Number", Pattern: `0[xX][0-9a-fA-F]+|\d+`},
	{Name: "Ident", Pattern: `[A-Za-z_][A-Za-z0-9_.\-]*`},
	{Name: "Punct", Pattern: `!=|==|[{}(),;=|/\-:\[\]*]`},
	{Name: "Bad", Pattern: `.`},
})

// tokens lexes src with def into "Type:Value@line:col" strings.
func tokens(t testing.TB, def lexer.Definition, src string) []string {
	l, err := def.(lexer.StringDefinition).LexString("f", src)
	if err != nil {
		t.Fatal(err)
	}
	names := lexer.SymbolsByRune(def)
	var out []string
	for i := 0; i < 100000; i++ {
		tok, err := l.Next()
		if err != nil {
			return append(out, "error: "+err.Error())
		}
		out = append(out, names[tok.Type]+":"+tok.Value+"@"+tok.Pos.String())
		if tok.EOF() {
			return out
		}
	}
	t.Fatal("lexer does not end")
	return nil
}

func sameTokens(t testing.TB, src string) {
	t.Helper()
	want, got := tokens(t, regexpLexer, src), tokens(t, ruleLexer, src)
	if strings.Join(want, "\n") != strings.Join(got, "\n") {
		for i := range min(len(want), len(got)) {
			if want[i] != got[i] {
				t.Fatalf("%q: token %d: regexp lexer %q, ruleLexer %q", src, i, want[i], got[i])
			}
		}
		t.Fatalf("%q: %d tokens from the regexp lexer, %d from ruleLexer", src, len(want), len(got))
	}
	// The parser's lexer gives the same tokens without the blanks.
	var blankFree []string
	for _, tok := range got {
		if !strings.HasPrefix(tok, "Whitespace:") {
			blankFree = append(blankFree, tok)
		}
	}
	if p := tokens(t, parseLexer, src); strings.Join(p, "\n") != strings.Join(blankFree, "\n") {
		t.Fatalf("%q: parseLexer %q, want ruleLexer's tokens without Whitespace %q", src, p, blankFree)
	}
}

// TestLexerMatchesRegexp: the hand-written lexer gives the regexp lexer's
// tokens, on rule text and on random text over the characters that matter.
func TestLexerMatchesRegexp(t *testing.T) {
	for _, src := range []string{
		"ip udp dport 4739 actions funnel encap tcp dport 179 sport 540 #IPFIX\n",
		"define p = { 1, 2-3 }\ninterface eth0 { egress { udp dport $p counter actions drop } }\r\n",
		"ip6 daddr 2001:db8::/32 tcp flags syn / syn,ack meta mark set 0x1/0xff actions dnat to [2001:db8::1]:80",
		"dnat to ::ffff:192.0.2.1 ; fe80::1%eth0 ::1 1::2:3:4:5:6:7:8 a:b c::d:e 1.2.3.4.5 1234.5.6.7 0x 0xg 0X1F",
		"comment \"a \\\" b\\\\\" \"unterminated\n\"x\\\n\" @set.name-1 $var_2 $ @ !x != == \\\r\n\\ \t\r \r\n",
		"set s { type ipv4_addr; size 70000; elements = { 192.0.2.0/24, 198.51.100.7 } }\n\uFEFFcafé ✓",
		"add:: dead:beef::1 deadbeef:1:2 ab:cd:ef:01:23:45:67:89:ab 12:34 123.4:5:6 1.2.3:4::",
		// The end of the input, where participle's generated lexers fail
		// (see lexer.go): a character that only Bad takes, a string
		// ending in a backslash, a lone CR or backslash.
		"x !", "x $", "comment \"x\\", "\"\\", "a\r", "a \\", "#", "\"",
	} {
		sameTokens(t, src)
	}
	alphabet := []string{"a", "f", "x", "X", "z", "_", "0", "1", "9", ":", "::", ".", "-", "/", "$", "@", "#", "\"", "\\", "\n", "\r", " ", "\t",
		"{", "}", "=", "!", "|", ",", ";", "[", "]", "*", "é", "ip", "udp", "192.0.2.1", "2001:db8::", "0x1f"}
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 20000; i++ {
		var b strings.Builder
		for j := rng.Intn(30); j >= 0; j-- {
			b.WriteString(alphabet[rng.Intn(len(alphabet))])
		}
		sameTokens(t, b.String())
	}
}

// TestScanIPv6: scanIPv6 matches what the IPv6 pattern matches, on random
// text over the characters of addresses.
func TestScanIPv6(t *testing.T) {
	alphabet := []string{"0", "1", "9", "a", "f", "F", "g", ":", "::", ".", "12", "123", "1234", "12345", "ffff", "192.0.2.1", "1.2.3", " "}
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 200000; i++ {
		var b strings.Builder
		for j := rng.Intn(16); j >= 0; j-- {
			b.WriteString(alphabet[rng.Intn(len(alphabet))])
		}
		s := b.String()
		want := 0
		if m := ipv6Pattern.FindStringIndex(s); m != nil {
			want = m[1]
		}
		if got := scanIPv6(s); got != want {
			t.Fatalf("%q: scanIPv6 %d, pattern %d", s, got, want)
		}
	}
}

func FuzzLexer(f *testing.F) {
	f.Add("ip6 daddr 2001:db8::/32 tcp dport { 80, 443 } comment \"x\" # y\n")
	f.Fuzz(func(t *testing.T, src string) {
		sameTokens(t, src)
	})
}

// advance moves a position as participle's Advance does, over spans of
// ASCII, newlines and multi-byte runes.
func TestAdvanceAsParticiple(t *testing.T) {
	r := rand.New(rand.NewSource(5))
	pieces := []string{"a", "udp", " ", "\t", "\n", "\r\n", "é", "→", "#c", "10.0.0.1", "\\\n"}
	got := lexer.Position{Filename: "f", Line: 1, Column: 1}
	want := got
	for range 5000 {
		var span string
		for range 1 + r.Intn(4) {
			span += pieces[r.Intn(len(pieces))]
		}
		advance(&got, span)
		want.Advance(span)
		if got != want {
			t.Fatalf("after %q: %+v, participle %+v", span, got, want)
		}
	}
}
