package bpf

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// HookID names one TC hook of one interface.
type HookID struct {
	Ifname string
	Hook   grammar.Hook
}

func (h HookID) String() string { return h.Ifname + " " + h.Hook.String() }

// rel is the hook's path below a hooks or links directory. bpffs refuses
// names with dots, which interface names may have ("eth0.100"); interface
// names can't have colons, so dots become colons.
func (h HookID) rel() string {
	return filepath.Join(strings.ReplaceAll(h.Ifname, ".", ":"), h.Hook.String())
}

// dir is the hook's directory in a generation.
func (h HookID) dir() string { return filepath.Join("hooks", h.rel()) }

// Mode is how a program is attached.
type Mode string

const (
	ModeTCX    Mode = "tcx"    // a tcx link (kernel ≥ 6.6)
	ModeClsact Mode = "clsact" // a cls_bpf direct-action filter on a clsact qdisc
)

// The cls_bpf filter sfunnel owns on each clsact hook: replaced in place
// (same priority and handle), so a swap is atomic there too.
const (
	clsactPrio   = 1
	clsactHandle = 0x5f
)

// Interface describes a network interface the way the compiler needs it.
type Interface struct {
	Name    string
	Index   int
	L3      bool // no MAC header in front of IP (tun, wireguard, ...)
	Encap   string
	Missing bool // no such interface in this namespace
}

// LookupInterface finds an interface by name in the current namespace.
// A missing interface is not an error: Missing is set.
func LookupInterface(name string) (Interface, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) || errors.Is(err, unix.ENODEV) {
			return Interface{Name: name, Missing: true}, nil
		}
		return Interface{}, fmt.Errorf("look up interface %s: %w", name, err)
	}
	a := l.Attrs()
	// Ethernet and loopback skbs carry a 14-byte MAC header at TC; tun,
	// wireguard, ppp, ip tunnels start with the IP header.
	l3 := a.EncapType != "ether" && a.EncapType != "loopback"
	return Interface{Name: name, Index: a.Index, L3: l3, Encap: a.EncapType}, nil
}

func tcxAttach(h grammar.Hook) ebpf.AttachType {
	if h == grammar.HookEgress {
		return ebpf.AttachTCXEgress
	}
	return ebpf.AttachTCXIngress
}

func clsactParent(h grammar.Hook) uint32 {
	if h == grammar.HookEgress {
		return netlink.HANDLE_MIN_EGRESS
	}
	return netlink.HANDLE_MIN_INGRESS
}

// clsactProgID returns the program id of sfunnel's cls_bpf filter on a hook,
// 0 if there is none.
func clsactProgID(ifindex int, h grammar.Hook) (ebpf.ProgramID, error) {
	filters, err := netlink.FilterList(&netlink.Dummy{LinkAttrs: netlink.LinkAttrs{Index: ifindex}}, clsactParent(h))
	if err != nil {
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return 0, nil // no clsact qdisc
		}
		return 0, fmt.Errorf("list tc filters: %w", err)
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Priority == clsactPrio && bf.Handle == clsactHandle {
			return ebpf.ProgramID(bf.Id), nil
		}
	}
	return 0, nil
}

// attachTCX attaches prog with a new tcx link and pins the link.
func (s *Store) attachTCX(id HookID, ifindex int, prog *ebpf.Program) error {
	// Ingress first, egress last: unfunnel and rewrite back restore the
	// packet before other programs look at it; funnel and rewrite act on
	// the packet as the others leave it.
	opts := link.TCXOptions{Interface: ifindex, Program: prog, Attach: tcxAttach(id.Hook), Anchor: link.Tail()}
	if id.Hook == grammar.HookIngress {
		opts.Anchor = link.Head()
	}
	lk, err := link.AttachTCX(opts)
	if err != nil {
		return fmt.Errorf("attach tcx link to %s: %w", id, permission(err))
	}
	defer lk.Close()
	if err := pinReplace(lk, filepath.Join(s.linkDir(id), "link")); err != nil {
		lk.(interface{ Detach() error }).Detach()
		return err
	}
	return nil
}

// setClsact creates or atomically replaces sfunnel's cls_bpf filter.
func setClsact(id HookID, ifindex int, prog *ebpf.Program) error {
	q := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{LinkIndex: ifindex, Handle: netlink.MakeHandle(0xffff, 0), Parent: netlink.HANDLE_CLSACT},
		QdiscType:  "clsact",
	}
	if err := netlink.QdiscAdd(q); err != nil && !errors.Is(err, unix.EEXIST) {
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
			err = fmt.Errorf("%w: %w", ebpf.ErrNotSupported, err)
		}
		return fmt.Errorf("add clsact qdisc to %s: %w", id.Ifname, permission(err))
	}
	f := &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex, Parent: clsactParent(id.Hook),
			Handle: clsactHandle, Priority: clsactPrio, Protocol: unix.ETH_P_ALL,
		},
		Fd: prog.FD(), Name: "sfunnel", DirectAction: true,
	}
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("attach cls_bpf filter to %s: %w", id, permission(err))
	}
	return nil
}

func delClsact(id HookID, ifindex int) error {
	f := &netlink.BpfFilter{FilterAttrs: netlink.FilterAttrs{
		LinkIndex: ifindex, Parent: clsactParent(id.Hook),
		Handle: clsactHandle, Priority: clsactPrio, Protocol: unix.ETH_P_ALL,
	}}
	if err := netlink.FilterDel(f); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove cls_bpf filter from %s: %w", id, err)
	}
	return nil
}
