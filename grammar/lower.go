package grammar

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/alecthomas/participle/v2"
	"github.com/alecthomas/participle/v2/lexer"
)

// Options control parsing of a whole input.
type Options struct {
	// Defines are `-D NAME=VALUE` definitions; VALUE is parsed as rule text.
	Defines map[string]string
	// IncludeDirs are searched for relative include paths after the
	// including file's own directory (`-I DIR`).
	IncludeDirs []string
	// LookupSet tells the type of a set that exists outside this input
	// (in the live ruleset), for `@name` references.
	LookupSet func(name string) (SetType, bool)
}

// maxIncludeDepth stops include cycles.
const maxIncludeDepth = 16

// Parse parses rule text: a file, stdin, or argv joined by spaces. It
// returns the commands in order and the sources read (for error context).
// Errors are *Error or ErrorList values.
func Parse(filename, src string, opts *Options) ([]*Command, Sources, error) {
	if opts == nil {
		opts = &Options{}
	}
	l := &lowerer{
		opts:    opts,
		defines: map[string]*define{},
		sets:    map[string]SetType{},
		sources: Sources{},
		reading: map[string]bool{},
	}
	if abs, err := filepath.Abs(filename); err == nil && !strings.HasPrefix(filename, "<") {
		l.reading[abs] = true
	}
	for name, text := range opts.Defines {
		// Errors in a -D value are shown on the line `define NAME = VALUE`.
		fname := "<define " + name + ">"
		line := "define " + name + " = " + text
		v, err := parseValue(fname, line)
		l.sources[fname] = line
		if err != nil {
			return nil, l.sources, err
		}
		l.defines[name] = &define{value: v}
	}
	l.file(filename, src, nil, 0)
	if len(l.errs) > 0 {
		return nil, l.sources, l.errs
	}
	return l.cmds, l.sources, nil
}

// ParseRule parses a single rule (no command words), as `add rule` takes it.
func ParseRule(filename, src string, opts *Options) (*Rule, error) {
	cmds, _, err := Parse(filename, src, opts)
	if err != nil {
		return nil, err
	}
	if len(cmds) != 1 || cmds[0].Kind != CmdBareRule {
		return nil, fmt.Errorf("%s: expected exactly one rule", filename)
	}
	return cmds[0].Rule, nil
}

// parseValue parses `define NAME = VALUE` text into its value.
func parseValue(filename, line string) (*valueSyntax, error) {
	f, err := parser.ParseString(filename, line)
	if err != nil {
		return nil, parseError(err, line)
	}
	if len(f.Stmts) != 1 || f.Stmts[0].Define == nil {
		return nil, &Error{Span: Span{Pos: Pos{Filename: filename, Line: 1, Column: 1}}, Msg: "not a single value"}
	}
	return f.Stmts[0].Define.Value, nil
}

type define struct {
	value *valueSyntax
	busy  bool // being expanded: a reference back is a cycle
}

type lowerer struct {
	opts    *Options
	defines map[string]*define
	sets    map[string]SetType // sets declared in this input so far
	sources Sources
	cmds    []*Command
	errs    ErrorList
	incl    []Span          // include chain of the file being lowered, innermost first
	reading map[string]bool // absolute paths of the files being read (include cycles)
}

func (l *lowerer) errorf(s Span, format string, args ...any) {
	if len(l.errs) >= 20 {
		return
	}
	l.errs = append(l.errs, &Error{Span: s, Msg: fmt.Sprintf(format, args...), IncludedFrom: append([]Span(nil), l.incl...)})
}

