package codec

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// FrameHeaderLen is the 2-byte big-endian length in front of every packet
// carried over a TCP stream.
const FrameHeaderLen = 2

// ErrBadFrame means the peer announced an empty frame or one larger than the MTU allows;
// the stream cannot be resynchronised and must be closed.
var ErrBadFrame = errors.New("frame length out of range")

// PutFrameHeader writes the length of a packet of n bytes into b[0:2].
func PutFrameHeader(b []byte, n int) { binary.BigEndian.PutUint16(b, uint16(n)) }

// FrameReader splits a byte stream into length-prefixed frames, reading as
// much as the socket has in one call and returning frames in place.
type FrameReader struct {
	r        io.Reader
	buf      []byte
	start    int
	end      int
	maxFrame int
}

// NewFrameReader reads frames of at most maxFrame bytes from r.
func NewFrameReader(r io.Reader, maxFrame int) *FrameReader {
	size := 4 * (maxFrame + FrameHeaderLen)
	if size < 256<<10 {
		size = 256 << 10
	}
	return &FrameReader{r: r, buf: make([]byte, size), maxFrame: maxFrame}
}

// Next returns the next frame's payload, valid until the following call.
// A zero-length frame or one above the limit is an error.
func (f *FrameReader) Next() ([]byte, error) {
	for {
		if avail := f.end - f.start; avail >= FrameHeaderLen {
			n := int(binary.BigEndian.Uint16(f.buf[f.start:]))
			if n == 0 || n > f.maxFrame {
				return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrBadFrame, n, f.maxFrame)
			}
			if avail >= FrameHeaderLen+n {
				p := f.buf[f.start+FrameHeaderLen : f.start+FrameHeaderLen+n]
				f.start += FrameHeaderLen + n
				return p, nil
			}
		}
		// Move the partial frame to the front when the tail is too short
		// for a maximal one, then read more.
		if len(f.buf)-f.start < FrameHeaderLen+f.maxFrame {
			f.end = copy(f.buf, f.buf[f.start:f.end])
			f.start = 0
		}
		m, err := f.r.Read(f.buf[f.end:])
		f.end += m
		if m > 0 {
			continue
		}
		if err == nil {
			err = io.ErrNoProgress
		}
		return nil, err
	}
}

// Buffered reports whether a complete frame is already buffered, so callers
// can batch writes to the TUN before blocking on the socket again.
func (f *FrameReader) Buffered() bool {
	avail := f.end - f.start
	if avail < FrameHeaderLen {
		return false
	}
	return avail >= FrameHeaderLen+int(binary.BigEndian.Uint16(f.buf[f.start:]))
}
