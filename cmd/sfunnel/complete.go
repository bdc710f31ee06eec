package main

import (
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/pflag"

	"github.com/sfunnel/sfunnel/grammar"
)

// Tab completion for the REPL and, through `sfunnel __complete`, for bash.
// Command words come from grammar.CommandUsage and rule words from the
// grammar's keyword tables, so completion cannot drift from the language.

var (
	funnelFields = []string{"sport", "dport", "flags", "seq", "ack", "window"}
	setWords     = []string{"type", "flags", "size", "elements", "interval"}
	// startWords begin a command or file statement; quit and exit only
	// mean something at the prompt, save and tunnel only on the command line.
	startWords = func() []string {
		var w []string
		for _, u := range grammar.CommandUsage {
			w = append(w, strings.Fields(u)[0])
		}
		w = append(w, grammar.FileWords...)
		return sortedUnion(w, []string{"save", "quit", "exit"})
	}()
	allKeywords = func() []string {
		lists := [][]string{startWords, grammar.Hooks, grammar.SetTypes, grammar.MatchWords, grammar.StatementWords,
			grammar.ActionWords, grammar.RuleWords, grammar.TCPFlags, funnelFields, setWords, {"encap", "decap"}}
		for _, v := range usageVariants {
			lists = append(lists, literals(v))
		}
		return sortedUnion(lists...)
	}()
	// usageVariants are the usage lines with every choice of their
	// optional [parts], split into words without punctuation.
	usageVariants = func() [][]string {
		var out [][]string
		for _, u := range grammar.CommandUsage {
			out = append(out, expandUsage(usageWords(u))...)
		}
		return out
	}()
)

func sortedUnion(lists ...[]string) []string {
	var all []string
	for _, l := range lists {
		all = append(all, l...)
	}
	slices.Sort(all)
	return slices.Compact(all)
}

// usageWords splits a usage line into words and brackets, dropping the
// punctuation completion skips ({ } ; , =).
func usageWords(u string) []string {
	u = strings.NewReplacer("[", " [ ", "]", " ] ").Replace(u)
	var out []string
	for _, w := range strings.Fields(u) {
		if !strings.ContainsAny(w, "{};,=") {
			out = append(out, w)
		}
	}
	return out
}

// expandUsage returns every sequence the optional [groups] allow.
func expandUsage(words []string) [][]string {
	at := slices.Index(words, "[")
	if at < 0 {
		return [][]string{words}
	}
	depth, end := 0, at
	for i := at; i < len(words); i++ {
		if words[i] == "[" {
			depth++
		} else if words[i] == "]" {
			if depth--; depth == 0 {
				end = i
				break
			}
		}
	}
	before, inner, after := words[:at], words[at+1:end], words[end+1:]
	var out [][]string
	for _, tail := range expandUsage(after) {
		out = append(out, concat(before, tail))
		for _, mid := range expandUsage(inner) {
			out = append(out, concat(before, mid, tail))
		}
	}
	return out
}

