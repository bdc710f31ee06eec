package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/vishvananda/netns"
	"golang.org/x/term"

	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/nftjson"
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

type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// Main runs sfunnel with argv (without the program name) and returns the
// exit code.
func Main(argv []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(argv) > 0 && argv[0] == "tunnel" {
		return runTunnel(argv[1:], stdout, stderr)
	}
	o, err := parseArgs(argv)
	if err != nil {
		var oe *optionOrderError
		if errors.As(err, &oe) {
			io.WriteString(stderr, oe.err.Format(grammar.Sources{"<cmdline>": oe.src}))
		} else {
			fmt.Fprintf(stderr, "Error: %v\n", err)
		}
		return exitUsage
	}
	switch {
	case o.help:
		io.WriteString(stdout, usage())
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
	case len(o.args) > 0 && o.args[0] == "__complete":
		return app.completeCommand(o.args[1:])
	case len(o.args) > 0 && o.args[0] == "save":
		return app.save(o.args[1:])
	case len(o.args) > 0 && o.args[0] == "metrics":
		return app.metrics(o.args[1:])
	case len(o.args) > 0:
		return app.runText("<cmdline>", strings.Join(o.args, " "))
	}
	if f, ok := stdin.(*os.File); ok && !term.IsTerminal(int(f.Fd())) {
		// Non-TTY stdin with no command reads like -f -.
		return app.runFile("-", stdin)
	}
	io.WriteString(stderr, usage())
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
	// fileInput: the command applies a ruleset file (-f).
	fileInput bool
}

func (a *app) runFile(path string, stdin io.Reader) int {
	a.fileInput = true
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
	if a.opts.json && nftjson.IsJSON(data) {
		// -j -f reads nft-shaped JSON, as nft -j -f does; a text file
		// still works with -j (its listings print as JSON).
		return a.report(a.execWith(name, string(data), func(opts *grammar.Options) ([]*grammar.Command, grammar.Sources, error) {
			return nftjson.Parse(name, data, opts)
		}))
	}
	return a.runText(name, string(data))
}

// runText parses and runs text as one transaction.
func (a *app) runText(name, text string) int {
	return a.report(a.exec(name, text))
}

// exec parses text and runs it as one transaction, under the lock.
func (a *app) exec(name, text string) error {
	return a.execWith(name, text, func(opts *grammar.Options) ([]*grammar.Command, grammar.Sources, error) {
		return grammar.Parse(name, text, opts)
	})
}

// execWith runs what parse returns as one transaction, under the lock.
func (a *app) execWith(name, text string, parse func(*grammar.Options) ([]*grammar.Command, grammar.Sources, error)) (err error) {
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
	if p, ok := b.(interface{ Prefetch() }); ok {
		p.Prefetch() // the live state is read while the input is parsed
	}
	// Set types come from the committed ruleset, read (without any lock)
	// only when the text names a set it does not define.
	var live *ruleset.Ruleset
	var loadErr error
	lookupSet := func(set string) (grammar.SetType, bool) {
		if live == nil && loadErr == nil {
			live, loadErr = b.Load()
		}
		if live == nil {
			return 0, false
		}
		return live.SetType(set)
	}
	if a.fileInput {
		limitMemoryEarly(text)
	}
	cmds, parsed, err := parse(&grammar.Options{
		Defines:     a.opts.defines,
		IncludeDirs: a.opts.includeDirs,
		LookupSet:   lookupSet,
	})
	if loadErr != nil {
		return loadErr
	}
	for k, v := range parsed {
		srcs[k] = v
	}
	if err != nil {
		return err
	}
	if a.fileInput {
		limitMemory(cmds, parsed)
	}
	s := &ruleset.Session{
		Backend:         b,
		Out:             a.stdout,
		Err:             a.stderr,
		JSON:            a.opts.json,
		Version:         version,
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
