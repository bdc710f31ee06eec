package ctmark

import (
	"net"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// A mark set on packets entering a namespace (as `ct mark set` does at TC
// ingress) is saved on the connection and restored onto the replies before
// they leave, without touching mark bits outside the mask.
func TestSaveAndRestore(t *testing.T) {
	testenv.RequireCommand(t, "nft")
	a, b := testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, a, "va", "192.0.2.1/24", b, "vb", "192.0.2.2/24")

	tbl := &Table{Mask: 0x00ff0000}
	must(t, b.Do(tbl.Ensure))
	must(t, b.Do(tbl.Ensure)) // replacing is fine
	listing := b.Run(t, "nft", "list", "table", "inet", "sfunnel")
	for _, want := range []string{"hook prerouting priority mangle", "hook postrouting priority mangle", "ct mark set", "meta mark set"} {
		if !strings.Contains(listing, want) {
			t.Errorf("table lacks %q:\n%s", want, listing)
		}
	}

	// The test's own table: the mark the datapath would set, a foreign ct
	// mark bit, and counters seeing what leaves.
	script := `table ip probe {
	chain pre { type filter hook prerouting priority -190; udp dport 5000 meta mark set 0x00420000 ct mark set ct mark | 0x1; }
	chain post { type filter hook postrouting priority 0;
		udp sport 5000 meta mark 0x00420000 counter
		udp sport 5000 ct mark 0x00420001 counter
	}
}`
	cmd := b.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}

	var srv *net.UDPConn
	must(t, b.Do(func() (err error) {
		srv, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 5000})
		return err
	}))
	defer srv.Close()
	go func() {
		buf := make([]byte, 100)
		for {
			n, from, err := srv.ReadFromUDP(buf)
			if err != nil {
				return
			}
			srv.WriteToUDP(buf[:n], from)
		}
	}()
	var cl *net.UDPConn
	must(t, a.Do(func() (err error) {
		cl, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(192, 0, 2, 2), Port: 5000})
		return err
	}))
	defer cl.Close()
	for i := 0; i < 3; i++ {
		cl.Write([]byte("ping"))
		cl.SetReadDeadline(time.Now().Add(time.Second))
		buf := make([]byte, 100)
		if _, err := cl.Read(buf); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
	}
	probe := b.Run(t, "nft", "list", "chain", "ip", "probe", "post")
	counts := regexp.MustCompile(`counter packets (\d+)`).FindAllStringSubmatch(probe, -1)
	if len(counts) != 2 || counts[0][1] != "3" || counts[1][1] != "3" {
		t.Errorf("want 3 replies with meta mark 0x00420000 and ct mark 0x00420001:\n%s", probe)
	}

	must(t, b.Do(tbl.Remove))
	must(t, b.Do(tbl.Remove)) // absent is fine
	if ok, err := tbl.Exists(); err != nil || ok {
		// Exists runs in the test's namespace here: must not see b's table.
		t.Errorf("Exists outside the namespace: %v %v", ok, err)
	}
	must(t, b.Do(func() error {
		if ok, err := tbl.Exists(); err != nil || ok {
			t.Errorf("table still there after Remove: %v %v", ok, err)
		}
		return nil
	}))
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
