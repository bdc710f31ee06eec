// Package seal is the tunnel's record protection: every datagram or frame
// sent under a key is encrypted and authenticated with an AEAD
// (AES-256-GCM or ChaCha20-Poly1305) under session keys derived from the
// handshake, numbered by a per-session counter and checked against a
// sliding replay window on receipt.
//
// A sealed record:
//
//	0      1         4            8                  16
//	| type | 0 0 0   | receiver   | counter (LE)     | ciphertext … | tag (16) |
//
// type is Data, Keepalive or KeepaliveReply; receiver is the session
// index the receiver chose (it finds the session by it, whatever address
// the record came from); counter numbers records per session and
// direction. The AEAD nonce is bytes 4–16 (receiver ‖ counter), the
// associated data bytes 0–16: the header cannot be changed either.
package seal

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/chacha20poly1305"
	"golang.org/x/sys/cpu"
)

// Sizes of a record's parts.
const (
	HeaderLen = 16
	TagLen    = 16
	Overhead  = HeaderLen + TagLen
)

// Record types.
const (
	TypeData           = 1
	TypeKeepalive      = 2 // the receiver answers with TypeKeepaliveReply
	TypeKeepaliveReply = 3
)

// Limits on a session, as in WireGuard: the sender asks for a new
// handshake once a session is RekeyAfter old or has sent RekeyAfterMessages
// records, and neither side uses it past RejectAfter or
// RejectAfterMessages. AES-GCM and ChaCha20-Poly1305 stay far inside
// their bounds at 2^40 records of at most 64 KiB under one key.
const (
	DefaultRekeyAfter   = 2 * time.Minute
	RekeyAfterMessages  = 1 << 39
	RejectAfterMessages = 1 << 40
)

// MaxRekey bounds --rekey. The side that answers handshakes does not know
// the other side's interval and holds its sessions to this one.
const MaxRekey = time.Hour

// RejectAfter is how long a session may be used after it was made, given
// the rekey interval: the client has a full rekey interval more to get a
// new one through.
func RejectAfter(rekey time.Duration) time.Duration { return 2*rekey + 30*time.Second }

// Cipher names an AEAD.
type Cipher uint8

const (
	Auto Cipher = iota
	AESGCM
	ChaCha20Poly1305
)

func (c Cipher) String() string {
	switch c {
	case AESGCM:
		return "aes-256-gcm"
	case ChaCha20Poly1305:
		return "chacha20-poly1305"
	}
	return "auto"
}

// ParseCipher reads a --cipher value.
func ParseCipher(s string) (Cipher, error) {
	switch s {
	case "", "auto":
		return Auto, nil
	case "aes-256-gcm", "aes-gcm", "aes":
		return AESGCM, nil
	case "chacha20-poly1305", "chacha20", "chacha":
		return ChaCha20Poly1305, nil
	}
	return Auto, fmt.Errorf("unknown cipher %q (auto, aes-256-gcm or chacha20-poly1305)", s)
}

// Resolve picks AES-GCM where the CPU has AES instructions (and carry-less
// multiplication), ChaCha20-Poly1305 elsewhere.
func (c Cipher) Resolve() Cipher {
	if c != Auto {
		return c
	}
	if (cpu.X86.HasAES && cpu.X86.HasPCLMULQDQ) || cpu.ARM64.HasAES || cpu.S390X.HasAES {
		return AESGCM
	}
	return ChaCha20Poly1305
}

func newAEAD(c Cipher, key []byte) cipher.AEAD {
	if c.Resolve() == AESGCM {
		b, err := aes.NewCipher(key)
		if err != nil {
			panic(err) // 32-byte keys only
		}
		a, err := cipher.NewGCM(b)
		if err != nil {
			panic(err)
		}
		return a
	}
	a, err := chacha20poly1305.New(key)
	if err != nil {
		panic(err)
	}
	return a
}

// Keys are one side's keys of a session.
type Keys struct {
	Send, Recv     [32]byte
	SendID, RecvID uint32 // receiver index the peer / we look sessions up by
}

// Derive computes a session's keys from the pre-shared key and the
// handshake's nonces (client's first): HKDF-SHA256 with the nonces as salt
// gives one key and one receiver index per direction. The client sends
// with the client-to-server half, the server with the other.
func Derive(psk, nc, ns []byte, client bool) (Keys, error) {
	salt := make([]byte, 0, len(nc)+len(ns))
	salt = append(append(salt, nc...), ns...)
	okm, err := hkdf.Key(sha256.New, psk, salt, "sfunnel tunnel v2 session keys", 72)
	if err != nil {
		return Keys{}, err
	}
	var k Keys
	c2s, s2c := okm[0:32], okm[32:64]
	c2sID, s2cID := binary.LittleEndian.Uint32(okm[64:]), binary.LittleEndian.Uint32(okm[68:])
	if client {
		copy(k.Send[:], c2s)
		copy(k.Recv[:], s2c)
		k.SendID, k.RecvID = c2sID, s2cID
	} else {
		copy(k.Send[:], s2c)
		copy(k.Recv[:], c2s)
		k.SendID, k.RecvID = s2cID, c2sID
	}
	return k, nil
}

