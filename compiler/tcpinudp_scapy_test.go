package compiler_test

import (
	"bytes"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/internal/testenv"
)

// TCP-in-UDP byte for byte against the draft's layout built with scapy
// (testdata/tcpinudp.py), independently of the compiler, in both
// directions: `rewrite udp` of each segment must equal the datagram scapy
// makes of it, and `rewrite tcp` of that datagram the segment scapy makes
// back (checksums computed by scapy from scratch).
func TestTCPInUDPAgainstScapy(t *testing.T) {
	py := "/usr/bin/python3"
	_, err := os.Stat(py)
	testenv.Require(t, err == nil && exec.Command(py, "-c", "import scapy.all").Run() == nil, "python3-scapy (Debian's /usr/bin/python3) is not installed")
	nop := layers.TCPOption{OptionType: layers.TCPOptionKindNop, OptionLength: 1}
	ts := layers.TCPOption{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: []byte{1, 2, 3, 4, 5, 6, 7, 8}}
	mss := layers.TCPOption{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{0x05, 0xb4}}
	var in [][]byte
	for _, v6 := range []bool{false, true} {
		for i, c := range []struct {
			tcp  layers.TCP
			size int
		}{
			{layers.TCP{SYN: true, Window: 64240, Options: []layers.TCPOption{mss, nop, nop, ts}}, 0},
			{layers.TCP{SYN: true, ACK: true, Window: 65160, Options: []layers.TCPOption{mss}}, 0},
			{layers.TCP{ACK: true, Window: 502, Options: []layers.TCPOption{nop, nop, ts}}, 1},
			{layers.TCP{ACK: true, PSH: true, Window: 502}, 1000},
			{layers.TCP{ACK: true, PSH: true, ECE: true, CWR: true, Window: 7}, 1399},
			{layers.TCP{ACK: true, FIN: true, Window: 1, Options: []layers.TCPOption{nop, nop, ts}}, 333},
			{layers.TCP{RST: true}, 0},
		} {
			tcp := c.tcp
			tcp.SrcPort, tcp.DstPort = layers.TCPPort(40000+i), 443
			tcp.Seq, tcp.Ack = 0xfedcba98-uint32(i), 0x01234567+uint32(i)*77777
			payload := make([]byte, c.size)
			for j := range payload {
				payload[j] = byte(j*7 + i)
			}
			in = append(in, craft(t, pktSpec{v6: v6, l4: &tcp, payload: payload}))
		}
	}
	var script strings.Builder
	for _, p := range in {
		script.WriteString(hex.EncodeToString(p) + "\n")
	}
	cmd := exec.Command(py, "testdata/tcpinudp.py")
	cmd.Stdin = strings.NewReader(script.String())
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("scapy: %v", err)
	}
	lines := strings.Fields(string(out))
	if len(lines) != 2*len(in) {
		t.Fatalf("scapy gave %d frames for %d segments", len(lines), len(in))
	}
	rule := func(text string) *loaded {
		r, err := grammar.ParseRule("<test>", text, nil)
		if err != nil {
			t.Fatal(err)
		}
		return compileLoad(t, []*grammar.Rule{r}, nil, compiler.Options{Hook: grammar.HookEgress})
	}
	toUDP, toTCP := rule("tcp dport 443 actions rewrite udp"), rule("udp dport 443 actions rewrite tcp")
	for i, p := range in {
		wantUDP, _ := hex.DecodeString(lines[2*i])
		wantTCP, _ := hex.DecodeString(lines[2*i+1])
		if got := toUDP.run(t, p, 0).out; !bytes.Equal(got, wantUDP) {
			t.Errorf("segment %d: rewrite udp\n  got %x\n want %x (scapy)", i, got, wantUDP)
		}
		if got := toTCP.run(t, wantUDP, 0).out; !bytes.Equal(got, wantTCP) {
			t.Errorf("segment %d: rewrite tcp of scapy's datagram\n  got %x\n want %x (scapy)", i, got, wantTCP)
		}
		if !bytes.Equal(wantTCP, p) {
			t.Errorf("segment %d: scapy's round trip differs from the segment sent (test bug?)\n got %x\nwant %x", i, wantTCP, p)
		}
	}
}
