package datapath

// Segmentation devices (see compiler/segment.go for why): an egress hook
// whose rules funnel or rewrite TCP gets a veth pair of its own,
//
//	sfseg<ifindex>   transmit end: tso, gso, tx checksum off, MTU 65535;
//	                 the hook's program redirects GSO and CHECKSUM_PARTIAL
//	                 packets it must rewrite here, and the kernel segments
//	                 and checksums them in software at this transmit
//	sfseg<ifindex>r  return end: GRO off; its tcx ingress program sends
//	                 every segment back out of the real device
//
// The pair has no addresses and no IPv6 link-local address, carries only
// what the hook redirects, and is removed when no rule needs it any more
// (`flush ruleset` removes it). It is created in the same namespace as the
// device, by the transaction that first needs it.

import (
	"errors"
	"fmt"
	"github.com/cilium/ebpf"
	"strings"
	"unsafe"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/compiler"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// SegdevPrefix starts the names of segmentation devices.
const SegdevPrefix = "sfseg"

// segdevNames names the pair of the device with index ifindex.
func segdevNames(ifindex int) (tx, rx string) {
	tx = fmt.Sprintf("%s%d", SegdevPrefix, ifindex)
	return tx, tx + "r"
}

// Segdev is a segmentation device pair serving one real device.
type Segdev struct {
	Dev              string // the real device
	Tx, Rx           string
	TxIndex, RxIndex int
	created          bool // made by this transaction (undo removes it)
}

// wantsSegdev reports whether a hook's rules need a segmentation device on
// this interface: egress, an Ethernet device, a rule that funnels or
// rewrites.
func wantsSegdev(ifc bpf.Interface, h grammar.Hook, rules []*grammar.Rule) bool {
	return h == grammar.HookEgress && !ifc.L3 && ifc.Encap != "loopback" && compiler.NeedsSegmentation(rules)
}

// findSegdev returns the pair of ifc if it exists (nil otherwise).
func findSegdev(ifc bpf.Interface) (*Segdev, error) {
	tx, rx := segdevNames(ifc.Index)
	lt, err := netlink.LinkByName(tx)
	if err != nil {
		if isNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("look up segmentation device %s: %w", tx, err)
	}
	lr, err := netlink.LinkByName(rx)
	if err != nil {
		if isNotFound(err) {
			return nil, nil
		}
		return nil, fmt.Errorf("look up segmentation device %s: %w", rx, err)
	}
	return &Segdev{Dev: ifc.Name, Tx: tx, Rx: rx, TxIndex: lt.Attrs().Index, RxIndex: lr.Attrs().Index}, nil
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf) || errors.Is(err, unix.ENODEV)
}

// ensureSegdev finds or creates the pair of ifc and (re)applies its
// settings.
func ensureSegdev(ifc bpf.Interface) (*Segdev, error) {
	sd, err := findSegdev(ifc)
	if err != nil {
		return nil, err
	}
	if sd == nil {
		tx, rx := segdevNames(ifc.Index)
		// A half pair (one end deleted by hand) is in the way.
		if l, err := netlink.LinkByName(tx); err == nil {
			netlink.LinkDel(l)
		}
		if l, err := netlink.LinkByName(rx); err == nil {
			netlink.LinkDel(l)
		}
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: tx, MTU: 65535}, PeerName: rx}
		if err := netlink.LinkAdd(v); err != nil {
			return nil, fmt.Errorf("create segmentation device %s for %s: %w", tx, ifc.Name, err)
		}
		if sd, err = findSegdev(ifc); err != nil || sd == nil {
			return nil, errors.Join(fmt.Errorf("segmentation device %s vanished", tx), err)
		}
		sd.created = true
	}
	if err := sd.configure(); err != nil {
		if sd.created {
			sd.remove()
		}
		return nil, err
	}
	return sd, nil
}

// configure applies the pair's settings: no addresses, segmentation and
// checksumming in software on the transmit end, no GRO on the return end,
// both up.
func (sd *Segdev) configure() error {
	for _, name := range []string{sd.Tx, sd.Rx} {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("segmentation device %s: %w", name, err)
		}
		// IN6_ADDR_GEN_MODE_NONE: no link-local address, so the host
		// sends no neighbour discovery into the pair.
		if err := netlink.LinkSetIP6AddrGenMode(l, 1); err != nil && !errors.Is(err, unix.EAFNOSUPPORT) {
			return fmt.Errorf("segmentation device %s: no IPv6 addresses: %w", name, err)
		}
		if l.Attrs().MTU != 65535 {
			if err := netlink.LinkSetMTU(l, 65535); err != nil {
				return fmt.Errorf("segmentation device %s: MTU: %w", name, err)
			}
		}
	}
	if err := featuresOff(sd.Tx, txOffload); err != nil {
		return err
	}
	if err := featuresOff(sd.Rx, rxMerge); err != nil {
		return err
	}
	for _, name := range []string{sd.Rx, sd.Tx} {
		l, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("segmentation device %s: %w", name, err)
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return fmt.Errorf("segmentation device %s: up: %w", name, err)
		}
	}
	return nil
}

