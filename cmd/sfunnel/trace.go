package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/sys/unix"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/datapath"
)

// traceEvent is one line of `sfunnel monitor trace` (and its -j form), in
// the manner of `nft monitor trace`: a packet's summary when its trace
// starts, each rule it matched, then the verdict.
type traceEvent struct {
	ID        string `json:"id"`
	Interface string `json:"interface"`
	Hook      string `json:"hook"`
	Type      string `json:"type"`             // packet, rule, verdict
	Packet    string `json:"packet,omitempty"` // packet: the summary
	Handle    uint64 `json:"handle,omitempty"` // rule
	Rule      string `json:"rule,omitempty"`   // rule: its text
	Verdict   string `json:"verdict,omitempty"`
	Reason    string `json:"reason,omitempty"` // verdict "left alone": why
}

func (e traceEvent) String() string {
	s := fmt.Sprintf("trace id %s %s %s ", e.ID, e.Interface, e.Hook)
	switch e.Type {
	case "packet":
		return s + "packet: " + e.Packet
	case "rule":
		return s + fmt.Sprintf("rule %s (handle %d)", e.Rule, e.Handle)
	}
	if e.Reason != "" {
		return s + fmt.Sprintf("verdict %s (%s)", e.Verdict, e.Reason)
	}
	return s + "verdict " + e.Verdict
}

type traceItem struct {
	src *datapath.TraceSource
	rec abi.TraceRecord
}

// monitorTrace prints the records of traced packets until ctx ends. As
// with nft, only packets traced after it started are shown (a ring buffer
// keeps what nobody read). The ring buffers are opened again whenever the
// ruleset changes (a new program has new ones).
func (a *app) monitorTrace(ctx context.Context, b *datapath.Backend, out io.Writer) error {
	var now unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err != nil {
		return err
	}
	start := uint64(now.Nano())
	stale := map[uint32]bool{} // trace ids that began before start
	items := make(chan traceItem, 1024)
	done := make(chan struct{}) // readers stop sending once monitoring ends
	defer close(done)
	var readers []*ringbuf.Reader
	var srcs []datapath.TraceSource
	closeAll := func() {
		for _, r := range readers {
			r.Close()
		}
		for _, s := range srcs {
			s.Map.Close()
		}
		readers, srcs = nil, nil
	}
	defer closeAll()
	open := func() error {
		closeAll()
		var err error
		if srcs, err = b.TraceSources(); err != nil {
			return err
		}
		for i := range srcs {
			src := &srcs[i]
			rd, err := ringbuf.NewReader(src.Map)
			if err != nil {
				return err
			}
			readers = append(readers, rd)
			go func() {
				for {
					rec, err := rd.Read()
					if err != nil {
						return // closed
					}
					if tr, err := abi.DecodeTrace(rec.RawSample); err == nil {
						select {
						case items <- traceItem{src, tr}:
						case <-done:
							return
						}
					}
				}
			}()
		}
		return nil
	}
	gen, err := b.Generation()
	if err != nil {
		return err
	}
	if err := open(); err != nil {
		return err
	}
	tick := time.NewTicker(monitorInterval)
	defer tick.Stop()
	started := map[string]bool{} // "IF HOOK id" whose packet line is out
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			g, err := b.Generation()
			if err != nil {
				return err
			}
			if g != gen {
				gen = g
				if err := open(); err != nil {
					return err
				}
			}
		case it := <-items:
			if it.rec.Time < start || stale[it.rec.ID] {
				stale[it.rec.ID] = it.rec.Kind != abi.TraceVerdict
				if !stale[it.rec.ID] {
					delete(stale, it.rec.ID)
				}
				continue
			}
			if len(started) > 4096 { // verdict records lost to a full ring buffer
				clear(started)
			}
			for _, e := range traceEvents(it, started) {
				a.printEvent(out, e)
			}
		}
	}
}

