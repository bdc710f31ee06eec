package tunnel

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/auth"
	"github.com/sfunnel/sfunnel/tunnel/seal"
	"github.com/sfunnel/sfunnel/tunnel/store"
	"github.com/sfunnel/sfunnel/tunnel/tun"
)

// daemon is one running `sfunnel tunnel`: the TUN device, the engine
// moving packets for the chosen --carry, and the housekeeping around them.
type daemon struct {
	cfg     *Config
	log     *log.Logger
	stats   Stats
	dev     *tun.Device
	store   *store.Store
	key     []byte
	started time.Time
	addrs   atomic.Pointer[[2]netip.Addr] // the TUN's first IPv4 and IPv6 addresses

	ctx     context.Context
	cancel  context.CancelFunc
	errc    chan error
	wg      sync.WaitGroup
	closers []io.Closer
	streams func() []string // set by IP over TCP, for the status

	keepalive *oneSender // UDP transports: sends keepalives
	dial      *dialer    // client roles over UDP: authenticates to servers
}

// exitError carries the exit code with the message.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func fatal(code int, err error) error { return &exitError{code, err} }

func run(cfg *Config, stderr io.Writer) error {
	d := &daemon{cfg: cfg, log: log.New(stderr, "sfunnel tunnel: ", 0), started: time.Now(), errc: make(chan error, 4)}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	defer d.cancel()
	// Catch signals from the start: a SIGTERM during setup is handled
	// (cleanly) once setup is done.
	sigc := make(chan os.Signal, 4)
	signal.Notify(sigc, syscall.SIGINT, syscall.SIGTERM, syscall.SIGUSR1)
	defer signal.Stop(sigc)
	if cfg.KeyFile != "" {
		k, err := auth.ReadKeyFile(cfg.KeyFile)
		if err != nil {
			// A configuration error: restarting will not help
			// (sfunnel-tunnel@.service has RestartPreventExitStatus=2).
			return fatal(ExitUsage, err)
		}
		d.key = k
	}
	var pools []netip.Prefix
	if cfg.Carry == "tcp" && cfg.Mode == "server" {
		pools = poolsFrom(cfg.Addresses)
	}
	ttl := cfg.Expiry
	if cfg.Mode == "client" {
		// The client forgets a little earlier than the server so that it
		// re-authenticates before the server has dropped it.
		ttl = ttl * 9 / 10
	}
	d.store = store.New(store.Options{Pools: pools, MaxPeers: cfg.MaxPeers, TTL: ttl})

	dev, err := tun.Create(tun.Options{Name: cfg.Interface, MTU: cfg.MTU, Addresses: cfg.Addresses, Persist: cfg.Persist, Offload: cfg.Offload})
	if err != nil {
		if errors.Is(err, tun.ErrPermission) {
			return fatal(3, err)
		}
		return fatal(1, err)
	}
	d.dev = dev
	defer d.closeAll()
	if err := d.refreshAddrs(); err != nil {
		return fatal(1, err)
	}

	switch cfg.Carry {
	case "tcp":
		err = d.startTCPOverUDP()
	default:
		err = d.startIP()
	}
	if err != nil {
		if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) {
			return fatal(3, err)
		}
		return fatal(1, err)
	}
	if err := d.startStatus(); err != nil {
		d.log.Printf("status socket disabled: %v", err)
	}
	if cfg.Keepalive > 0 {
		d.goLoop("keepalive", d.keepaliveLoop)
	}
	d.goLoop("expiry", d.expireLoop)
	d.goLoop("addresses", d.addrLoop)
	sealed := "unsealed (no --key)"
	if d.key != nil {
		sealed = "sealed with " + cfg.Cipher.Resolve().String()
		if cfg.Cipher == seal.Auto {
			sealed += " (auto: as a server, each peer's choice)"
		}
	}
	d.log.Printf("%s up: carry %s, transport %s, mode %s, listen port %d, %s", dev.Name, cfg.Carry, cfg.Transport, cfg.Mode, cfg.ListenPort, sealed)

	for {
		select {
		case s := <-sigc:
			if s == syscall.SIGUSR1 {
				writeStatusText(stderr, d.status())
				continue
			}
			d.log.Printf("%v: shutting down", s)
			return nil
		case err := <-d.errc:
			return fatal(1, err)
		}
	}
}

// goLoop runs f until the daemon stops; an error from f stops the daemon.
func (d *daemon) goLoop(name string, f func() error) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		if err := f(); err != nil && d.ctx.Err() == nil {
			select {
			case d.errc <- fmt.Errorf("%s: %w", name, err):
			default:
			}
		}
	}()
}

