// Package testenv gives tests what they need from the machine: root, kernel
// features, commands, and throw-away network namespaces joined by veth pairs.
//
// A test that cannot run here skips, unless SFUNNEL_REQUIRE_KERNEL=1 (set by
// CI), in which case it fails: a skipped test proves nothing.
package testenv

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"

	"github.com/vishvananda/netns"
)

// Strict reports whether skips must become failures.
func Strict() bool { return os.Getenv("SFUNNEL_REQUIRE_KERNEL") == "1" }

// Require skips (or, when Strict, fails) the test unless ok.
func Require(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	msg := fmt.Sprintf(format, args...)
	if Strict() {
		t.Fatalf("SFUNNEL_REQUIRE_KERNEL=1 and this test cannot run: %s", msg)
	}
	t.Skip(msg)
}

// RequireRoot needs uid 0.
func RequireRoot(t testing.TB) {
	t.Helper()
	Require(t, os.Geteuid() == 0, "needs root")
}

// RequireCommand needs an executable on PATH.
func RequireCommand(t testing.TB, name string) {
	t.Helper()
	_, err := exec.LookPath(name)
	Require(t, err == nil, "needs %s on PATH (make test installs it)", name)
}

// Run runs a command and fails the test if it fails.
func Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// NS is a network namespace created for one test and deleted after it.
type NS struct {
	Name string
}

// NewNS creates a named network namespace (visible to `ip netns`), brings
// its loopback up and deletes it when the test ends.
func NewNS(t testing.TB) *NS {
	t.Helper()
	RequireRoot(t)
	RequireCommand(t, "ip")
	b := make([]byte, 4)
	rand.Read(b)
	ns := &NS{Name: "sft-" + hex.EncodeToString(b)}
	Run(t, "ip", "netns", "add", ns.Name)
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns.Name).Run() })
	ns.Run(t, "ip", "link", "set", "lo", "up")
	return ns
}

// Run runs a command inside the namespace (ip netns exec) and fails the
// test if it fails. It returns the combined output.
func (ns *NS) Run(t testing.TB, name string, args ...string) string {
	t.Helper()
	return Run(t, "ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// Command returns an exec.Cmd that runs inside the namespace.
func (ns *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", ns.Name, name}, args...)...)
}

// Do runs f on an OS thread switched into the namespace, so sockets, netlink
// handles and BPF attachments made by f live there.
func (ns *NS) Do(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		// The thread goes back to the pool only once it is back in the
		// original namespace; otherwise it stays locked and dies with the
		// goroutine. (Not only for the pool's sake: Go never ends the
		// main thread, it parks it, and a main thread parked in the
		// namespace kept it alive until the test binary exited.)
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		h, err := netns.GetFromName(ns.Name)
		if err != nil {
			errc <- err
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			errc <- err
			return
		}
		err = f()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// Veth joins two namespaces with a veth pair named aIf (in a) and bIf (in b),
// assigns the given addresses (CIDR notation, may be empty) and brings both
// ends up.
func Veth(t testing.TB, a *NS, aIf, aAddr string, b *NS, bIf, bAddr string) {
	t.Helper()
	tmp := "sfv" + aIf
	if len(tmp) > 15 {
		tmp = tmp[:15]
	}
	Run(t, "ip", "link", "add", tmp, "netns", a.Name, "type", "veth", "peer", "name", bIf, "netns", b.Name)
	a.Run(t, "ip", "link", "set", tmp, "name", aIf)
	for _, e := range []struct {
		ns       *NS
		ifc, adr string
	}{{a, aIf, aAddr}, {b, bIf, bAddr}} {
		if e.adr != "" {
			args := []string{"addr", "add", e.adr, "dev", e.ifc}
			if strings.Contains(e.adr, ":") {
				args = append(args, "nodad")
			}
			e.ns.Run(t, "ip", args...)
		}
		e.ns.Run(t, "ip", "link", "set", e.ifc, "up")
	}
}
