package compiler_test

import (
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
)

// sync makes a live set map hold exactly the elements of spec, the way the
// bpf package applies `add element` / `delete element`.
func syncSet(t *testing.T, live *ebpf.Map, spec *ebpf.MapSpec) {
	t.Helper()
	// abi: the set's outer map gets a new elements map, in one update.
	elems, err := ebpf.NewMap(spec)
	if err != nil {
		t.Fatal(err)
	}
	defer elems.Close()
	if err := live.Put(uint32(0), elems); err != nil {
		t.Fatal(err)
	}
}

func toBytes(t *testing.T, k any) []byte {
	switch v := k.(type) {
	case []byte:
		return v
	case uint32:
		return []byte{byte(v), byte(v >> 8), byte(v >> 16), byte(v >> 24)}
	}
	t.Fatalf("key %T", k)
	return nil
}

// Set elements change live: the loaded program follows its maps.
func TestLiveSetUpdates(t *testing.T) {
	addrs := &grammar.Set{Name: "peers-v4", Type: grammar.SetIPv4Addr, Prefixes: []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24")}}
	svc := &grammar.Set{Name: "svc", Type: grammar.SetInetService, Ports: []grammar.PortRange{{Lo: 53, Hi: 53}}}
	sets := map[string]*grammar.Set{addrs.Name: addrs, svc.Name: svc}
	rules := []*grammar.Rule{{Family: grammar.FamilyIPv4, Saddr: &grammar.AddrMatch{Set: addrs.Name}, Proto: grammar.ProtoUDP, Dport: &grammar.PortMatch{Set: svc.Name},
		Actions: []*grammar.Action{act(grammar.ActDrop, 0)}}}
	l := compileLoad(t, rules, sets, compiler.Options{Hook: grammar.HookIngress})
	if got := l.prog.NamedSets; len(got) != 2 {
		t.Fatalf("named sets %v", got)
	}
	pkt := udpPkt(t, false, 1000, 4739, []byte("x")) // from 192.0.2.1
	if r := l.run(t, pkt, 0); r.ret != compiler.VerdictNext {
		t.Fatalf("before: verdict %d", r.ret)
	}
	addrs.Prefixes = append(addrs.Prefixes, netip.MustParsePrefix("192.0.2.0/28"))
	svc.Ports = append(svc.Ports, grammar.PortRange{Lo: 4700, Hi: 4800})
	for _, s := range []*grammar.Set{addrs, svc} {
		spec := compiler.SetMap(s)
		live := l.coll.Maps[compiler.SetMapPrefix+s.Name]
		if live == nil {
			t.Fatalf("no map for set %s", s.Name)
		}
		syncSet(t, live, spec)
	}
	if r := l.run(t, pkt, 0); r.ret != compiler.VerdictDrop {
		t.Fatalf("after add: verdict %d", r.ret)
	}
	addrs.Prefixes = addrs.Prefixes[:1]
	syncSet(t, l.coll.Maps[compiler.SetMapPrefix+addrs.Name], compiler.SetMap(addrs))
	if r := l.run(t, pkt, 0); r.ret != compiler.VerdictNext {
		t.Fatalf("after delete: verdict %d", r.ret)
	}
}
