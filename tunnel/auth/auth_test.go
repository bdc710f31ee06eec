package auth

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func pair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); ch <- c }()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestHandshake(t *testing.T) {
	key := GenerateKey()
	for _, tc := range []struct {
		name              string
		clientKey, srvKey []byte
		refuse            error
		clientErr         error
		serverErr         error
	}{
		{"ok", key, key, nil, nil, nil},
		{"client has a wrong key", GenerateKey(), key, nil, ErrBadMAC, nil},
		{"store full", key, key, errors.New("full"), ErrRefused, errors.New("full")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, s := pair(t)
			type res struct {
				peer netip.AddrPort
				err  error
			}
			done := make(chan res, 1)
			var accepted netip.AddrPort
			go func() {
				p, err := (&Server{Key: tc.srvKey}).Handshake(s, func(r *Result) error { accepted = r.Peer; return tc.refuse })
				s.Close()
				done <- res{p, err}
			}()
			seen, cerr := ClientHandshake(c, tc.clientKey, 0)
			c.Close()
			sr := <-done
			if (cerr == nil) != (tc.clientErr == nil) || (tc.clientErr != nil && !errors.Is(cerr, tc.clientErr)) {
				t.Fatalf("client: %v, want %v", cerr, tc.clientErr)
			}
			if tc.name == "ok" {
				if sr.err != nil || seen != sr.peer || accepted != sr.peer || seen.String() != c.LocalAddr().String() {
					t.Fatalf("server %v %v, client saw %v, local %v", sr.peer, sr.err, seen, c.LocalAddr())
				}
			} else if sr.err == nil && tc.name != "client has a wrong key" {
				t.Fatal("server accepted")
			}
		})
	}
	// A server with the wrong key is caught by the client before it
	// proves anything.
	c, s := pair(t)
	srvErr := make(chan error, 1)
	go func() {
		_, err := (&Server{Key: GenerateKey()}).Handshake(s, func(*Result) error { return nil })
		s.Close()
		srvErr <- err
	}()
	if _, err := ClientHandshake(c, key, 0); !errors.Is(err, ErrBadMAC) {
		t.Fatalf("client against a server with another key: %v", err)
	}
	c.Close()
	if err := <-srvErr; err == nil {
		t.Fatal("server with the wrong key succeeded")
	}
}

func TestKeyFile(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "k")
	if err := WriteKeyFile(p); err != nil {
		t.Fatal(err)
	}
	if err := WriteKeyFile(p); err == nil {
		t.Fatal("an existing key file was overwritten")
	}
	st, _ := os.Stat(p)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %o", st.Mode().Perm())
	}
	k, err := ReadKeyFile(p)
	if err != nil || len(k) != KeyLen {
		t.Fatalf("%v %d", err, len(k))
	}
	os.Chmod(p, 0o640)
	if _, err := ReadKeyFile(p); !errors.Is(err, ErrKeyPermissions) {
		t.Fatalf("group-readable key file: %v", err)
	}
	os.Chmod(p, 0o604)
	if _, err := ReadKeyFile(p); !errors.Is(err, ErrKeyPermissions) {
		t.Fatalf("world-readable key file: %v", err)
	}
	for _, bad := range []string{"", "abcd", "zz" + FormatKey(k)[2:]} {
		if _, err := ParseKey(bad); err == nil {
			t.Errorf("key %q accepted", bad)
		}
	}
}

// Both sides agree on the nonces (the session keys' input) and on the
// session a rekey replaces; a man in the middle who changes the latter
// breaks the server's proof.
func TestHandshakeResult(t *testing.T) {
	key := GenerateKey()
	c, s := pair(t)
	got := make(chan *Result, 1)
	go func() {
		(&Server{Key: key}).Handshake(s, func(r *Result) error { got <- r; return nil })
		s.Close()
	}()
	r, err := Client(c, key, 0, 0x01020304, 2)
	if err != nil {
		t.Fatal(err)
	}
	sr := <-got
	if sr.Nc != r.Nc || sr.Ns != r.Ns || sr.Prev != 0x01020304 || r.Prev != sr.Prev || sr.Cipher != 2 {
		t.Fatalf("client %+v, server %+v", r, sr)
	}
	// A relay that rewrites R in the hello.
	c2, s2 := pair(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		m, err := ln.Accept()
		if err != nil {
			return
		}
		defer m.Close()
		hello := make([]byte, helloLen)
		io.ReadFull(m, hello)
		hello[helloLen-2] ^= 1 // the last byte of R
		s2.Write(hello)
		go io.Copy(s2, m)
		io.Copy(m, s2)
	}()
	go func() {
		(&Server{Key: key}).Handshake(c2, func(*Result) error { return nil })
		c2.Close()
	}()
	mc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer mc.Close()
	if _, err := Client(mc, key, 2*time.Second, 5, 1); !errors.Is(err, ErrBadMAC) {
		t.Fatalf("handshake with R rewritten on the way: %v, want %v", err, ErrBadMAC)
	}
}
