package compiler_test

import (
	"bytes"
	"encoding/hex"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

// FuzzPacket feeds arbitrary frames to programs compiled from fixed
// rulesets and holds them to the reference model (go test -fuzz
// FuzzPacket ./compiler; plain go test runs the seeds).
func FuzzPacket(f *testing.F) {
	udp := udpPkt(f, false, 40000, 4739, []byte("seed"))
	f.Add(udp, uint32(0))
	f.Add(expectFunnel(udp, 14, false, grammar.ProtoTCP, 540, 179, funnelTo(grammar.ProtoTCP, 540, 179).Funnel), uint32(0))
	f.Add(udpPkt(f, true, 1, 2055, nil), uint32(0x10000))
	f.Add(withHeaders(udpPkt(f, true, 1, 6343, []byte("x")), true, false), uint32(1))
	f.Add(withHeaders(tcpPkt(f, false, 540, 179, true, false, []byte("y")), false, false), uint32(0))
	f.Add(tcpPkt(f, true, 33000, 5201, false, true, nil), uint32(0))

	rulesets := [][]*grammar.Rule{
		defaultRuleset(),
		{
			{Proto: grammar.ProtoUDP, Actions: []*grammar.Action{funnelTo(grammar.ProtoUDP, 0, 4789)}},
			{Proto: grammar.ProtoTCP, Dport: ports(5201), Actions: []*grammar.Action{act(grammar.ActRewrite, grammar.ProtoUDP)}},
			{Proto: grammar.ProtoUDP, Sport: ports(5201), Actions: []*grammar.Action{act(grammar.ActRewrite, grammar.ProtoTCP)}},
			{Proto: grammar.ProtoTCP, Counter: true, Actions: []*grammar.Action{act(grammar.ActUnfunnel, grammar.ProtoUDP)}},
			{Family: grammar.FamilyIPv6, Actions: []*grammar.Action{{Kind: grammar.ActDNAT, DNATAddr: netip.MustParseAddr("2001:db8::9"), DNATPort: 80}}},
		},
	}
	type pair struct {
		prog  *ebpf.Program
		model *refmodel.Model
	}
	var progs []pair
	for _, rules := range rulesets {
		opts := compiler.Options{Hook: grammar.HookIngress}
		l := compileLoad(f, rules, nil, opts)
		m, err := refmodel.New(rules, nil, modelOptions(opts))
		if err != nil {
			f.Fatal(err)
		}
		progs = append(progs, pair{l.coll.Programs[compiler.ProgramName], m})
	}
	f.Fuzz(func(t *testing.T, pkt []byte, mark uint32) {
		if len(pkt) < 14 || len(pkt) > 1500 {
			return
		}
		for _, p := range progs {
			out := make([]byte, len(pkt)+256)
			var ctxOut skbCtx
			opts := &ebpf.RunOptions{Data: pkt, DataOut: out, Context: skbCtx{Mark: mark}, ContextOut: &ctxOut}
			ret, err := p.prog.Run(opts)
			if err != nil {
				return // BPF_PROG_TEST_RUN refuses some frames (short IP headers)
			}
			want := p.model.Run(refmodel.Input{Packet: pkt, Mark: mark})
			if int32(ret) != want.Verdict || !bytes.Equal(opts.DataOut, want.Packet) || ctxOut.Mark != want.Mark {
				t.Fatalf("in %s\ngot  %d %#x %s\nwant %d %#x %s", hex.EncodeToString(pkt), int32(ret), ctxOut.Mark, hex.EncodeToString(opts.DataOut),
					want.Verdict, want.Mark, hex.EncodeToString(want.Packet))
			}
		}
	})
}
