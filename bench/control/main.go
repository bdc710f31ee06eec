// Command control measures sfunnel's control plane against nft in the same
// run, on comparable rulesets in a scratch network namespace: apply a
// ruleset file, add and delete one rule on its large hook, list it; wall
// time (medians) and peak RSS of each command. It prints a Markdown table
// and, with -o FILE, replaces the "Control plane" section of FILE
// (BENCHMARKS.md).
//
//	go run ./bench/control -sfunnel bin/sfunnel -rules 10000 -runs 5 -o BENCHMARKS.md
package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sfunnel/sfunnel/internal/controlrules"
)

var (
	only    = flag.String("workload", "", "run only the workloads whose name contains this")
	sfunnel = flag.String("sfunnel", "bin/sfunnel", "sfunnel binary")
	rules   = flag.Int("rules", 10000, "rules on the hook")
	runs    = flag.Int("runs", 5, "runs per measurement (the median is reported)")
	out     = flag.String("o", "", "Markdown file whose \"## Control plane\" section is replaced")
)

// workload is one ruleset shape, written for both tools.
type workload struct {
	name string
	rule func(i int) (sf, nft string)
	// change is the rule `add`, `insert` and `replace rule` write (a =
	// 251, 252, 253 for each, n the run); nil: hostPort.
	change func(a, n int) (sf, nft string)
}

// hostPort is the changed rule of most workloads: a shape and action
// the hook has, and a new key.
func hostPort(a, n int) (string, string) {
	m := fmt.Sprintf("ip saddr 10.%d.0.%d udp dport 1005", a, n)
	return m + " counter actions drop", m + " counter drop"
}

var workloads = []workload{
	{"IPv4 host + port", func(i int) (string, string) {
		m := controlrules.HostPort(i)
		return m + " counter actions drop", m + " counter drop"
	}, nil},
	{"mixed shapes", func(i int) (string, string) {
		m := controlrules.Mixed(i)
		return m + " counter actions drop", m + " counter drop"
	}, nil},
	// Rules of a shape each of their own (`sport !=` stays in the shape):
	// the record scan. The changed rules are of shapes of their own too.
	{"unique shapes", func(i int) (string, string) {
		m := fmt.Sprintf("ip saddr 10.%d.%d.1 udp sport != %d", i/250%250, i%250, i%60000+1)
		p := fmt.Sprintf(" dport %d counter", 1000+i%60000)
		return m + p + " actions drop", m + " udp" + p + " drop"
	}, func(a, n int) (string, string) {
		m := fmt.Sprintf("ip saddr 10.%d.0.%d udp sport != %d", a, n, 60000+a+n)
		return m + " dport 1005 counter actions drop", m + " udp dport 1005 counter drop"
	}},
	// Accounting: counters without a verdict, one shape.
	{"counters only", func(i int) (string, string) {
		m := fmt.Sprintf("ip saddr 10.%d.%d.1 udp dport %d counter", i/250%250, i%250, 1000+i%60000)
		return m, m
	}, func(a, n int) (string, string) {
		m := fmt.Sprintf("ip saddr 10.%d.0.%d udp dport 1005 counter", a, n)
		return m, m
	}},
}

// sample is one command's wall time and peak RSS.
type sample struct {
	wall time.Duration
	cpu  time.Duration // user + system
	rss  int64         // KiB
	ok   bool
	err  string
}

func run(stdin []byte, name string, args ...string) sample {
	cmd := exec.Command(name, args...)
	cmd.Stdin = bytes.NewReader(stdin)
	var stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = nil, &stderr
	t := time.Now()
	err := cmd.Run()
	s := sample{wall: time.Since(t), ok: err == nil}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		s.rss = ru.Maxrss
		s.cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	if err != nil {
		s.err = strings.TrimSpace(firstLine(stderr.String()))
	}
	return s
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}

func median(ss []sample) sample {
	cpus := make([]time.Duration, len(ss))
	for i, s := range ss {
		cpus[i] = s.cpu
	}
	sort.Slice(cpus, func(i, j int) bool { return cpus[i] < cpus[j] })
	sort.Slice(ss, func(i, j int) bool { return ss[i].wall < ss[j].wall })
	m := ss[len(ss)/2]
	m.cpu = cpus[len(cpus)/2]
	for _, s := range ss {
		if s.rss > m.rss {
			m.rss = s.rss
		}
		if !s.ok {
			m.ok, m.err = false, s.err
		}
	}
	return m
}

func must(name string, args ...string) string {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s %v: %v\n%s", name, args, err, out)
		os.Exit(1)
	}
	return string(out)
}

type row struct {
	what     string
	sf, nft  sample
	ratioRSS bool
}