// checkSegdev is compile's seg for Check, which creates nothing: an
// existing device's index, or a stand-in (the verifier accepts any).
func checkSegdev(ifc bpf.Interface) (tx, rx int, err error) {
	sd, err := findSegdev(ifc)
	if err != nil || sd == nil {
		return 1, 1, err
	}
	return sd.TxIndex, sd.RxIndex, nil
}

// segdevs makes the segmentation devices a transaction needs.
type segdevs struct {
	verbose bool
	used    []*Segdev
}

// ensure is compile's seg for Commit.
func (s *segdevs) ensure(ifc bpf.Interface) (tx, rx int, err error) {
	for _, sd := range s.used {
		if sd.Dev == ifc.Name {
			return sd.TxIndex, sd.RxIndex, nil // (asked again: an incremental change first, then compile)
		}
	}
	sd, err := ensureSegdev(ifc)
	if err != nil {
		return 0, 0, err
	}
	s.used = append(s.used, sd)
	return sd.TxIndex, sd.RxIndex, nil
}

// auxHook is a hook sfunnel attaches for itself (not a user's hook): a
// segmentation device's return program.
type auxHook struct {
	id   bpf.HookID
	coll *ebpf.Collection
}

// updates loads the return programs of the devices in use.
func (s *segdevs) updates() ([]auxHook, error) {
	var us []auxHook
	for _, sd := range s.used {
		l, err := netlink.LinkByName(sd.Dev)
		if err != nil {
			for _, u := range us {
				u.coll.Close()
			}
			return nil, fmt.Errorf("segmentation device for %s: %w", sd.Dev, err)
		}
		u, err := sd.returnUpdate(l.Attrs().Index, s.verbose)
		if err != nil {
			for _, u := range us {
				u.coll.Close()
			}
			return nil, err
		}
		us = append(us, u)
	}
	return us, nil
}

// undo removes the devices this transaction created.
func (s *segdevs) undo() {
	for _, sd := range s.used {
		if sd.created {
			sd.remove()
		}
	}
}

// keep names the devices in use.
func (s *segdevs) keep() map[string]bool {
	m := map[string]bool{}
	for _, sd := range s.used {
		m[sd.Tx] = true
	}
	return m
}

// remove deletes the pair (deleting one end deletes both).
func (sd *Segdev) remove() error {
	l, err := netlink.LinkByName(sd.Tx)
	if err != nil {
		if isNotFound(err) {
			return nil
		}
		return err
	}
	if err := netlink.LinkDel(l); err != nil {
		return fmt.Errorf("remove segmentation device %s: %w", sd.Tx, err)
	}
	return nil
}

// returnUpdate loads the return program of sd for the return end's
// ingress hook.
func (sd *Segdev) returnUpdate(ifindex int, verbose bool) (auxHook, error) {
	id := bpf.HookID{Ifname: sd.Rx, Hook: grammar.HookIngress}
	coll, err := bpf.LoadCollection(compiler.SegReturn(ifindex), bpf.LoadOptions{What: id.String(), Verbose: verbose})
	if err != nil {
		return auxHook{}, err
	}
	return auxHook{id: id, coll: coll}, nil
}

// isSegdevHook tells the return ends' hooks from the user's.
func isSegdevHook(id bpf.HookID) bool {
	return strings.HasPrefix(id.Ifname, SegdevPrefix) && strings.HasSuffix(id.Ifname, "r")
}

// Segdevs lists the segmentation devices present in the namespace, by
// the real device's name ("" when that device is gone).
func Segdevs() ([]Segdev, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	byIndex := map[int]string{}
	for _, l := range links {
		byIndex[l.Attrs().Index] = l.Attrs().Name
	}
	var out []Segdev
	for _, l := range links {
		name := l.Attrs().Name
		var idx int
		if _, err := fmt.Sscanf(name, SegdevPrefix+"%d", &idx); err != nil || name != fmt.Sprintf("%s%d", SegdevPrefix, idx) {
			continue
		}
		if _, ok := l.(*netlink.Veth); !ok {
			continue
		}
		sd := Segdev{Dev: byIndex[idx], Tx: name, Rx: name + "r", TxIndex: l.Attrs().Index}
		if r, err := netlink.LinkByName(sd.Rx); err == nil {
			sd.RxIndex = r.Attrs().Index
		}
		out = append(out, sd)
	}
	return out, nil
}