func (l *lowerer) file(filename, src string, incl []Span, depth int) {
	saved := l.incl
	l.incl = incl
	defer func() { l.incl = saved }()
	src, bad := checkText(filename, src)
	l.sources[filename] = src
	if bad != nil {
		bad.IncludedFrom = incl
		l.errs = append(l.errs, bad)
		return
	}
	// No garbage-collector tuning here: the quick path (quick.go) allocates
	// little, and a relaxed collector target (tried before it, 200 %) now
	// only added some 20 MB to the peak RSS of `sfunnel -f` on 10 000 rules
	// (BENCHMARKS.md, "Rule text parsing").
	if quickPath && streamLowering && l.streamFile(filename, src, incl, depth) {
		return
	}
	f, err := parseGrammar(filename, src)
	if err != nil {
		start := len(l.errs)
		if f = l.syntaxErrors(filename, src, err, incl); f == nil {
			return
		}
		// The text parsed once the bad lines were blanked: check the rest
		// too, so a mistake the lowerer finds (an unknown action) is not
		// hidden by a syntax error elsewhere. What the blanked lines
		// declared is missing, so "undefined" errors are not reported.
		defer func() {
			errs := l.errs[start:]
			errs = slices.DeleteFunc(errs, func(e *Error) bool { return strings.HasPrefix(e.Msg, "undefined ") })
			sort.SliceStable(errs, func(i, j int) bool { return errs[i].Span.Pos.Offset < errs[j].Span.Pos.Offset })
			l.errs = l.errs[:start+len(errs)]
		}()
	}
	for _, st := range f.Stmts {
		l.stmt(st, filename, incl, depth)
	}
}

// stmt lowers one statement of file filename.
func (l *lowerer) stmt(st *stmtSyntax, filename string, incl []Span, depth int) {
	switch {
	case st.Define != nil:
		d := st.Define
		if _, dup := l.defines[d.Name]; dup && l.opts.Defines[d.Name] != "" {
			return // -D overrides the file
		}
		l.defines[d.Name] = &define{value: d.Value}
	case st.Include != nil:
		l.include(st.Include, filename, incl, depth)
	case st.Set != nil:
		l.setDecl(st.Set)
	case st.Interface != nil:
		l.interfaceBlock(st.Interface)
	case st.Command != nil:
		l.command(st.Command)
	case st.Rule != nil:
		if r := l.rule(st.Rule); r != nil {
			l.cmds = append(l.cmds, &Command{Span: r.Span, Kind: CmdBareRule, Rule: r})
		}
	}
}

// maxSyntaxErrors bounds the syntax errors reported for one file.
const maxSyntaxErrors = 10

// syntaxErrors reports err and looks for more, as nft does: the line with
// the error is blanked (so positions stay put) and the text parsed again.
// Recovery stops at a line with a brace (blanking it would unbalance the
// blocks and report errors that are not there) or when the parser does
// not get past the blanked line. Semantic checks are skipped: they would
// report what the blanked lines declared as missing.
func (l *lowerer) syntaxErrors(filename, src string, err error, incl []Span) *fileSyntax {
	text := []byte(src)
	for n := 0; ; n++ {
		e := parseError(err, string(text))
		le, ok := e.(*Error)
		if !ok {
			l.errs = append(l.errs, &Error{Msg: e.Error(), IncludedFrom: incl})
			return nil
		}
		le.IncludedFrom = incl
		if alone := lineAlone(filename, string(text), le); alone != nil {
			le = alone
		}
		l.errs = append(l.errs, le)
		off := le.Span.Pos.Offset
		if n+1 >= maxSyntaxErrors || off < 0 || off >= len(text) {
			return nil
		}
		start := strings.LastIndexByte(string(text[:off]), '\n') + 1
		end := len(text)
		if i := strings.IndexByte(string(text[off:]), '\n'); i >= 0 {
			end = off + i
		}
		line := text[start:end]
		if strings.ContainsAny(string(line), "{}") {
			return nil
		}
		for i := range line {
			line[i] = ' '
		}
		f, perr2 := parser.ParseBytes(filename, text)
		if perr2 == nil {
			return f
		}
		err = perr2
		var perr participle.Error
		if !errors.As(err, &perr) || perr.Position().Offset <= end {
			return nil
		}
	}
}

