package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
	"time"

	"github.com/creack/pty"
)

// terminal drives `sfunnel -i` on a pseudo-terminal, as a person would.
type terminal struct {
	t    *testing.T
	cmd  *exec.Cmd
	ptm  *os.File
	mu   sync.Mutex
	out  bytes.Buffer // everything the program wrote
	seen int          // out[:seen] has been matched already
	done chan struct{}
}

// startREPL runs the test binary as sfunnel (see TestMain) with -i on a
// new pseudo-terminal, with HOME set to home.
func startREPL(t *testing.T, home, state string) *terminal {
	t.Helper()
	bin, err := exec.LookPath("sfunnel")
	if err != nil {
		t.Fatalf("the test binary is not installed as sfunnel: %v", err)
	}
	cmd := exec.Command(bin, "-i", "--state", state)
	cmd.Env = append(os.Environ(), "HOME="+home, "TERM=xterm", "SFUNNEL_STATE=")
	ptm, err := pty.StartWithSize(cmd, &pty.Winsize{Rows: 50, Cols: 200})
	if err != nil {
		t.Fatalf("start on a pty: %v", err)
	}
	term := &terminal{t: t, cmd: cmd, ptm: ptm, done: make(chan struct{})}
	go func() {
		defer close(term.done)
		buf := make([]byte, 4096)
		for {
			n, err := ptm.Read(buf)
			term.mu.Lock()
			term.out.Write(buf[:n])
			term.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		ptm.Close()
	})
	return term
}