// traceEvents turns a record into lines: the packet's summary first when
// its trace starts.
func traceEvents(it traceItem, started map[string]bool) []traceEvent {
	r := it.rec
	base := traceEvent{ID: fmt.Sprintf("%08x", r.ID), Interface: it.src.Ifname, Hook: it.src.Hook.String()}
	key := base.Interface + " " + base.Hook + " " + base.ID
	var out []traceEvent
	if !started[key] {
		started[key] = true
		e := base
		e.Type, e.Packet = "packet", packetSummary(r)
		out = append(out, e)
	}
	e := base
	switch r.Kind {
	case abi.TraceRule:
		e.Type = "rule"
		if int(r.Rule) < len(it.src.Rules) {
			e.Handle, e.Rule = it.src.Rules[r.Rule].Handle, it.src.Rules[r.Rule].Text
		} else {
			e.Rule = fmt.Sprintf("#%d", r.Rule)
		}
	case abi.TraceVerdict:
		delete(started, key)
		e.Type = "verdict"
		switch r.Verdict {
		case abi.TraceNext:
			e.Verdict = "continue" // to the next program and the stack, as nft says
		case abi.TracePass:
			e.Verdict = "accept"
		case abi.TraceDrop:
			e.Verdict = "drop"
		case abi.TraceSegment:
			e.Verdict = "segment"
		case abi.TraceLeft:
			e.Verdict = "left alone"
			if n := int(r.Reason) - 1; n >= 0 && n < len(abi.StatNames) {
				e.Reason = abi.StatNames[n]
			}
		default:
			e.Verdict = fmt.Sprintf("%d", r.Verdict)
		}
	default:
		return out
	}
	return append(out, e)
}

// packetSummary renders a record's packet in nft's words: addresses,
// protocol, ports, TCP flags, length, mark.
func packetSummary(r abi.TraceRecord) string {
	var w []string
	var first gopacket.LayerType
	switch {
	case len(r.Data) > 0 && r.Data[0]>>4 == 4:
		first = layers.LayerTypeIPv4
	case len(r.Data) > 0 && r.Data[0]>>4 == 6:
		first = layers.LayerTypeIPv6
	default:
		return fmt.Sprintf("length %d", r.Len)
	}
	p := gopacket.NewPacket(r.Data, first, gopacket.DecodeOptions{Lazy: true, NoCopy: true})
	udp, _ := p.Layer(layers.LayerTypeUDP).(*layers.UDP)
	tcp, _ := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
	if ip, ok := p.Layer(layers.LayerTypeIPv4).(*layers.IPv4); ok {
		w = append(w, "ip saddr", addr(ip.SrcIP), "ip daddr", addr(ip.DstIP), "ip protocol", strings.ToLower(ip.Protocol.String()))
		if ip.Flags&layers.IPv4MoreFragments != 0 || ip.FragOffset != 0 {
			w = append(w, "ip frag-off", fmt.Sprint(ip.FragOffset*8))
			if ip.FragOffset == 0 { // gopacket leaves a first fragment's transport header undecoded
				udp, tcp = transport(ip.Protocol, ip.Payload)
			}
		}
	}
	if ip, ok := p.Layer(layers.LayerTypeIPv6).(*layers.IPv6); ok {
		w = append(w, "ip6 saddr", addr(ip.SrcIP), "ip6 daddr", addr(ip.DstIP))
	}
	if udp != nil {
		w = append(w, "udp sport", fmt.Sprint(uint16(udp.SrcPort)), "udp dport", fmt.Sprint(uint16(udp.DstPort)))
	}
	if tcp != nil {
		w = append(w, "tcp sport", fmt.Sprint(uint16(tcp.SrcPort)), "tcp dport", fmt.Sprint(uint16(tcp.DstPort)), "tcp flags", tcpFlags(tcp))
	}
	w = append(w, "length", fmt.Sprint(r.Len))
	if r.Mark != 0 {
		w = append(w, "meta mark", fmt.Sprintf("0x%08x", r.Mark))
	}
	return strings.Join(w, " ")
}

// transport decodes a UDP or TCP header at the start of b, if there is one.
func transport(proto layers.IPProtocol, b []byte) (*layers.UDP, *layers.TCP) {
	switch proto {
	case layers.IPProtocolUDP:
		u := &layers.UDP{}
		if len(b) >= 8 && u.DecodeFromBytes(b, gopacket.NilDecodeFeedback) == nil {
			return u, nil
		}
	case layers.IPProtocolTCP:
		t := &layers.TCP{}
		if t.DecodeFromBytes(b, gopacket.NilDecodeFeedback) == nil {
			return nil, t
		}
	}
	return nil, nil
}

func addr(ip []byte) string {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return "?"
	}
	return a.Unmap().String()
}

func tcpFlags(t *layers.TCP) string {
	var f []string
	for _, x := range []struct {
		on   bool
		name string
	}{{t.FIN, "fin"}, {t.SYN, "syn"}, {t.RST, "rst"}, {t.PSH, "psh"}, {t.ACK, "ack"}, {t.URG, "urg"}, {t.ECE, "ecn"}, {t.CWR, "cwr"}} {
		if x.on {
			f = append(f, x.name)
		}
	}
	if len(f) == 0 {
		return "0x0"
	}
	return strings.Join(f, "|")
}