func (d *daemon) closeAll() {
	d.cancel()
	for i := len(d.closers) - 1; i >= 0; i-- {
		d.closers[i].Close()
	}
	d.dev.Close()
	done := make(chan struct{})
	go func() { d.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		d.log.Printf("some loops did not stop in time")
	}
}

func (d *daemon) onClose(c io.Closer) { d.closers = append(d.closers, c) }

func poolsFrom(addrs []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	have4, have6 := false, false
	for _, p := range addrs {
		if p.Addr().Is4() && !have4 {
			have4 = true
			out = append(out, p)
		}
		if p.Addr().Is6() && !have6 {
			have6 = true
			out = append(out, p)
		}
	}
	return out
}

func (d *daemon) refreshAddrs() error {
	v4, v6, err := tun.FirstAddrs(d.dev.Index)
	if err != nil {
		return fmt.Errorf("read addresses of %s: %w", d.dev.Name, err)
	}
	a := [2]netip.Addr{v4, v6}
	d.addrs.Store(&a)
	return nil
}

// tunAddr is the destination for packets written into the TUN.
func (d *daemon) tunAddr(v4 bool) netip.Addr {
	a := d.addrs.Load()
	if v4 {
		return a[0]
	}
	return a[1]
}

func (d *daemon) addrLoop() error {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return nil
		case <-t.C:
			if err := d.refreshAddrs(); err != nil {
				d.log.Print(err)
			}
		}
	}
}

func (d *daemon) expireLoop() error {
	every := d.store.TTL() / 10
	every = min(max(every, 50*time.Millisecond), time.Second)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return nil
		case now := <-t.C:
			for _, e := range d.store.Expire(now) {
				d.stats.Expired.Add(1)
				if e.Addr.IsValid() {
					d.log.Printf("peer %s (%s) expired", e.Peer, e.Addr)
				} else {
					d.log.Printf("peer %s expired", e.Peer)
				}
			}
		}
	}
}

func (d *daemon) status() *Status {
	st := &Status{Interface: d.dev.Name, Carry: d.cfg.Carry, Transport: d.cfg.Transport, Mode: d.cfg.Mode,
		ListenPort: d.cfg.ListenPort, Started: d.started, Expiry: d.store.TTL().String(),
		Counters: d.stats.counters(), Drops: d.stats.drops(), Peers: d.store.Snapshot(), HeapAllocs: heapAllocs()}
	if d.cfg.Remote.IsValid() {
		st.Remote = d.cfg.Remote.String()
	}
	if d.key != nil {
		st.Cipher = d.cfg.Cipher.Resolve().String()
		if d.cfg.Cipher == seal.Auto {
			st.Cipher = "auto (" + st.Cipher + ")"
		}
	}
	if d.cfg.Keepalive > 0 {
		st.Keepalive = d.cfg.Keepalive.String()
	}
	if d.streams != nil {
		st.Streams = d.streams()
	}
	switch {
	case d.dev.TSO():
		st.Offload = "tun-tso udp-gso-gro"
	case d.dev.Offload():
		st.Offload = "vnet-headers (no TSO from the kernel) udp-gso-gro"
	default:
		st.Offload = "off"
	}
	return st
}

// startStatus serves the status as JSON on a unix socket: one connection,
// one document.
func (d *daemon) startStatus() error {
	path := d.cfg.StatusSocket
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	// Never take over a socket another daemon still answers on.
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return fmt.Errorf("another daemon answers on %s (use --status-socket)", path)
	}
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	os.Chmod(path, 0o600)
	var mine syscall.Stat_t
	syscall.Stat(path, &mine)
	d.onClose(closerFunc(func() error {
		ln.Close()
		// Remove the file only if it is still ours.
		var now syscall.Stat_t
		if syscall.Stat(path, &now) == nil && now.Ino == mine.Ino && now.Dev == mine.Dev {
			os.Remove(path)
			if strings.HasPrefix(filepath.Base(filepath.Dir(path)), "netns-") {
				os.Remove(filepath.Dir(path)) // only if empty
			}
		}
		return nil
	}))
	d.goLoop("status", func() error {
		for {
			c, err := ln.Accept()
			if err != nil {
				return nil
			}
			c.SetDeadline(time.Now().Add(2 * time.Second))
			encodeStatus(c, d.status())
			c.Close()
		}
	})
	return nil
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }
