package datapath

import (
	"strings"
	"testing"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
	"github.com/vishvananda/netlink"
)

// A hook that funnels at egress gets its segmentation device pair, set up
// as the datapath needs it (segmentation and checksum offload off on the
// transmit end, a return program on the other); a ruleset without such a
// rule, or flush, removes it; Check creates nothing.
func TestSegdevFollowsRules(t *testing.T) {
	e := newEnv(t, Options{})
	rule := func(h uint64) *grammar.Rule {
		r, err := grammar.ParseRule("<test>", "tcp dport 8080 counter actions funnel udp dport 4000", nil)
		if err != nil {
			t.Fatal(err)
		}
		r.Handle = h
		return r
	}
	funnel := &ruleset.Ruleset{NextHandle: 2, Interfaces: []*ruleset.Interface{{Name: "vb", Egress: []*grammar.Rule{rule(1)}}}}
	segdevs := func() []Segdev {
		var sds []Segdev
		e.do(t, func() (err error) { sds, err = Segdevs(); return err })
		return sds
	}

	e.do(t, func() error { return e.be.Check(funnel) })
	if sds := segdevs(); len(sds) != 0 {
		t.Fatalf("Check created %v", sds)
	}
	e.commit(t, funnel)
	sds := segdevs()
	if len(sds) != 1 || sds[0].Dev != "vb" || sds[0].RxIndex == 0 {
		t.Fatalf("after a funnel rule at egress: %+v, want one pair for vb", sds)
	}
	feat := e.b.Run(t, "ethtool", "-k", sds[0].Tx)
	for _, f := range []string{"tx-checksumming: off", "tcp-segmentation-offload: off", "generic-segmentation-offload: off"} {
		if !strings.Contains(feat, f) {
			t.Errorf("%s: want %q in\n%s", sds[0].Tx, f, feat)
		}
	}
	if got := e.b.Run(t, "ip", "-6", "addr", "show", "dev", sds[0].Tx); strings.Contains(got, "inet6") {
		t.Errorf("%s has IPv6 addresses:\n%s", sds[0].Tx, got)
	}
	var mode string
	e.do(t, func() error {
		l, err := netlink.LinkByName(sds[0].Rx)
		if err == nil && l.Attrs().OperState != netlink.OperUp && l.Attrs().OperState != netlink.OperUnknown {
			mode = l.Attrs().OperState.String()
		}
		return err
	})
	if mode != "" {
		t.Errorf("%s is %s", sds[0].Rx, mode)
	}
	for _, f := range []string{"segmentation: on", "tx-checksum-ip-generic: on"} {
		if strings.Contains(feat, f) {
			t.Errorf("%s: %q left on", sds[0].Tx, f)
		}
	}
	if feat := e.b.Run(t, "ethtool", "-k", sds[0].Rx); !strings.Contains(feat, "generic-receive-offload: off") {
		t.Errorf("%s: GRO on:\n%s", sds[0].Rx, feat)
	}
	e.do(t, func() error {
		s, err := e.be.existing()
		if err != nil || s == nil {
			t.Errorf("no state: %v", err)
			return nil
		}
		a, err := s.Attached(bpf.HookID{Ifname: sds[0].Rx, Hook: grammar.HookIngress})
		if a == nil {
			t.Errorf("no return program on %s (%v)", sds[0].Rx, err)
		}
		return nil
	})

	// Recommit: same pair, still there.
	e.commit(t, funnel)
	if again := segdevs(); len(again) != 1 || again[0].TxIndex != sds[0].TxIndex {
		t.Errorf("recommit: %+v, want the same pair %+v", again, sds)
	}
	// Ingress only: not needed.
	e.commit(t, &ruleset.Ruleset{NextHandle: 3, Interfaces: []*ruleset.Interface{{Name: "vb", Ingress: []*grammar.Rule{rule(2)}}}})
	if sds := segdevs(); len(sds) != 0 {
		t.Errorf("no egress funnel left, still %+v", sds)
	}
	e.commit(t, funnel)
	e.commit(t, &ruleset.Ruleset{})
	if sds := segdevs(); len(sds) != 0 {
		t.Errorf("after flush: %+v", sds)
	}
}

// A rule's counter counts what it transformed; what it matched but left
// alone is counted beside it, by reason, and listed next to the rule.
func TestLeftAloneBesideCounter(t *testing.T) {
	e := newEnv(t, Options{})
	r, err := grammar.ParseRule("<test>", "udp dport 4739 counter actions rewrite tcp", nil)
	if err != nil {
		t.Fatal(err)
	}
	r.Handle = 1
	rs := &ruleset.Ruleset{NextHandle: 2, Interfaces: []*ruleset.Interface{{Name: "vb", Ingress: []*grammar.Rule{r}}}}
	e.commit(t, rs)
	// 16-byte datagrams are too short to be TCP: left alone, so delivered.
	if got := e.send(t, 4739, 5); got != 5 {
		t.Fatalf("%d of 5 datagrams left alone arrived", got)
	}
	var cs map[uint64]ruleset.Counter
	var la map[uint64]map[string]uint64
	e.do(t, func() (err error) {
		if cs, err = e.be.Counters(); err != nil {
			return err
		}
		la, err = e.be.LeftAlone()
		return err
	})
	if cs[1].Packets != 0 || cs[1].Bytes != 0 {
		t.Errorf("counter %+v, want 0: nothing was transformed", cs[1])
	}
	if la[1]["not-applicable"] != 5 {
		t.Errorf("left alone %v, want not-applicable 5", la)
	}
	var sb strings.Builder
	if err := ruleset.WriteText(&sb, rs, nil, &ruleset.ListOptions{Counters: cs, LeftAlone: la, Handles: true}); err != nil {
		t.Fatal(err)
	}
	if want := "counter packets 0 bytes 0 actions rewrite tcp # handle 1, left alone: not-applicable 5\n"; !strings.Contains(sb.String(), want) {
		t.Errorf("listing:\n%s\nwant a line ending %q", sb.String(), want)
	}
}
