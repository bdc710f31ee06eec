package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sfunnel/sfunnel/internal/testenv"
	"github.com/sfunnel/sfunnel/tunnel/auth"
)

// The test binary doubles as the daemon: started with SFUNNEL_TUNNEL_ARGS
// set (inside a namespace, through ip netns exec) it runs Main instead of
// the tests.
func TestMain(m *testing.M) {
	if a := os.Getenv("SFUNNEL_TUNNEL_ARGS"); a != "" {
		var args []string
		if err := json.Unmarshal([]byte(a), &args); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		os.Exit(Main(args, os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proc is a tunnel daemon running in a namespace.
type proc struct {
	t      *testing.T
	ns     *testenv.NS
	cmd    *exec.Cmd
	log    *syncBuf
	status string // status socket path
	done   chan struct{}
	code   int
}

// startTunnel runs `sfunnel tunnel ARGS` inside ns and waits until its
// status socket answers.
func startTunnel(t *testing.T, ns *testenv.NS, args ...string) *proc {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "status.sock")
	args = append(args, "--status-socket", sock)
	js, _ := json.Marshal(args)
	p := &proc{t: t, ns: ns, log: &syncBuf{}, status: sock, done: make(chan struct{})}
	p.cmd = ns.Command(exe)
	p.cmd.Env = append(os.Environ(), "SFUNNEL_TUNNEL_ARGS="+string(js))
	p.cmd.Stdout, p.cmd.Stderr = p.log, p.log
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		p.cmd.Wait()
		p.code = p.cmd.ProcessState.ExitCode()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("daemon in %s (%s):\n%s", ns.Name, strings.Join(args, " "), p.log.String())
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("daemon exited with %d:\n%s", p.code, p.log.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not come up:\n%s", p.log.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop sends SIGTERM (ip netns exec passes it on by exec'ing) and waits.
func (p *proc) stop() int {
	select {
	case <-p.done:
		return p.code
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
		p.t.Errorf("daemon did not stop on SIGTERM")
	}
	return p.code
}

func (p *proc) getStatus() *Status {
	p.t.Helper()
	c, err := net.Dial("unix", p.status)
	if err != nil {
		p.t.Fatalf("status: %v", err)
	}
	defer c.Close()
	var st Status
	if err := json.NewDecoder(c).Decode(&st); err != nil {
		p.t.Fatalf("status: %v", err)
	}
	return &st
}

func writeKey(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "tunnel.key")
	if err := auth.WriteKeyFile(path); err != nil {
		t.Fatal(err)
	}
	return path
}

// twoHosts makes namespaces a and b joined by eth0 with 192.0.2.1/24 and
// 2001:db8:1::1/64 on a, .2 and ::2 on b.
func twoHosts(t *testing.T) (a, b *testenv.NS) {
	t.Helper()
	testenv.RequireRoot(t)
	_, err := os.Stat("/dev/net/tun")
	testenv.Require(t, err == nil, "needs /dev/net/tun")
	a, b = testenv.NewNS(t), testenv.NewNS(t)
	testenv.Veth(t, a, "eth0", "192.0.2.1/24", b, "eth0", "192.0.2.2/24")
	a.Run(t, "ip", "addr", "add", "2001:db8:1::1/64", "dev", "eth0", "nodad")
	b.Run(t, "ip", "addr", "add", "2001:db8:1::2/64", "dev", "eth0", "nodad")
	return a, b
}

// echoServer listens on port in ns, echoes every connection and sends the
// remote address of each accepted connection on the returned channel.
func echoServer(t *testing.T, ns *testenv.NS, network, addr string) <-chan net.Addr {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) { ln, err = net.Listen(network, addr); return }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	peers := make(chan net.Addr, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			select {
			case peers <- c.RemoteAddr():
			default:
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
	return peers
}

// transfer connects from ns to addr, sends size random bytes and checks
// that exactly the same bytes come back.
func transfer(t *testing.T, ns *testenv.NS, network, addr string, size int) {
	t.Helper()
	var c net.Conn
	err := ns.Do(func() (err error) {
		d := net.Dialer{Timeout: 15 * time.Second}
		c, err = d.DialContext(context.Background(), network, addr)
		return
	})
	if err != nil {
		t.Fatalf("connect through the tunnel to %s: %v", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	data := make([]byte, size)
	rand.Read(data)
	want := sha256.Sum256(data)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		c.(*net.TCPConn).CloseWrite()
		werr <- err
	}()
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		t.Fatalf("read back after %d bytes: %v", n, err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("write: %v", err)
	}
	if n != int64(size) {
		t.Fatalf("got %d bytes back, sent %d", n, size)
	}
	if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
		t.Fatalf("content differs after the round trip")
	}
}

// waitCounter waits until a status counter reaches at least min.
func (p *proc) waitCounter(name string, min uint64) {
	p.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		st := p.getStatus()
		if st.Counters[name] >= min {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("counter %s stayed at %d, want %d", name, st.Counters[name], min)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkAllocs runs traffic and checks that the daemons allocated (nearly)
// nothing per packet: status requests and timers allocate a little, the
// packet path must not.
func checkAllocs(t *testing.T, traffic func(), procs ...*proc) {
	t.Helper()
	before := make([]*Status, len(procs))
	for i, p := range procs {
		before[i] = p.getStatus()
	}
	traffic()
	for i, p := range procs {
		after := p.getStatus()
		pkts := after.Counters["tun_rx"] + after.Counters["tun_tx"] - before[i].Counters["tun_rx"] - before[i].Counters["tun_tx"]
		allocs := after.HeapAllocs - before[i].HeapAllocs
		t.Logf("%s: %d heap objects allocated while moving %d packets", p.ns.Name, allocs, pkts)
		if pkts < 1000 || allocs > pkts/50+300 {
			t.Errorf("%s: %d allocations for %d packets", p.ns.Name, allocs, pkts)
		}
	}
}
