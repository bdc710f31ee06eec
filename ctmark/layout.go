package ctmark

import (
	"fmt"
	"math/bits"

	"github.com/sfunnel/sfunnel/abi"
	"github.com/sfunnel/sfunnel/grammar"
)

// DefaultMask is the connection mark bits sfunnel uses unless told
// otherwise (--ct-mark-mask). It leaves out kube-proxy's 0x4000 (masquerade)
// and 0x8000 (drop) bits and the low byte that many setups use for routing
// marks.
const DefaultMask = abi.DefaultCtMarkMask

// Layout is how `ct mark` values ride in the packet mark between TC and the
// nftables table. A value V is the connection mark as `conntrack -L` shows
// it (restricted to Mask): `ct mark set V` writes V into the Mask bits of
// skb->mark and sets Flag, which tells the table to copy the Mask bits onto
// the connection, zeros included, so `ct mark set 0` clears them.
type Layout struct {
	Mask uint32 // connection mark bits sfunnel reads and writes
	Flag uint32 // one packet mark bit outside Mask: "sfunnel set the ct mark"
}

// CheckMask reports whether mask can carry ct mark values: any non-zero
// mask that leaves a bit free for Flag. The error says why not.
func CheckMask(mask uint32) error {
	switch mask {
	case 0:
		return fmt.Errorf("ct mark mask is 0: it must have at least one bit")
	case 0xffffffff:
		return fmt.Errorf("ct mark mask 0xffffffff leaves no packet mark bit for sfunnel's \"ct mark set\" flag")
	}
	return nil
}

// NewLayout returns the layout for mask (0 = DefaultMask). The flag bit is
// the bit just above the mask's highest bit, or, for a mask that reaches
// bit 31, the highest bit below it that the mask leaves free.
func NewLayout(mask uint32) (Layout, error) {
	if mask == 0 {
		mask = DefaultMask
	}
	if err := CheckMask(mask); err != nil {
		return Layout{}, err
	}
	top := 31 - bits.LeadingZeros32(mask)
	if top < 31 {
		return Layout{Mask: mask, Flag: 1 << (top + 1)}, nil
	}
	free := ^mask
	return Layout{Mask: mask, Flag: 1 << (31 - bits.LeadingZeros32(free))}, nil
}

// MatchBits returns the skb->mark mask and value that `ct mark V[/M]`
// tests. Without /M the rule compares all of Mask (bits outside it are not
// carried, so they can't be tested).
func (l Layout) MatchBits(m *grammar.MarkMatch) (mask, value uint32, err error) {
	mm := l.Mask
	if m.HasMask {
		if m.Mask&^l.Mask != 0 {
			return 0, 0, fmt.Errorf("ct mark mask 0x%x has bits outside the ct mark mask 0x%08x (--ct-mark-mask): sfunnel sees only those bits of the connection mark", m.Mask, l.Mask)
		}
		mm = m.Mask
	}
	if m.Value&^mm != 0 {
		return 0, 0, fmt.Errorf("ct mark 0x%x has bits outside the ct mark mask 0x%08x (--ct-mark-mask): sfunnel sees only those bits of the connection mark", m.Value, l.Mask)
	}
	return mm, m.Value, nil
}

// SetBits returns the skb->mark mask and value that `ct mark set V`
// writes: V in the Mask bits plus the Flag. A /M must be the whole Mask:
// the table copies all of it onto the connection at once.
func (l Layout) SetBits(s *grammar.MarkSet) (mask, value uint32, err error) {
	if s.HasMask && s.Mask != l.Mask {
		return 0, 0, fmt.Errorf("ct mark set writes all the bits of the ct mark mask 0x%08x (--ct-mark-mask) at once: /0x%x is not that mask", l.Mask, s.Mask)
	}
	if s.Value&^l.Mask != 0 {
		return 0, 0, fmt.Errorf("ct mark set 0x%x has bits outside the ct mark mask 0x%08x (--ct-mark-mask): only those bits of the connection mark are sfunnel's", s.Value, l.Mask)
	}
	return l.Mask | l.Flag, s.Value | l.Flag, nil
}