// removeSegdevsExcept deletes every segmentation device not named in keep.
func removeSegdevsExcept(keep map[string]bool) error {
	all, err := Segdevs()
	if err != nil {
		return err
	}
	var errs []error
	for i := range all {
		if !keep[all[i].Tx] {
			errs = append(errs, all[i].remove())
		}
	}
	return errors.Join(errs...)
}

// ethtool ioctl commands (linux/ethtool.h).
const (
	ethtoolGSSETINFO = 0x37
	ethtoolGSTRINGS  = 0x1b
	ethtoolSFEATURES = 0x3b
	ethSSFeatures    = 4
	ethGStringLen    = 32
)

// ifreqData is struct ifreq with ifr_data.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [16]byte
}

func ethtool(fd int, ifname string, data unsafe.Pointer) error {
	ifr := ifreqData{data: data}
	copy(ifr.name[:unix.IFNAMSIZ-1], ifname)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr))); errno != 0 {
		return errno
	}
	return nil
}

// featuresOff turns off every feature of ifname whose name off accepts, as
// `ethtool -K` does: by name, since feature bit numbers change between
// kernels (new segmentation types appear).
func featuresOff(ifname string, off func(name string) bool) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("ethtool socket: %w", err)
	}
	defer unix.Close(fd)
	fail := func(what string, err error) error {
		return fmt.Errorf("segmentation device %s: ethtool %s: %w", ifname, what, err)
	}
	info := struct {
		cmd, reserved uint32
		mask          uint64
		count         uint32
	}{cmd: ethtoolGSSETINFO, mask: 1 << ethSSFeatures}
	if err := ethtool(fd, ifname, unsafe.Pointer(&info)); err != nil {
		return fail("feature count", err)
	}
	n := int(info.count)
	if info.mask == 0 || n == 0 || n > 1024 {
		return fail("feature count", fmt.Errorf("%d features", n))
	}
	buf := make([]byte, 12+n*ethGStringLen)
	*(*[3]uint32)(unsafe.Pointer(&buf[0])) = [3]uint32{ethtoolGSTRINGS, ethSSFeatures, uint32(n)}
	if err := ethtool(fd, ifname, unsafe.Pointer(&buf[0])); err != nil {
		return fail("feature names", err)
	}
	blocks := (n + 31) / 32
	sf := make([]uint32, 2+2*blocks)
	sf[0], sf[1] = ethtoolSFEATURES, uint32(blocks)
	for i := 0; i < n; i++ {
		name := string(buf[12+i*ethGStringLen : 12+(i+1)*ethGStringLen])
		if j := strings.IndexByte(name, 0); j >= 0 {
			name = name[:j]
		}
		if off(name) {
			sf[2+2*(i/32)] |= 1 << (i % 32) // valid; requested stays 0
		}
	}
	if err := ethtool(fd, ifname, unsafe.Pointer(&sf[0])); err != nil {
		return fail("set features", err)
	}
	return nil
}

// txOffload names the features that let a device take packets unsegmented
// or with checksums to finish.
func txOffload(name string) bool {
	return strings.HasPrefix(name, "tx-checksum") || strings.HasPrefix(name, "tx-gso") || strings.Contains(name, "segmentation")
}

// rxMerge names the features that merge received packets.
func rxMerge(name string) bool {
	return strings.HasPrefix(name, "rx-gro") || name == "rx-lro" || name == "rx-udp-gro-forwarding"
}

var _ ruleset.Noter = (*Backend)(nil)

// Notes names the segmentation devices serving the live hooks, for the
// listing (as comment lines).
func (b *Backend) Notes() ([]string, error) {
	sds, err := Segdevs()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, sd := range sds {
		if sd.Dev == "" {
			continue
		}
		out = append(out, fmt.Sprintf("segmentation device %s (return %s) serves %s egress: TCP segments and GSO packets its funnel/rewrite rules match are segmented and checksummed there (tso, gso, tx off) and rewritten one by one", sd.Tx, sd.Rx, sd.Dev))
	}
	return out, nil
}
