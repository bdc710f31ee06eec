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
	"github.com/prometheus/client_golang/prometheus/promhttp"

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

// Read takes a snapshot of the live datapath (in the calling thread's
// network namespace).
func Read(b *datapath.Backend) (*Snapshot, error) {
	rs, err := b.Load()
	if err != nil {
		return nil, err
	}
	counters, err := b.Counters()
	if err != nil {
		return nil, err
	}
	s := &Snapshot{}
	for _, ifc := range rs.Interfaces {
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			for _, r := range ifc.Rules(h) {
				if !r.Counter {
					continue
				}
				c := counters[r.Handle]
				s.Rules = append(s.Rules, Rule{Interface: ifc.Name, Hook: h, Handle: r.Handle, Comment: r.Comment, Packets: c.Packets, Bytes: c.Bytes})
			}
		}
	}
	if s.Hooks, err = b.Status(); err != nil {
		return nil, err
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
		"Packets a rule matched but passed untouched, by reason (fragment, unfunnel-invalid, not-applicable, no-checksum, ip-options, gso, partial-checksum, helper-failed).",
		[]string{"interface", "hook", "reason"}, nil)
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
	for _, d := range []*prometheus.Desc{rulePackets, ruleBytes, leftAlone, mtuExceeded, hookInfo, outOfStep} {
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
			if reason == "mtu-exceeded" { // per rule below
				continue
			}
			ch <- prometheus.MustNewConstMetric(leftAlone, prometheus.CounterValue, float64(n), hs.Ifname, hook, reason)
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
	reg.MustRegister(&Collector{Read: read})
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorHandling: promhttp.HTTPErrorOnError})
}
