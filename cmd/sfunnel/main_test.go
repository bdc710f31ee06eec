package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/rogpeppe/go-internal/testscript"

	"github.com/sfunnel/sfunnel/internal/jsonaudit"
	"github.com/sfunnel/sfunnel/internal/testenv"
)

// TestMain lets the test binary act as the sfunnel command in scripts (and
// in the REPL's pseudo-terminal test), so no separate build is needed.
func TestMain(m *testing.M) {
	testscript.Main(m, map[string]func(){
		"sfunnel": func() { os.Exit(Main(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) },
	})
}

// TestScripts runs the CLI scripts in testdata/script. They use the state
// file backend (SFUNNEL_STATE), so they need neither root nor the datapath.
func TestScripts(t *testing.T) {
	src, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	// Every listing the scripts print (text or JSON) is also written as JSON
	// to audit; once all scripts are done, each must validate against the
	// schema and read back to the same document.
	audit := t.TempDir()
	t.Cleanup(func() {
		n, errs := jsonaudit.CheckDir(audit)
		for _, err := range errs {
			t.Error(err)
		}
		if n < 20 {
			t.Errorf("only %d listings audited; the scripts list far more", n)
		}
		t.Logf("%d listings validated against nftjson/schema.json and read back", n)
	})
	testscript.Run(t, testscript.Params{
		Dir:                 filepath.Join("testdata", "script"),
		RequireExplicitExec: true,
		// SFUNNEL_UPDATE_SCRIPTS=1 rewrites the cmp files of failing scripts.
		UpdateScripts: os.Getenv("SFUNNEL_UPDATE_SCRIPTS") != "",
		Setup: func(env *testscript.Env) error {
			env.Setenv("SFUNNEL_STATE", filepath.Join(env.WorkDir, "state"))
			env.Setenv("SFUNNEL_JSON_AUDIT", audit)
			env.Setenv("SFUNNEL_SRC", src) // the repository, for contrib/ and man/
			return nil
		},
		Cmds: map[string]func(ts *testscript.TestScript, neg bool, args []string){
			"exitcode": cmdExitCode,
		},
	})
}

// cmdExitCode runs `exitcode N PROG ARGS…` and fails unless PROG exits with
// status N; stdout and stderr are kept for later cmp/stdout/stderr lines.
func cmdExitCode(ts *testscript.TestScript, neg bool, args []string) {
	if neg {
		ts.Fatalf("exitcode does not take !")
	}
	if len(args) < 2 {
		ts.Fatalf("usage: exitcode N PROG [ARGS…]")
	}
	want, err := strconv.Atoi(args[0])
	if err != nil {
		ts.Fatalf("exitcode: bad status %q", args[0])
	}
	err = ts.Exec(args[1], args[2:]...)
	got := 0
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		got = ee.ExitCode()
	case err != nil:
		ts.Fatalf("exitcode: %v", err)
	}
	if got != want {
		ts.Fatalf("%s exited with status %d, want %d", args[1], got, want)
	}
}

// TestNetnsOption checks that --netns operates inside the named namespace:
// a rule for an interface that exists only there is accepted with --netns
// and refused without it.
func TestNetnsOption(t *testing.T) {
	ns := testenv.NewNS(t)
	ifc := "sx" + strings.TrimPrefix(ns.Name, "sft-")
	ns.Run(t, "ip", "link", "add", ifc, "type", "veth", "peer", "name", "sy"+ifc[2:])
	state := filepath.Join(t.TempDir(), "state")
	sfunnel := func(args ...string) (string, int) {
		t.Helper()
		cmd := exec.Command("sfunnel", append([]string{"--state", state}, args...)...)
		cmd.Env = append(os.Environ(), "SFUNNEL_STATE=")
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if err != nil && !errors.As(err, &ee) {
			t.Fatalf("sfunnel %v: %v", args, err)
		}
		return string(out), cmd.ProcessState.ExitCode()
	}
	rule := []string{"add", "rule", ifc, "egress", "udp", "dport", "4739", "actions", "funnel", "tcp", "dport", "179", "sport", "540"}
	if out, code := sfunnel(rule...); code != exitError || !strings.Contains(out, "unknown interface "+ifc) {
		t.Errorf("outside the namespace: status %d, output %q; want 1 and unknown interface", code, out)
	}
	if out, code := sfunnel(append([]string{"--netns", ns.Name}, rule...)...); code != exitOK {
		t.Errorf("with --netns %s: status %d, output %q", ns.Name, code, out)
	}
	if out, code := sfunnel("--netns", ns.Name, "list", "interface", ifc); code != exitOK || !strings.Contains(out, "udp dport 4739") {
		t.Errorf("list with --netns: status %d, output %q", code, out)
	}
	if out, code := sfunnel("--netns", "sfx-no-such-ns", "list", "ruleset"); code != exitError || !strings.Contains(out, `network namespace "sfx-no-such-ns"`) {
		t.Errorf("missing namespace: status %d, output %q; want 1", code, out)
	}
}
