package main

import (
	"io"

	"github.com/sfunnel/sfunnel/tunnel"
)

// runTunnel hands `sfunnel tunnel …` to the tunnel package.
func runTunnel(args []string, stdout, stderr io.Writer) int {
	return tunnel.Main(args, stdout, stderr)
}
