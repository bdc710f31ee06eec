package grammar

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/alecthomas/participle/v2"
	"github.com/alecthomas/participle/v2/lexer"
)

// Error is a problem located in rule text. It prints in nft's format:
//
//	FILE:LINE:COL-COL: Error: MESSAGE
//
// and, with Format and the source at hand, the line and a caret underline.
type Error struct {
	Span Span
	Msg  string
	// IncludedFrom lists the include statements that led to the file the
	// error is in, innermost first.
	IncludedFrom []Span
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: Error: %s", e.Span.location(), e.Msg)
}

// location renders FILE:LINE:COL-COL with an inclusive end column, as nft
// does. A span over several lines ends at the end of its first line.
func (s Span) location() string {
	name := s.Pos.Filename
	if name == "" {
		name = "<cmdline>"
	}
	endCol := s.Pos.Column
	if s.End.Line == s.Pos.Line && s.End.Column > s.Pos.Column {
		endCol = s.End.Column - 1
	}
	return fmt.Sprintf("%s:%d:%d-%d", name, s.Pos.Line, s.Pos.Column, endCol)
}

// Sources maps file names to their text, so errors can quote their line.
type Sources map[string]string

// Format renders the error with its include chain, source line and carets.
func (e *Error) Format(src Sources) string {
	var b strings.Builder
	for _, inc := range e.IncludedFrom {
		fmt.Fprintf(&b, "In file included from %s:\n", inc.location())
	}
	b.WriteString(e.Error())
	b.WriteByte('\n')
	text, ok := src[e.Span.Pos.Filename]
	if !ok || e.Span.Pos.Line < 1 {
		return b.String()
	}
	lines := strings.Split(text, "\n")
	if e.Span.Pos.Line > len(lines) {
		return b.String()
	}
	line := strings.TrimRight(lines[e.Span.Pos.Line-1], "\r")
	start := e.Span.Pos.Column - 1
	if start > len(line) {
		start = len(line)
	}
	end := len(line)
	if e.Span.End.Line == e.Span.Pos.Line && e.Span.End.Column-1 <= len(line) {
		end = e.Span.End.Column - 1
	}
	line, start, end = quoteWindow(line, start, end)
	b.WriteString(line)
	b.WriteByte('\n')
	if end <= start {
		end = start + 1
	}
	// Keep tabs so the carets line up under tab-indented rules.
	for _, c := range line[:start] {
		if c == '\t' {
			b.WriteByte('\t')
		} else {
			b.WriteByte(' ')
		}
	}
	b.WriteString(strings.Repeat("^", end-start))
	b.WriteByte('\n')
	return b.String()
}

// maxQuote is the most of a source line an error quotes: a generated
// element list on one line can be megabytes long.
const maxQuote = 160

// quoteWindow returns the part of line an error quotes, with the span
// [start, end) in it: the whole line when it is short, else maxQuote
// bytes from a little before the span, cut at characters and marked with
// "..." where cut (the span's carets are cut with it).
func quoteWindow(line string, start, end int) (string, int, int) {
	if len(line) <= maxQuote {
		return line, start, end
	}
	from := max(0, start-maxQuote/4)
	for from > 0 && !utf8.RuneStart(line[from]) {
		from--
	}
	to := min(len(line), from+maxQuote)
	for to < len(line) && !utf8.RuneStart(line[to]) {
		to--
	}
	quoted := line[from:to]
	start, end = start-from, min(end, to)-from
	if from > 0 {
		quoted = "..." + quoted
		start, end = start+3, end+3
	}
	if to < len(line) {
		quoted += "..."
	}
	return quoted, start, end
}

// ErrorList is several located errors, reported together.
type ErrorList []*Error