func concat(parts ...[]string) []string {
	var out []string
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func literals(words []string) []string {
	var out []string
	for _, w := range words {
		if !isPlaceholder(w) {
			out = append(out, w)
		}
	}
	return out
}

func isPlaceholder(w string) bool { return w != "" && w == strings.ToUpper(w) }

// complete is liner's word completer: it returns the text before the word
// under the cursor, the candidates for that word (each with a trailing
// space) and the text after the cursor. live is called only when the
// position wants names from the ruleset or the system.
func complete(line string, pos int, live func() *names) (string, []string, string) {
	before, tail := line[:pos], line[pos:]
	start := strings.LastIndexAny(before, " \t{},;") + 1
	head, word := before[:start], before[start:]

	// The words of the command under the cursor, without punctuation.
	cmd := head[lastTopSemicolon(head)+1:]
	words := strings.Fields(strings.NewReplacer("{", " ", "}", " ", ",", " ", "=", " ", ";", " ").Replace(cmd))

	var cands []string
	var n *names
	get := func() *names {
		if n == nil {
			n = live()
		}
		return n
	}
	switch {
	case strings.HasPrefix(word, "@"):
		for _, s := range get().sets {
			cands = append(cands, "@"+s)
		}
	case strings.HasPrefix(word, "$"):
		// Variables are the user's own; nothing to offer.
	default:
		cands = candidates(words, get)
	}
	var out []string
	for _, c := range cands {
		if strings.HasPrefix(c, word) {
			out = append(out, c+" ")
		}
	}
	if len(out) == 0 && word != "" && !strings.ContainsAny(word[:1], "@$") {
		for _, c := range allKeywords {
			if strings.HasPrefix(c, word) {
				out = append(out, c+" ")
			}
		}
	}
	slices.Sort(out)
	return head, slices.Compact(out), tail
}

// lastTopSemicolon is the index of the last `;` outside braces (a `;`
// inside `set s { type …; … }` does not end the command), -1 if none.
func lastTopSemicolon(s string) int {
	depth, last := 0, -1
	for i, c := range s {
		switch c {
		case '{':
			depth++
		case '}':
			depth--
		case ';':
			if depth <= 0 {
				last = i
			}
		}
	}
	return last
}

// candidates lists what may follow words, the words typed so far in the
// command.
func candidates(words []string, live func() *names) []string {
	if len(words) == 0 {
		return startWords
	}
	switch words[0] {
	case "interface":
		switch len(words) {
		case 1:
			return live().interfaces
		case 2:
			return grammar.Hooks
		}
		return append(slices.Clone(grammar.Hooks), ruleCandidates(words[2:])...)
	case "set":
		return setCandidates(words)
	case "monitor", "quit", "exit", "save", "include", "define":
		if words[0] == "monitor" && len(words) == 1 {
			break
		}
		return nil
	}
	var out []string
	for _, v := range usageVariants {
		out = append(out, usageCandidates(v, words, live)...)
	}
	return sortedUnion(out)
}

// setCandidates follows a set declaration: `set NAME { type TYPE; … }`.
func setCandidates(words []string) []string {
	switch words[len(words)-1] {
	case "type":
		return grammar.SetTypes
	case "flags":
		return []string{"interval"}
	case "size", "elements", "set":
		return nil
	}
	return setWords
}

// usageCandidates returns what may follow words if they are a prefix of
// the usage variant v.
func usageCandidates(v, words []string, live func() *names) []string {
	for i, w := range words {
		if i >= len(v) {
			return nil
		}
		switch v[i] {
		case "RULE":
			if w == "position" || w == "handle" {
				return nil // the variant with [position H]
			}
			return ruleCandidates(words[i:])
		case "ELEMENTS":
			return nil
		case "TYPE":
			if !slices.Contains(grammar.SetTypes, w) {
				return nil
			}
		case "HOOK":
			if !slices.Contains(grammar.Hooks, w) {
				return nil
			}
		default:
			if !isPlaceholder(v[i]) && v[i] != w {
				return nil
			}
		}
	}
	if len(words) >= len(v) {
		return nil
	}
	switch next := v[len(words)]; next {
	case "IF":
		return live().interfaces
	case "HOOK":
		return grammar.Hooks
	case "NAME":
		if v[0] == "add" && v[1] == "set" {
			return nil // a new name
		}
		return live().sets
	case "H":
		nm := live()
		if len(words) >= 4 {
			if h, ok := nm.handles[words[2]+" "+words[3]]; ok {
				return h
			}
		}
		return nm.handles[""]
	case "TYPE":
		return grammar.SetTypes
	case "RULE":
		return ruleCandidates(nil)
	case "ELEMENTS", "N":
		return nil
	default:
		return []string{next}
	}
}

// ruleCandidates lists the keywords that may follow words inside a rule.
func ruleCandidates(words []string) []string {
	last := ""
	if len(words) > 0 {
		last = words[len(words)-1]
	}
	switch last {
	case "funnel":
		return []string{"tcp", "udp", "encap"}
	case "unfunnel":
		return []string{"tcp", "udp", "decap"}
	case "rewrite", "encap", "decap", "protocol", "nexthdr", "l4proto":
		return []string{"tcp", "udp"}
	case "nfproto":
		return []string{"ipv4", "ipv6"}
	case "flags":
		return grammar.TCPFlags
	case "meta":
		return []string{"mark", "l4proto", "nfproto", "nftrace"}
	case "ct":
		return []string{"mark"}
	case "mark", "nftrace":
		return []string{"set"}
	case "dnat":
		return []string{"to"}
	case "comment", "saddr", "daddr", "sport", "dport", "seq", "ack", "window", "to", "set":
		return nil // a value follows
	}
	if last == "actions" {
		return grammar.ActionWords
	}
	if at := slices.IndexFunc(words, func(w string) bool { return w == "actions" || slices.Contains(grammar.ActionWords, w) }); at >= 0 {
		// After an action: another one, the comment, or the fields of a
		// funnel being written.
		next := append(slices.Clone(grammar.ActionWords), "comment")
		for _, w := range slices.Backward(words[at:]) {
			if slices.Contains(grammar.ActionWords, w) {
				if w == "funnel" {
					next = append(next, funnelFields...)
				}
				break
			}
		}
		return next
	}
	out := sortedUnion(grammar.MatchWords, grammar.StatementWords, grammar.ActionWords, []string{"actions", "comment"})
	switch last {
	case "ip":
		out = append(out, "protocol")
	case "ip6":
		out = append(out, "nexthdr")
	}
	return out
}

// completeCommand is `sfunnel [options] __complete WORD… CUR`: bash
// completion asks the binary, so both complete from the same tables. It
// prints one candidate a line. A CUR starting with '-' before any command
// word lists the options.
func (a *app) completeCommand(args []string) int {
	cur := ""
	if len(args) > 0 {
		cur, args = args[len(args)-1], args[:len(args)-1]
	}
	if len(args) == 0 && strings.HasPrefix(cur, "-") {
		for _, o := range optionNames() {
			if strings.HasPrefix(o, cur) {
				fmt.Fprintln(a.stdout, o)
			}
		}
		return exitOK
	}
	if len(args) == 0 {
		// On the command line a command comes first (no file statements,
		// no quit); tunnel is bash's to add.
		var first []string
		for _, u := range grammar.CommandUsage {
			first = append(first, strings.Fields(u)[0])
		}
		for _, w := range sortedUnion(first, []string{"save", "metrics"}) {
			if strings.HasPrefix(w, cur) {
				fmt.Fprintln(a.stdout, w)
			}
		}
		return exitOK
	}
	line := strings.Join(append(args, cur), " ")
	_, cands, _ := complete(line, len(line), a.liveNames)
	for _, c := range cands {
		fmt.Fprintln(a.stdout, strings.TrimSuffix(c, " "))
	}
	return exitOK
}

// optionNames lists every option as written: -x and --long.
func optionNames() []string {
	var out []string
	fs := newFlagSet(&options{}, new([]string))
	fs.VisitAll(func(f *pflag.Flag) {
		if f.Shorthand != "" {
			out = append(out, "-"+f.Shorthand)
		}
		out = append(out, "--"+f.Name)
	})
	return out
}
