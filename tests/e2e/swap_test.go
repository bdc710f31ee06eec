package e2e

import (
	"encoding/binary"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// While numbered datagrams stream through funnel (client egress) and
// unfunnel (server ingress), both rulesets are replaced again and again.
// Every replacement swaps the programs (the rule lists differ), and none may
// lose a datagram or let one through un-funneled: the server drops plain
// UDP to the port, so a datagram that skipped the funnel shows up as lost.
// With tcx links (link update) and with the clsact fallback (cls_bpf filter
// replaced in place).
func TestAtomicSwapUnderTraffic(t *testing.T) {
	for _, clsact := range []bool{false, true} {
		name := "tcx"
		if clsact {
			name = "clsact"
		}
		t.Run(name, func(t *testing.T) { testAtomicSwap(t, clsact) })
	}
}

func testAtomicSwap(t *testing.T, clsact bool) {
	swaps := 200
	if v, err := strconv.Atoi(os.Getenv("SFUNNEL_SWAPS")); err == nil {
		swaps = v
	}
	tp := newTopo(t)
	tp.be = datapath.New(datapath.Options{Root: tp.root, ForceClsact: clsact})
	funnel := "ip daddr 203.0.113.10 udp dport 4739 counter actions funnel tcp dport 179 sport 540"
	unfunnel := "tcp dport 179 sport 540 counter actions unfunnel udp"
	dropPlain := "udp dport 4739 counter actions drop"
	// Two versions of each side's rules; the extra rule matches nothing.
	versions := func(i int, rules_ []*grammar.Rule) []*grammar.Rule {
		if i%2 == 0 {
			return rules_
		}
		return append(rules(t, 100+uint64(i), "udp dport 9 counter actions accept"), rules_...)
	}
	clientRules, serverRules := rules(t, 1, funnel), rules(t, 1, unfunnel, dropPlain)
	commit := func(i int) {
		tp.commit(t, tp.c, &ruleset.Ruleset{NextHandle: 1000, Interfaces: []*ruleset.Interface{iface("c0", nil, versions(i, clientRules))}})
		tp.commit(t, tp.s, &ruleset.Ruleset{NextHandle: 1000, Interfaces: []*ruleset.Interface{iface("s0", versions(i, serverRules), nil)}})
	}
	commit(0)
	firstProg := tp.progID(t, tp.c, "c0", grammar.HookEgress)
	capN := startCapture(t, tp.n, "n0")

	var srv, cl *net.UDPConn
	must(t, tp.s.Do(func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: serverIP.AsSlice(), Port: 4739})
		return err
	}))
	defer srv.Close()
	srv.SetReadBuffer(8 << 20)
	must(t, tp.c.Do(func() (err error) {
		cl, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: vip.AsSlice(), Port: 4739})
		return err
	}))
	defer cl.Close()

	var received sync.Map
	var nrecv atomic.Int64
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		buf := make([]byte, 2000)
		for {
			srv.SetReadDeadline(time.Now().Add(time.Second))
			m, err := srv.Read(buf)
			if err != nil {
				return
			}
			if m == 64 {
				received.Store(binary.BigEndian.Uint64(buf), true)
				nrecv.Add(1)
			}
		}
	}()
	var sent atomic.Int64
	stop := make(chan struct{})
	sendDone := make(chan struct{})
	go func() {
		defer close(sendDone)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			cl.Write(datagram(i, 64))
			sent.Store(int64(i + 1))
			if i%4 == 3 {
				time.Sleep(100 * time.Microsecond)
			}
		}
	}()

	start := time.Now()
	for i := 1; i <= swaps; i++ {
		commit(i)
	}
	elapsed := time.Since(start)
	if tp.progID(t, tp.c, "c0", grammar.HookEgress) == firstProg {
		t.Error("the client's program was never replaced")
	}
	time.Sleep(20 * time.Millisecond)
	close(stop)
	<-sendDone
	<-recvDone
	n := int(sent.Load())
	t.Logf("%d swaps per side in %v (%.1f ms per transaction), %d datagrams sent, %d received",
		swaps, elapsed, float64(elapsed.Microseconds())/float64(2*swaps)/1000, n, nrecv.Load())
	if n < 1000 {
		t.Errorf("only %d datagrams were sent during the swaps", n)
	}
	lost := 0
	for i := 0; i < n; i++ {
		if _, ok := received.Load(uint64(i)); !ok {
			if lost++; lost <= 5 {
				t.Errorf("datagram %d lost", i)
			}
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d datagrams lost", lost, n)
	}
	plain := 0
	for _, f := range capN.stop() {
		if w, err := parseWire(f); err == nil && w.proto == 17 {
			if _, dport := w.ports(); dport == 4739 {
				plain++
			}
		}
	}
	if plain > 0 {
		t.Errorf("%d datagrams crossed the wire un-funneled", plain)
	}
	if c := tp.counters(t, tp.s)[2]; c.Packets != 0 {
		t.Errorf("the server dropped %d plain datagrams", c.Packets)
	}
	if c := tp.counters(t, tp.c)[1]; c.Packets != uint64(n) {
		t.Errorf("funnel counter %d across %d swaps, want %d (counters carry over)", c.Packets, swaps, n)
	}
}
