package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

func manPages(t *testing.T) []string {
	t.Helper()
	pages, err := filepath.Glob(filepath.Join("..", "..", "man", "*.[1-8]"))
	if err != nil || len(pages) == 0 {
		t.Fatalf("no man pages in man/: %v", err)
	}
	return pages
}

// TestManLint fails on any warning groff (and mandoc, where installed)
// gives for the man pages.
func TestManLint(t *testing.T) {
	testenv.RequireCommand(t, "groff")
	for _, page := range manPages(t) {
		lint(t, page, "groff", "-ww", "-z", "-man", page)
		if _, err := exec.LookPath("mandoc"); err == nil {
			lint(t, page, "mandoc", "-Tlint", "-W", "style", page)
		}
		// Rendered text must not be empty and must have the usual sections.
		out, err := exec.Command("groff", "-man", "-Tutf8", page).Output()
		if err != nil {
			t.Errorf("render %s: %v", page, err)
		}
		out = overstrike.ReplaceAll(out, nil) // grotty's bold and underline
		for _, sec := range []string{"NAME", "DESCRIPTION", "SEE ALSO"} {
			if !bytes.Contains(out, []byte(sec)) {
				t.Errorf("%s renders without a %s section", page, sec)
			}
		}
	}
}

var overstrike = regexp.MustCompile(`.\x08`)

func lint(t *testing.T, page, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// TestManDocumentsOptions checks that sfunnel(8) has an entry (a .TP tag)
// for every option of the --help text.
func TestManDocumentsOptions(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("..", "..", "man", "sfunnel.8"))
	if err != nil {
		t.Fatal(err)
	}
	var tags strings.Builder
	lines := strings.Split(strings.ReplaceAll(string(src), `\-`, "-"), "\n")
	for i := 1; i < len(lines); i++ {
		if lines[i-1] == ".TP" || lines[i-1] == ".TQ" {
			tags.WriteString(lines[i] + "\n")
		}
	}
	_, opts, _ := strings.Cut(usage(), "Options:")
	opts, _, _ = strings.Cut(opts, "Commands:")
	for _, opt := range regexp.MustCompile(`(?m)(?:^|[ ,])(--?[a-z][a-z-]*)`).FindAllStringSubmatch(opts, -1) {
		if !regexp.MustCompile(regexp.QuoteMeta(opt[1]) + `\b`).MatchString(tags.String()) {
			t.Errorf("sfunnel.8 has no entry for %s", opt[1])
		}
	}
}
