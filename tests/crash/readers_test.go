package crash

import (
	"fmt"
	"regexp"
	"strings"
	"sync"
	"testing"
)

// Readers read a generation that a writer may publish over and remove
// while they read it: `list ruleset` (which reads the counters) and
// `list ruleset -j` run while other processes commit rule changes without
// a pause (by table entries and by new programs, attaching and detaching
// a hook) must never fail nor warn of a detached hook, and must always
// show the rules no writer touches.
func TestReadersDuringCommits(t *testing.T) {
	e := newEnv(t)
	e.must(t, rulesetD(), "-f", "-")
	done := make(chan struct{})
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := 0; ; k++ {
				select {
				case <-done:
					return
				default:
				}
				rule := fmt.Sprintf("ip saddr 198.51.100.%d udp dport %d counter actions drop", 1+k%50, 7100+k%50)
				if k%3 == w {
					rule = fmt.Sprintf("udp sport %d dport %d counter actions drop", 1000+k%50, 7200+k%50) // a new shape: compiled
				}
				r := e.sfunnel(t, "", nil, append([]string{"-e", "add", "rule", "vb", "ingress"}, strings.Fields(rule)...)...)
				m := regexp.MustCompile(`# handle (\d+)`).FindStringSubmatch(r.stdout)
				if r.code != 0 || m == nil {
					t.Errorf("writer: exit %d: %s", r.code, r.stderr)
					return
				}
				if r := e.sfunnel(t, "", nil, "delete", "rule", "vb", "ingress", "handle", m[1]); r.code != 0 {
					t.Errorf("writer: exit %d: %s", r.code, r.stderr)
					return
				}
				if w == 1 && k%2 == 0 { // a hook attached and detached
					for _, args := range [][]string{strings.Fields("add rule vb egress udp dport 7300 counter actions drop"), strings.Fields("flush interface vb egress")} {
						if r := e.sfunnel(t, "", nil, args...); r.code != 0 {
							t.Errorf("writer: %v: exit %d: %s", args, r.code, r.stderr)
							return
						}
					}
				}
			}
		}()
	}
	for i := range 60 {
		args := []string{"list", "ruleset"}
		if i%2 == 1 {
			args = []string{"-j", "list", "ruleset"}
		}
		r := e.sfunnel(t, "", nil, args...)
		if r.code != 0 {
			t.Errorf("%v %d while others commit: exit %d: %s", args, i, r.code, r.stderr)
			break
		}
		if strings.Contains(r.stdout+r.stderr, "warning") {
			t.Errorf("%v %d while others commit warns:\n%s%s", args, i, r.stdout, r.stderr)
			break
		}
		if n := strings.Count(r.stdout, "192.0.2.1"); n < 40 { // rulesetD's sources: 192.0.2.100-139
			t.Errorf("%v %d while others commit: %d of rulesetD's 40 rules:\n%s", args, i, n, r.stdout)
			break
		}
	}
	close(done)
	wg.Wait()
}
