package auth

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"
)

// The handshake, all on one TCP connection from the client's UDP address
// and port to the server's listen port:
//
//	C → S  hello   "SFT2" ‖ Nc ‖ R ‖ C                  (41 bytes)
//	S → C  chall   "SFT2" ‖ Ns ‖ A ‖ P ‖ MACs             (86 bytes)
//	C → S  proof   MACc                                  (32 bytes)
//	S → C  result  0 = accepted, 1 = refused (store full) (1 byte)
//
// Nc, Ns: 32 fresh random bytes each. A ‖ P: the client's address (16
// bytes, IPv4 mapped) and port as the server sees the connection. R: the
// receiver index of the session this handshake replaces (a rekey), 0 for
// a new peer. C: the AEAD the client seals with (package seal's numbering),
// which the server adopts or refuses (result 2). MACs = HMAC-SHA256(K,
// "sfunnel tunnel v2 server" ‖ Nc ‖ Ns ‖ A ‖ P ‖ R ‖ C), MACc the same with
// "client". Session keys are derived from
// K, Nc and Ns afterwards (package seal). The
// server proves the key first but only over the client's fresh nonce; the
// client's proof covers the server's fresh nonce, so neither message can be
// replayed, and the labels keep one side's MAC from serving as the other's.
const (
	magic        = "SFT2"
	nonceLen     = 32
	macLen       = sha256.Size
	helloLen     = len(magic) + nonceLen + 4 + 1
	challengeLen = len(magic) + nonceLen + 16 + 2 + macLen
)

var (
	labelServer = []byte("sfunnel tunnel v2 server")
	labelClient = []byte("sfunnel tunnel v2 client")
)

// Errors a handshake can end with.
var (
	ErrBadMAC   = errors.New("authentication failed: wrong key or tampered handshake")
	ErrProtocol = errors.New("not an sfunnel tunnel handshake")
	ErrRefused  = errors.New("server refused the peer (connection store full)")
	// ErrCipher is returned by a server's accept function, and by the
	// client, when the server does not take the client's cipher.
	ErrCipher = errors.New("the server uses another --cipher")
)

// DefaultTimeout bounds a whole handshake.
const DefaultTimeout = 5 * time.Second

func mac(key, label, nc, ns []byte, peer netip.AddrPort, prev uint32, cipher byte) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(label)
	h.Write(nc)
	h.Write(ns)
	var ap [23]byte
	a := peer.Addr().As16()
	copy(ap[:], a[:])
	binary.BigEndian.PutUint16(ap[16:], peer.Port())
	binary.BigEndian.PutUint32(ap[18:], prev)
	ap[22] = cipher
	h.Write(ap[:])
	return h.Sum(nil)
}

// Result is what a successful handshake agreed on.
type Result struct {
	Peer   netip.AddrPort // the client as the server saw it
	Nc, Ns [nonceLen]byte
	Prev   uint32 // the receiver index of the session being replaced, or 0
	Cipher byte   // the AEAD the client seals with
}

func tcpAddrPort(a net.Addr) (netip.AddrPort, error) {
	t, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("not a TCP address: %v", a)
	}
	ap := t.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
}

// Server answers handshakes.
type Server struct {
	Key     []byte
	Timeout time.Duration // 0: DefaultTimeout
}

