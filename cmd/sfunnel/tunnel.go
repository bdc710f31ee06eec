package main

import (
	"fmt"
	"io"
)

func runTunnel(args []string, stdout, stderr io.Writer) int {
	fmt.Fprintln(stderr, "Error: sfunnel tunnel is not built in yet")
	return exitError
}
