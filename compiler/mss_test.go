package compiler_test

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/refmodel"
)

// A funneled SYN's MSS option is clamped: by default to what fits the
// device MTU once funneled (BPF_PROG_TEST_RUN runs on loopback, MTU 65536),
// to the rule's `mss N`, or not at all with `mss off`; segments without SYN
// and MSS options already small enough are left as they are. The inner
// checksum stays valid (address-neutral) and the reference model agrees
// byte for byte.
func TestMSSClamp(t *testing.T) {
	syn := func(v6 bool, mss uint16, flags string, opts ...layers.TCPOption) []byte {
		mo := layers.TCPOption{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: binary.BigEndian.AppendUint16(nil, mss)}
		all := append(append([]layers.TCPOption(nil), opts...), mo,
			layers.TCPOption{OptionType: layers.TCPOptionKindSACKPermitted, OptionLength: 2},
			layers.TCPOption{OptionType: layers.TCPOptionKindWindowScale, OptionLength: 3, OptionData: []byte{7}},
		)
		tcp := &layers.TCP{SrcPort: 33000, DstPort: 80, Seq: 1, SYN: true, ACK: flags == "syn|ack", Window: 64240, Options: all}
		return craft(t, pktSpec{v6: v6, l4: tcp})
	}
	nop := layers.TCPOption{OptionType: layers.TCPOptionKindNop, OptionLength: 1}
	ts := layers.TCPOption{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: make([]byte, 8)}
	for _, c := range []struct {
		name   string
		action string
		pkt    func(v6 bool) []byte
		want   uint16
	}{
		{"explicit", "funnel udp dport 4739 mss 1360", func(v6 bool) []byte { return syn(v6, 1460, "syn") }, 1360},
		{"explicit-syn-ack-after-options", "funnel tcp dport 179 sport 540 mss 1000", func(v6 bool) []byte { return syn(v6, 1460, "syn|ack", nop, nop, ts) }, 1000},
		{"already-smaller", "funnel udp dport 4739 mss 1360", func(v6 bool) []byte { return syn(v6, 1200, "syn") }, 1200},
		{"off", "funnel udp dport 4739 mss off", func(v6 bool) []byte { return syn(v6, 65535, "syn") }, 65535},
		{"default-loopback-mtu", "funnel udp dport 4739", func(v6 bool) []byte { return syn(v6, 65535, "syn") }, 0},
	} {
		for _, v6 := range []bool{false, true} {
			t.Run(c.name+map[bool]string{false: "/ipv4", true: "/ipv6"}[v6], func(t *testing.T) {
				r, err := grammar.ParseRule("<test>", "tcp dport 80 actions "+c.action, nil)
				if err != nil {
					t.Fatal(err)
				}
				opts := compiler.Options{Hook: grammar.HookEgress}
				l := compileLoad(t, []*grammar.Rule{r}, nil, opts)
				in := c.pkt(v6)
				got := l.run(t, in, 0)
				m, err := refmodel.New([]*grammar.Rule{r}, nil, modelOptions(opts))
				if err != nil {
					t.Fatal(err)
				}
				ref := m.Run(refmodel.Input{Packet: append([]byte(nil), in...)})
				if !bytes.Equal(got.out, ref.Packet) {
					t.Errorf("datapath and reference model differ:\n got %x\nwant %x", got.out, ref.Packet)
				}
				iphl, hl := 20, 8
				if v6 {
					iphl = 40
				}
				if r.Actions[0].Proto == grammar.ProtoTCP {
					hl = 20
				}
				inner := got.out[14+iphl+hl:]
				want := c.want
				if want == 0 { // loopback MTU 65536 minus IP, TCP and funnel headers
					want = uint16(65536 - iphl - 20 - hl)
				}
				mss := uint16(0)
				for o := 20; o+4 <= int(inner[12]>>4)*4; {
					if inner[o] == 1 {
						o++
						continue
					}
					if inner[o] == 2 {
						mss = binary.BigEndian.Uint16(inner[o+2:])
						break
					}
					o += int(inner[o+1])
				}
				if mss != want {
					t.Errorf("inner MSS %d, want %d", mss, want)
				}
				if !segmentValid(nil, nil, false, 6, inner) {
					t.Errorf("inner TCP checksum not address-neutral-valid")
				}
			})
		}
	}
}
