// Package auth authenticates tunnel peers with a pre-shared key: a short
// mutual challenge-response over TCP, with fresh nonces from both sides,
// bound to the client's address and port as the server sees them.
package auth

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
)

// KeyLen is the length of a pre-shared key in bytes.
const KeyLen = 32

// GenerateKey returns a fresh random key.
func GenerateKey() []byte {
	k := make([]byte, KeyLen)
	rand.Read(k) // never fails on Linux (getrandom)
	return k
}

// FormatKey is the key file's content: hex and a newline.
func FormatKey(k []byte) string { return hex.EncodeToString(k) + "\n" }

// WriteKeyFile creates path with mode 0600 and a new key; an existing file
// is not overwritten.
func WriteKeyFile(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create key file: %w", err)
	}
	if _, err := io.WriteString(f, FormatKey(GenerateKey())); err != nil {
		f.Close()
		return fmt.Errorf("write key file: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("write key file: %w", err)
	}
	return f.Close()
}

// ErrKeyPermissions means the key file can be read by group or others.
var ErrKeyPermissions = errors.New("key file is accessible by group or others")

// ReadKeyFile loads a key written by WriteKeyFile (hex or base64, 32 bytes).
// It refuses files that group or others can read or write.
func ReadKeyFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open key file: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("open key file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s: %w (mode %04o, want 0600: chmod 600 %s)", path, ErrKeyPermissions, st.Mode().Perm(), path)
	}
	b, err := io.ReadAll(io.LimitReader(f, 4096))
	if err != nil {
		return nil, fmt.Errorf("read key file: %w", err)
	}
	return ParseKey(string(b))
}

// ParseKey decodes a key in hex or standard base64.
func ParseKey(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	if k, err := hex.DecodeString(s); err == nil && len(k) == KeyLen {
		return k, nil
	}
	if k, err := base64.StdEncoding.DecodeString(s); err == nil && len(k) == KeyLen {
		return k, nil
	}
	return nil, fmt.Errorf("key must be %d bytes in hex or base64 (sfunnel tunnel genkey makes one)", KeyLen)
}
