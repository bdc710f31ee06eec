package main

import (
	"fmt"
	"io"
)

func (a *app) repl(stdin io.Reader) int {
	fmt.Fprintln(a.stderr, "Error: the interactive prompt is not built in yet")
	return exitError
}