func (l *lowerer) include(inc *includeSyntax, from string, incl []Span, depth int) {
	span := spanOf(inc.Tokens)
	path, err := strconv.Unquote(inc.Path)
	if err != nil {
		l.errorf(span, "bad include path %s", inc.Path)
		return
	}
	if depth >= maxIncludeDepth {
		l.errorf(span, "includes nested deeper than %d (a cycle?)", maxIncludeDepth)
		return
	}
	files, err := l.resolveInclude(path, from)
	if err != nil {
		l.errorf(span, "%v", err)
		return
	}
	chain := append([]Span{span}, incl...)
	for _, f := range files {
		abs, _ := filepath.Abs(f)
		if l.reading[abs] {
			l.errorf(span, "include cycle: %s is already being read", f)
			return
		}
		data, err := ReadSource(f)
		if err != nil {
			l.errorf(span, "cannot include: %v", err)
			continue
		}
		l.reading[abs] = true
		l.file(f, string(data), chain, depth+1)
		delete(l.reading, abs)
	}
}

// resolveInclude finds the files an include names: relative paths are
// tried against the including file's directory, then each -I directory.
// A glob matching nothing is no error; a plain path that does not exist is.
func (l *lowerer) resolveInclude(path, from string) ([]string, error) {
	isGlob := strings.ContainsAny(path, "*?[")
	var dirs []string
	if filepath.IsAbs(path) {
		dirs = []string{""}
	} else {
		if from != "" && !strings.HasPrefix(from, "<") && from != "/dev/stdin" {
			dirs = append(dirs, filepath.Dir(from))
		}
		dirs = append(dirs, l.opts.IncludeDirs...)
		if len(dirs) == 0 {
			dirs = []string{"."}
		}
	}
	for _, d := range dirs {
		p := path
		if d != "" {
			p = filepath.Join(d, path)
		}
		if isGlob {
			m, err := filepath.Glob(p)
			if err != nil {
				return nil, fmt.Errorf("bad include glob %q: %v", path, err)
			}
			// Directories among the matches are skipped (include "/etc/sfunnel/*").
			m = slices.DeleteFunc(m, func(p string) bool {
				st, err := os.Stat(p)
				return err != nil || st.IsDir()
			})
			if len(m) > 0 {
				sort.Strings(m)
				return m, nil
			}
			continue
		}
		if st, err := os.Stat(p); err == nil {
			if st.IsDir() {
				return nil, fmt.Errorf("include %q is a directory (use a glob such as %q)", path, filepath.Join(path, "*.conf"))
			}
			return []string{p}, nil
		}
	}
	if isGlob {
		return nil, nil
	}
	return nil, fmt.Errorf("include file %q not found (searched %s)", path, strings.Join(dirs, ", "))
}

func (l *lowerer) setDecl(s *setSyntax) {
	span := spanOf(s.Tokens)
	set := &Set{Span: span, Name: s.Name}
	switch s.Type {
	case "ipv4_addr":
		set.Type = SetIPv4Addr
	case "ipv6_addr":
		set.Type = SetIPv6Addr
	case "inet_service":
		set.Type = SetInetService
	default:
		l.errorf(tokenSpan(s.Tokens, s.Type), "unknown set type %q (want ipv4_addr, ipv6_addr or inet_service)", s.Type)
		return
	}
	var elems []Value
	for _, p := range s.Props {
		pspan := spanOf(p.Tokens)
		switch {
		case p.Flags != nil:
			for _, f := range p.Flags {
				if f != "interval" {
					l.errorf(tokenSpan(p.Tokens, f), "unknown set flag %q (only interval is accepted; it is implied)", f)
				}
			}
		case p.Size != nil:
			if set.Size != 0 {
				l.errorf(pspan, "size given twice in set %q", s.Name)
				continue
			}
			if n, ok := l.number(p.Size, MaxSetElements); ok {
				if n == 0 {
					l.errorf(spanOf(p.Size.Tokens), "a set of size 0 could hold nothing")
					continue
				}
				set.Size = uint32(n)
			}
		case p.Elements != nil:
			elems = append(elems, l.values(p.Elements)...)
		}
	}
	if _, dup := l.sets[s.Name]; dup {
		l.errorf(span, "set %q is declared twice", s.Name)
	}
	l.sets[s.Name] = set.Type
	l.typeElements(set, elems)
	l.cmds = append(l.cmds, &Command{Span: span, Kind: CmdDefineSet, Set: set})
}

