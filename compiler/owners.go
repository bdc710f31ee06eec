package compiler

import "encoding/binary"

// keyOwners records which rule holds each key of each shape of a segment
// (classifyWith): the first rule with the key gets its entry; a later one
// is dropped when the holder ends evaluation, and starts a new segment
// when it doesn't. Shapes are named by their index in the segment.
//
// The keys are found without building strings: a 101-port range is 101
// keys, and a map keyed by shape and key string was most of the
// classifier's time on bench/control's mixed hook. The ports of a
// port-only shape (an ARRAY) are two bitmaps; other keys of at most 16
// bytes are two words.
//
// One keyOwners serves every segment of a pass (reset): a hook cut into
// thousands of segments (rules that don't end evaluation between others)
// would otherwise allocate a bitmap per segment.
type keyOwners struct {
	ports []*portOwners // by shape: its ports when it keys on one port only
	words map[wordKey]bool
	long  map[longKey]bool
	spare []*portOwners // cleared, for the next segment's shapes
}

// The value of a key in words and long: held by a rule that doesn't end
// evaluation.

type wordKey struct {
	sh   int32
	n    uint8
	a, b uint64
}

type longKey struct {
	sh int32
	k  string
}

// portOwners are the ports a port-only shape holds, and of those the
// ones held by rules that don't end evaluation.
type portOwners struct {
	held, open [65536 / 64]uint64
	used       []uint16 // the words of held that are not 0
}

func newKeyOwners() *keyOwners {
	return &keyOwners{words: map[wordKey]bool{}, long: map[longKey]bool{}}
}

// reset forgets every shape and key, for the next segment.
func (o *keyOwners) reset() {
	for _, p := range o.ports {
		if p != nil {
			for _, w := range p.used {
				p.held[w], p.open[w] = 0, 0
			}
			p.used = p.used[:0]
			o.spare = append(o.spare, p)
		}
	}
	o.ports = o.ports[:0]
	// (Clearing a map costs its size: a large one is dropped instead.)
	if len(o.words) > 256 {
		o.words = map[wordKey]bool{}
	} else {
		clear(o.words)
	}
	if len(o.long) > 256 {
		o.long = map[longKey]bool{}
	} else {
		clear(o.long)
	}
}

// addShape registers the segment's next shape (index len(o.ports)).
func (o *keyOwners) addShape(sh *shape) {
	var p *portOwners
	if sh.portOnly() {
		if n := len(o.spare); n > 0 {
			p, o.spare = o.spare[n-1], o.spare[:n-1]
		} else {
			p = &portOwners{}
		}
	}
	o.ports = append(o.ports, p)
}

// open reports whether key k of shape sh is held by a rule that doesn't
// end evaluation.
func (o *keyOwners) open(sh int32, k []byte) bool {
	if p := o.ports[sh]; p != nil {
		port := binary.NativeEndian.Uint32(k)
		return p.open[port/64]&(1<<(port%64)) != 0
	}
	if len(k) <= 16 {
		return o.words[wordOf(sh, k)]
	}
	return o.long[longKey{sh, string(k)}] // no string is made for a lookup
}

// claim gives key k of shape sh to a rule (open: it doesn't end
// evaluation) and reports whether the key was free.
func (o *keyOwners) claim(sh int32, k []byte, open bool) bool {
	if p := o.ports[sh]; p != nil {
		port := binary.NativeEndian.Uint32(k)
		w, bit := port/64, uint64(1)<<(port%64)
		if p.held[w]&bit != 0 {
			return false
		}
		if p.held[w] == 0 {
			p.used = append(p.used, uint16(w))
		}
		p.held[w] |= bit
		if open {
			p.open[w] |= bit
		}
		return true
	}
	if len(k) <= 16 {
		wk := wordOf(sh, k)
		if _, dup := o.words[wk]; dup {
			return false
		}
		o.words[wk] = open
		return true
	}
	if _, dup := o.long[longKey{sh, string(k)}]; dup {
		return false
	}
	o.long[longKey{sh, string(k)}] = open
	return true
}

func wordOf(sh int32, k []byte) wordKey {
	var w [16]byte
	copy(w[:], k)
	return wordKey{sh: sh, n: uint8(len(k)), a: binary.NativeEndian.Uint64(w[:8]), b: binary.NativeEndian.Uint64(w[8:])}
}
