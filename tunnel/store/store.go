// Package store is the tunnel's connection store: authenticated peers
// (remote address and UDP port), each with a unique tunnel address taken
// from a pool, found in O(1) from either side, forgotten after a period
// without traffic. Only the authentication step adds entries, so senders
// that never authenticated cannot fill it.
package store

import (
	"errors"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/seal"
)

// ErrFull means every tunnel address (or the peer limit) is in use.
var ErrFull = errors.New("connection store full")

// ErrIndexTaken means a new session's receiver index is already in use
// (one chance in 2^32 per peer); the client simply authenticates again.
var ErrIndexTaken = errors.New("session index collision, try again")

// Entry is one authenticated peer.
type Entry struct {
	// Peer is the address and port the peer authenticated from (TCP),
	// the entry's key; with a key, Endpoint is where its authenticated
	// datagrams last came from, which may change (NAT rebinding, roaming).
	Peer       netip.AddrPort // remote address and UDP port (unmapped)
	endpoint   atomic.Pointer[netip.AddrPort]
	sess, prev atomic.Pointer[seal.Session]
	// awaiting: sess answers the peer's rekey and the peer has not sealed
	// anything under it yet, so we still seal under prev (see Session).
	awaiting             atomic.Bool
	Addr                 netip.Addr // tunnel address, invalid when the store has no pool
	Created              time.Time
	lastUsed             atomic.Int64 // unix nanoseconds
	RxPackets, TxPackets atomic.Uint64
	// since when we have been sending without hearing back (0: we heard)
	unanswered atomic.Int64
	lastSent   atomic.Int64
}

// Sent notes a packet sent to the peer at now and returns how long the
// peer has been silent while we kept sending: since the first packet it
// did not answer, unless we ourselves were quiet for longer than quiet in
// between (then the count starts again: an unanswered last ACK before an
// idle hour says nothing).
func (e *Entry) Sent(now int64, quiet time.Duration) time.Duration {
	prev := e.lastSent.Swap(now)
	since := e.unanswered.Load()
	if since == 0 || now-prev > int64(quiet) {
		e.unanswered.Store(now)
		return 0
	}
	return time.Duration(now - since)
}

// Heard notes a packet from the peer.
func (e *Entry) Heard() {
	if e.unanswered.Load() != 0 {
		e.unanswered.Store(0)
	}
}

// RestartSilence starts the silence count afresh (after acting on it).
func (e *Entry) RestartSilence(now int64) { e.unanswered.Store(now) }

// Endpoint is where datagrams for the peer go.
func (e *Entry) Endpoint() netip.AddrPort {
	if p := e.endpoint.Load(); p != nil {
		return *p
	}
	return e.Peer
}

// SetEndpoint records that authenticated traffic of the peer now comes
// from ap (this allocates, but only when the address changes).
func (e *Entry) SetEndpoint(ap netip.AddrPort) bool {
	if e.Endpoint() == ap {
		return false
	}
	p := ap // a copy, so that only a change allocates
	e.endpoint.Store(&p)
	return true
}

// Session is the session to seal with (nil without a key): the current
// one, except while a rekey's responder waits for the peer to use it.
// The handshake's end reaches the peer over TCP and our records go over
// UDP, so a record sealed under the new session could overtake the peer
// installing it (and be dropped as an unknown session). Until the peer's
// first record under the new session arrives (Confirm), we seal under
// the previous one, which the peer keeps for receiving.
func (e *Entry) Session() *seal.Session {
	if e.awaiting.Load() {
		if p := e.prev.Load(); p != nil {
			return p
		}
	}
	return e.sess.Load()
}

// Confirm notes that the peer sealed a record under ses: if ses is the
// session we await the peer's use of, we seal under it from now on.
func (e *Entry) Confirm(ses *seal.Session) {
	if e.awaiting.Load() && e.sess.Load() == ses {
		e.awaiting.Store(false)
	}
}

// SessionFor returns the current or the previous session if its receiver
// index is id (records sealed before a rekey may still be in flight).
func (e *Entry) SessionFor(id uint32) *seal.Session {
	if s := e.sess.Load(); s != nil && s.RecvID() == id {
		return s
	}
	if s := e.prev.Load(); s != nil && s.RecvID() == id {
		return s
	}
	return nil
}

// Touch marks the entry as used now.
func (e *Entry) Touch(now int64) { e.lastUsed.Store(now) }

