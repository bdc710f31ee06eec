package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/term"

	"github.com/sfunnel/sfunnel/ctmark"
	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Exit codes (SPEC §3.3).
const (
	exitOK         = 0
	exitError      = 1 // ruleset or kernel error
	exitUsage      = 2
	exitPermission = 3 // no permission or missing kernel feature
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "0.1.0-dev"

// options are the command-line flags (SPEC §3.1).
type options struct {
	file        string // -f
	check       bool   // -c
	json        bool   // -j
	handles     bool   // -a
	echo        bool   // -e
	interactive bool   // -i
	verbose     bool   // -v with work to do: full verifier logs
	version     bool   // -v alone, --version
	help        bool
	defines     map[string]string
	includeDirs []string
	netns       string
	state       string // --state FILE: keep the ruleset in a file, no kernel
	ctMarkMask  uint32 // --ct-mark-mask: skb mark bits that carry ct mark values
	ifaces      []string
	hooks       []grammar.Hook
	args        []string // the command words
}

type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

const usageText = `Usage: sfunnel [options] [command]
       sfunnel [options] -f FILE
       sfunnel -i
       sfunnel tunnel …

Options:
  -f, --file FILE         apply FILE as one transaction (- reads stdin)
  -c, --check             parse, compile and verify only; change nothing
  -j, --json              JSON output
  -a, --handle            show rule handles
  -e, --echo              echo what was added, with handles
  -i, --interactive       read commands from an interactive prompt
  -D, --define NAME=VALUE define $NAME (with -f)
  -I, --includepath DIR   search DIR for include files
      --netns NAME        operate inside the named network namespace
      --interface IF[,IF] with -f: where bare sfunnel rules go
      --hook ingress|egress|both
                          with -f: the hook bare sfunnel rules go to
      --state FILE        keep the ruleset in FILE instead of the kernel
      --ct-mark-mask MASK mark bits that carry ct mark (default 0x00ff0000)
  -v, --version           print the version (with a command: verbose errors)
  -h, --help              print this help

Commands:
  list ruleset | list interface IF [HOOK] | list sets | list set NAME
  flush ruleset | flush interface IF [HOOK]
  add rule IF HOOK RULE           insert rule IF HOOK [position H] RULE
  replace rule IF HOOK handle H RULE
  delete rule IF HOOK handle H    delete interface IF
  add element NAME { … }          delete element NAME { … }
  add set NAME { type T; … }      delete set NAME
  reset counters [IF [HOOK]]      monitor
  save FILE                       tunnel …

See sfunnel(8) and sfunnel.conf(5).
`

func parseArgs(argv []string) (*options, error) {
	o := &options{defines: map[string]string{}}
	argv = splitShortFlags(argv)
	for i := 0; i < len(argv); i++ {
		a := argv[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			o.args = argv[i:]
			break
		}
		if a == "--" {
			o.args = argv[i+1:]
			break
		}
		name, val, hasVal := strings.Cut(a, "=")
		next := func() (string, error) {
			if hasVal {
				return val, nil
			}
			if i+1 >= len(argv) {
				return "", usagef("option %s needs a value", name)
			}
			i++
			return argv[i], nil
		}
		var err error
		var v string
		switch name {
		case "-f", "--file":
			o.file, err = next()
		case "-c", "--check":
			o.check = true
		case "-j", "--json":
			o.json = true
		case "-a", "--handle":
			o.handles = true
		case "-e", "--echo":
			o.echo = true
		case "-i", "--interactive":
			o.interactive = true
		case "-v":
			o.verbose = true
		case "--version":
			o.version = true
		case "-h", "--help":
			o.help = true
		case "-D", "--define":
			if v, err = next(); err == nil {
				k, val, ok := strings.Cut(v, "=")
				if !ok || k == "" {
					return nil, usagef("-D wants NAME=VALUE, got %q", v)
				}
				o.defines[k] = val
			}
		case "-I", "--includepath":
			if v, err = next(); err == nil {
				o.includeDirs = append(o.includeDirs, v)
			}
		case "--netns":
			o.netns, err = next()
		case "--state":
			o.state, err = next()
		case "--ct-mark-mask":
			if v, err = next(); err == nil {
				m, perr := strconv.ParseUint(v, 0, 32)
				if perr != nil {
					return nil, usagef("--ct-mark-mask wants a 32-bit mask, got %q", v)
				}
				if merr := ctmark.CheckMask(uint32(m)); merr != nil {
					return nil, usagef("--ct-mark-mask %s: %v", v, merr)
				}
				o.ctMarkMask = uint32(m)
			}
		case "--interface":
			if v, err = next(); err == nil {
				for _, f := range strings.Split(v, ",") {
					if f = strings.TrimSpace(f); f != "" {
						o.ifaces = append(o.ifaces, f)
					}
				}
			}
		case "--hook":
			if v, err = next(); err == nil {
				switch v {
				case "ingress":
					o.hooks = []grammar.Hook{grammar.HookIngress}
				case "egress":
					o.hooks = []grammar.Hook{grammar.HookEgress}
				case "both":
					o.hooks = []grammar.Hook{grammar.HookIngress, grammar.HookEgress}
				default:
					return nil, usagef("--hook wants ingress, egress or both, got %q", v)
				}
			}
		default:
			return nil, usagef("unknown option %s (see sfunnel --help)", a)
		}
		if err != nil {
			return nil, err
		}
		// Single-dash value options may not take "=": -f=x is a mistake.
		if hasVal && !strings.HasPrefix(name, "--") {
			return nil, usagef("write %s VALUE, not %s", name, a)
		}
	}
	// -v alone asks for the version; -v with work to do asks for detail.
	if o.verbose && o.file == "" && len(o.args) == 0 && !o.interactive {
		o.version = true
	}
	if len(o.defines) > 0 && o.file == "" {
		return nil, usagef("-D is only for -f FILE")
	}
	if (len(o.ifaces) > 0) != (len(o.hooks) > 0) {
		return nil, usagef("--interface and --hook go together")
	}
	if len(o.ifaces) > 0 && o.file == "" {
		return nil, usagef("--interface/--hook are for applying a bare sfunnel ruleset file with -f")
	}
	if o.interactive && (o.file != "" || len(o.args) > 0) {
		return nil, usagef("-i reads commands from the prompt; it takes no -f FILE or command words")
	}
	if o.file != "" && len(o.args) > 0 {
		return nil, usagef("-f FILE takes no command words (got %q)", strings.Join(o.args, " "))
	}
	return o, nil
}

// splitShortFlags expands combined boolean short options as nft takes
// them: -ae is -a -e. It stops at the first word that is not an option.
func splitShortFlags(argv []string) []string {
	takesValue := map[string]bool{"-f": true, "-D": true, "-I": true, "--file": true, "--define": true,
		"--includepath": true, "--netns": true, "--state": true, "--interface": true, "--hook": true, "--ct-mark-mask": true}
	var out []string
	for i := 0; i < len(argv); i++ {
		a := argv[i]
		if !strings.HasPrefix(a, "-") || a == "-" || a == "--" {
			return append(out, argv[i:]...)
		}
		if len(a) > 2 && a[1] != '-' && strings.Trim(a[1:], "cjaeiv") == "" {
			for _, c := range a[1:] {
				out = append(out, "-"+string(c))
			}
			continue
		}
		out = append(out, a)
		if takesValue[a] && i+1 < len(argv) {
			i++
			out = append(out, argv[i])
		}
	}
	return out
}

// Main runs sfunnel with argv (without the program name) and returns the
// exit code.
func Main(argv []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(argv) > 0 && argv[0] == "tunnel" {
		return runTunnel(argv[1:], stdout, stderr)
	}
	o, err := parseArgs(argv)
	if err != nil {
		fmt.Fprintf(stderr, "Error: %v\n", err)
		return exitUsage
	}
	switch {
	case o.help:
		io.WriteString(stdout, usageText)
		return exitOK
	case o.version:
		fmt.Fprintf(stdout, "sfunnel v%s\n", version)
		return exitOK
	}
	if o.netns != "" {
		if err := enterNetns(o.netns); err != nil {
			fmt.Fprintf(stderr, "Error: %v\n", err)
			if errors.Is(err, os.ErrPermission) {
				return exitPermission
			}
			return exitError
		}
	}
	app := &app{opts: o, stdout: stdout, stderr: stderr}
	switch {
	case o.interactive:
		return app.repl(stdin)
	case o.file != "":
		return app.runFile(o.file, stdin)
	case len(o.args) > 0 && o.args[0] == "save":
		return app.save(o.args[1:])
	case len(o.args) > 0:
		return app.runText("<cmdline>", strings.Join(o.args, " "))
	}
	if f, ok := stdin.(*os.File); ok && !term.IsTerminal(int(f.Fd())) {
		// Non-TTY stdin with no command reads like -f -.
		return app.runFile("-", stdin)
	}
	io.WriteString(stderr, usageText)
	return exitUsage
}

func enterNetns(name string) error {
	h, err := netns.GetFromName(name)
	if err != nil {
		return fmt.Errorf("network namespace %q: %w", name, err)
	}
	defer h.Close()
	if err := netns.Set(h); err != nil {
		return fmt.Errorf("enter network namespace %q: %w", name, err)
	}
	return nil
}

// app carries one invocation's settings to the commands it runs.
type app struct {
	opts           *options
	stdout, stderr io.Writer
	backend        ruleset.Backend
	unlock         func()
	// lastFailure is the exit code of the last failed command at the
	// prompt; a non-interactive `-i` session exits with it.
	lastFailure int
}

func (a *app) runFile(path string, stdin io.Reader) int {
	name := path
	var data []byte
	var err error
	if path == "-" {
		name = "/dev/stdin"
		data, err = grammar.ReadBounded(stdin, name)
	} else {
		data, err = grammar.ReadSource(path)
	}
	if err != nil {
		fmt.Fprintf(a.stderr, "Error: %v\n", err)
		return exitError
	}
	return a.runText(name, string(data))
}

// runText parses and runs text as one transaction.
func (a *app) runText(name, text string) int {
	return a.report(a.exec(name, text))
}

// exec parses text and runs it as one transaction, under the lock.
func (a *app) exec(name, text string) (err error) {
	srcs := grammar.Sources{name: text}
	defer func() {
		if err != nil {
			err = &shownError{err: err, srcs: srcs, verbose: a.opts.verbose}
		}
	}()
	b, err := a.openBackend()
	if err != nil {
		return err
	}
	defer a.release()
	live, err := b.Load()
	if err != nil {
		return err
	}
	cmds, parsed, err := grammar.Parse(name, text, &grammar.Options{
		Defines:     a.opts.defines,
		IncludeDirs: a.opts.includeDirs,
		LookupSet:   live.SetType,
	})
	for k, v := range parsed {
		srcs[k] = v
	}
	if err != nil {
		return err
	}
	s := &ruleset.Session{
		Backend:         b,
		Out:             a.stdout,
		JSON:            a.opts.json,
		Handles:         a.opts.handles,
		Echo:            a.opts.echo,
		Check:           a.opts.check,
		InterfaceExists: interfaceExists,
	}
	if db, ok := b.(*datapath.Backend); ok {
		s.Monitor = a.monitor(db)
	}
	if len(a.opts.ifaces) > 0 {
		s.Bare = &ruleset.BareTarget{Interfaces: a.opts.ifaces, Hooks: a.opts.hooks}
	}
	return s.Run(cmds)
}

func interfaceExists(name string) bool {
	_, err := net.InterfaceByName(name)
	return err == nil
}

// shownError carries what is needed to print an error with its source.
type shownError struct {
	err     error
	srcs    grammar.Sources
	verbose bool
}

func (e *shownError) Error() string { return e.err.Error() }
func (e *shownError) Unwrap() error { return e.err }

// report prints err (if any) in nft's format and returns the exit code.
func (a *app) report(err error) int {
	if err == nil {
		return exitOK
	}
	var srcs grammar.Sources
	verbose := a.opts.verbose
	var se *shownError
	if errors.As(err, &se) {
		srcs, verbose = se.srcs, se.verbose
		err = se.err
	}
	var ve *ebpf.VerifierError
	if verbose && errors.As(err, &ve) {
		fmt.Fprintf(a.stderr, "%+v\n", ve)
	}
	err = locateKernelError(err)
	io.WriteString(a.stderr, grammar.FormatError(err, srcs))
	if errors.Is(err, os.ErrPermission) {
		io.WriteString(a.stderr, "sfunnel needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (for bpffs and setns)\n")
	}
	return exitCode(err)
}

func exitCode(err error) int {
	var ue *usageError
	switch {
	case errors.As(err, &ue):
		return exitUsage
	case errors.Is(err, os.ErrPermission), errors.Is(err, ebpf.ErrNotSupported):
		return exitPermission
	}
	return exitError
}

// save writes the live ruleset to FILE atomically, as a file that restores
// it with `sfunnel -f FILE`.
func (a *app) save(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(a.stderr, "Error: usage: sfunnel save FILE")
		return exitUsage
	}
	b, err := a.openBackend()
	if err != nil {
		return a.report(err)
	}
	defer a.release()
	rs, err := b.Load()
	if err != nil {
		return a.report(err)
	}
	var sb strings.Builder
	sb.WriteString("#!/usr/sbin/sfunnel -f\nflush ruleset\n\n")
	if err := ruleset.WriteText(&sb, rs, nil, &ruleset.ListOptions{}); err != nil {
		return a.report(err)
	}
	if err := ruleset.SaveFile(args[0], []byte(sb.String())); err != nil {
		return a.report(err)
	}
	return exitOK
}