// Session is one handshake's pair of directions.
type Session struct {
	Created time.Time
	cipher  Cipher
	rekey   time.Duration
	reject  time.Duration
	send    cipher.AEAD
	sendID  uint32
	counter atomic.Uint64
	recv    cipher.AEAD
	recvID  uint32
	mu      sync.Mutex // guards window
	window  Window
}

// NewSession makes a session from derived keys. rekey is the rekey
// interval (0: DefaultRekeyAfter).
func NewSession(c Cipher, k Keys, rekey time.Duration, now time.Time) *Session {
	if rekey <= 0 {
		rekey = DefaultRekeyAfter
	}
	return &Session{Created: now, cipher: c.Resolve(), rekey: rekey, reject: RejectAfter(rekey),
		send: newAEAD(c, k.Send[:]), sendID: k.SendID, recv: newAEAD(c, k.Recv[:]), recvID: k.RecvID}
}

// Cipher is the AEAD in use.
func (s *Session) Cipher() Cipher { return s.cipher }

// RecvID is the index records for this session carry.
func (s *Session) RecvID() uint32 { return s.recvID }

// SendID is the index this side writes into its records.
func (s *Session) SendID() uint32 { return s.sendID }

// Sent is the number of records sealed so far.
func (s *Session) Sent() uint64 { return s.counter.Load() }

// NeedsRekey reports whether the sender should start a new handshake.
func (s *Session) NeedsRekey(now int64) bool {
	return now-s.Created.UnixNano() > int64(s.rekey) || s.counter.Load() >= RekeyAfterMessages
}

// Expired reports whether the session may no longer be used at all.
func (s *Session) Expired(now int64) bool {
	return now-s.Created.UnixNano() > int64(s.reject) || s.counter.Load() >= RejectAfterMessages
}

// Seal writes a record of type typ carrying plaintext into dst, which
// needs len(plaintext)+Overhead bytes, and returns it. plaintext may sit
// exactly at dst[HeaderLen:] (sealing in place); otherwise it must not
// overlap dst. ok is false once the session is worn out.
func (s *Session) Seal(dst []byte, typ byte, plaintext []byte) (rec []byte, ok bool) {
	ctr := s.counter.Add(1) - 1
	if ctr >= RejectAfterMessages {
		return nil, false
	}
	h := dst[:HeaderLen]
	h[0], h[1], h[2], h[3] = typ, 0, 0, 0
	binary.LittleEndian.PutUint32(h[4:], s.sendID)
	binary.LittleEndian.PutUint64(h[8:], ctr)
	out := s.send.Seal(dst[HeaderLen:HeaderLen], h[4:16], plaintext, h)
	return dst[:HeaderLen+len(out)], true
}

// Receiver returns the receiver index of a record, false if it is too
// short to be one.
func Receiver(rec []byte) (uint32, bool) {
	if len(rec) < Overhead || rec[1]|rec[2]|rec[3] != 0 {
		return 0, false
	}
	return binary.LittleEndian.Uint32(rec[4:]), true
}

// Why a record was refused.
type Reject uint8

const (
	OK        Reject = iota
	Malformed        // too short or a bad header
	BadTag           // did not authenticate: forged, modified or another key
	Replay           // its counter was seen already
	Old              // its counter is behind the replay window
	Stale            // the session is worn out
)

// Open authenticates and decrypts rec in place (the plaintext lands at
// rec[HeaderLen:]), or into dst when dst is not nil (dst must not overlap
// rec). The counter is recorded only after the record authenticated, so a
// forgery cannot move the window. newest reports that the record is the
// newest seen on this session (callers update the peer's address only then).
func (s *Session) Open(dst, rec []byte, now int64) (typ byte, plaintext []byte, newest bool, why Reject) {
	if len(rec) < Overhead || rec[0] < TypeData || rec[0] > TypeKeepaliveReply || rec[1]|rec[2]|rec[3] != 0 ||
		binary.LittleEndian.Uint32(rec[4:]) != s.recvID {
		return 0, nil, false, Malformed
	}
	ctr := binary.LittleEndian.Uint64(rec[8:])
	if ctr >= RejectAfterMessages || now-s.Created.UnixNano() > int64(s.reject) {
		return 0, nil, false, Stale
	}
	s.mu.Lock()
	v := s.window.Check(ctr)
	s.mu.Unlock()
	switch v {
	case Replayed:
		return 0, nil, false, Replay
	case TooOld:
		return 0, nil, false, Old
	}
	if dst == nil {
		dst = rec[HeaderLen:HeaderLen]
	} else {
		dst = dst[:0]
	}
	pt, err := s.recv.Open(dst, rec[4:16], rec[HeaderLen:], rec[:HeaderLen])
	if err != nil {
		return 0, nil, false, BadTag
	}
	s.mu.Lock()
	// Another goroutine may have accepted the same counter meanwhile.
	if s.window.Check(ctr) != Fresh {
		s.mu.Unlock()
		return 0, nil, false, Replay
	}
	newest = s.window.Accept(ctr)
	s.mu.Unlock()
	return rec[0], pt, newest, OK
}