// LastUsed is when the entry last carried traffic (or was authenticated).
func (e *Entry) LastUsed() time.Time { return time.Unix(0, e.lastUsed.Load()) }

// Info is a copy of an entry for status output.
type Info struct {
	Peer      string    `json:"peer"`
	Endpoint  string    `json:"endpoint,omitempty"` // when it differs from Peer
	Address   string    `json:"address,omitempty"`
	Cipher    string    `json:"cipher,omitempty"`
	Rekeyed   time.Time `json:"session_created,omitzero"`
	Sealed    uint64    `json:"sealed,omitempty"`
	Created   time.Time `json:"created"`
	LastUsed  time.Time `json:"last_used"`
	RxPackets uint64    `json:"rx_packets"`
	TxPackets uint64    `json:"tx_packets"`
}

// Options configure a Store.
type Options struct {
	// Pools hand out tunnel addresses (at most one per family). Each is the
	// TUN's own address with its prefix length; the own address, the
	// network address and (IPv4) the broadcast address are never given out.
	Pools []netip.Prefix
	// MaxPeers bounds the number of entries; 0 means 4096.
	MaxPeers int
	// TTL is how long an unused entry lives.
	TTL time.Duration
}

// Store maps peers to tunnel addresses and back.
type Store struct {
	mu     sync.RWMutex
	byPeer map[netip.AddrPort]*Entry
	byAddr map[netip.Addr]*Entry
	byID   map[uint32]*Entry // receiver index of current and previous sessions
	pools  []*pool
	max    int
	ttl    time.Duration
}

type pool struct {
	prefix netip.Prefix
	own    netip.Addr
	cursor netip.Addr
	size   uint64 // usable addresses (capped)
	used   int
}

// New makes an empty store.
func New(o Options) *Store {
	s := &Store{
		byPeer: make(map[netip.AddrPort]*Entry),
		byAddr: make(map[netip.Addr]*Entry),
		byID:   make(map[uint32]*Entry),
		max:    o.MaxPeers,
		ttl:    o.TTL,
	}
	if s.max <= 0 {
		s.max = 4096
	}
	for _, p := range o.Pools {
		host := p.Masked().Addr().BitLen() - p.Bits()
		size := uint64(1<<62) - 1
		if host < 62 {
			size = uint64(1)<<host - 1 // minus the network address
			if p.Addr().Is4() && host > 1 {
				size-- // broadcast
			}
			if size > 0 {
				size-- // our own address
			}
		}
		s.pools = append(s.pools, &pool{prefix: p.Masked(), own: p.Addr(), cursor: p.Masked().Addr(), size: size})
	}
	return s
}

// TTL returns the configured expiry.
func (s *Store) TTL() time.Duration { return s.ttl }

// Len is the number of entries.
func (s *Store) Len() int {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return len(s.byPeer)
}

// ByPeer finds the entry of a remote address and port.
func (s *Store) ByPeer(p netip.AddrPort) *Entry {
	s.mu.RLock()
	e := s.byPeer[p]
	s.mu.RUnlock()
	return e
}

// ByAddr finds the entry owning a tunnel address.
func (s *Store) ByAddr(a netip.Addr) *Entry {
	s.mu.RLock()
	e := s.byAddr[a]
	s.mu.RUnlock()
	return e
}

// BySession finds the entry owning a session receiver index.
func (s *Store) BySession(id uint32) *Entry {
	s.mu.RLock()
	e := s.byID[id]
	s.mu.RUnlock()
	return e
}

// Install makes ses the entry's current session; the one it replaces
// stays usable for receiving until the next rekey. The side answering a
// handshake (the server) passes awaitPeer: it keeps sealing under the
// replaced session until the peer uses the new one (Session, Confirm).
func (s *Store) Install(e *Entry, ses *seal.Session, awaitPeer bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byPeer[e.Peer] != e {
		return errors.New("peer expired during the handshake")
	}
	if o := s.byID[ses.RecvID()]; o != nil || ses.RecvID() == 0 {
		return ErrIndexTaken
	}
	if old := e.prev.Load(); old != nil {
		delete(s.byID, old.RecvID())
	}
	e.prev.Store(e.sess.Load())
	e.sess.Store(ses)
	e.awaiting.Store(awaitPeer)
	s.byID[ses.RecvID()] = e
	return nil
}

