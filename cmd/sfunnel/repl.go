package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/peterh/liner"
	"golang.org/x/term"

	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// The interactive prompt (SPEC §3.4): `sfunnel -i`.

const (
	prompt       = "sfunnel> "
	promptMore   = ".... "
	historyFile  = ".sfunnel_history"
	replFilename = "<cli>" // what errors call REPL input, as nft's interactive mode does
)

// errQuit ends the loop on `quit` or `exit`.
var errQuit = errors.New("quit")

// repl reads commands one at a time: each is its own transaction, an error
// is printed and the loop goes on. With a terminal on both ends it edits
// lines with history and Tab completion; otherwise it reads plain lines.
func (a *app) repl(stdin io.Reader) int {
	if isTerminal(stdin) && isTerminal(a.stdout) {
		return a.replTerminal()
	}
	// Prompts only make sense to someone typing.
	showPrompt := isTerminal(stdin)
	r := bufio.NewReader(stdin)
	read := func(p string) (string, error) {
		if showPrompt {
			io.WriteString(a.stdout, p)
		}
		line, err := r.ReadString('\n')
		if err == io.EOF && line != "" {
			err = nil // a last line without newline still counts
		}
		return strings.TrimRight(line, "\r\n"), err
	}
	return a.replLoop(read, nil, a.replCommand)
}

func isTerminal(x any) bool {
	f, ok := x.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

func (a *app) replTerminal() int {
	// Commands run with the terminal as it was (echo, Ctrl-C as SIGINT);
	// liner's raw mode is for editing only.
	cooked, cookedErr := liner.TerminalMode()
	ln := liner.NewLiner()
	defer ln.Close()
	raw, rawErr := liner.TerminalMode()
	run := a.replCommand
	if cookedErr == nil && rawErr == nil {
		run = func(text string) error {
			cooked.ApplyMode()
			defer raw.ApplyMode()
			return a.replCommand(text)
		}
	}
	// Ctrl-C while a command runs must not kill the session (leaving the
	// terminal raw); monitor stops on it by itself. A full channel drops
	// the signal, so nothing needs to read it.
	sigc := make(chan os.Signal, 1)
	signal.Notify(sigc, os.Interrupt)
	defer signal.Stop(sigc)
	ln.SetCtrlCAborts(true)
	ln.SetTabCompletionStyle(liner.TabPrints)
	ln.SetWordCompleter(func(line string, pos int) (string, []string, string) {
		return complete(line, pos, a.liveNames)
	})
	hist := historyPath()
	if hist != "" {
		if f, err := os.Open(hist); err == nil {
			ln.ReadHistory(f)
			f.Close()
		}
	}
	code := a.replLoop(ln.Prompt, ln.AppendHistory, run)
	if hist != "" {
		var b strings.Builder
		ln.WriteHistory(&b)
		// 0600: commands can name addresses and hosts the user keeps private.
		if err := ruleset.WriteFileAtomic(hist, []byte(b.String()), 0o600); err != nil {
			fmt.Fprintf(a.stderr, "Error: save history: %v\n", err)
		}
	}
	return code
}

// historyPath is ~/.sfunnel_history, "" when there is no home.
func historyPath() string {
	home := os.Getenv("HOME")
	if home == "" {
		var err error
		if home, err = os.UserHomeDir(); err != nil {
			return ""
		}
	}
	return filepath.Join(home, historyFile)
}

// replLoop runs commands read with read until end of input or quit.
// remember, if set, records each command for the history.
func (a *app) replLoop(read func(string) (string, error), remember func(string), run func(string) error) int {
	for {
		text, err := readCommand(read)
		switch {
		case errors.Is(err, liner.ErrPromptAborted):
			continue // Ctrl-C drops the line being typed
		case errors.Is(err, io.EOF):
			if isTerminal(a.stdout) {
				io.WriteString(a.stdout, "\n")
			}
			return a.sessionStatus()
		case err != nil:
			fmt.Fprintf(a.stderr, "Error: %v\n", err)
			return exitError
		}
		if strings.TrimSpace(text) == "" {
			continue
		}
		if remember != nil {
			remember(historyEntry(text))
		}
		if run(text) == errQuit {
			return a.sessionStatus()
		}
	}
}

// sessionStatus is the exit code of a prompt session: 0 for someone at a
// terminal (errors were shown as they happened), the last failure's code for
// a script piping commands into -i.
func (a *app) sessionStatus() int {
	if isTerminal(a.stdout) {
		return exitOK
	}
	return a.lastFailure
}

// readCommand reads one command, following lines that end in `\`.
func readCommand(read func(string) (string, error)) (string, error) {
	var lines []string
	p := prompt
	for {
		line, err := read(p)
		if err != nil {
			return "", err
		}
		lines = append(lines, line)
		if !strings.HasSuffix(line, `\`) {
			return strings.Join(lines, "\n"), nil
		}
		p = promptMore
	}
}

// historyEntry turns a continued command into one line that means the same.
func historyEntry(text string) string {
	parts := strings.Split(text, "\\\n")
	for i := range parts {
		parts[i] = strings.TrimSpace(parts[i])
	}
	return strings.Join(parts, " ")
}

var defineLine = regexp.MustCompile(`^\s*define\s+([A-Za-z_][A-Za-z0-9_]*)\s*=\s*([^;#]*?)\s*;?\s*$`)

// replCommand runs one command; errors are printed, not returned.
func (a *app) replCommand(text string) error {
	words := strings.Fields(text)
	switch words[0] {
	case "quit", "exit":
		if len(words) == 1 {
			return errQuit
		}
	case "save":
		a.save(words[1:])
		return nil
	}
	if code := a.report(a.exec(replFilename, text)); code != exitOK {
		a.lastFailure = code
		return nil
	}
	// A define stays for the rest of the session, as if given with -D.
	if m := defineLine.FindStringSubmatch(text); m != nil && !strings.Contains(text, "\n") {
		if a.opts.defines == nil {
			a.opts.defines = map[string]string{}
		}
		a.opts.defines[m[1]] = m[2]
	}
	return nil
}

// names are what Tab completes besides keywords.
type names struct {
	interfaces []string
	sets       []string
	// handles by "IF HOOK"; "" holds every handle.
	handles map[string][]string
}

// liveNames collects interface names (the system's and the ruleset's), set
// names and rule handles from the live ruleset.
func (a *app) liveNames() *names {
	n := &names{handles: map[string][]string{}}
	if ifs, err := net.Interfaces(); err == nil {
		for _, i := range ifs {
			n.interfaces = append(n.interfaces, i.Name)
		}
	}
	rs := a.liveRuleset()
	if rs != nil {
		for _, i := range rs.Interfaces {
			n.interfaces = append(n.interfaces, i.Name)
			for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
				for _, r := range i.Rules(h) {
					hs := strconv.FormatUint(r.Handle, 10)
					key := i.Name + " " + h.String()
					n.handles[key] = append(n.handles[key], hs)
					n.handles[""] = append(n.handles[""], hs)
				}
			}
		}
		for _, s := range rs.Sets {
			n.sets = append(n.sets, s.Name)
		}
	}
	slices.Sort(n.interfaces)
	n.interfaces = slices.Compact(n.interfaces)
	return n
}

// liveRuleset loads the ruleset for completion; nil if it cannot be read.
func (a *app) liveRuleset() *ruleset.Ruleset {
	b, err := a.openBackend()
	if err != nil {
		return nil
	}
	defer a.release()
	rs, err := b.Load()
	if err != nil {
		return nil
	}
	return rs
}