func (l ErrorList) Error() string {
	s := make([]string, len(l))
	for i, e := range l {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// Format renders every error as Error.Format does.
func (l ErrorList) Format(src Sources) string {
	var b strings.Builder
	for _, e := range l {
		b.WriteString(e.Format(src))
	}
	return b.String()
}

// FormatError renders any error from this package with source context; other
// errors print as "Error: MSG".
func FormatError(err error, src Sources) string {
	var list ErrorList
	if errors.As(err, &list) {
		return list.Format(src)
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Format(src)
	}
	return "Error: " + err.Error() + "\n"
}

func posOf(p lexer.Position) Pos {
	return Pos{Filename: p.Filename, Offset: p.Offset, Line: p.Line, Column: p.Column}
}

// spanOf covers the given tokens, from the first to the last that is not
// blank (each found from its end of the list).
func spanOf(toks []lexer.Token) Span {
	var first, last *lexer.Token
	for i := range toks {
		if t := &toks[i]; !blankToken(t) {
			first = t
			break
		}
	}
	for i := len(toks) - 1; first != nil; i-- {
		if t := &toks[i]; !blankToken(t) {
			last = t
			break
		}
	}
	if first == nil {
		if len(toks) > 0 {
			p := posOf(toks[0].Pos)
			return Span{Pos: p, End: p}
		}
		return Span{}
	}
	end := posOf(last.Pos)
	end.Offset += len(last.Value)
	end.Column += len(last.Value)
	return Span{Pos: posOf(first.Pos), End: end}
}

func blankToken(t *lexer.Token) bool { return t.EOF() || strings.TrimSpace(t.Value) == "" }

// parseError turns a participle error into a located Error that underlines
// the offending token.
func parseError(err error, src string) error {
	var perr participle.Error
	if !errors.As(err, &perr) {
		return err
	}
	p := posOf(perr.Position())
	span := Span{Pos: p, End: p}
	// Underline the whole token at the error position.
	if p.Offset >= 0 && p.Offset < len(src) {
		n := tokenLen(src[p.Offset:])
		span.End.Column += n
		span.End.Offset += n
	}
	msg := friendlyMessage(perr.Message())
	if verb := verbBefore(src, p.Offset); verb != "" {
		// `add frob`: participle's alternatives (add set, add rule, a rule)
		// blur what was expected; the usage lines say it.
		head, _, _ := strings.Cut(msg, ",")
		head, _, _ = strings.Cut(head, " (")
		what := afterVerb(verb)
		if verb == "list" || verb == "flush" {
			what = "what to " + verb + ": " + what
		}
		msg = head + ", expected " + what
	}
	if p.Offset >= 0 && p.Offset+1 < len(src) && src[p.Offset] == '-' && isLetter(src[p.Offset+1]) {
		// `list ruleset -a` at the prompt or in a file: rule text has no
		// words that start with '-'.
		n := 1
		for p.Offset+n < len(src) && isLetter(src[p.Offset+n]) {
			n++
		}
		span.End = p
		span.End.Column += n
		span.End.Offset += n
		msg = "unexpected option " + src[p.Offset:p.Offset+n] + ": options go on the command line, before the command (sfunnel " + src[p.Offset:p.Offset+n] + " COMMAND)"
	}
	return &Error{Span: span, Msg: "syntax error, " + msg}
}

func isLetter(c byte) bool { return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-' }

// tokenLen is the length of the token that starts s (at least 1).
func tokenLen(s string) int {
	toks, err := ruleLexer.LexString("", s)
	if err != nil {
		return 1
	}
	t, err := toks.Next()
	if err != nil || t.EOF() || len(t.Value) == 0 || t.Value == "\n" {
		return 1
	}
	return len(t.Value)
}

// expectations translates participle's grammar names into words.
var expectations = []struct{ node, words string }{
	{"ActionSyntax", "an action: " + orList(ActionWords)},
	{"ListSyntax", "what to list: " + afterVerb("list")},
	{"FlushSyntax", "what to flush: " + afterVerb("flush")},
	{"AddSyntax", afterVerb("add")},
	{"InsertSyntax", afterVerb("insert")},
	{"ReplaceSyntax", afterVerb("replace")},
	{"DeleteSyntax", afterVerb("delete")},
	{"ResetSyntax", afterVerb("reset")},
	{"RuleCmdSyntax", "an interface name and a hook"},
	{"ElementCmdSyntax", "a set name and { elements }"},
	{"FunnelSyntax", "tcp or udp"},
	{"DnatSyntax", "an address (ADDR, ADDR:PORT or [IPv6]:PORT)"},
	{"HookName", "a hook: ingress or egress"},
	{"StringSyntax", "a quoted string"},
	{"NumberSyntax", "a number"},
	{"ValueSyntax", "an address, a port, a { list }, a @set or a $variable"},
	{"ProtoSyntax", "tcp or udp"},
	{"NameSyntax", "a name"},
	{"RuleSyntax", "a rule"},
}

// verbBefore returns the command verb just before offset when it starts
// its statement (only blanks, or a ';', before it on the line), else "".
func verbBefore(src string, off int) string {
	if off <= 0 || off > len(src) {
		return ""
	}
	line := src[:off]
	if i := strings.LastIndexAny(line, "\n;"); i >= 0 {
		line = line[i+1:]
	}
	words := strings.Fields(line)
	if len(words) != 1 || !strings.HasSuffix(line, " ") && !strings.HasSuffix(line, "\t") {
		return ""
	}
	for _, u := range CommandUsage {
		if strings.Fields(u)[0] == words[0] {
			return words[0]
		}
	}
	return ""
}

// afterVerb lists what may follow a command verb, from CommandUsage:
// "ruleset, interface IF [HOOK], sets or set NAME" for list.
func afterVerb(verb string) string {
	var forms []string
	for _, u := range CommandUsage {
		rest, ok := strings.CutPrefix(u, verb+" ")
		if !ok {
			continue
		}
		// Up to the first placeholder that is not a name: enough to see
		// which form is meant, without the rule or set body.
		var w []string
		for _, f := range strings.Fields(rest) {
			if f == "RULE" || f == "{" || strings.HasPrefix(f, "[position") || f == "handle" {
				break
			}
			w = append(w, f)
		}
		form := strings.Join(w, " ")
		if strings.HasPrefix(form, "[") && strings.HasSuffix(form, "]") && strings.Count(form, "[") == 1 {
			form = form[1 : len(form)-1] // monitor [trace]: after the verb, trace
		}
		if !slices.Contains(forms, form) {
			forms = append(forms, form)
		}
	}
	return orList(forms)
}

func friendlyMessage(msg string) string {
	if strings.HasPrefix(msg, `unexpected token "\""`) {
		return "unterminated string"
	}
	msg = strings.ReplaceAll(msg, `token "\n"`, "end of line")
	msg = strings.ReplaceAll(msg, `"\n"`, "end of line")
	msg = strings.ReplaceAll(msg, `token "<EOF>"`, "end of input")
	msg = strings.ReplaceAll(msg, `(expected "}")`, `(expected "," or "}")`)
	head, expected, found := strings.Cut(msg, " (expected ")
	if h := hint(msg); h != "" {
		return head + h
	}
	if found && strings.HasPrefix(expected, `<ident> (("|" | ",")`) {
		return head + ", expected tcp flags: " + orList(TCPFlags)
	}
	if found {
		for _, e := range expectations {
			if strings.HasPrefix(expected, e.node) {
				return head + ", expected " + e.words
			}
		}
	}
	if w, ok := strings.CutPrefix(head, "unexpected token "); ok && unknownWord(w) {
		// A word the language does not have, where a rule could go on: say
		// what could, rather than the separator participle wanted.
		return head + ", expected a match, a statement (counter, meta mark set, ct mark set, meta nftrace set 1), an action (" + orList(ActionWords) + ") or the end of the rule"
	}
	if !found || strings.Contains(expected, "Syntax") {
		return head
	}
	return head + " (expected " + expected
}

// unknownWord reports whether a quoted token is a word that is none of
// the language's keywords.
func unknownWord(quoted string) bool {
	w, err := strconv.Unquote(quoted)
	if err != nil || w == "" || !(w[0] == '_' || w[0] >= 'a' && w[0] <= 'z' || w[0] >= 'A' && w[0] <= 'Z') {
		return false
	}
	for _, list := range [][]string{MatchWords, StatementWords, ActionWords, RuleWords, Hooks, FileWords, TCPFlags} {
		if slices.Contains(list, w) {
			return false
		}
	}
	for _, u := range CommandUsage {
		if slices.Contains(strings.Fields(u), w) {
			return false
		}
	}
	return true
}

// hint suggests the word meant for common slips from nft and sfunnel habits.
func hint(msg string) string {
	for word, h := range map[string]string{
		`"action"`: "did you mean actions?", `"port"`: "did you mean sport or dport?", `"to"`: "did you mean dnat to ADDR?",
		`"chain"`: "sfunnel writes interface NAME { ingress { … } }", `"table"`: "sfunnel writes interface NAME { … }",
		`"counter"`: "counter is a statement: write it before the actions, e.g. udp dport 5 counter drop",
		`"state"`:   "sfunnel's hooks see no conntrack state; ct mark is the connection match it has",
		`"iifname"`: "the interface is the block's: interface NAME { ingress { … } }",
		`"oifname"`: "the interface is the block's: interface NAME { egress { … } }",
		`"iif"`:     "the interface is the block's: interface NAME { ingress { … } }",
		`"oif"`:     "the interface is the block's: interface NAME { egress { … } }",
		`"icmp"`:    "sfunnel rules match tcp or udp only",
		`"icmpv6"`:  "sfunnel rules match tcp or udp only",
		`"th"`:      "write tcp or udp: sfunnel has no th (any transport header) match",
	} {
		if strings.Contains(msg, "unexpected token "+word) {
			return " (" + h + ")"
		}
	}
	for word, alt := range nftOnly {
		if strings.Contains(msg, `unexpected token "`+word+`"`) {
			h := " (nft's " + word + " has no sfunnel counterpart"
			if alt != "" {
				h += "; see " + alt
			}
			return h + ")"
		}
	}
	return ""
}
