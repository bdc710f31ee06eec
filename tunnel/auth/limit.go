package auth

import (
	"net/netip"
	"sync"
	"time"
)

// Limiter slows down sources that fail to authenticate and keeps the log
// readable: a source with MaxFailures failures within Window is refused
// without a handshake until the window has passed, and log lines go out at
// most once per LogEvery (the ones suppressed in between are counted).
type Limiter struct {
	MaxFailures int
	Window      time.Duration
	LogEvery    time.Duration

	mu         sync.Mutex
	fails      map[netip.Addr]*failure
	lastLog    time.Time
	suppressed int
	total      uint64
}

type failure struct {
	n     int
	first time.Time
}

// maxTracked bounds the failure table; beyond it the table starts afresh,
// so a spoofing flood cannot grow memory.
const maxTracked = 4096

// NewLimiter returns a limiter with the defaults: 5 failures a minute, one
// log line per second.
func NewLimiter() *Limiter {
	return &Limiter{MaxFailures: 5, Window: time.Minute, LogEvery: time.Second}
}

// Blocked reports whether a source is currently refused.
func (l *Limiter) Blocked(a netip.Addr, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	f := l.fails[a]
	if f == nil {
		return false
	}
	if now.Sub(f.first) > l.Window {
		delete(l.fails, a)
		return false
	}
	return f.n >= l.MaxFailures
}

// Fail records a failure and returns whether to log it and how many
// earlier lines were suppressed.
func (l *Limiter) Fail(a netip.Addr, now time.Time) (log bool, suppressed int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total++
	if l.fails == nil || len(l.fails) >= maxTracked {
		l.fails = make(map[netip.Addr]*failure)
	}
	f := l.fails[a]
	if f == nil || now.Sub(f.first) > l.Window {
		f = &failure{first: now}
		l.fails[a] = f
	}
	f.n++
	if now.Sub(l.lastLog) < l.LogEvery {
		l.suppressed++
		return false, 0
	}
	l.lastLog = now
	s := l.suppressed
	l.suppressed = 0
	return true, s
}

// Failures is the number of failed handshakes so far.
func (l *Limiter) Failures() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.total
}
