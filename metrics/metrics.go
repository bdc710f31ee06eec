// Package metrics exports sfunnel's counters in Prometheus' text format:
// rule counters, the packets rules left alone and why, MTU overruns, what
// is attached, and whether the kernel still holds what was committed. The
// format comes from Prometheus' client library; every scrape reads the
// kernel afresh (nothing is cached or kept between scrapes).
package metrics

import (
	"fmt"
	"net/http"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/grammar"
)

// Snapshot is what one scrape reports.
type Snapshot struct {
	Rules    []Rule
	Hooks    []datapath.HookStatus
	Warnings []string
}

// Rule is the counter of one rule with a `counter` statement.
type Rule struct {
	Interface string
	Hook      grammar.Hook
	Handle    uint64
	Comment   string
	Packets   uint64
	Bytes     uint64
}

// Reader takes snapshots of the live datapath (in the calling thread's
// network namespace). The rules are parsed again only when a commit made a
// new generation; counters, events and warnings are read every time.
type Reader struct {
	B *datapath.Backend

	gen   uint64
	have  bool
	rules []Rule // counter rules, without counts
}

// Read takes a snapshot.
func (rd *Reader) Read() (*Snapshot, error) {
	b := rd.B
	gen, err := b.Generation()
	if err != nil {
		return nil, err
	}
	if !rd.have || gen != rd.gen {
		rs, err := b.Load()
		if err != nil {
			return nil, err
		}
		rd.rules = rd.rules[:0]
		for _, ifc := range rs.Interfaces {
			for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
				for _, r := range ifc.Rules(h) {
					if r.Counter {
						rd.rules = append(rd.rules, Rule{Interface: ifc.Name, Hook: h, Handle: r.Handle, Comment: r.Comment})
					}
				}
			}
		}
		rd.gen, rd.have = gen, true
	}
	counters, err := b.Counters()
	if err != nil {
		return nil, err
	}
	s := &Snapshot{}
	if s.Hooks, err = b.Status(); err != nil {
		return nil, err
	}
	live := map[string]bool{}
	for _, h := range s.Hooks {
		live[h.Ifname+" "+h.Hook.String()] = true
	}
	for _, r := range rd.rules {
		// A hook detached outside sfunnel has no counters to show.
		if c, ok := counters[r.Handle]; ok && live[r.Interface+" "+r.Hook.String()] {
			r.Packets, r.Bytes = c.Packets, c.Bytes
			s.Rules = append(s.Rules, r)
		}
	}
	if s.Warnings, err = b.Warnings(); err != nil {
		return nil, err
	}
	return s, nil
}

var (
	rulePackets = prometheus.NewDesc("sfunnel_rule_packets_total",
		"Packets counted by a rule's counter statement.", []string{"interface", "hook", "handle", "comment"}, nil)
	ruleBytes = prometheus.NewDesc("sfunnel_rule_bytes_total",
		"Bytes counted by a rule's counter statement.", []string{"interface", "hook", "handle", "comment"}, nil)
	leftAlone = prometheus.NewDesc("sfunnel_left_alone_packets_total",
		"Packets a rule matched but passed untouched, by reason (the event names of sfunnel monitor, e.g. fragment, unfunnel-invalid, gso).",
		[]string{"interface", "hook", "reason"}, nil)
	segmented = prometheus.NewDesc("sfunnel_segmented_packets_total",
		"GSO or CHECKSUM_PARTIAL packets a funnel or rewrite rule sent through the segmentation device (their segments are rewritten one by one).",
		[]string{"interface", "hook"}, nil)
	mtuExceeded = prometheus.NewDesc("sfunnel_mtu_exceeded_packets_total",
		"Packets a rule's funnel made longer than the egress MTU.", []string{"interface", "hook", "handle"}, nil)
	hookInfo = prometheus.NewDesc("sfunnel_hook_info",
		"A hook with an sfunnel program attached (always 1).", []string{"interface", "hook", "mode", "program"}, nil)
	outOfStep = prometheus.NewDesc("sfunnel_warnings",
		"Ways the kernel no longer holds what was committed: hooks detached outside sfunnel, the nftables table flushed (see sfunnel list ruleset).", nil, nil)
)

// Collector is a prometheus.Collector over snapshots from Read.
type Collector struct {
	Read func() (*Snapshot, error)
}

func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{rulePackets, ruleBytes, leftAlone, segmented, mtuExceeded, hookInfo, outOfStep} {
		ch <- d
	}
}

func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s, err := c.Read()
	if err != nil {
		ch <- prometheus.NewInvalidMetric(outOfStep, fmt.Errorf("reading the datapath: %w", err))
		return
	}
	for _, r := range s.Rules {
		h := strconv.FormatUint(r.Handle, 10)
		ch <- prometheus.MustNewConstMetric(rulePackets, prometheus.CounterValue, float64(r.Packets), r.Interface, r.Hook.String(), h, r.Comment)
		ch <- prometheus.MustNewConstMetric(ruleBytes, prometheus.CounterValue, float64(r.Bytes), r.Interface, r.Hook.String(), h, r.Comment)
	}
	for _, hs := range s.Hooks {
		hook := hs.Hook.String()
		ch <- prometheus.MustNewConstMetric(hookInfo, prometheus.GaugeValue, 1, hs.Ifname, hook, string(hs.Mode), strconv.FormatUint(uint64(hs.ProgID), 10))
		for reason, n := range hs.Stats {
			switch reason {
			case abi.StatNames[abi.StatMTUExceeded]: // per rule below
			case abi.StatNames[abi.StatSegmented]: // not left alone
				ch <- prometheus.MustNewConstMetric(segmented, prometheus.CounterValue, float64(n), hs.Ifname, hook)
			default:
				ch <- prometheus.MustNewConstMetric(leftAlone, prometheus.CounterValue, float64(n), hs.Ifname, hook, reason)
			}
		}
		for handle, n := range hs.MTUExceeded {
			ch <- prometheus.MustNewConstMetric(mtuExceeded, prometheus.CounterValue, float64(n), hs.Ifname, hook, strconv.FormatUint(handle, 10))
		}
	}
	ch <- prometheus.MustNewConstMetric(outOfStep, prometheus.GaugeValue, float64(len(s.Warnings)))
}

// Handler serves the metrics of read at every request.
func Handler(read func() (*Snapshot, error)) http.Handler {
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(&Collector{Read: read},
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		collectors.NewGoCollector())
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError})
}