// typeElements checks elements against the set type and appends them to set,
// reporting duplicates at the duplicate.
func (l *lowerer) typeElements(set *Set, elems []Value) {
	// Sized up front: a block list may have tens of thousands of elements.
	nP, nR := len(set.Prefixes), len(set.Ports)
	if set.Type == SetInetService {
		nR += len(elems)
	} else {
		nP += len(elems)
	}
	seenP := make(map[netip.Prefix]bool, nP)
	seenR := make(map[PortRange]bool, nR)
	for _, p := range set.Prefixes {
		seenP[p] = true
	}
	for _, r := range set.Ports {
		seenR[r] = true
	}
	limit := set.Limit()
	for _, e := range elems {
		if len(set.Prefixes)+len(set.Ports) >= limit {
			l.errorf(e.Span, "set %q is full: it holds at most %d elements (%s)", set.Name, limit, sizeHint(set))
			return
		}
		switch set.Type {
		case SetInetService:
			r, ok := l.portRange(e)
			if !ok {
				continue
			}
			if seenR[r] {
				l.errorf(e.Span, "duplicate element %s in set %q", formatRange(r), set.Name)
				continue
			}
			seenR[r] = true
			set.Ports = append(set.Ports, r)
		default:
			p, ok := l.prefix(e)
			if !ok {
				continue
			}
			want := FamilyIPv4
			if set.Type == SetIPv6Addr {
				want = FamilyIPv6
			}
			if familyOf(p.Addr()) != want {
				l.errorf(e.Span, "%s is not an element of a set of type %s", e.Addr, set.Type)
				continue
			}
			if seenP[p] {
				l.errorf(e.Span, "duplicate element %s in set %q", formatPrefix(p), set.Name)
				continue
			}
			seenP[p] = true
			set.Prefixes = append(set.Prefixes, p)
		}
	}
}

func sizeHint(s *Set) string {
	if s.Size == 0 {
		return fmt.Sprintf("the default and maximum size is %d", MaxSetElements)
	}
	return fmt.Sprintf("declared with size %d", s.Size)
}

// CheckElements types element values against a set, as `add element` and
// `delete element` need once the set is known. New elements that are
// already in set are reported as duplicates when add is true.
func CheckElements(set *Set, elems []Value, add bool) (*Set, error) {
	l := &lowerer{opts: &Options{}}
	out := &Set{Name: set.Name, Type: set.Type, Size: set.Size}
	if add {
		out.Prefixes = append(out.Prefixes, set.Prefixes...)
		out.Ports = append(out.Ports, set.Ports...)
	}
	l.typeElements(out, elems)
	if len(l.errs) > 0 {
		return nil, l.errs
	}
	if add {
		out.Prefixes = out.Prefixes[len(set.Prefixes):]
		out.Ports = out.Ports[len(set.Ports):]
	}
	return out, nil
}

func (l *lowerer) interfaceBlock(b *interfaceSyntax) {
	seen := map[string]bool{}
	for _, n := range b.Names {
		name, nspan, ok := l.name(n)
		if !ok {
			continue
		}
		if seen[name] {
			l.errorf(nspan, "interface %s is listed twice", name)
			continue
		}
		seen[name] = true
		for _, h := range b.Hooks {
			hook := HookIngress
			if h.Hook == "egress" {
				hook = HookEgress
			}
			for _, line := range h.Rules {
				if line.Bad != nil {
					if seen[name] && name == firstName(b, l) {
						l.badLine(line.Bad)
					}
					continue
				}
				// Each interface gets its own copy of the rule.
				l.hookRule(name, nspan, hook, line.Rule, len(b.Names) > 1)
			}
		}
	}
}

// firstName is the first interface of a block, so a bad line of a block
// for several interfaces is reported once.
func firstName(b *interfaceSyntax, l *lowerer) string {
	if len(b.Names) == 0 {
		return ""
	}
	return b.Names[0].Name
}

