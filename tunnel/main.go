// Package tunnel is `sfunnel tunnel`: userspace tunnels through a TUN
// device the daemon creates itself. It carries TCP segments in UDP
// datagrams between authenticated peers (udp-encap-tun's format), or whole
// IP packets over UDP or over TCP with a 2-byte length prefix.
package tunnel

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/auth"
	"github.com/spf13/pflag"
)

// Exit codes, as for the rest of sfunnel.
const (
	ExitOK         = 0
	ExitError      = 1
	ExitUsage      = 2
	ExitPermission = 3
)

// Main runs `sfunnel tunnel ARGS…` and returns the exit code.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "genkey":
			return genkey(args[1:], stdout, stderr)
		case "status":
			return status(args[1:], stdout, stderr)
		case "run":
			args = args[1:]
		case "help":
			fmt.Fprint(stdout, runUsage)
			return ExitOK
		}
	}
	cfg, err := parseRunFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, runUsage)
		return ExitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "sfunnel tunnel: %v\n", err)
		fmt.Fprintln(stderr, "see: sfunnel tunnel --help")
		return ExitUsage
	}
	if err := run(cfg, stderr); err != nil {
		fmt.Fprintf(stderr, "sfunnel tunnel: %v\n", err)
		var ee *exitError
		if errors.As(err, &ee) {
			return ee.code
		}
		return ExitError
	}
	return ExitOK
}

func genkey(args []string, stdout, stderr io.Writer) int {
	switch len(args) {
	case 0:
		fmt.Fprint(stdout, auth.FormatKey(auth.GenerateKey()))
		return ExitOK
	case 1:
		if args[0] == "-h" || args[0] == "--help" {
			fmt.Fprintln(stdout, "usage: sfunnel tunnel genkey [FILE]   (FILE is created with mode 0600; without it the key goes to stdout)")
			return ExitOK
		}
		if err := auth.WriteKeyFile(args[0]); err != nil {
			fmt.Fprintf(stderr, "sfunnel tunnel genkey: %v\n", err)
			if errors.Is(err, os.ErrPermission) {
				return ExitPermission
			}
			return ExitError
		}
		return ExitOK
	}
	fmt.Fprintln(stderr, "usage: sfunnel tunnel genkey [FILE]")
	return ExitUsage
}

func status(args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("sfunnel tunnel status", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	ifname := "tun0"
	var sock string
	var asJSON bool
	fs.StringVarP(&ifname, "interface", "i", ifname, "tunnel interface")
	fs.StringVar(&sock, "status-socket", "", "status socket of the daemon")
	fs.BoolVarP(&asJSON, "json", "j", false, "JSON output")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintln(stdout, "usage: sfunnel tunnel status [-i IF | --status-socket PATH] [-j]")
			return ExitOK
		}
		fmt.Fprintf(stderr, "sfunnel tunnel status: %v\n", err)
		return ExitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "sfunnel tunnel status: unexpected argument %q\n", fs.Arg(0))
		return ExitUsage
	}
	if sock == "" {
		sock = defaultStatusSocket(ifname)
	}
	c, err := net.DialTimeout("unix", sock, 2*time.Second)
	if err != nil {
		fmt.Fprintf(stderr, "sfunnel tunnel status: no tunnel daemon answers on %s: %v\n", sock, err)
		if errors.Is(err, os.ErrPermission) {
			return ExitPermission
		}
		return ExitError
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	var st Status
	if err := json.NewDecoder(c).Decode(&st); err != nil {
		fmt.Fprintf(stderr, "sfunnel tunnel status: %v\n", err)
		return ExitError
	}
	if asJSON {
		encodeStatus(stdout, &st)
	} else {
		writeStatusText(stdout, &st)
	}
	return ExitOK
}
