package seal

// WindowBits is how far behind the newest packet a packet may arrive and
// still be accepted (less one word, as in WireGuard's and RFC 6479's
// scheme: the word holding the newest counter is partly in the future).
const WindowBits = 2048

const (
	windowWords = WindowBits / 64
	// WindowSize is the largest distance from the newest counter that is
	// still judged by the bitmap; anything older is too old.
	WindowSize = WindowBits - 64
)

// Window is a sliding replay window over packet counters: a ring of
// 64-bit words, cleared word by word as the newest counter moves on.
// It is not safe for concurrent use; Opener serialises access.
type Window struct {
	last uint64 // newest counter seen
	bits [windowWords]uint64
}

// Verdict of the window about a counter.
type Verdict uint8

const (
	Fresh    Verdict = iota // never seen, inside the window or ahead of it
	Replayed                // seen already
	TooOld                  // behind the window: cannot tell, refused
)

// Check judges counter without recording it (before the packet has
// been authenticated, nothing may change).
func (w *Window) Check(counter uint64) Verdict {
	if counter > w.last {
		return Fresh
	}
	if w.last-counter > WindowSize {
		return TooOld
	}
	if w.bits[(counter>>6)%windowWords]&(1<<(counter&63)) != 0 {
		return Replayed
	}
	return Fresh
}

// Accept records counter once its packet authenticated. It reports
// whether the counter advanced the window (the packet is the newest).
func (w *Window) Accept(counter uint64) (newest bool) {
	block := counter >> 6
	if counter > w.last {
		cur := w.last >> 6
		diff := min(block-cur, windowWords)
		for i := uint64(1); i <= diff; i++ {
			w.bits[(cur+i)%windowWords] = 0
		}
		w.last = counter
		newest = true
	}
	w.bits[block%windowWords] |= 1 << (counter & 63)
	return newest
}