// lineAlone parses the line of a syntax error on its own (as the command
// line would see it) and returns that error if it lies further into the
// line: participle backs out of a rule inside a block and blames an
// earlier token, while the line alone gets the specific message. Lines
// with braces are left as they are.
func lineAlone(filename, src string, e *Error) *Error {
	off := e.Span.Pos.Offset
	if off < 0 || off > len(src) {
		return nil
	}
	start := strings.LastIndexByte(src[:off], '\n') + 1
	end := len(src)
	if i := strings.IndexByte(src[off:], '\n'); i >= 0 {
		end = off + i
	}
	if strings.ContainsAny(src[start:end], "{}") {
		return nil
	}
	blank := []byte(src[:end])
	for i := 0; i < start; i++ {
		if blank[i] != '\n' {
			blank[i] = ' '
		}
	}
	_, err := parser.ParseBytes(filename, blank)
	if err == nil {
		return nil
	}
	alone, ok := parseError(err, string(blank)).(*Error)
	if !ok || alone.Span.Pos.Offset <= off || alone.Span.Pos.Offset > end {
		return nil
	}
	alone.Msg = strings.Replace(alone.Msg, "end of input", "end of line", 1)
	alone.IncludedFrom = e.IncludedFrom
	return alone
}

// hookRule lowers a rule of a hook block of interface name into an add
// rule command (a copy of the rule when several interfaces share it).
func (l *lowerer) hookRule(name string, nspan Span, hook Hook, rs *ruleSyntax, clone bool) {
	r := l.rule(rs)
	if r == nil {
		return
	}
	if clone {
		r = cloneRule(r)
	}
	l.cmds = append(l.cmds, &Command{Span: r.Span, Kind: CmdAddRule, Interface: name, InterfaceSpan: nspan, Hook: hook, HasHook: true, Rule: r})
}

// badLine reports a hook line that is not a rule by parsing it alone, with
// the rest of its file blanked so positions stay put: the message is the
// one the same text gets on the command line.
func (l *lowerer) badLine(b *badLineSyntax) {
	span := spanOf(b.Tokens)
	src := l.sources[span.Pos.Filename]
	if span.Pos.Offset < 0 || span.End.Offset > len(src) {
		l.errorf(span, "syntax error: not a rule")
		return
	}
	// The line alone, as the command line would have it: blanks before
	// (newlines kept), nothing after.
	end := len(src)
	if i := strings.IndexByte(src[span.End.Offset:], '\n'); i >= 0 {
		end = span.End.Offset + i
	}
	blank := []byte(src[:end])
	for i := 0; i < span.Pos.Offset; i++ {
		if blank[i] != '\n' {
			blank[i] = ' '
		}
	}
	_, err := parser.ParseBytes(span.Pos.Filename, blank)
	if err == nil {
		l.errorf(span, "syntax error, this is not a rule")
		return
	}
	if e, ok := parseError(err, string(blank)).(*Error); ok && e.Span.Pos.Offset >= span.Pos.Offset {
		e.Msg = strings.Replace(e.Msg, "end of input", "end of line", 1)
		e.IncludedFrom = append([]Span(nil), l.incl...)
		l.errs = append(l.errs, e)
		return
	}
	l.errorf(span, "syntax error, this is not a rule")
}

// name resolves an interface or set name, which may be a $var.
func (l *lowerer) name(n *nameSyntax) (string, Span, bool) {
	span := spanOf(n.Tokens)
	if !strings.HasPrefix(n.Name, "$") {
		return n.Name, span, true
	}
	vals := l.expand(n.Name, span)
	if vals == nil {
		return "", span, false
	}
	if len(vals) != 1 || vals[0].Name == "" {
		l.errorf(span, "%s does not hold a single name", n.Name)
		return "", span, false
	}
	return vals[0].Name, span, true
}

func (l *lowerer) hook(h *hookName) (Hook, Span) {
	span := spanOf(h.Tokens)
	if h.Hook == "egress" {
		return HookEgress, span
	}
	return HookIngress, span
}

