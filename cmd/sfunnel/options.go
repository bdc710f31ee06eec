package main

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/pflag"

	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/ctmark"
	"github.com/sfunnel/sfunnel/grammar"
)

// options are the command-line flags (SPEC §3.1).
type options struct {
	file        string // -f
	check       bool   // -c
	json        bool   // -j
	handles     bool   // -a
	echo        bool   // -e
	interactive bool   // -i
	numeric     int    // -n: nft's numeric output; sfunnel's is always numeric
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

// hookValue is --hook: ingress, egress or both.
type hookValue struct{ hooks *[]grammar.Hook }

func (h hookValue) String() string { return "" }
func (h hookValue) Type() string   { return "ingress|egress|both" }
func (h hookValue) Set(v string) error {
	switch v {
	case "ingress":
		*h.hooks = []grammar.Hook{grammar.HookIngress}
	case "egress":
		*h.hooks = []grammar.Hook{grammar.HookEgress}
	case "both":
		*h.hooks = []grammar.Hook{grammar.HookIngress, grammar.HookEgress}
	default:
		return fmt.Errorf("wants ingress, egress or both, got %q", v)
	}
	return nil
}

// maskValue is --ct-mark-mask, checked when given (not when a rule first
// uses it): the mask the datapath and the nftables table can carry.
type maskValue struct{ mask *uint32 }

func (m maskValue) String() string { return "" }
func (m maskValue) Type() string   { return "MASK" }
func (m maskValue) Set(v string) error {
	n, err := strconv.ParseUint(v, 0, 32)
	if err != nil {
		return fmt.Errorf("wants a 32-bit mask, got %q", v)
	}
	if err := ctmark.CheckMask(uint32(n)); err != nil {
		return err
	}
	*m.mask = uint32(n)
	return nil
}

// listValue appends comma-separated words (--interface eth0,eth1).
type listValue struct{ list *[]string }

func (l listValue) String() string { return "" }
func (l listValue) Type() string   { return "IF[,IF]" }
func (l listValue) Set(v string) error {
	for _, f := range strings.Split(v, ",") {
		if f = strings.TrimSpace(f); f != "" {
			*l.list = append(*l.list, f)
		}
	}
	return nil
}

// newFlagSet declares every option once: parsing, the --help text, the
// option-after-command check and completion all read it.
func newFlagSet(o *options, defines *[]string) *pflag.FlagSet {
	fs := pflag.NewFlagSet("sfunnel", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	// Rule words follow the command; nothing after the first of them is an
	// option (nft's rule: options go before the command).
	fs.SetInterspersed(false)
	fs.SortFlags = false
	fs.StringVarP(&o.file, "file", "f", "", "apply `FILE` as one transaction (- reads stdin)")
	fs.BoolVarP(&o.check, "check", "c", false, "parse, compile and verify only; change nothing")
	fs.BoolVarP(&o.json, "json", "j", false, "JSON output (libnftables-json shape); with -f, read JSON")
	fs.BoolVarP(&o.handles, "handle", "a", false, "show rule handles")
	fs.BoolVarP(&o.echo, "echo", "e", false, "echo what was added, with handles")
	fs.BoolVarP(&o.interactive, "interactive", "i", false, "read commands from an interactive prompt")
	fs.VarPF(numericValue{&o.numeric}, "numeric", "n", "accepted as nft takes it, also repeated (sfunnel prints numbers anyway)").NoOptDefVal = "true"
	fs.StringArrayVarP(defines, "define", "D", nil, "define $NAME (with -f)")
	fs.Lookup("define").Value = &defineValue{defines}
	fs.Lookup("define").DefValue = ""
	fs.StringArrayVarP(&o.includeDirs, "includepath", "I", nil, "search `DIR` for include files")
	fs.StringVar(&o.netns, "netns", "", "operate inside the named network namespace `NAME`")
	fs.Var(listValue{&o.ifaces}, "interface", "with -f: where bare sfunnel rules go")
	fs.Var(hookValue{&o.hooks}, "hook", "with -f: the hook bare sfunnel rules go to")
	fs.StringVar(&o.state, "state", "", "keep the ruleset in `FILE` instead of the kernel")
	fs.Var(maskValue{&o.ctMarkMask}, "ct-mark-mask", fmt.Sprintf("mark bits that carry ct mark (default %#08x)", compiler.DefaultCtMarkMask))
	fs.BoolVarP(&o.verbose, "verbose", "v", false, "verbose errors (full verifier log); alone: print the version")
	fs.BoolVar(&o.version, "version", false, "print the version")
	fs.BoolVarP(&o.help, "help", "h", false, "print this help")
	return fs
}

// numericValue is -n: a switch that may be repeated (-nn), as nft's.
type numericValue struct{ n *int }

func (v numericValue) String() string   { return "" }
func (v numericValue) Type() string     { return "bool" }
func (v numericValue) IsBoolFlag() bool { return true }
func (v numericValue) Set(string) error { *v.n++; return nil }

// defineValue is -D NAME=VALUE, checked as given.
type defineValue struct{ list *[]string }

func (d *defineValue) String() string { return "" }
func (d *defineValue) Type() string   { return "NAME=VALUE" }
func (d *defineValue) Set(v string) error {
	if k, _, ok := strings.Cut(v, "="); !ok || k == "" {
		return fmt.Errorf("wants NAME=VALUE, got %q", v)
	}
	*d.list = append(*d.list, v)
	return nil
}

// usage builds the --help text from the flag set.
func usage() string {
	fs := newFlagSet(&options{}, new([]string))
	var b strings.Builder
	b.WriteString(`Usage: sfunnel [options] [command]
       sfunnel [options] -f FILE
       sfunnel -i
       sfunnel tunnel …

Options:
`)
	b.WriteString(fs.FlagUsagesWrapped(100))
	b.WriteString("\nCommands:\n")
	for _, u := range grammar.CommandUsage {
		b.WriteString("  " + u + "\n")
	}
	b.WriteString("  save FILE\n  metrics [ADDR]   (Prometheus metrics on http://ADDR/metrics)\n  tunnel …\n\nSee sfunnel(8) and sfunnel.conf(5).\n")
	return b.String()
}

func parseArgs(argv []string) (*options, error) {
	o := &options{defines: map[string]string{}}
	var defines []string
	fs := newFlagSet(o, &defines)
	if err := fs.Parse(argv); err != nil {
		return nil, flagError(err)
	}
	o.args = fs.Args()
	for _, d := range defines {
		k, v, _ := strings.Cut(d, "=")
		o.defines[k] = v
	}
	if err := optionAfterCommand(fs, o.args); err != nil {
		return nil, err
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

// flagError words pflag's errors as the rest of sfunnel's usage errors.
func flagError(err error) error {
	msg := err.Error()
	switch {
	case strings.HasPrefix(msg, "unknown flag: "):
		return usagef("unknown option %s (see sfunnel --help)", strings.TrimPrefix(msg, "unknown flag: "))
	case strings.HasPrefix(msg, "unknown shorthand flag: "):
		// "unknown shorthand flag: 'x' in -x"
		c := strings.TrimPrefix(msg, "unknown shorthand flag: ")
		return usagef("unknown option -%c (see sfunnel --help)", c[1])
	case strings.HasPrefix(msg, "flag needs an argument: "):
		// "flag needs an argument: 'f' in -f" or "flag needs an argument: --file"
		name := strings.TrimPrefix(msg, "flag needs an argument: ")
		if _, arg, ok := strings.Cut(name, " in "); ok {
			name = arg
		}
		return usagef("option %s needs a value", name)
	case strings.HasPrefix(msg, "invalid argument "):
		// invalid argument "x" for "--hook" flag: REASON
		rest := strings.TrimPrefix(msg, "invalid argument ")
		_, after, _ := strings.Cut(rest, " for ")
		name, reason, _ := strings.Cut(after, " flag: ")
		name = strings.Trim(name, `"`)
		if _, long, ok := strings.Cut(name, ", "); ok {
			name = long
		}
		return usagef("%s %s", name, reason)
	}
	return usagef("%s", msg)
}

// optionAfterCommand finds an option written after the command words
// (`list ruleset -a`) and says what nft says: options go first. Rule text
// has no words that start with '-', so the check cannot misfire on a rule.
func optionAfterCommand(fs *pflag.FlagSet, args []string) error {
	col := 1
	for _, a := range args {
		if isOption(fs, a) {
			text := strings.Join(args, " ")
			span := grammar.Span{
				Pos: grammar.Pos{Filename: "<cmdline>", Line: 1, Column: col, Offset: col - 1},
				End: grammar.Pos{Filename: "<cmdline>", Line: 1, Column: col + len(a), Offset: col - 1 + len(a)},
			}
			return &optionOrderError{err: &grammar.Error{Span: span,
				Msg: fmt.Sprintf("syntax error, options must be specified before commands (sfunnel %s %s)", a, strings.Join(slicesWithout(args, a), " "))},
				src: text}
		}
		col += len(a) + 1
	}
	return nil
}

func slicesWithout(args []string, drop string) []string {
	var out []string
	for _, a := range args {
		if a != drop {
			out = append(out, a)
		}
	}
	return out
}

// isOption reports whether a is an option of fs: --long[=v], -x, or a
// cluster of short options (-aj).
func isOption(fs *pflag.FlagSet, a string) bool {
	if name, ok := strings.CutPrefix(a, "--"); ok {
		name, _, _ = strings.Cut(name, "=")
		return name != "" && fs.Lookup(name) != nil
	}
	if len(a) < 2 || a[0] != '-' {
		return false
	}
	for _, c := range a[1:] {
		if fs.ShorthandLookup(string(c)) == nil {
			return false
		}
	}
	return true
}

// optionOrderError is a usage error located in the command line.
type optionOrderError struct {
	err *grammar.Error
	src string
}

func (e *optionOrderError) Error() string { return e.err.Error() }
func (e *optionOrderError) Unwrap() error { return e.err }

// errIsUsage reports whether err is one of the usage errors above.
func errIsUsage(err error) bool {
	var ue *usageError
	var oe *optionOrderError
	return errors.As(err, &ue) || errors.As(err, &oe)
}
