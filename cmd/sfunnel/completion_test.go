package main

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"
)

// TestBashCompletionValueOptions: the bash script must know which options
// take a value (it skips the value when finding the command words); the
// list is checked against the flag set, the one declaration of options.
func TestBashCompletionValueOptions(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("..", "..", "contrib", "bash-completion", "sfunnel"))
	if err != nil {
		t.Fatal(err)
	}
	var inScript []string
	for _, m := range regexp.MustCompile(`(?m)^\s*((?:-[-a-zA-Z]+ \| )*-[-a-zA-Z]+)\) .*skip=(?:drop|keep)`).FindAllStringSubmatch(string(src), -1) {
		inScript = append(inScript, strings.Split(m[1], " | ")...)
	}
	var want []string
	newFlagSet(&options{}, new([]string)).VisitAll(func(f *pflag.Flag) {
		if f.Value.Type() == "bool" || f.Value.Type() == "count" {
			return
		}
		if f.Shorthand != "" {
			want = append(want, "-"+f.Shorthand)
		}
		want = append(want, "--"+f.Name)
	})
	slices.Sort(inScript)
	slices.Sort(want)
	if !slices.Equal(inScript, want) {
		t.Errorf("contrib/bash-completion/sfunnel skips the values of %q; the options that take one are %q", inScript, want)
	}
}