func (l *lowerer) command(c *commandSyntax) {
	span := spanOf(c.Tokens)
	cmd := &Command{Span: span}
	target := func(t *targetSyntax) {
		if t == nil {
			return
		}
		name, nspan, _ := l.name(t.Name)
		cmd.Interface, cmd.InterfaceSpan = name, nspan
		if t.Hook != nil {
			cmd.Hook, _ = l.hook(t.Hook)
			cmd.HasHook = true
		}
	}
	ruleCmd := func(kind CmdKind, rc *ruleCmdSyntax) bool {
		cmd.Kind = kind
		name, nspan, _ := l.name(rc.Name)
		cmd.Interface, cmd.InterfaceSpan = name, nspan
		cmd.Hook, _ = l.hook(rc.Hook)
		cmd.HasHook = true
		switch {
		case rc.Position != nil && kind != CmdInsertRule && kind != CmdAddRule:
			l.errorf(spanOf(rc.Position.Tokens), "position is only for add rule and insert rule")
			return false
		case rc.Handle != nil && kind != CmdReplaceRule && kind != CmdDeleteRule:
			l.errorf(spanOf(rc.Handle.Tokens), "handle is only for replace rule and delete rule (add and insert take position)")
			return false
		case rc.Handle == nil && (kind == CmdReplaceRule || kind == CmdDeleteRule):
			l.errorf(span, "%s needs handle H (see list ruleset -a)", map[CmdKind]string{CmdReplaceRule: "replace rule", CmdDeleteRule: "delete rule"}[kind])
			return false
		}
		if rc.Position != nil {
			cmd.Handle, cmd.HandleSpan = l.handle(rc.Position)
		}
		if rc.Handle != nil {
			cmd.Handle, cmd.HandleSpan = l.handle(rc.Handle)
		}
		if kind == CmdDeleteRule {
			if rc.Rule != nil {
				l.errorf(spanOf(rc.Rule.Tokens), "delete rule takes no rule text after the handle")
				return false
			}
			return true
		}
		if rc.Rule == nil {
			l.errorf(span, "missing rule after %s %s", cmd.Interface, cmd.Hook)
			return false
		}
		cmd.Rule = l.rule(rc.Rule)
		return cmd.Rule != nil
	}
	elementCmd := func(kind CmdKind, ec *elementCmdSyntax) bool {
		cmd.Kind = kind
		name, _, ok := l.name(ec.Name)
		if !ok {
			return false
		}
		cmd.Set = &Set{Span: spanOf(ec.Name.Tokens), Name: name}
		cmd.Elements = l.nonEmpty(ec.Value)
		return cmd.Elements != nil
	}
	ok := true
	switch {
	case c.List != nil:
		switch {
		case c.List.Ruleset:
			cmd.Kind = CmdListRuleset
		case c.List.Interface != nil:
			cmd.Kind = CmdListInterface
			target(c.List.Interface)
		case c.List.Sets:
			cmd.Kind = CmdListSets
		case c.List.Set != nil:
			cmd.Kind = CmdListSet
			name, nspan, _ := l.name(c.List.Set)
			cmd.Set = &Set{Span: nspan, Name: name}
		}
	case c.Flush != nil:
		if c.Flush.Ruleset {
			cmd.Kind = CmdFlushRuleset
		} else {
			cmd.Kind = CmdFlushInterface
			target(c.Flush.Interface)
		}
	case c.Add != nil:
		if c.Add.Rule != nil {
			ok = ruleCmd(CmdAddRule, c.Add.Rule)
		} else {
			ok = elementCmd(CmdAddElement, c.Add.Element)
		}
	case c.Insert != nil:
		ok = ruleCmd(CmdInsertRule, c.Insert.Rule)
	case c.Replace != nil:
		ok = ruleCmd(CmdReplaceRule, c.Replace.Rule)
	case c.Delete != nil:
		switch {
		case c.Delete.Rule != nil:
			ok = ruleCmd(CmdDeleteRule, c.Delete.Rule)
		case c.Delete.Interface != nil:
			cmd.Kind = CmdDeleteInterface
			cmd.Interface, cmd.InterfaceSpan, ok = l.name(c.Delete.Interface)
		case c.Delete.Set != nil:
			cmd.Kind = CmdDeleteSet
			var name string
			var nspan Span
			name, nspan, ok = l.name(c.Delete.Set)
			cmd.Set = &Set{Span: nspan, Name: name}
		default:
			ok = elementCmd(CmdDeleteElement, c.Delete.Element)
		}
	case c.Reset != nil:
		cmd.Kind = CmdResetCounters
		target(c.Reset.Target)
	case c.Monitor:
		cmd.Kind, cmd.Trace = CmdMonitor, c.Trace
	}
	if ok {
		l.cmds = append(l.cmds, cmd)
	}
}

