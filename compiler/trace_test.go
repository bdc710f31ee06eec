package compiler_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// A program without a traced rule carries no tracing code and no ring
// buffer; with one, a packet the traced rule matches yields a record for
// that rule, for each later rule that matches, and for the verdict, while a
// packet that only untraced rules match yields nothing.
func TestTraceRecords(t *testing.T) {
	parse := func(handle uint64, text string) *grammar.Rule {
		r, err := grammar.ParseRule("<test>", text, nil)
		if err != nil {
			t.Fatal(err)
		}
		r.Handle = handle
		return r
	}
	untraced := []*grammar.Rule{parse(1, "udp dport 4739 counter"), parse(2, "udp dport 4739 drop")}
	p, err := compiler.Compile(untraced, nil, compiler.Options{ChecksumHelper: true})
	if err != nil {
		t.Fatal(err)
	}
	listing := p.Spec.Programs[compiler.ProgramName].Instructions.String()
	if p.Spec.Maps[abi.TraceMap] != nil || strings.Contains(listing, "Ringbuf") || strings.Contains(listing, "trace") {
		t.Errorf("untraced program has tracing code or map:\n%s", listing)
	}

	rules := []*grammar.Rule{
		parse(1, "udp dport 5000 counter"), // matches before tracing starts: no record
		parse(2, "udp dport 4739 counter meta nftrace set 1"),
		parse(3, "udp sport 9 drop"),       // does not match
		parse(4, "udp dport 4739 counter"), // traced: a record
		parse(5, "udp actions accept"),
	}
	l := compileLoad(t, rules, nil, compiler.Options{})
	rd, err := ringbuf.NewReader(l.coll.Maps[abi.TraceMap])
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	read := func() []abi.TraceRecord { return readTraces(t, rd) }

	pkt := craft(t, pktSpec{l4: udpLayer(40000, 4739), payload: []byte("traced")})
	before := monotonic(t)
	if r := l.run(t, pkt, 0); r.ret != compiler.VerdictPass {
		t.Fatalf("verdict %d", r.ret)
	}
	after := monotonic(t)
	got := read()
	for _, g := range got {
		if g.Time < before || g.Time > after {
			t.Errorf("record time %d outside the run [%d, %d]", g.Time, before, after)
		}
	}
	if len(got) != 4 {
		t.Fatalf("%d records, want rules 2, 4, 5 and the verdict: %+v", len(got), got)
	}
	for i, want := range []struct {
		kind    uint8
		rule    uint32
		verdict uint8
	}{{abi.TraceRule, 1, 0}, {abi.TraceRule, 3, 0}, {abi.TraceRule, 4, 0}, {abi.TraceVerdict, 0xffffffff, abi.TracePass}} {
		g := got[i]
		if g.Kind != want.kind || g.Rule != want.rule || g.Verdict != want.verdict || g.ID == 0 || g.ID != got[0].ID || g.Hook != 0 {
			t.Errorf("record %d: %+v, want kind %d rule %d verdict %d and the id of the first", i, g, want.kind, want.rule, want.verdict)
		}
		// BPF_PROG_TEST_RUN pads the frame to 60 bytes.
		if !bytes.HasPrefix(g.Data, pkt[14:]) || g.Len < uint32(len(pkt)) {
			t.Errorf("record %d: data %x (len %d), want the packet from its IP header %x", i, g.Data, g.Len, pkt[14:])
		}
	}

	// Only untraced rules match: no record.
	other := craft(t, pktSpec{l4: udpLayer(40000, 5000)})
	l.run(t, other, 0)
	if got := read(); len(got) != 0 {
		t.Errorf("untraced packet gave records: %+v", got)
	}

	// A rule that leaves the packet alone says why: a fragment can't be funneled.
	frules := []*grammar.Rule{parse(7, "udp meta nftrace set 1 actions funnel tcp dport 179 sport 540")}
	lf := compileLoad(t, frules, nil, compiler.Options{})
	rdf, err := ringbuf.NewReader(lf.coll.Maps[abi.TraceMap])
	if err != nil {
		t.Fatal(err)
	}
	defer rdf.Close()
	frag := craft(t, pktSpec{l4: udpLayer(40000, 4739), payload: make([]byte, 64)})
	frag[14+6] |= 0x20 // more fragments
	lf.run(t, frag, 0)
	rd = rdf
	got = read()
	if len(got) != 2 || got[1].Kind != abi.TraceVerdict || got[1].Verdict != abi.TraceLeft || int(got[1].Reason) != abi.StatFragment+1 {
		t.Errorf("fragment: %+v, want the rule, then verdict left alone (fragment)", got)
	}

	// Rules compiled as one group (a map lookup; the body finds the rule
	// index at run time) report the rule that matched.
	var grouped []*grammar.Rule
	for k := 0; k < 20; k++ {
		grouped = append(grouped, parse(uint64(100+k), fmt.Sprintf("udp dport %d meta nftrace set 1 actions accept", 3000+k)))
	}
	lg := compileLoad(t, grouped, nil, compiler.Options{})
	if !strings.Contains(lg.prog.Spec.Programs[compiler.ProgramName].Instructions.String(), "group") {
		t.Log("the rules did not compile to a group")
	}
	rdg, err := ringbuf.NewReader(lg.coll.Maps[abi.TraceMap])
	if err != nil {
		t.Fatal(err)
	}
	defer rdg.Close()
	lg.run(t, craft(t, pktSpec{l4: udpLayer(40000, 3005)}), 0)
	rd = rdg
	got = read()
	if len(got) != 2 || got[0].Kind != abi.TraceRule || got[0].Rule != 5 || got[1].Verdict != abi.TracePass {
		t.Errorf("grouped rules: %+v, want rule index 5 then pass", got)
	}
}

func monotonic(t *testing.T) uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		t.Fatal(err)
	}
	return uint64(ts.Nano())
}

// readTraces returns the trace records waiting in rd.
func readTraces(t *testing.T, rd *ringbuf.Reader) []abi.TraceRecord {
	t.Helper()
	var out []abi.TraceRecord
	for {
		rd.SetDeadline(time.Now().Add(100 * time.Millisecond))
		rec, err := rd.Read()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		tr, err := abi.DecodeTrace(rec.RawSample)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, tr)
	}
}
