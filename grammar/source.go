package grammar

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"syscall"
	"unicode/utf8"
)

// MaxSourceBytes bounds what one file, include or stdin may hold. A
// ruleset of 100 000 rules is about 8 MB; reading without a bound would let
// `include "/dev/zero"` fill memory while holding the ruleset lock.
const MaxSourceBytes = 64 << 20

// ErrNotRegular is returned for a path that is a device, FIFO or socket.
var ErrNotRegular = errors.New("not a regular file")

// ReadSource reads a ruleset file: only regular files, at most
// MaxSourceBytes. A FIFO or device would block or never end.
func ReadSource(path string) ([]byte, error) {
	// O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
	// writer before the mode can be checked. Regular files ignore it.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: %w (a %s cannot hold a ruleset)", path, ErrNotRegular, fileKind(st.Mode()))
	}
	if st.Size() > MaxSourceBytes {
		return nil, fmt.Errorf("%s: %d bytes is more than the %d a ruleset file may have", path, st.Size(), MaxSourceBytes)
	}
	return ReadBounded(f, path)
}

// ReadBounded reads r (stdin) up to MaxSourceBytes.
func ReadBounded(r io.Reader, name string) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, MaxSourceBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > MaxSourceBytes {
		return nil, fmt.Errorf("%s: more than the %d bytes a ruleset may have", name, MaxSourceBytes)
	}
	return data, nil
}

func fileKind(m os.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m&os.ModeNamedPipe != 0:
		return "FIFO"
	case m&os.ModeSocket != 0:
		return "socket"
	case m&os.ModeCharDevice != 0:
		return "character device"
	case m&os.ModeDevice != 0:
		return "block device"
	}
	return "special file"
}

const utf8BOM = "\uFEFF"

// checkText drops a leading UTF-8 byte order mark (editors on other
// systems write one) and refuses text that is not UTF-8, pointing at the
// first bad byte: decoding it as U+FFFD would silently change comments and
// strings, and guessing Latin-1 could be wrong for other encodings.
func checkText(filename, src string) (string, *Error) {
	src = strings.TrimPrefix(src, utf8BOM)
	if utf8.ValidString(src) {
		return src, nil
	}
	line, col := 1, 1
	for i := 0; i < len(src); {
		r, n := utf8.DecodeRuneInString(src[i:])
		if r == utf8.RuneError && n <= 1 {
			p := Pos{Filename: filename, Offset: i, Line: line, Column: col}
			end := p
			end.Offset++
			end.Column++
			return src, &Error{Span: Span{Pos: p, End: end},
				Msg: fmt.Sprintf("invalid UTF-8 byte 0x%02x: rule text must be UTF-8 (convert a Latin-1 file with iconv -f latin1 -t utf-8)", src[i])}
		}
		if r == '\n' {
			line, col = line+1, 1
		} else {
			col += n
		}
		i += n
	}
	return src, nil
}