func (l *lowerer) handle(n *numberSyntax) (uint64, Span) {
	span := spanOf(n.Tokens)
	v, ok := l.number(n, 1<<53)
	if !ok {
		return 0, span
	}
	return v, span
}

// number resolves a number (or a $var holding one) and checks it is <= max.
func (l *lowerer) number(n *numberSyntax, max uint64) (uint64, bool) {
	span := spanOf(n.Tokens)
	text := n.Num
	if n.Var != "" {
		vals := l.expand(n.Var, span)
		if vals == nil {
			return 0, false
		}
		if len(vals) != 1 || vals[0].Lo == "" || vals[0].Hi != "" {
			l.errorf(span, "%s does not hold a single number", n.Var)
			return 0, false
		}
		text, span = vals[0].Lo, vals[0].Span
	}
	v, err := strconv.ParseUint(text, 0, 64)
	if err != nil || v > max {
		l.errorf(span, "%s is out of range (0-%d)%s", text, max, octalHint(text))
		return 0, false
	}
	return v, true
}

// octalHint explains why a number with a leading 0 and an 8 or 9 does not
// read: as in nft, a leading 0 makes a number octal (0443 is 291).
func octalHint(text string) string {
	if len(text) > 1 && text[0] == '0' && text[1] >= '0' && text[1] <= '9' && strings.ContainsAny(text, "89") {
		return ": a leading 0 makes a number octal, as in nft"
	}
	return ""
}

// values flattens a value (list, element or $var) into elements, expanding
// $vars recursively. @set references are not values here.
func (l *lowerer) values(v *valueSyntax) []Value {
	if v.SetRef != "" {
		l.errorf(spanOf(v.Tokens), "a set reference (%s) cannot be used here", v.SetRef)
		return nil
	}
	if v.Elem != nil {
		return l.appendElem(nil, v.Elem)
	}
	var out []Value
	if len(v.List) > 0 {
		out = make([]Value, 0, len(v.List))
	}
	for _, e := range v.List {
		out = l.appendElem(out, e)
	}
	return out
}

func (l *lowerer) appendElem(out []Value, e *elemSyntax) []Value {
	span := spanOf(e.Tokens)
	if e.Var != "" {
		return append(out, l.expand(e.Var, span)...)
	}
	return append(out, elemValue(e, span))
}

func elemValue(e *elemSyntax, span Span) Value {
	return Value{Span: span, Addr: e.Addr, Len: e.Len, Lo: e.Lo, Hi: e.Hi, Name: e.Name}
}

// matchValues is nonEmpty for a match, with a single element written
// into one rather than a list of its own: most matches are one element,
// and a large file has thousands of them.
func (l *lowerer) matchValues(v *valueSyntax, one *[1]Value) []Value {
	if e := v.Elem; e != nil && e.Var == "" {
		one[0] = elemValue(e, spanOf(e.Tokens))
		return one[:]
	}
	return l.nonEmpty(v)
}

