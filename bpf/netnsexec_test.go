package bpf

import (
	"fmt"
	"os"
	"testing"

	"github.com/sfunnel/sfunnel/grammar"
)

// The test binary run again under `ip netns exec` attaches a program, as
// `ip netns exec NS sfunnel -f FILE` would.
const childEnv = "SFUNNEL_BPF_TEST_CHILD"

func TestMain(m *testing.M) {
	if root := os.Getenv(childEnv); root != "" {
		if err := childAttach(root); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func childAttach(root string) error {
	s, err := Open(Options{Root: root})
	if err != nil {
		return err
	}
	coll, err := LoadCollection(countingSpec(tcxNext, 7), LoadOptions{What: "vb ingress"})
	if err != nil {
		return err
	}
	defer coll.Close()
	id := HookID{Ifname: "vb", Hook: grammar.HookIngress}
	g, err := s.NewGen()
	if err != nil {
		return err
	}
	if err := g.PinHook(id, coll.Programs[ProgramName], coll.Maps); err != nil {
		return err
	}
	if err := s.Run(id, coll.Programs[ProgramName]); err != nil {
		return err
	}
	return s.Publish(g)
}

// Under `ip netns exec` (private mount namespace, fresh /sys) the state goes
// to the host's bpffs, so the program stays attached after the command and
// a later command with in-process setns sees it.
func TestIPNetnsExecKeepsState(t *testing.T) {
	root := testRoot(t)
	p := newPair(t)
	cmd := p.b.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), childEnv+"="+root)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("child under ip netns exec: %v\n%s", err, out)
	}
	if got := p.udpDelivered(t, 4); got != 4 {
		t.Fatalf("%d of 4 datagrams arrived", got)
	}
	must(t, p.b.Do(func() error {
		s, err := Open(Options{Root: root})
		if err != nil {
			return err
		}
		id := HookID{Ifname: "vb", Hook: grammar.HookIngress}
		if a, err := s.Attached(id); err != nil || a == nil {
			return fmt.Errorf("program attached under ip netns exec is not attached afterwards: %v", err)
		}
		g, err := s.Current()
		if err != nil || g == nil {
			return fmt.Errorf("no generation: %v", err)
		}
		l, err := g.Hook(id)
		if err != nil || l == nil {
			return fmt.Errorf("generation has no %s: %v", id, err)
		}
		defer l.Close()
		var mark []uint64
		if err := l.Maps["stats"].Lookup(uint32(0), &mark); err != nil || mark[0] != 7 {
			return fmt.Errorf("live program is not the child's: %v %v", mark, err)
		}
		c, err := ReadCounters(l.Counters())
		if err != nil || c[0].Packets < 4 {
			return fmt.Errorf("counters %+v %v, want ≥ 4 packets", c, err)
		}
		return nil
	}))
}
