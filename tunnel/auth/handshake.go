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
//	C → S  hello   "SFT1" ‖ Nc                          (36 bytes)
//	S → C  chall   "SFT1" ‖ Ns ‖ A ‖ P ‖ MACs             (86 bytes)
//	C → S  proof   MACc                                  (32 bytes)
//	S → C  result  0 = accepted, 1 = refused (store full) (1 byte)
//
// Nc, Ns: 32 fresh random bytes each. A ‖ P: the client's address (16
// bytes, IPv4 mapped) and port as the server sees the connection: UDP from
// exactly there is accepted afterwards. MACs = HMAC-SHA256(K, "sfunnel
// tunnel v1 server" ‖ Nc ‖ Ns ‖ A ‖ P), MACc the same with "client". The
// server proves the key first but only over the client's fresh nonce; the
// client's proof covers the server's fresh nonce, so neither message can be
// replayed, and the labels keep one side's MAC from serving as the other's.
const (
	magic        = "SFT1"
	nonceLen     = 32
	macLen       = sha256.Size
	helloLen     = len(magic) + nonceLen
	challengeLen = len(magic) + nonceLen + 16 + 2 + macLen
)

var (
	labelServer = []byte("sfunnel tunnel v1 server")
	labelClient = []byte("sfunnel tunnel v1 client")
)

// Errors a handshake can end with.
var (
	ErrBadMAC   = errors.New("authentication failed: wrong key or tampered handshake")
	ErrProtocol = errors.New("not an sfunnel tunnel handshake")
	ErrRefused  = errors.New("server refused the peer (connection store full)")
)

// DefaultTimeout bounds a whole handshake.
const DefaultTimeout = 5 * time.Second

func mac(key, label, nc, ns []byte, peer netip.AddrPort) []byte {
	h := hmac.New(sha256.New, key)
	h.Write(label)
	h.Write(nc)
	h.Write(ns)
	var ap [18]byte
	a := peer.Addr().As16()
	copy(ap[:], a[:])
	binary.BigEndian.PutUint16(ap[16:], peer.Port())
	h.Write(ap[:])
	return h.Sum(nil)
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
func (s *Server) Handshake(conn net.Conn, accept func(peer netip.AddrPort) error) (netip.AddrPort, error) {
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
	nc := hello[len(magic):]
	var ch [challengeLen]byte
	copy(ch[:], magic)
	ns := ch[len(magic) : len(magic)+nonceLen]
	rand.Read(ns)
	a := peer.Addr().As16()
	copy(ch[len(magic)+nonceLen:], a[:])
	binary.BigEndian.PutUint16(ch[len(magic)+nonceLen+16:], peer.Port())
	copy(ch[len(magic)+nonceLen+18:], mac(s.Key, labelServer, nc, ns, peer))
	if _, err := conn.Write(ch[:]); err != nil {
		return peer, fmt.Errorf("write challenge: %w", err)
	}
	var proof [macLen]byte
	if _, err := io.ReadFull(conn, proof[:]); err != nil {
		return peer, fmt.Errorf("read proof: %w", err)
	}
	if !hmac.Equal(proof[:], mac(s.Key, labelClient, nc, ns, peer)) {
		return peer, ErrBadMAC
	}
	if err := accept(peer); err != nil {
		conn.Write([]byte{1})
		return peer, err
	}
	if _, err := conn.Write([]byte{0}); err != nil {
		return peer, fmt.Errorf("write result: %w", err)
	}
	return peer, nil
}

// ClientHandshake authenticates to the server on conn and returns the
// address and port the server saw (and will accept UDP from).
func ClientHandshake(conn net.Conn, key []byte, timeout time.Duration) (netip.AddrPort, error) {
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	conn.SetDeadline(time.Now().Add(timeout))
	defer conn.SetDeadline(time.Time{})
	var hello [helloLen]byte
	copy(hello[:], magic)
	nc := hello[len(magic):]
	rand.Read(nc)
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
	ap := ch[len(magic)+nonceLen:]
	seen := netip.AddrPortFrom(netip.AddrFrom16([16]byte(ap[:16])).Unmap(), binary.BigEndian.Uint16(ap[16:18]))
	if !hmac.Equal(ap[18:18+macLen], mac(key, labelServer, nc, ns, seen)) {
		return seen, ErrBadMAC
	}
	if _, err := conn.Write(mac(key, labelClient, nc, ns, seen)); err != nil {
		return seen, fmt.Errorf("write proof: %w", err)
	}
	var res [1]byte
	if _, err := io.ReadFull(conn, res[:]); err != nil {
		return seen, fmt.Errorf("read result (wrong key?): %w", err)
	}
	if res[0] != 0 {
		return seen, ErrRefused
	}
	return seen, nil
}
