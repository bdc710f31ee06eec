package cli

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// TestMetrics scrapes `sfunnel metrics` in a namespace: the text parses as
// Prometheus' format, rule counters agree with `list ruleset`, the funnel
// that exceeded the MTU and the fragments it left alone are there, and a
// flushed nftables table shows as a warning.
func TestMetrics(t *testing.T) {
	testenv.RequireCommand(t, "nft")
	a, _ := topology(t)
	a.Run(t, "ip", "link", "set", "veth0", "mtu", "1280")
	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "egress", "udp", "dport", "4739", "counter", "actions", "funnel", "tcp", "dport", "179", "sport", "540", "comment", `"flows"`)
	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "ingress", "udp", "dport", "4739", "ct", "mark", "set", "0x10000")
	// Fragments match no port; this rule meets them and leaves them alone.
	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "egress", "ip", "daddr", "192.0.2.2", "udp", "actions", "funnel", "tcp", "dport", "179", "sport", "540")
	err := a.Do(func() error {
		c, err := net.Dial("udp", "192.0.2.2:4739")
		if err != nil {
			return err
		}
		defer c.Close()
		for _, n := range []int{100, 100, 100, 1280 - 20 - 8 - 10, 2000} { // fits, fits, fits, over the MTU once funneled, fragmented
			if _, err := c.Write(make([]byte, n)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(binary, "--netns", a.Name, "metrics", "127.0.0.1:9142")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if l, err := bufio.NewReader(stderr).ReadString('\n'); err != nil || !strings.Contains(l, "http://127.0.0.1:9142/metrics") {
		t.Fatalf("metrics did not start: %q %v", l, err)
	}

	mf := scrape(t, a, "127.0.0.1:9142")
	listing := mustSfunnel(t, "", "--netns", a.Name, "list", "ruleset")
	m := regexp.MustCompile(`counter packets (\d+) bytes (\d+)`).FindStringSubmatch(listing)
	if m == nil {
		t.Fatalf("no counter in the listing:\n%s", listing)
	}
	rule := map[string]string{"interface": "veth0", "hook": "egress", "handle": "1", "comment": "flows"}
	if got := value(t, mf, "sfunnel_rule_packets_total", rule); strconv.FormatFloat(got, 'f', -1, 64) != m[1] || got != 4 {
		t.Errorf("sfunnel_rule_packets_total = %v, list ruleset says %s (want the 4 unfragmented datagrams)", got, m[1])
	}
	if got := value(t, mf, "sfunnel_rule_bytes_total", rule); strconv.FormatFloat(got, 'f', -1, 64) != m[2] {
		t.Errorf("sfunnel_rule_bytes_total = %v, list ruleset says %s", got, m[2])
	}
	if got := value(t, mf, "sfunnel_mtu_exceeded_packets_total", map[string]string{"interface": "veth0", "hook": "egress", "handle": "1"}); got != 1 {
		t.Errorf("sfunnel_mtu_exceeded_packets_total = %v, want 1", got)
	}
	if got := value(t, mf, "sfunnel_left_alone_packets_total", map[string]string{"interface": "veth0", "hook": "egress", "reason": "fragment"}); got < 1 {
		t.Errorf("sfunnel_left_alone_packets_total{reason=fragment} = %v, want the fragmented datagram", got)
	}
	value(t, mf, "sfunnel_segmented_packets_total", map[string]string{"interface": "veth0", "hook": "egress"})
	for _, m := range mf["sfunnel_left_alone_packets_total"].Metric {
		for _, l := range m.Label {
			if l.GetName() == "reason" && (l.GetValue() == "segmented" || l.GetValue() == "mtu-exceeded") {
				t.Errorf("%s counted as left alone", l.GetValue())
			}
		}
	}
	if got := value(t, mf, "sfunnel_hook_info", map[string]string{"interface": "veth0", "hook": "ingress"}); got != 1 {
		t.Errorf("sfunnel_hook_info for veth0 ingress = %v", got)
	}
	if got := value(t, mf, "sfunnel_warnings", nil); got != 0 {
		t.Errorf("sfunnel_warnings = %v before nft flush ruleset", got)
	}
	if mf["process_cpu_seconds_total"] == nil || mf["go_goroutines"] == nil {
		t.Error("no process_ or go_ metrics of the exporter itself")
	}
	a.Run(t, "nft", "flush", "ruleset")
	if got := value(t, scrape(t, a, "127.0.0.1:9142"), "sfunnel_warnings", nil); got != 1 {
		t.Errorf("sfunnel_warnings = %v after nft flush ruleset, want 1", got)
	}

	// A commit shows at the next scrape: the new rule, the table back.
	mustSfunnel(t, "", "--netns", a.Name, "add", "rule", "veth0", "egress", "udp", "dport", "5555", "counter")
	mf = scrape(t, a, "127.0.0.1:9142")
	if got := value(t, mf, "sfunnel_rule_packets_total", map[string]string{"interface": "veth0", "hook": "egress", "handle": "4"}); got != 0 {
		t.Errorf("new rule: sfunnel_rule_packets_total = %v, want 0", got)
	}
	if got := value(t, mf, "sfunnel_warnings", nil); got != 0 {
		t.Errorf("sfunnel_warnings = %v after the next commit restored the table, want 0", got)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("metrics after SIGTERM: %v", err)
	}
}

// scrape fetches /metrics inside ns (the dial must happen on the thread
// that is in the namespace, so no http.Client) and parses it.
func scrape(t *testing.T, ns *testenv.NS, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	var mf map[string]*dto.MetricFamily
	err := ns.Do(func() error {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "GET /metrics HTTP/1.1\r\nHost: %s\r\nAccept: text/plain\r\nConnection: close\r\n\r\n", addr)
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") {
			return fmt.Errorf("GET /metrics: %s, %s", resp.Status, resp.Header.Get("Content-Type"))
		}
		p := expfmt.NewTextParser(model.UTF8Validation)
		mf, err = p.TextToMetricFamilies(resp.Body)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return mf
}

// value returns the value of the one metric of family name whose labels
// include want.
func value(t *testing.T, mf map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	t.Helper()
	f := mf[name]
	if f == nil {
		t.Fatalf("no %s in the scrape", name)
	}
	var found []float64
next:
	for _, m := range f.Metric {
		labels := map[string]string{}
		for _, l := range m.Label {
			labels[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if labels[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			found = append(found, m.Counter.GetValue())
		case m.Gauge != nil:
			found = append(found, m.Gauge.GetValue())
		}
	}
	if len(found) != 1 {
		t.Fatalf("%s%v: %d metrics, want 1", name, want, len(found))
	}
	return found[0]
}
