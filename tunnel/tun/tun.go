// Package tun creates the tunnel's TUN device through netlink and moves
// packets in and out of it, several per wake-up.
package tun

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Options describe the device to create.
type Options struct {
	Name      string
	MTU       int            // 0 keeps the kernel default (1500)
	Addresses []netip.Prefix // assigned after creation
	// Persist leaves the device in place when the daemon exits (and reuses
	// an existing persistent device of that name).
	Persist bool
	// Offload asks for virtio-net headers with TSO/checksum offload, so
	// reads may return segmentation-offloaded super-packets.
	Offload bool
}

// ErrPermission means the caller lacks CAP_NET_ADMIN or /dev/net/tun.
var ErrPermission = errors.New("creating a TUN device needs CAP_NET_ADMIN and /dev/net/tun")

// Device is an open TUN device in IFF_TUN|IFF_NO_PI mode: every read or
// write is one IP packet.
type Device struct {
	Name    string
	Index   int
	file    *os.File
	rc      syscall.RawConn
	persist bool
	vnet    bool // packets carry a virtio-net header (offloads on)
	tso     bool // the kernel accepted TSO/checksum offload

	// state of the batch read, kept here so the callback handed to the
	// runtime poller is built once and reading allocates nothing
	readFn func(fd uintptr) bool
	rbufs  [][]byte
	roff   int
	rsizes []int
	rn     int
	rerr   error
}

// Create makes the device, sets its MTU and addresses and brings it up.
func Create(o Options) (*Device, error) {
	if o.Name == "" || len(o.Name) > 15 {
		return nil, fmt.Errorf("invalid interface name %q", o.Name)
	}
	link := &netlink.Tuntap{
		LinkAttrs:  netlink.LinkAttrs{Name: o.Name},
		Mode:       netlink.TUNTAP_MODE_TUN,
		Flags:      netlink.TUNTAP_MULTI_QUEUE_DEFAULTS | flagsFor(o),
		Queues:     1,
		NonPersist: !o.Persist,
	}
	if err := netlink.LinkAdd(link); err != nil {
		if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) || errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("create TUN %s: %w: %v", o.Name, ErrPermission, err)
		}
		return nil, fmt.Errorf("create TUN %s: %w", o.Name, err)
	}
	d := &Device{Name: link.Name, file: link.Fds[0], persist: o.Persist, vnet: o.Offload}
	for _, f := range link.Fds[1:] {
		f.Close()
	}
	d.readFn = d.doRead
	var err error
	if d.rc, err = d.file.SyscallConn(); err != nil {
		d.Close()
		return nil, err
	}
	if d.vnet {
		// Without TSO (an old kernel) the virtio-net headers still work:
		// packets just come one by one.
		d.tso = d.enableOffload() == nil
	}
	if err := d.configure(o); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

func flagsFor(o Options) netlink.TuntapFlag {
	if o.Offload {
		return netlink.TUNTAP_VNET_HDR
	}
	return 0
}

// Offload reports whether the device uses virtio-net headers.
func (d *Device) Offload() bool { return d.vnet }

// TSO reports whether the kernel hands over and takes TCP super-packets.
func (d *Device) TSO() bool { return d.tso }

func (d *Device) configure(o Options) error {
	l, err := netlink.LinkByName(d.Name)
	if err != nil {
		return fmt.Errorf("find TUN %s: %w", d.Name, err)
	}
	d.Index = l.Attrs().Index
	if o.MTU > 0 {
		if err := netlink.LinkSetMTU(l, o.MTU); err != nil {
			return fmt.Errorf("set MTU of %s: %w", d.Name, err)
		}
	}
	for _, p := range o.Addresses {
		a := &netlink.Addr{IPNet: prefixToIPNet(p)}
		if p.Addr().Is6() {
			a.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrReplace(l, a); err != nil {
			return fmt.Errorf("add address %s to %s: %w", p, d.Name, err)
		}
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("bring %s up: %w", d.Name, err)
	}
	return nil
}

// Close releases the device; unless persistent the kernel removes it.
func (d *Device) Close() error {
	if d.persist {
		return d.file.Close()
	}
	err := d.file.Close()
	// The kernel deletes a non-persistent TUN when its last queue closes;
	// delete explicitly too in case a stale persistent one was reused.
	if l, lerr := netlink.LinkByName(d.Name); lerr == nil && l.Attrs().Index == d.Index {
		if tt, ok := l.(*netlink.Tuntap); ok && !tt.NonPersist {
			netlink.LinkDel(l)
		}
	}
	return err
}

// ReadBatch waits for at least one packet and reads up to len(bufs)
// packets without blocking again. Packet i lands at bufs[i][off:] and its
// size is stored in sizes[i].
func (d *Device) ReadBatch(bufs [][]byte, off int, sizes []int) (int, error) {
	d.rbufs, d.roff, d.rsizes, d.rn, d.rerr = bufs, off, sizes, 0, nil
	if err := d.rc.Read(d.readFn); err != nil {
		return 0, err
	}
	return d.rn, d.rerr
}

func (d *Device) doRead(fd uintptr) bool {
	for d.rn < len(d.rbufs) {
		m, err := unix.Read(int(fd), d.rbufs[d.rn][d.roff:])
		if err == unix.EAGAIN {
			return d.rn > 0
		}
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			d.rerr = err
			return true
		}
		d.rsizes[d.rn] = m
		d.rn++
	}
	return true
}

// Write sends one IP packet into the kernel.
func (d *Device) Write(pkt []byte) error {
	_, err := d.file.Write(pkt)
	return err
}

// FirstAddrs returns the device's first IPv4 and first IPv6 global
// addresses (invalid when it has none).
func FirstAddrs(index int) (v4, v6 netip.Addr, err error) {
	l, err := netlink.LinkByIndex(index)
	if err != nil {
		return v4, v6, err
	}
	addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return v4, v6, err
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		switch {
		case ip.Is4() && !v4.IsValid():
			v4 = ip
		case ip.Is6() && !ip.IsLinkLocalUnicast() && !v6.IsValid():
			v6 = ip
		}
	}
	return v4, v6, nil
}

func prefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
