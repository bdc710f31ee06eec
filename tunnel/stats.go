package tunnel

import (
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"sort"
	"sync/atomic"
	"time"

	"github.com/sfunnel/sfunnel/tunnel/codec"
	"github.com/sfunnel/sfunnel/tunnel/seal"
	"github.com/sfunnel/sfunnel/tunnel/store"
)

// Stats are the daemon's counters, updated lock-free on the packet path.
type Stats struct {
	TunRx, TunTx, NetRx, NetTx atomic.Uint64
	Drops                      [codec.NumDrops]atomic.Uint64
	AuthOK, AuthFail           atomic.Uint64
	Connects                   atomic.Uint64
	Expired                    atomic.Uint64
	KeepaliveTx, KeepaliveRx   atomic.Uint64
	Roamed, Rekeys             atomic.Uint64
}

// dropSeal counts a sealed record that Open refused.
func (s *Stats) dropSeal(why seal.Reject) {
	switch why {
	case seal.Malformed:
		s.drop(codec.DropUnauth) // not a record of ours at all
	case seal.BadTag:
		s.drop(codec.DropBadTag)
	case seal.Replay:
		s.drop(codec.DropReplay)
	case seal.Old:
		s.drop(codec.DropTooOld)
	case seal.Stale:
		s.drop(codec.DropStale)
	}
}

func (s *Stats) drop(why codec.Drop) { s.Drops[why].Add(1) }

// Status is what `sfunnel tunnel status` prints.
type Status struct {
	Interface  string            `json:"interface"`
	Carry      string            `json:"carry"`
	Transport  string            `json:"transport"`
	Mode       string            `json:"mode"`
	Cipher     string            `json:"cipher,omitempty"` // with a key
	Keepalive  string            `json:"keepalive,omitempty"`
	Offload    string            `json:"offload"`
	ListenPort int               `json:"listen_port,omitempty"`
	Remote     string            `json:"remote,omitempty"`
	Started    time.Time         `json:"started"`
	Expiry     string            `json:"expiry"`
	Counters   map[string]uint64 `json:"counters"`
	Drops      map[string]uint64 `json:"drops"`
	Peers      []store.Info      `json:"peers"`
	Streams    []string          `json:"streams,omitempty"` // IP over TCP: connected streams
	// HeapAllocs is the number of heap objects the daemon has allocated
	// so far; it stays flat while packets flow.
	HeapAllocs uint64 `json:"heap_allocs"`
}

func heapAllocs() uint64 {
	// ReadMemStats stops the world briefly, but counts exactly.
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.Mallocs
}

func (s *Stats) counters() map[string]uint64 {
	return map[string]uint64{
		"tun_rx": s.TunRx.Load(), "tun_tx": s.TunTx.Load(),
		"net_rx": s.NetRx.Load(), "net_tx": s.NetTx.Load(),
		"auth_ok": s.AuthOK.Load(), "auth_fail": s.AuthFail.Load(),
		"connects": s.Connects.Load(), "expired": s.Expired.Load(),
		"keepalive_tx": s.KeepaliveTx.Load(), "keepalive_rx": s.KeepaliveRx.Load(),
		"roamed": s.Roamed.Load(), "rekeys": s.Rekeys.Load(),
	}
}

func (s *Stats) drops() map[string]uint64 {
	m := map[string]uint64{}
	for i := codec.Drop(1); i < codec.NumDrops; i++ {
		m[i.String()] = s.Drops[i].Load()
	}
	return m
}

func writeStatusText(w io.Writer, st *Status) {
	fmt.Fprintf(w, "interface %s  carry %s  transport %s  mode %s", st.Interface, st.Carry, st.Transport, st.Mode)
	if st.ListenPort != 0 {
		fmt.Fprintf(w, "  listen-port %d", st.ListenPort)
	}
	if st.Remote != "" {
		fmt.Fprintf(w, "  remote %s", st.Remote)
	}
	fmt.Fprintf(w, "\nup since %s  expiry %s  offload %s", st.Started.Format(time.RFC3339), st.Expiry, st.Offload)
	if st.Cipher != "" {
		fmt.Fprintf(w, "  cipher %s", st.Cipher)
	} else {
		fmt.Fprint(w, "  unsealed (no --key)")
	}
	if st.Keepalive != "" {
		fmt.Fprintf(w, "  keepalive %s", st.Keepalive)
	}
	fmt.Fprintln(w)
	printMap := func(title string, m map[string]uint64) {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		fmt.Fprintf(w, "%s:", title)
		for _, k := range keys {
			fmt.Fprintf(w, " %s %d", k, m[k])
		}
		fmt.Fprintln(w)
	}
	printMap("counters", st.Counters)
	printMap("drops", st.Drops)
	for _, s := range st.Streams {
		fmt.Fprintf(w, "stream: %s\n", s)
	}
	fmt.Fprintf(w, "peers: %d\n", len(st.Peers))
	for _, p := range st.Peers {
		addr := p.Address
		if addr == "" {
			addr = "-"
		}
		fmt.Fprintf(w, "  %-45s %-39s rx %d tx %d idle %s", p.Peer, addr, p.RxPackets, p.TxPackets,
			time.Since(p.LastUsed).Truncate(time.Second))
		if p.Endpoint != "" {
			fmt.Fprintf(w, " now at %s", p.Endpoint)
		}
		if !p.Rekeyed.IsZero() {
			fmt.Fprintf(w, " session %s old", time.Since(p.Rekeyed).Truncate(time.Second))
		}
		fmt.Fprintln(w)
	}
}

func encodeStatus(w io.Writer, st *Status) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(st)
}
