package compiler_test

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

// Packets a rule matches but must not transform are passed untouched and
// counted with their reason, in the datapath and in the reference model:
// UDP whose length field disagrees with the IP payload (or is below 8) is
// not funneled; a TCP segment with URG set is not rewritten to UDP
// (TCP-in-UDP has no urgent pointer). Well-formed packets still are.
func TestLeftAloneWithReason(t *testing.T) {
	payload := bytes.Repeat([]byte{0x5a}, 40)
	udpLen := func(v6 bool, set func(n int) int) []byte {
		p := udpPkt(t, v6, 40000, 4739, payload)
		l4 := 14 + map[bool]int{false: 20, true: 40}[v6]
		n := int(binary.BigEndian.Uint16(p[l4+4:]))
		binary.BigEndian.PutUint16(p[l4+4:], uint16(set(n)))
		return p // the UDP checksum is now wrong too: no matter, it is left alone first
	}
	urg := func(v6 bool) []byte {
		return craft(t, pktSpec{v6: v6, l4: &layers.TCP{SrcPort: 33000, DstPort: 80, Seq: 7, Ack: 9, ACK: true, URG: true, Urgent: 3, Window: 512}, payload: payload})
	}
	for _, v6 := range []bool{false, true} {
		sfx := map[bool]string{false: "/ipv4", true: "/ipv6"}[v6]
		for _, c := range []struct {
			name, rule string
			pkt        []byte
			stat       int // -1: transformed
		}{
			{"udp-length-longer", "udp dport 4739 actions funnel tcp dport 179 sport 540", udpLen(v6, func(n int) int { return n + 1 }), abi.StatUDPLength},
			{"udp-length-shorter", "udp dport 4739 actions funnel udp dport 4000", udpLen(v6, func(n int) int { return n - 4 }), abi.StatUDPLength},
			{"udp-length-below-8", "udp dport 4739 actions funnel tcp dport 179", udpLen(v6, func(int) int { return 4 }), abi.StatUDPLength},
			{"udp-length-right", "udp dport 4739 actions funnel tcp dport 179", udpPkt(t, v6, 40000, 4739, payload), -1},
			{"urgent", "tcp dport 80 actions rewrite udp", urg(v6), abi.StatUrgent},
			{"not-urgent", "tcp dport 80 actions rewrite udp", tcpPkt(t, v6, 33000, 80, false, true, payload), -1},
			{"urgent-funneled", "tcp dport 80 actions funnel udp dport 4000", urg(v6), -1},
		} {
			t.Run(c.name+sfx, func(t *testing.T) {
				r, err := grammar.ParseRule("<test>", c.rule, nil)
				if err != nil {
					t.Fatal(err)
				}
				opts := compiler.Options{Hook: grammar.HookEgress}
				l := compileLoad(t, []*grammar.Rule{r}, nil, opts)
				got := l.run(t, c.pkt, 0)
				m, err := refmodel.New([]*grammar.Rule{r}, nil, modelOptions(opts))
				if err != nil {
					t.Fatal(err)
				}
				ref := m.Run(refmodel.Input{Packet: append([]byte(nil), c.pkt...)})
				if !bytes.Equal(got.out, ref.Packet) {
					t.Errorf("datapath and model differ:\n got %x\nwant %x", got.out, ref.Packet)
				}
				st := l.stats(t)
				if c.stat < 0 {
					if bytes.Equal(got.out, c.pkt) {
						t.Errorf("not transformed; stats %v", st)
					}
					return
				}
				if !bytes.Equal(got.out, c.pkt) {
					t.Errorf("changed:\n got %x\n was %x", got.out, c.pkt)
				}
				if st[c.stat] != 1 || ref.Stats[c.stat] != 1 {
					t.Errorf("%s counted %d (model %d), want 1", abi.StatNames[c.stat], st[c.stat], ref.Stats[c.stat])
				}
			})
		}
	}
}