func main() {
	flag.Parse()
	ns := fmt.Sprintf("sfbench-%d", os.Getpid())
	must("ip", "netns", "add", ns)
	defer exec.Command("ip", "netns", "del", ns).Run()
	must("ip", "-n", ns, "link", "add", "vb", "type", "veth", "peer", "name", "va")
	must("ip", "-n", ns, "link", "set", "vb", "up")
	must("ip", "-n", ns, "link", "set", "va", "up")
	sf := func(stdin []byte, args ...string) sample {
		return run(stdin, *sfunnel, append([]string{"--netns", ns}, args...)...)
	}
	nft := func(stdin []byte, args ...string) sample {
		return run(stdin, "ip", append([]string{"netns", "exec", ns, "nft"}, args...)...)
	}
	var table strings.Builder
	kernel := strings.TrimSpace(must("uname", "-r"))
	fmt.Fprintf(&table, "Measured %s, kernel %s, %d rules on one hook (sfunnel: vb ingress; nft: a netdev ingress chain on vb), medians of %d runs (wall time, and CPU time user + system, which a loaded machine disturbs less); RSS is the largest of the runs. Times include process start; `÷ nft add rule` is the issue's yardstick for rule changes (sfunnel's time over nft's `add rule` of the same run). "+
		"`add rule` appends `ip saddr 10.251.0.N udp dport 1005 counter drop` (N = the run: a shape, action and port range the hook has, and a new key: sfunnel writes that rule's table entries, without compiling or loading a program; the same rule added again would compile the hook, see sfunnel(8) NOTES); `insert rule (middle)` inserts `ip saddr 10.252.0.N udp dport 1005 counter drop` before the rule in the middle of the hook; `replace rule` replaces that inserted rule by one with another address; `delete rule` deletes an added rule again. Machine load (1-minute load average) when the run started: %s.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), kernel, *rules, *runs, loadAvg())
	table.WriteString("| ruleset | operation | sfunnel | nft | ratio | ÷ nft add rule | sfunnel CPU | nft CPU | CPU ratio | sfunnel RSS | nft RSS | RSS ratio |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
	for _, w := range workloads {
		if !strings.Contains(w.name, *only) {
			continue
		}
		if w.change == nil {
			w.change = hostPort
		}
		var sfText, nftText strings.Builder
		sfText.WriteString("flush ruleset\ninterface vb {\n\tingress {\n")
		nftText.WriteString("flush ruleset\ntable netdev sfb {\n\tchain c {\n\t\ttype filter hook ingress device vb priority 0;\n")
		for i := 0; i < *rules; i++ {
			s, n := w.rule(i)
			sfText.WriteString("\t\t" + s + "\n")
			nftText.WriteString("\t\t" + n + "\n")
		}
		sfText.WriteString("\t}\n}\n")
		nftText.WriteString("\t}\n}\n")
		var rows []row
		measure := func(what string, f func() (sample, sample)) {
			var a, b []sample
			for i := 0; i < *runs; i++ {
				x, y := f()
				a, b = append(a, x), append(b, y)
			}
			rows = append(rows, row{what: what, sf: median(a), nft: median(b)})
		}
		// A ruleset sfunnel refuses (slowly: the verifier gives up after a
		// million instructions) is tried once.
		var refused *sample
		measure("apply (-f)", func() (sample, sample) {
			b := nft([]byte(nftText.String()), "-f", "-")
			if refused != nil {
				return *refused, b
			}
			a := sf([]byte(sfText.String()), "-f", "-")
			if !a.ok {
				refused = &a
			}
			return a, b
		})
		if refused != nil {
			r := rows[0]
			fmt.Fprintf(&table, "| %s | %s | %s | %s | — | — | — | %s | — | — | %s | — |\n", w.name, r.what, cell(r.sf), cell(r.nft), cpuCell(r.nft), kib(r.nft))
			nft([]byte("flush ruleset\n"), "-f", "-")
			continue
		}
		// The rest on the loaded hook (the last apply of each stays).
		sf([]byte(sfText.String()), "-f", "-")
		nft([]byte(nftText.String()), "-f", "-")
		measure("list ruleset", func() (sample, sample) {
			return sf(nil, "list", "ruleset"), nft(nil, "list", "ruleset")
		})
		handleRe := regexp.MustCompile(`# handle (\d+)`)
		var sfHandles, nftHandles []string
		n := 0
		measure("add rule", func() (sample, sample) {
			n++
			sfRule, nftRule := w.change(251, n)
			a := run(nil, "sh", "-c", fmt.Sprintf("%s --netns %s -e add rule vb ingress %s > /tmp/sfb-echo", *sfunnel, ns, sfRule))
			if m := handleRe.FindStringSubmatch(readFile("/tmp/sfb-echo")); m != nil {
				sfHandles = append(sfHandles, m[1])
			}
			b := run(nil, "sh", "-c", fmt.Sprintf("ip netns exec %s nft --echo --handle add rule netdev sfb c %s > /tmp/nftb-echo", ns, nftRule))
			if m := handleRe.FindStringSubmatch(readFile("/tmp/nftb-echo")); m != nil {
				nftHandles = append(nftHandles, m[1])
			}
			return a, b
		})
		// A rule inserted in the middle of the hook (before the rule at
		// position rules/2), then replaced by one with another address.
		middle := func(list string) string {
			ms := handleRe.FindAllStringSubmatch(list, -1)
			if len(ms) <= *rules/2 {
				return ""
			}
			return ms[*rules/2][1]
		}
		sfMid := middle(run1(*sfunnel, "--netns", ns, "-a", "list", "ruleset"))
		nftMid := middle(run1("ip", "netns", "exec", ns, "nft", "-a", "list", "ruleset"))
		var sfIns, nftIns []string
		n = 0
		measure("insert rule (middle)", func() (sample, sample) {
			n++
			sfRule, nftRule := w.change(252, n)
			a := run(nil, "sh", "-c", fmt.Sprintf("%s --netns %s -e insert rule vb ingress position %s %s > /tmp/sfb-echo", *sfunnel, ns, sfMid, sfRule))
			if m := handleRe.FindStringSubmatch(readFile("/tmp/sfb-echo")); m != nil {
				sfIns = append(sfIns, m[1])
			}
			b := run(nil, "sh", "-c", fmt.Sprintf("ip netns exec %s nft --echo --handle insert rule netdev sfb c position %s %s > /tmp/nftb-echo", ns, nftMid, nftRule))
			if m := handleRe.FindStringSubmatch(readFile("/tmp/nftb-echo")); m != nil {
				nftIns = append(nftIns, m[1])
			}
			return a, b
		})
		j := 0
		measure("replace rule", func() (sample, sample) {
			var a, b sample
			sfRule, nftRule := w.change(253, j+1)
			if j < len(sfIns) {
				a = sf(nil, append([]string{"replace", "rule", "vb", "ingress", "handle", sfIns[j]}, strings.Fields(sfRule)...)...)
			} else {
				a = sample{err: "no handle from insert rule"}
			}
			if j < len(nftIns) {
				b = nft(nil, append([]string{"replace", "rule", "netdev", "sfb", "c", "handle", nftIns[j]}, strings.Fields(nftRule)...)...)
			} else {
				b = sample{err: "no handle from insert rule"}
			}
			j++
			return a, b
		})
		i := 0
		measure("delete rule", func() (sample, sample) {
			var a, b sample
			if i < len(sfHandles) {
				a = sf(nil, "delete", "rule", "vb", "ingress", "handle", sfHandles[i])
			} else {
				a = sample{err: "no handle from add rule"}
			}
			if i < len(nftHandles) {
				b = nft(nil, "delete", "rule", "netdev", "sfb", "c", "handle", nftHandles[i])
			} else {
				b = sample{err: "no handle from add rule"}
			}
			i++
			return a, b
		})
		for _, h := range sfIns {
			sf(nil, "delete", "rule", "vb", "ingress", "handle", h)
		}
		for _, h := range nftIns {
			nft(nil, "delete", "rule", "netdev", "sfb", "c", "handle", h)
		}
		var nftAdd sample
		for _, r := range rows {
			if r.what == "add rule" {
				nftAdd = r.nft
			}
		}
		for _, r := range rows {
			vsAdd := "—"
			if strings.HasSuffix(r.what, "rule") || strings.Contains(r.what, "rule (") {
				vsAdd = ratio(r.sf, nftAdd, float64(r.sf.wall), float64(nftAdd.wall))
			}
			fmt.Fprintf(&table, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", w.name, r.what, cell(r.sf), cell(r.nft),
				ratio(r.sf, r.nft, float64(r.sf.wall), float64(r.nft.wall)), vsAdd,
				cpuCell(r.sf), cpuCell(r.nft), ratio(r.sf, r.nft, float64(r.sf.cpu), float64(r.nft.cpu)),
				kib(r.sf), kib(r.nft), ratio(r.sf, r.nft, float64(r.sf.rss), float64(r.nft.rss)))
		}
		sf([]byte("flush ruleset\n"), "-f", "-")
		nft([]byte("flush ruleset\n"), "-f", "-")
	}
	table.WriteString(`
Where sfunnel's time goes (pprof of ` + "`-f`" + ` of both files, 2026-11-30 07:36 UTC, load 10-13): ` + "`-f`" + ` of
10 000 rules is a third parsing the input (the quick path lowers each rule as it reads it, and a rule's
syntax memory serves the next rule; lexing is a third of the parse), a seventh compiling (half of it
classification: the ports a range holds are a bitmap, not 101 map keys; a rule's keys lie in one
buffer; shape and body keys are printed once per distinct signature), a tenth creating maps and
loading the program, a twentieth the program's digest (sha256 of its text, written without fmt),
the canonical text of every rule for the state record, and the collector (a fifteenth); kernel BTF,
for the compiler's skb offsets, is read once per boot (/run/sfunnel/kernel-skb); the old state
record (version 3, read without parsing a rule), needed to replace it (priorities and counter slots
of rules that stay), is read on the other core while the input is parsed. A file that starts with
` + "`flush ruleset`" + ` sets a soft memory limit from its size before it is parsed, and the collector is
paced by that limit alone (GOGC off; sfunnel(8) ENVIRONMENT): one collection per ` + "`-f`" + ` of these
files, and the peak RSS the same from run to run. Old and new binaries alternating (07:38 UTC, load
9-12, 11 runs, CPU medians, nft -f in the same runs): mixed shapes 0.251 s before the classifier,
parser and collector changes of 07:00-07:35, 0.144 s after (nft 0.253 s); IPv4 host + port 0.198 s,
0.134 s (nft 0.272 s); main at 07:00 (state version 2) took 0.289 s and 0.236 s.
` + "`add`/`insert`/`replace`/`delete rule`" + ` batches read the rules
as placeholders (their handles) and parse only the rules they remove or replace (or every rule of a
hook they compile after all). A rule whose shape and action the hook's tables have is written into
the spare table generation, without compiling; so are rules of shapes of their own (` + "`unique shapes`" + `:
the segment's record list is written anew in the spare generation) and counter-only rules among rules
of one shape (` + "`counters only`" + `); a key another rule shares and priorities exhausted at one place are
handled in the maps too (docs/datapath.md, "Incremental rule changes"). A rule of a new shape or body, or a
port outside the hook's port range, compiles the hook again. What remains of a rule change (perf,
07:30 UTC): the incremental path itself (about a quarter: the perfect-hash table rebuilt in the spare
value, the old and new rules matched up), the placeholders of ten thousand rules (an eighth), process
start and the collector, and the state record (version 3: a header, the rules as text and a binary
index, read and written without parsing a rule; about a seventh, half of it on the other core). nft's
` + "`add`/`insert rule`" + ` here include ` + "`--echo --handle`" + ` (they read the ruleset back); its
` + "`replace`/`delete rule`" + ` are a single netlink message.
`)
	fmt.Print(table.String())
	if *out != "" {
		if err := replaceSection(*out, "## Control plane", table.String()); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}

// loadAvg is the 1-minute load average.
func loadAvg() string {
	f := strings.Fields(readFile("/proc/loadavg"))
	if len(f) == 0 {
		return "unknown"
	}
	return f[0]
}

// run1 returns a command's output ("" if it fails).
func run1(name string, args ...string) string {
	out, _ := exec.Command(name, args...).Output()
	return string(out)
}

func readFile(p string) string {
	b, _ := os.ReadFile(p)
	return string(b)
}

func cell(s sample) string {
	if !s.ok {
		return "fails: " + strings.ReplaceAll(s.err, "|", "/")
	}
	return fmt.Sprintf("%.3f s", s.wall.Seconds())
}

func cpuCell(s sample) string {
	if !s.ok {
		return "—"
	}
	return fmt.Sprintf("%.3f s", s.cpu.Seconds())
}

func kib(s sample) string {
	if !s.ok {
		return "—"
	}
	return strconv.FormatInt(s.rss/1024, 10) + " MB"
}

func ratio(a, b sample, x, y float64) string {
	if !a.ok || !b.ok || y == 0 {
		return "—"
	}
	return fmt.Sprintf("%.2f×", x/y)
}

// replaceSection replaces the body of the section starting with heading
// (up to the next "## " heading) in file, or appends the section.
func replaceSection(file, heading, body string) error {
	data, err := os.ReadFile(file)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	text := string(data)
	section := heading + " (`make bench-control`)\n\n" + body + "\n"
	start := strings.Index(text, heading)
	if start < 0 {
		if text != "" && !strings.HasSuffix(text, "\n\n") {
			text += "\n"
		}
		return os.WriteFile(file, []byte(text+section), 0o644)
	}
	end := len(text)
	if i := strings.Index(text[start+len(heading):], "\n## "); i >= 0 {
		end = start + len(heading) + i + 1
	}
	return os.WriteFile(file, []byte(text[:start]+section+text[end:]), 0o644)
}