// expect waits until the output after the last match matches re, and
// returns the text up to and including the match. The terminal's "\r" are
// dropped, so lines compare as the program wrote them.
func (tm *terminal) expect(re string) string {
	tm.t.Helper()
	rx := regexp.MustCompile(re)
	deadline := time.Now().Add(10 * time.Second)
	for {
		// Whether the program has ended, before looking: its last output
		// is then all there.
		ended := false
		select {
		case <-tm.done:
			ended = true
		default:
		}
		tm.mu.Lock()
		text := strings.ReplaceAll(tm.out.String()[tm.seen:], "\r", "")
		raw := tm.out.Len()
		tm.mu.Unlock()
		if loc := rx.FindStringIndex(text); loc != nil {
			// Advance past the match in the raw output.
			tm.mu.Lock()
			rawText := tm.out.String()[tm.seen:raw]
			tm.seen += rawIndex(rawText, loc[1])
			tm.mu.Unlock()
			return text[:loc[1]]
		}
		if ended {
			tm.t.Fatalf("sfunnel -i ended while waiting for %q; the terminal shows:\n%s", re, text)
		}
		if time.Now().After(deadline) {
			tm.t.Fatalf("waited 10s for %q; the terminal shows:\n%s", re, text)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// rawIndex maps an offset in s with "\r" removed back to an offset in s.
func rawIndex(s string, n int) int {
	i := 0
	for k := 0; k < n && i < len(s); i++ {
		if s[i] != '\r' {
			k++
		}
	}
	return i
}

func (tm *terminal) send(keys string) {
	tm.t.Helper()
	if _, err := tm.ptm.Write([]byte(keys)); err != nil {
		tm.t.Fatalf("type %q: %v", keys, err)
	}
}

// wait waits for the program to exit and returns its exit code.
func (tm *terminal) wait() int {
	tm.t.Helper()
	exited := make(chan error, 1)
	go func() { exited <- tm.cmd.Wait() }()
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		tm.t.Fatalf("sfunnel -i did not exit; the terminal shows:\n%s", tm.out.String())
	}
	return tm.cmd.ProcessState.ExitCode()
}

// Keys.
const (
	enter = "\r"
	tab   = "\t"
	ctrlC = "\x03"
	ctrlD = "\x04"
	ctrlU = "\x15"
	up    = "\x1b[A"
)

func TestREPL(t *testing.T) {
	home := t.TempDir()
	state := filepath.Join(t.TempDir(), "state")
	tm := startREPL(t, home, state)

	tm.expect(`sfunnel> $`)

	// Tab completes a command word…
	tm.send("fl" + tab)
	tm.expect(`sfunnel> flush `)
	tm.send("ruleset" + enter)
	tm.expect(`\nsfunnel> $`)

	tm.send("add rule lo egress ip udp dport 4739 actions funnel tcp dport 179 sport 540" + enter)
	tm.expect(`\nsfunnel> $`)

	// …and offers the handle of the rule just added.
	tm.send("delete rule lo egress handle " + tab)
	tm.expect(`sfunnel> delete rule lo egress handle 1 `)
	tm.send(ctrlU)

	// Interface names and @sets complete too; a second Tab lists the
	// candidates when there are several.
	tm.send("list interface l" + tab)
	tm.expect(`sfunnel> list interface lo `)
	tm.send(ctrlU + "add rule lo " + tab + tab)
	tm.expect(`egress +ingress`)
	tm.send(ctrlU)

	// An error prints with carets, named <cli>, and the session goes on.
	tm.send("add rule lo egress udp dport 99999 actions drop" + enter)
	got := tm.expect(`\nsfunnel> $`)
	wantErr := "<cli>:1:30-34: Error: port 99999 is out of range (0-65535)\n" +
		"add rule lo egress udp dport 99999 actions drop\n" +
		"                             ^^^^^\n"
	if !strings.Contains(got, wantErr) {
		t.Errorf("error output:\n%s\nwant it to contain:\n%s", got, wantErr)
	}

	// A trailing \ continues on a `.... ` line.
	tm.send(`add rule lo ingress tcp dport 179 sport 540 \` + enter)
	tm.expect(`\n\.\.\.\. $`)
	tm.send("actions unfunnel udp" + enter)
	tm.expect(`\nsfunnel> $`)

	// Ctrl-C abandons the whole command being typed, continued or not.
	tm.send(`add rule lo egress udp dport 7 \` + enter)
	tm.expect(`\n\.\.\.\. $`)
	tm.send("actions drop" + ctrlC)
	tm.expect(`\^C\nsfunnel> $`)

	// The same command twice in a row is one history entry.
	tm.send("list ruleset" + enter)
	got = tm.expect(`\nsfunnel> $`)
	for _, want := range []string{"interface lo {", "ip udp dport 4739 actions funnel tcp dport 179 sport 540", "tcp dport 179 sport 540 actions unfunnel udp"} {
		if !strings.Contains(got, want) {
			t.Errorf("list ruleset shows:\n%s\nwant a line with %q", got, want)
		}
	}
	// SIGINT (Ctrl-C while a command runs) does not end the session.
	if err := tm.cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	tm.send("list ruleset" + enter)
	tm.expect(`\nsfunnel> $`)

	tm.send(ctrlD)
	if code := tm.wait(); code != 0 {
		t.Fatalf("Ctrl-D: exit code %d, want 0", code)
	}

	// The good commands were applied, the bad and the abandoned ones not.
	var out, errOut bytes.Buffer
	if code := Main([]string{"--state", state, "-a", "list", "ruleset"}, strings.NewReader(""), &out, &errOut); code != 0 {
		t.Fatalf("list ruleset after the session: %d %s", code, errOut.String())
	}
	wantList := "interface lo {\n" +
		"\tingress {\n\t\ttcp dport 179 sport 540 actions unfunnel udp # handle 2\n\t}\n" +
		"\tegress {\n\t\tip udp dport 4739 actions funnel tcp dport 179 sport 540 # handle 1\n\t}\n" +
		"}\n"
	if out.String() != wantList {
		t.Errorf("ruleset after the session:\n%s\nwant:\n%s", out.String(), wantList)
	}

	hist := filepath.Join(home, ".sfunnel_history")
	fi, err := os.Stat(hist)
	if err != nil {
		t.Fatalf("history: %v", err)
	}
	if mode := fi.Mode().Perm(); mode != 0o600 {
		t.Errorf("history mode %#o, want 0600", mode)
	}
	data, err := os.ReadFile(hist)
	if err != nil {
		t.Fatal(err)
	}
	entries := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
	want := []string{
		"flush ruleset",
		"add rule lo egress ip udp dport 4739 actions funnel tcp dport 179 sport 540",
		"add rule lo egress udp dport 99999 actions drop",
		"add rule lo ingress tcp dport 179 sport 540 actions unfunnel udp",
		"list ruleset",
	}
	if !slices.Equal(entries, want) {
		t.Errorf("history:\n%q\nwant:\n%q", entries, want)
	}

	// A new session loads the history (Up recalls the last command), and
	// quit exits 0; the history gains no duplicate.
	tm = startREPL(t, home, state)
	tm.expect(`sfunnel> $`)
	tm.send(up)
	tm.expect(`sfunnel> list ruleset`)
	tm.send(ctrlU + "list ruleset" + enter)
	tm.expect(`\nsfunnel> $`)
	tm.send("quit" + enter)
	if code := tm.wait(); code != 0 {
		t.Fatalf("quit: exit code %d, want 0", code)
	}
	data, err = os.ReadFile(hist)
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, "quit")
	if got := strings.Split(strings.TrimSuffix(string(data), "\n"), "\n"); !slices.Equal(got, want) {
		t.Errorf("history after the second session:\n%q\nwant:\n%q", got, want)
	}
}

func TestComplete(t *testing.T) {
	live := func() *names {
		return &names{
			interfaces: []string{"eth0", "lo"},
			sets:       []string{"flow_ports", "routers"},
			handles:    map[string][]string{"lo egress": {"1", "4"}, "lo ingress": {"2"}, "": {"1", "2", "4"}},
		}
	}
	tests := []struct {
		line string
		want []string
	}{
		{"", []string{"add ", "define ", "delete ", "exit ", "flush ", "include ", "insert ", "interface ", "list ", "monitor ", "quit ", "replace ", "reset ", "save ", "set "}},
		{"fl", []string{"flush "}},
		{"list ", []string{"interface ", "ruleset ", "set ", "sets "}},
		{"list set ", []string{"flow_ports ", "routers "}},
		{"list interface ", []string{"eth0 ", "lo "}},
		{"list interface lo ", []string{"egress ", "ingress "}},
		{"flush interface e", []string{"eth0 "}},
		{"delete ", []string{"element ", "interface ", "rule ", "set "}},
		{"add ", []string{"element ", "rule ", "set "}},
		{"delete set ", []string{"flow_ports ", "routers "}},
		{"add set s { type ", []string{"inet_service ", "ipv4_addr ", "ipv6_addr "}},
		{"add set s { type ipv4_addr; ", []string{"elements ", "size "}},
		{"monitor ", []string{"trace "}},
		{"add rule lo ingress meta ", []string{"l4proto ", "mark ", "nfproto ", "nftrace "}},
		{"add rule lo ingress ip protocol ", []string{"tcp ", "udp "}},
		{"add rule lo ingress udp dport 1 drop ", []string{"accept ", "comment ", "dnat ", "drop ", "funnel ", "rewrite ", "unfunnel "}},
		{"delete rule lo egress ", []string{"handle "}},
		{"delete rule lo egress handle ", []string{"1 ", "4 "}},
		{"replace rule lo ingress handle ", []string{"2 "}},
		{"insert rule eth0 ingress position ", []string{"1 ", "2 ", "4 "}},
		{"add rule lo ingress p", []string{"position "}},
		{"add rule lo ingress udp dport 1 ", []string{"accept ", "actions ", "comment ", "counter ", "ct ", "daddr ", "dnat ", "dport ", "drop ", "flags ", "funnel ", "ip ", "ip6 ", "meta ", "rewrite ", "saddr ", "sport ", "tcp ", "udp ", "unfunnel "}},
		{"add rule lo ingress udp dport @", []string{"@flow_ports ", "@routers "}},
		{"add rule lo ingress udp dport 1 actions ", []string{"accept ", "dnat ", "drop ", "funnel ", "rewrite ", "unfunnel "}},
		{"add rule lo ingress udp dport 1 actions f", []string{"funnel "}},
		{"add rule lo ingress udp dport 1 actions funnel tcp dport 179 ", []string{"accept ", "ack ", "comment ", "dnat ", "dport ", "drop ", "flags ", "funnel ", "rewrite ", "seq ", "sport ", "unfunnel ", "window "}},
		{"add rule lo ingress udp dport 1 actions dnat to 192.0.2.1 ", []string{"accept ", "comment ", "dnat ", "drop ", "funnel ", "rewrite ", "unfunnel "}},
		{"add rule lo ingress udp dport 1 actions funnel ", []string{"encap ", "tcp ", "udp "}},
		{"add rule lo ingress tcp flags s", []string{"syn "}},
		{"add element ", []string{"flow_ports ", "routers "}},
		{"reset counters ", []string{"eth0 ", "lo "}},
		{"interface lo { ", []string{"egress ", "ingress "}},
		{"list ruleset; fl", []string{"flush "}},
		// Out of context, any keyword.
		{"list ruleset unf", []string{"unfunnel "}},
	}
	for _, tt := range tests {
		head, got, tail := complete(tt.line, len(tt.line), live)
		if !slices.Equal(got, tt.want) {
			t.Errorf("complete(%q) = %q, want %q", tt.line, got, tt.want)
		}
		for _, c := range got {
			// The candidate replaces the word under the cursor.
			if !strings.HasPrefix(head+c, tt.line) {
				t.Errorf("complete(%q): head %q and %q do not extend the line", tt.line, head, c)
			}
		}
		if tail != "" {
			t.Errorf("complete(%q): tail %q, want none", tt.line, tail)
		}
	}

	// The text after the cursor is kept.
	head, got, tail := complete("list rul -a", 8, live)
	if head != "list " || !slices.Equal(got, []string{"ruleset "}) || tail != " -a" {
		t.Errorf("mid-line completion = %q %q %q", head, got, tail)
	}
}

// TestCompleteEveryUsageLine walks every command form of grammar.CommandUsage
// (with and without its optional parts) word by word: at each step, Tab
// must offer the word that comes next (a stand-in for placeholders).
func TestCompleteEveryUsageLine(t *testing.T) {
	live := func() *names {
		return &names{interfaces: []string{"lo"}, sets: []string{"routers"}, handles: map[string][]string{"lo egress": {"1"}, "": {"1"}}}
	}
	stand := map[string]string{"IF": "lo", "HOOK": "egress", "NAME": "routers", "H": "1", "TYPE": "ipv4_addr", "RULE": "udp"}
	if len(usageVariants) < len(grammar.CommandUsage) {
		t.Fatalf("%d variants for %d usage lines", len(usageVariants), len(grammar.CommandUsage))
	}
	for _, v := range usageVariants {
		typed := ""
		for _, w := range v {
			want, ok := stand[w]
			switch {
			case w == "NAME" && v[0] == "add" && v[1] == "set", w == "N", w == "ELEMENTS":
				want, ok = "", false // the user's own value
			case !isPlaceholder(w):
				want, ok = w, true
			}
			if ok {
				_, got, _ := complete(typed, len(typed), live)
				if !slices.Contains(got, want+" ") {
					t.Errorf("usage %q: after %q Tab offers %q, not %q", strings.Join(v, " "), typed, got, want)
				}
			}
			if want == "" {
				want = "x"
				if w == "N" {
					want = "2"
				}
			}
			typed += want + " "

		}
	}
}