// Handshake authenticates the client on conn. On success it calls accept
// with the peer (the connection's remote address and port); a non-nil error
// from accept is reported to the client as a refusal. The connection is
// left open; the caller closes it.
func (s *Server) Handshake(conn net.Conn, accept func(r *Result) error) (netip.AddrPort, error) {
	peer, err := tcpAddrPort(conn.RemoteAddr())
	if err != nil {
		return peer, err
	}
	t := s.Timeout
	if t == 0 {
		t = DefaultTimeout
	}
	conn.SetDeadline(time.Now().Add(t))
	var hello [helloLen]byte
	if _, err := io.ReadFull(conn, hello[:]); err != nil {
		return peer, fmt.Errorf("read hello: %w", err)
	}
	if string(hello[:len(magic)]) != magic {
		return peer, ErrProtocol
	}
	nc := hello[len(magic) : len(magic)+nonceLen]
	prev := binary.BigEndian.Uint32(hello[len(magic)+nonceLen:])
	cipher := hello[helloLen-1]
	var ch [challengeLen]byte
	copy(ch[:], magic)
	ns := ch[len(magic) : len(magic)+nonceLen]
	rand.Read(ns)
	a := peer.Addr().As16()
	copy(ch[len(magic)+nonceLen:], a[:])
	binary.BigEndian.PutUint16(ch[len(magic)+nonceLen+16:], peer.Port())
	copy(ch[len(magic)+nonceLen+18:], mac(s.Key, labelServer, nc, ns, peer, prev, cipher))
	if _, err := conn.Write(ch[:]); err != nil {
		return peer, fmt.Errorf("write challenge: %w", err)
	}
	var proof [macLen]byte
	if _, err := io.ReadFull(conn, proof[:]); err != nil {
		return peer, fmt.Errorf("read proof: %w", err)
	}
	if !hmac.Equal(proof[:], mac(s.Key, labelClient, nc, ns, peer, prev, cipher)) {
		return peer, ErrBadMAC
	}
	r := &Result{Peer: peer, Nc: [nonceLen]byte(nc), Ns: [nonceLen]byte(ns), Prev: prev, Cipher: cipher}
	if err := accept(r); err != nil {
		code := byte(1)
		if errors.Is(err, ErrCipher) {
			code = 2
		}
		conn.Write([]byte{code})
		return peer, err
	}
	if _, err := conn.Write([]byte{0}); err != nil {
		return peer, fmt.Errorf("write result: %w", err)
	}
	return peer, nil
}

// ClientHandshake authenticates to the server on conn and returns the
// address and port the server saw.
func ClientHandshake(conn net.Conn, key []byte, timeout time.Duration) (netip.AddrPort, error) {
	r, err := Client(conn, key, timeout, 0, 1)
	return r.Peer, err
}

// Client authenticates to the server on conn; prev names the session a
// rekey replaces (0: none), cipher the AEAD this side seals with.
func Client(conn net.Conn, key []byte, timeout time.Duration, prev uint32, cipher byte) (*Result, error) {
	r := &Result{Prev: prev, Cipher: cipher}
	seen, err := client(conn, key, timeout, r)
	r.Peer = seen
	return r, err
}

func client(conn net.Conn, key []byte, timeout time.Duration, r *Result) (netip.AddrPort, error) {
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	conn.SetDeadline(time.Now().Add(timeout))
	defer conn.SetDeadline(time.Time{})
	var hello [helloLen]byte
	copy(hello[:], magic)
	nc := hello[len(magic) : len(magic)+nonceLen]
	rand.Read(nc)
	binary.BigEndian.PutUint32(hello[len(magic)+nonceLen:], r.Prev)
	hello[helloLen-1] = r.Cipher
	copy(r.Nc[:], nc)
	if _, err := conn.Write(hello[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("write hello: %w", err)
	}
	var ch [challengeLen]byte
	if _, err := io.ReadFull(conn, ch[:]); err != nil {
		return netip.AddrPort{}, fmt.Errorf("read challenge: %w", err)
	}
	if string(ch[:len(magic)]) != magic {
		return netip.AddrPort{}, ErrProtocol
	}
	ns := ch[len(magic) : len(magic)+nonceLen]
	copy(r.Ns[:], ns)
	ap := ch[len(magic)+nonceLen:]
	seen := netip.AddrPortFrom(netip.AddrFrom16([16]byte(ap[:16])).Unmap(), binary.BigEndian.Uint16(ap[16:18]))
	if !hmac.Equal(ap[18:18+macLen], mac(key, labelServer, nc, ns, seen, r.Prev, r.Cipher)) {
		return seen, ErrBadMAC
	}
	if _, err := conn.Write(mac(key, labelClient, nc, ns, seen, r.Prev, r.Cipher)); err != nil {
		return seen, fmt.Errorf("write proof: %w", err)
	}
	var res [1]byte
	if _, err := io.ReadFull(conn, res[:]); err != nil {
		return seen, fmt.Errorf("read result (wrong key?): %w", err)
	}
	if res[0] == 2 {
		return seen, ErrCipher
	}
	if res[0] != 0 {
		return seen, ErrRefused
	}
	return seen, nil
}
