// Command tunneld runs `sfunnel tunnel` alone, for the tunnel benchmark
// (bench/tunnel/run.sh), independent of the full sfunnel binary.
package main

import (
	"os"

	"github.com/sfunnel/sfunnel/tunnel"
)

func main() { os.Exit(tunnel.Main(os.Args[1:], os.Stdout, os.Stderr)) }