// nonEmpty is values for a match or an element command, where an empty
// list is an error as in nft: `udp dport { }` would otherwise match every
// UDP packet once the empty match is dropped, the opposite of what it says.
func (l *lowerer) nonEmpty(v *valueSyntax) []Value {
	before := len(l.errs)
	vals := l.values(v)
	if len(vals) > 0 || len(l.errs) > before {
		return vals
	}
	span := spanOf(v.Tokens)
	if v.Elem != nil && v.Elem.Var != "" {
		l.errorf(span, "%s is an empty list: nft refuses { } too (to match nothing, use a named @set with no elements)", v.Elem.Var)
	} else {
		l.errorf(span, "empty list { }: nft refuses it too (to match nothing, use a named @set with no elements)")
	}
	return nil
}

// expand resolves a $var to its elements.
func (l *lowerer) expand(name string, use Span) []Value {
	d, ok := l.defines[strings.TrimPrefix(name, "$")]
	if !ok {
		l.errorf(use, "undefined variable %s", name)
		return nil
	}
	if d.busy {
		l.errorf(use, "variable %s refers to itself", name)
		return nil
	}
	d.busy = true
	defer func() { d.busy = false }()
	return l.values(d.value)
}

func (l *lowerer) prefix(e Value) (netip.Prefix, bool) {
	if e.Addr == "" {
		l.errorf(e.Span, "expected an address or prefix, found %s", e.text())
		return netip.Prefix{}, false
	}
	a, err := netip.ParseAddr(e.Addr)
	if err != nil {
		l.errorf(e.Span, "bad address %s", e.Addr)
		return netip.Prefix{}, false
	}
	bits := a.BitLen()
	if e.Len != "" {
		n, err := strconv.Atoi(e.Len)
		if err != nil || n < 0 || n > a.BitLen() {
			l.errorf(e.Span, "bad prefix length /%s for %s (0-%d)", e.Len, e.Addr, a.BitLen())
			return netip.Prefix{}, false
		}
		bits = n
	}
	// Host bits are cleared, as sfunnel does: 192.0.2.1/24 is 192.0.2.0/24.
	return netip.PrefixFrom(a, bits).Masked(), true
}

func (l *lowerer) portRange(e Value) (PortRange, bool) {
	if e.Lo == "" {
		l.errorf(e.Span, "expected a port or port range, found %s", e.text())
		return PortRange{}, false
	}
	lo, err := strconv.ParseUint(e.Lo, 0, 64)
	if err != nil || lo > 65535 {
		l.errorf(e.Span, "port %s is out of range (0-65535)%s", e.Lo, octalHint(e.Lo))
		return PortRange{}, false
	}
	hi := lo
	if e.Hi != "" {
		hi, err = strconv.ParseUint(e.Hi, 0, 64)
		if err != nil || hi > 65535 {
			l.errorf(e.Span, "port %s is out of range (0-65535)%s", e.Hi, octalHint(e.Hi))
			return PortRange{}, false
		}
		if hi < lo {
			l.errorf(e.Span, "port range %s-%s is empty (high end first?)", e.Lo, e.Hi)
			return PortRange{}, false
		}
	}
	return PortRange{Lo: uint16(lo), Hi: uint16(hi)}, true
}

func (v Value) text() string {
	switch {
	case v.Addr != "":
		return v.Addr
	case v.Lo != "" && v.Hi != "":
		return v.Lo + "-" + v.Hi
	case v.Lo != "":
		return v.Lo
	}
	return v.Name
}

func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return FamilyIPv4
	}
	return FamilyIPv6
}

func familyName(f Family) string {
	if f == FamilyIPv6 {
		return "ip6"
	}
	return "ip"
}

// tokenSpan finds the span of the first token with the given value.
func tokenSpan(toks []lexer.Token, value string) Span {
	for _, t := range toks {
		if t.Value == value {
			return spanOf([]lexer.Token{t})
		}
	}
	return spanOf(toks)
}

func cloneRule(r *Rule) *Rule {
	c := *r
	c.Actions = make([]*Action, len(r.Actions))
	for i, a := range r.Actions {
		ac := *a
		if a.Funnel != nil {
			f := *a.Funnel
			ac.Funnel = &f
		}
		c.Actions[i] = &ac
	}
	return &c
}
