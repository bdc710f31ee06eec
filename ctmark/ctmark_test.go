package ctmark

import (
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
)

// A mark set on packets entering a namespace (as `ct mark set` does at TC
// ingress: the value bits plus the flag) is saved on the connection, as
// `conntrack -L` shows it, and restored onto the replies before they leave,
// without touching connection mark bits outside the mask. A flagged value of
// 0 clears the saved bits; unflagged packets leave them alone.
func TestSaveAndRestore(t *testing.T) {
	testenv.RequireCommand(t, "nft")
	testenv.RequireCommand(t, "conntrack")
	a, b := testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, a, "va", "192.0.2.1/24", b, "vb", "192.0.2.2/24")

	tbl := &Table{Mask: 0x00ff0000} // flag bit 0x01000000
	must(t, b.Do(tbl.Ensure))
	must(t, b.Do(tbl.Ensure)) // replacing is fine
	listing := b.Run(t, "nft", "list", "table", "inet", "sfunnel")
	for _, want := range []string{"hook prerouting priority mangle", "hook postrouting priority mangle", "ct mark set", "meta mark set"} {
		if !strings.Contains(listing, want) {
			t.Errorf("table lacks %q:\n%s", want, listing)
		}
	}

	// The test's own table: the mark the datapath would set (chain pre is
	// refilled per phase), a foreign ct mark bit, and counters seeing what
	// leaves.
	nft(t, b, `table ip probe {
	chain pre { type filter hook prerouting priority -190; }
	chain foreign { type filter hook prerouting priority -180; udp dport 5000 ct mark set ct mark | 0x1; }
	chain post { type filter hook postrouting priority 0;
		udp sport 5000 meta mark 0x00420000 counter
		udp sport 5000 ct mark 0x00420001 counter
	}
}`)

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
	ping := func(n int) {
		t.Helper()
		for i := 0; i < n; i++ {
			cl.Write([]byte("ping"))
			cl.SetReadDeadline(time.Now().Add(time.Second))
			if _, err := cl.Read(make([]byte, 100)); err != nil {
				t.Fatalf("reply %d: %v", i, err)
			}
		}
	}
	phase := func(mark string) {
		t.Helper()
		nft(t, b, "flush chain ip probe pre\nadd rule ip probe pre udp dport 5000 meta mark set "+mark)
	}

	phase("0x01420000") // ct mark set 0x420000
	ping(3)
	if got := connMark(t, b); got != 0x00420001 {
		t.Errorf("conntrack -L shows mark=%#x, want 0x420001 (the value and the foreign bit)", got)
	}
	probe := b.Run(t, "nft", "list", "chain", "ip", "probe", "post")
	counts := regexp.MustCompile(`counter packets (\d+)`).FindAllStringSubmatch(probe, -1)
	if len(counts) != 2 || counts[0][1] != "3" || counts[1][1] != "3" {
		t.Errorf("want 3 replies with meta mark 0x00420000 and ct mark 0x00420001:\n%s", probe)
	}

	phase("0x00000000") // a packet sfunnel did not mark
	ping(1)
	if got := connMark(t, b); got != 0x00420001 {
		t.Errorf("an unflagged packet changed the connection mark to %#x", got)
	}
	phase("0x01000000") // ct mark set 0
	ping(1)
	if got := connMark(t, b); got != 0x00000001 {
		t.Errorf("after ct mark set 0 conntrack -L shows mark=%#x, want 0x1 (only the foreign bit)", got)
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

// Masks that can't carry ct mark values are refused; the flag bit sits
// just above the mask, or below it when the mask reaches bit 31.
func TestLayout(t *testing.T) {
	for _, c := range []struct{ mask, flag uint32 }{
		{0, 0x01000000}, {0x00ff0000, 0x01000000}, {0xff, 0x100}, {0x0f0f, 0x1000},
		{0xff000000, 0x00800000}, {0x80000001, 0x40000000}, {0xfffffffe, 1},
	} {
		l, err := NewLayout(c.mask)
		if err != nil || l.Flag != c.flag || l.Flag&l.Mask != 0 {
			t.Errorf("NewLayout(%#x) = %+v, %v; want flag %#x", c.mask, l, err, c.flag)
		}
	}
	if _, err := NewLayout(0xffffffff); err == nil {
		t.Error("mask 0xffffffff accepted")
	}
	if err := CheckMask(0); err == nil {
		t.Error("CheckMask(0) accepted")
	}
}

// nft runs an nft script in ns.
func nft(t *testing.T, ns *testenv.NS, script string) {
	t.Helper()
	cmd := ns.Command("nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v\n%s", err, out)
	}
}

// connMark returns the mark of the one UDP connection to port 5000 as
// `conntrack -L` prints it.
func connMark(t *testing.T, ns *testenv.NS) uint32 {
	t.Helper()
	out := ns.Run(t, "conntrack", "-L", "-p", "udp", "--dport", "5000")
	m := regexp.MustCompile(`mark=(\d+)`).FindAllStringSubmatch(out, -1)
	if len(m) != 1 {
		t.Fatalf("want one connection in conntrack -L:\n%s", out)
	}
	v, err := strconv.ParseUint(m[0][1], 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(v)
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