// Add records an authenticated peer and gives it a tunnel address of its
// own family (when the store has a pool for it). A peer already present
// keeps its entry and address; its timer restarts.
func (s *Store) Add(peer netip.AddrPort, now time.Time) (*Entry, error) {
	peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.byPeer[peer]; e != nil {
		e.Touch(now.UnixNano())
		return e, nil
	}
	if len(s.byPeer) >= s.max {
		return nil, ErrFull
	}
	e := &Entry{Peer: peer, Created: now}
	if len(s.pools) > 0 {
		var pl *pool
		for _, p := range s.pools {
			if p.prefix.Addr().Is4() == peer.Addr().Is4() {
				pl = p
			}
		}
		if pl == nil {
			return nil, errors.New("no tunnel address pool for the peer's address family")
		}
		a, ok := s.allocate(pl)
		if !ok {
			return nil, ErrFull
		}
		e.Addr = a
		s.byAddr[a] = e
	}
	e.Touch(now.UnixNano())
	s.byPeer[peer] = e
	return e, nil
}

// allocate finds the next free address after the pool's cursor. The pool
// never holds more than MaxPeers entries, so the scan ends quickly.
func (s *Store) allocate(p *pool) (netip.Addr, bool) {
	if uint64(p.used) >= p.size {
		return netip.Addr{}, false
	}
	a := p.cursor
	for range s.max + 3 {
		a = a.Next()
		if !a.IsValid() || !p.prefix.Contains(a) || isBroadcast(p.prefix, a) {
			a = p.prefix.Addr().Next()
		}
		if a == p.own {
			continue
		}
		if _, taken := s.byAddr[a]; !taken {
			p.cursor = a
			p.used++
			return a, true
		}
	}
	return netip.Addr{}, false
}

func isBroadcast(p netip.Prefix, a netip.Addr) bool {
	if !a.Is4() || p.Bits() >= 31 {
		return false
	}
	n := a.Next()
	return !n.IsValid() || !p.Contains(n)
}

// Remove forgets a peer.
func (s *Store) Remove(peer netip.AddrPort) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e := s.byPeer[peer]; e != nil {
		s.removeLocked(e)
	}
}

func (s *Store) removeLocked(e *Entry) {
	delete(s.byPeer, e.Peer)
	for _, ses := range []*seal.Session{e.sess.Load(), e.prev.Load()} {
		if ses != nil && s.byID[ses.RecvID()] == e {
			delete(s.byID, ses.RecvID())
		}
	}
	if e.Addr.IsValid() {
		delete(s.byAddr, e.Addr)
		for _, p := range s.pools {
			if p.prefix.Contains(e.Addr) {
				p.used--
			}
		}
	}
}

// Expire removes entries unused for longer than the TTL and returns them.
func (s *Store) Expire(now time.Time) []*Entry {
	limit := now.Add(-s.ttl).UnixNano()
	var gone []*Entry
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.byPeer {
		if e.lastUsed.Load() < limit {
			s.removeLocked(e)
			gone = append(gone, e)
		}
	}
	return gone
}

// Entries lists the entries (for periodic work such as keepalives).
func (s *Store) Entries() []*Entry {
	s.mu.RLock()
	out := make([]*Entry, 0, len(s.byPeer))
	for _, e := range s.byPeer {
		out = append(out, e)
	}
	s.mu.RUnlock()
	return out
}

// Idle is how long ago the entry last carried traffic either way.
func (e *Entry) Idle(now int64) time.Duration { return time.Duration(now - e.lastUsed.Load()) }

// Snapshot copies all entries, sorted by peer, for status output.
func (s *Store) Snapshot() []Info {
	s.mu.RLock()
	out := make([]Info, 0, len(s.byPeer))
	for _, e := range s.byPeer {
		i := Info{Peer: e.Peer.String(), Created: e.Created, LastUsed: e.LastUsed(),
			RxPackets: e.RxPackets.Load(), TxPackets: e.TxPackets.Load()}
		if e.Addr.IsValid() {
			i.Address = e.Addr.String()
		}
		if ep := e.Endpoint(); ep != e.Peer {
			i.Endpoint = ep.String()
		}
		if ses := e.sess.Load(); ses != nil {
			i.Cipher, i.Rekeyed, i.Sealed = ses.Cipher().String(), ses.Created, ses.Sent()
		}
		out = append(out, i)
	}
	s.mu.RUnlock()
	sort.Slice(out, func(a, b int) bool { return out[a].Peer < out[b].Peer })
	return out
}
