package tunnel

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/seal"
	"github.com/spf13/pflag"
)

// Config is everything `sfunnel tunnel` was asked to do.
type Config struct {
	Interface    string
	ListenPort   int
	BindTo       string
	EndpointPort int // TCP over UDP: client mode when non-zero
	Carry        string
	Transport    string
	Mode         string // client, server or both
	Remote       netip.AddrPort
	RemoteHost   string
	Addresses    []netip.Prefix
	MTU          int
	KeyFile      string
	Expiry       time.Duration
	MaxPeers     int
	Persist      bool
	StatusSocket string
	Batch        int
	Offload      bool
	Cipher       seal.Cipher
	Rekey        time.Duration // with a key: session lifetime before a new handshake
	Keepalive    time.Duration // 0: off
}

// Defaults.
const (
	DefaultExpiry   = 5 * time.Minute
	DefaultPort     = 7472
	DefaultMaxPeers = 4096
	DefaultBatch    = 64
)

type prefixList struct{ p *[]netip.Prefix }

func (l prefixList) String() string {
	if l.p == nil {
		return ""
	}
	s := make([]string, len(*l.p))
	for i, p := range *l.p {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func (l prefixList) Type() string { return "CIDR" }

func (l prefixList) Set(v string) error {
	for _, f := range strings.Split(v, ",") {
		p, err := netip.ParsePrefix(strings.TrimSpace(f))
		if err != nil {
			return fmt.Errorf("not an address/prefix: %q", f)
		}
		*l.p = append(*l.p, p)
	}
	return nil
}

const runUsage = `usage: sfunnel tunnel [run] [options]
       sfunnel tunnel genkey [FILE]
       sfunnel tunnel status [-i IF | --status-socket PATH] [-j]

TCP over UDP (the default, --carry tcp; udp-encap-tun's options):
  server: sfunnel tunnel -i tun0 -l 7472 --address 203.0.113.1/24 --key /etc/sfunnel/tunnel.key
  client: sfunnel tunnel -i tun0 -l 7472 -b eth0 -e 7472 --address 198.51.100.1/32 --key /etc/sfunnel/tunnel.key
IP over UDP or TCP:
  sfunnel tunnel --carry ip --transport udp|tcp --mode client|server|both --remote HOST[:PORT] --address CIDR [--key FILE]

options:
  -i, --interface IF           TUN device to create (default tun0)
  -l, --listen-port N          UDP port, and TCP port for authentication (default 7472;
                               an IP-over-UDP/TCP client picks one unless given)
  -b, --bind-to-interface IF   send and receive only through IF (SO_BINDTODEVICE)
  -e, --endpoint-port N        TCP over UDP client: send to each packet's destination, port N
      --carry tcp|ip           TCP segments over UDP, or whole IP packets
      --transport udp|tcp      with --carry ip (default udp)
      --mode client|server|both   with --carry ip
      --remote HOST[:PORT]     with --carry ip: the other end
      --address CIDR           TUN address (repeatable, one per family); TCP-over-UDP
                               server: the pool of tunnel addresses for peers
      --key FILE               pre-shared key (sfunnel tunnel genkey). With a key peers
                               authenticate and every datagram and frame is encrypted
                               and authenticated; without one the formats are plain
                               (udp-encap-tun's, TunConnector's) and anyone can inject
      --cipher NAME            auto (AES-256-GCM with AES instructions, else
                               ChaCha20-Poly1305; a server takes the client's choice),
                               aes-256-gcm or chacha20-poly1305
      --rekey DURATION         new session keys this often (default 2m)
      --keepalive DURATION     send a keepalive after this long without sending,
                               to keep NAT mappings (default 0: off; 25s is typical)
      --expiry DURATION        forget a peer after this long unused (default 5m)
      --max-peers N            most peers in the connection store (default 4096)
      --mtu N                  TUN MTU (default 1492 TCP over UDP, 1452 IP over UDP, 1500 IP over
                               TCP; 32 less over UDP with --key)
      --persist                keep the TUN device on exit
      --status-socket PATH     for sfunnel tunnel status (default /run/sfunnel/tunnel-IF.sock,
                               /run/sfunnel/netns-INODE/tunnel-IF.sock outside the host namespace)
      --batch N                most packets per system call (default 64)
      --offload=false          no TUN/UDP segmentation offloads
  -h, --help                   this text

See sfunnel-tunnel(8).
`

// runFlags declares every `sfunnel tunnel` option once, on c; remote
// receives --remote for later resolution.
func runFlags(c *Config, remote, cipher *string) *pflag.FlagSet {
	fs := pflag.NewFlagSet("sfunnel tunnel", pflag.ContinueOnError)
	fs.SetOutput(io.Discard) // Main prints the error, and the help for -h
	fs.Usage = func() {}
	fs.SortFlags = false
	fs.StringVarP(&c.Interface, "interface", "i", c.Interface, "TUN device to create")
	fs.IntVarP(&c.ListenPort, "listen-port", "l", 0, "UDP (and TCP, for authentication) port to listen on (default 7472; client: ephemeral with --carry ip)")
	fs.StringVarP(&c.BindTo, "bind-to-interface", "b", "", "send and receive only through this interface (SO_BINDTODEVICE)")
	fs.IntVarP(&c.EndpointPort, "endpoint-port", "e", 0, "TCP over UDP client mode: send to the packet's destination address at this port")
	fs.StringVar(&c.Carry, "carry", c.Carry, "what the tunnel carries: tcp (TCP segments over UDP) or ip (whole IP packets)")
	fs.StringVar(&c.Transport, "transport", c.Transport, "with --carry ip: udp or tcp")
	fs.StringVar(&c.Mode, "mode", "", "with --carry ip: client, server or both")
	fs.StringVar(remote, "remote", "", "with --carry ip: the other end, HOST[:PORT]")
	fs.Var(prefixList{&c.Addresses}, "address", "address/prefix for the TUN (repeatable or comma-separated); server: the pool of tunnel addresses")
	fs.IntVar(&c.MTU, "mtu", 0, "MTU of the TUN device")
	fs.StringVar(&c.KeyFile, "key", "", "pre-shared key file (sfunnel tunnel genkey)")
	fs.StringVar(cipher, "cipher", "auto", "AEAD with --key: auto, aes-256-gcm or chacha20-poly1305")
	fs.DurationVar(&c.Rekey, "rekey", seal.DefaultRekeyAfter, "with --key: new session keys this often")
	fs.DurationVar(&c.Keepalive, "keepalive", 0, "send a keepalive after this long without sending (0: off)")
	fs.DurationVar(&c.Expiry, "expiry", c.Expiry, "forget a peer after this long without traffic")
	fs.IntVar(&c.MaxPeers, "max-peers", c.MaxPeers, "most peers kept in the connection store")
	fs.BoolVar(&c.Persist, "persist", false, "leave the TUN device in place on exit")
	fs.StringVar(&c.StatusSocket, "status-socket", "", "unix socket for `sfunnel tunnel status`")
	fs.IntVar(&c.Batch, "batch", c.Batch, "packets moved per system call at most")
	fs.BoolVar(&c.Offload, "offload", true, "use TUN segmentation offloads (virtio-net headers) and UDP GSO/GRO")
	return fs
}

func parseRunFlags(args []string, stderr io.Writer) (*Config, error) {
	c := &Config{Interface: "tun0", Carry: "tcp", Transport: "udp", Mode: "",
		Expiry: DefaultExpiry, MaxPeers: DefaultMaxPeers, Batch: DefaultBatch}
	var remote, cipher string
	fs := runFlags(c, &remote, &cipher)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return nil, flag.ErrHelp
		}
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	bad := func(f string, a ...any) (*Config, error) { return nil, fmt.Errorf(f, a...) }
	if c.Interface == "" || len(c.Interface) > 15 || strings.ContainsAny(c.Interface, "/ \t") {
		return bad("invalid --interface %q", c.Interface)
	}
	for _, p := range []struct {
		name string
		v    int
	}{{"--listen-port", c.ListenPort}, {"--endpoint-port", c.EndpointPort}} {
		if p.v < 0 || p.v > 65535 {
			return bad("%s %d out of range 0-65535", p.name, p.v)
		}
	}
	if c.MTU == 0 {
		switch {
		case c.Carry == "tcp":
			c.MTU = 1500 - 8 // the IP header is replaced by a UDP header
		case c.Transport == "udp":
			c.MTU = 1500 - 48 // IPv6 and UDP headers in front
		default:
			c.MTU = 1500
		}
		if c.KeyFile != "" && (c.Carry == "tcp" || c.Transport == "udp") {
			c.MTU -= seal.Overhead // a sealed datagram still fits a 1500-byte path
		}
	}
	if c.MTU < 576 || c.MTU > 65535 {
		return bad("--mtu %d out of range 576-65535", c.MTU)
	}
	var err error
	if c.Cipher, err = seal.ParseCipher(cipher); err != nil {
		return bad("--cipher: %v", err)
	}
	if c.Rekey < time.Second || c.Rekey > seal.MaxRekey {
		return bad("--rekey must be between 1s and %s", seal.MaxRekey)
	}
	if c.Keepalive < 0 {
		return bad("--keepalive must not be negative")
	}
	if c.Expiry <= 0 {
		return bad("--expiry must be positive")
	}
	if c.MaxPeers < 1 {
		return bad("--max-peers must be at least 1")
	}
	if c.Batch < 1 || c.Batch > 1024 {
		return bad("--batch %d out of range 1-1024", c.Batch)
	}
	if c.StatusSocket == "" {
		c.StatusSocket = defaultStatusSocket(c.Interface)
	}
	switch c.Carry {
	case "tcp":
		if c.Mode != "" || remote != "" || c.Transport != "udp" {
			return bad("--mode, --remote and --transport need --carry ip (TCP over UDP picks client mode with --endpoint-port)")
		}
		if c.ListenPort == 0 {
			c.ListenPort = DefaultPort
		}
		c.Mode = "server"
		if c.EndpointPort != 0 {
			c.Mode = "client"
		} else if len(c.Addresses) == 0 {
			return bad("TCP over UDP server mode (no --endpoint-port) needs --address CIDR: the TUN's address and the pool of tunnel addresses for peers")
		}
	case "ip":
		if c.EndpointPort != 0 {
			return bad("--endpoint-port is for --carry tcp; use --remote HOST:PORT")
		}
		if c.Transport != "udp" && c.Transport != "tcp" {
			return bad("--transport must be udp or tcp, not %q", c.Transport)
		}
		switch c.Mode {
		case "client", "both":
			if remote == "" {
				return bad("--mode %s needs --remote HOST[:PORT]", c.Mode)
			}
		case "server":
		case "":
			return bad("--carry ip needs --mode client, server or both")
		default:
			return bad("--mode must be client, server or both, not %q", c.Mode)
		}
		if c.ListenPort == 0 && c.Mode != "client" {
			c.ListenPort = DefaultPort
		}
	default:
		return bad("--carry must be tcp or ip, not %q", c.Carry)
	}
	if remote != "" {
		c.RemoteHost = remote
		ap, err := resolveRemote(remote)
		if err != nil {
			return nil, err
		}
		c.Remote = ap
	}
	return c, nil
}

// resolveRemote accepts HOST, HOST:PORT, [V6]:PORT and bare IPv6 addresses.
func resolveRemote(s string) (netip.AddrPort, error) {
	host, port := s, strconv.Itoa(DefaultPort)
	if h, p, err := net.SplitHostPort(s); err == nil {
		host, port = h, p
	} else if strings.HasPrefix(s, "[") && strings.HasSuffix(s, "]") {
		host = s[1 : len(s)-1]
	}
	pn, err := strconv.ParseUint(port, 10, 16)
	if err != nil || pn == 0 {
		return netip.AddrPort{}, fmt.Errorf("--remote %q: bad port", s)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return netip.AddrPortFrom(a.Unmap(), uint16(pn)), nil
	}
	ips, err := net.LookupIP(host)
	if err != nil || len(ips) == 0 {
		return netip.AddrPort{}, fmt.Errorf("--remote %q: cannot resolve %s: %v", s, host, err)
	}
	a, _ := netip.AddrFromSlice(ips[0])
	return netip.AddrPortFrom(a.Unmap(), uint16(pn)), nil
}

// defaultStatusSocket is the status socket's path for ifname. Interface
// names are per network namespace, so outside the host's namespace the
// path carries the namespace's inode: daemons in two namespaces with the
// same TUN name do not meet (`ip netns exec NS sfunnel tunnel status`
// computes the same path inside NS).
func defaultStatusSocket(ifname string) string {
	if ino, host := netnsInode(); !host {
		return fmt.Sprintf("/run/sfunnel/netns-%d/tunnel-%s.sock", ino, ifname)
	}
	return "/run/sfunnel/tunnel-" + ifname + ".sock"
}

// netnsInode identifies our network namespace; host is false when it is
// known not to be the host's: it differs from PID 1's (when that can be
// read) or it is one of the named namespaces of ip-netns(8).
func netnsInode() (ino uint64, host bool) {
	var self, init syscall.Stat_t
	if syscall.Stat("/proc/self/ns/net", &self) != nil {
		return 0, true
	}
	if syscall.Stat("/proc/1/ns/net", &init) == nil {
		return self.Ino, self.Ino == init.Ino && self.Dev == init.Dev
	}
	named, _ := filepath.Glob("/run/netns/*")
	for _, n := range named {
		var st syscall.Stat_t
		if syscall.Stat(n, &st) == nil && st.Ino == self.Ino && st.Dev == self.Dev {
			return self.Ino, false
		}
	}
	return self.Ino, true
}
