// Package ctmark keeps sfunnel's nftables table, which turns packet marks
// into connection marks and back: the eBPF datapath can only see and set
// skb->mark, so `ct mark set V` at TC ingress marks the packet, this table
// saves the mark bits on the connection after conntrack, and restores them
// onto packets of the connection before TC egress, where `ct mark V` matches
// the packet mark. V is the connection mark itself (see Layout): what
// `conntrack -L` shows, restricted to MASK.
//
// The table is `table inet sfunnel` and nothing outside it is touched:
//
//	table inet sfunnel {
//		chain ct_save {     # after conntrack, before routing
//			type filter hook prerouting priority mangle
//			meta mark & FLAG != 0 ct mark set ct mark & ~MASK
//			meta mark & (FLAG|BIT) == FLAG|BIT ct mark set ct mark | BIT   # for every BIT of MASK
//			meta mark & FLAG != 0 meta mark set meta mark & ~FLAG
//		}
//		chain ct_restore {  # last netfilter hook before TC egress
//			type filter hook postrouting priority mangle
//			ct mark & MASK != 0 meta mark set meta mark & ~MASK
//			ct mark & BIT != 0 meta mark set meta mark | BIT
//		}
//	}
//
// Only MASK bits are copied (nftables cannot OR two registers, hence one
// rule per bit). Saving happens only for packets whose FLAG bit says a
// `ct mark set` ran, so other packets of the connection leave the saved
// value alone while `ct mark set 0` clears it.
package ctmark

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// DefaultName is the table sfunnel owns.
const DefaultName = "sfunnel"

// Table is sfunnel's connmark table in the current network namespace.
type Table struct {
	// Name of the inet table ("" = DefaultName).
	Name string
	// Mask is the mark bits that are saved and restored; must not be 0.
	Mask uint32
}

func (t *Table) table() *nftables.Table {
	name := t.Name
	if name == "" {
		name = DefaultName
	}
	return &nftables.Table{Name: name, Family: nftables.TableFamilyINet}
}

func conn() (*nftables.Conn, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

// Exists reports whether the table is there.
func (t *Table) Exists() (bool, error) {
	c, err := conn()
	if err != nil {
		return false, err
	}
	_, err = c.ListTableOfFamily(t.table().Name, nftables.TableFamilyINet)
	if err == nil {
		return true, nil
	}
	if errors.Is(err, unix.ENOENT) || errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	return false, nftError("list nftables table", err)
}

// Ensure creates the table, or replaces it (one nftables transaction) so it
// holds exactly the rules for Mask.
func (t *Table) Ensure() error {
	l, err := NewLayout(t.Mask)
	if err != nil {
		return err
	}
	exists, err := t.Exists()
	if err != nil {
		return err
	}
	c, err := conn()
	if err != nil {
		return err
	}
	tbl := t.table()
	if exists {
		c.DelTable(tbl)
	}
	tbl = c.AddTable(tbl)
	save := c.AddChain(&nftables.Chain{
		Name: "ct_save", Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle,
	})
	restore := c.AddChain(&nftables.Chain{
		Name: "ct_restore", Table: tbl, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityMangle,
	})
	for _, r := range saveRules(l) {
		c.AddRule(&nftables.Rule{Table: tbl, Chain: save, Exprs: r})
	}
	for _, r := range restoreRules(l.Mask) {
		c.AddRule(&nftables.Rule{Table: tbl, Chain: restore, Exprs: r})
	}
	if err := c.Flush(); err != nil {
		return nftError("create nftables table "+tbl.Name, err)
	}
	return nil
}

// Remove deletes the table if it is there.
func (t *Table) Remove() error {
	exists, err := t.Exists()
	if err != nil || !exists {
		return err
	}
	c, err := conn()
	if err != nil {
		return err
	}
	c.DelTable(t.table())
	if err := c.Flush(); err != nil {
		return nftError("delete nftables table", err)
	}
	return nil
}

func nftError(what string, err error) error {
	if errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%s: %w (needs CAP_NET_ADMIN)", what, os.ErrPermission)
	}
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPROTONOSUPPORT) {
		return fmt.Errorf("%s (nftables or conntrack marks missing from the kernel): %w", what, err)
	}
	return fmt.Errorf("%s: %w", what, err)
}

// Register 1, the 32-bit NFT_REG32_00.
const reg = 1

func metaLoad() expr.Any { return &expr.Meta{Key: expr.MetaKeyMARK, Register: reg} }
func metaStore() expr.Any {
	return &expr.Meta{Key: expr.MetaKeyMARK, Register: reg, SourceRegister: true}
}
func ctLoad() expr.Any  { return &expr.Ct{Key: expr.CtKeyMARK, Register: reg} }
func ctStore() expr.Any { return &expr.Ct{Key: expr.CtKeyMARK, Register: reg, SourceRegister: true} }

func le(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

// and sets reg = reg & m (xor 0); or sets the bits of m: (reg & ^m) ^ m.
func and(m uint32) expr.Any {
	return &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: le(m), Xor: le(0)}
}
func or(m uint32) expr.Any {
	return &expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4, Mask: le(^m), Xor: le(m)}
}

// test loads src, keeps the bits of m and compares them with want.
func test(src func() expr.Any, m uint32, op expr.CmpOp, want uint32) []expr.Any {
	return []expr.Any{src(), and(m), &expr.Cmp{Op: op, Register: reg, Data: le(want)}}
}

// saveRules copy the Mask bits of flagged packets onto the connection,
// then drop the flag.
func saveRules(l Layout) [][]expr.Any {
	rules := [][]expr.Any{append(test(metaLoad, l.Flag, expr.CmpOpNeq, 0), ctLoad(), and(^l.Mask), ctStore())}
	for m := l.Mask; m != 0; m &= m - 1 {
		bit := uint32(1) << bits.TrailingZeros32(m)
		rules = append(rules, append(test(metaLoad, l.Flag|bit, expr.CmpOpEq, l.Flag|bit), ctLoad(), or(bit), ctStore()))
	}
	return append(rules, append(test(metaLoad, l.Flag, expr.CmpOpNeq, 0), metaLoad(), and(^l.Flag), metaStore()))
}

// restoreRules copy the mask bits of a marked connection onto its packets.
func restoreRules(mask uint32) [][]expr.Any {
	rules := [][]expr.Any{append(test(ctLoad, mask, expr.CmpOpNeq, 0), metaLoad(), and(^mask), metaStore())}
	for m := mask; m != 0; m &= m - 1 {
		bit := uint32(1) << bits.TrailingZeros32(m)
		rules = append(rules, append(test(ctLoad, bit, expr.CmpOpNeq, 0), metaLoad(), or(bit), metaStore()))
	}
	return rules
}

// Check describes what is wrong with the table in the current namespace
// ("" when it is there with both chains): something outside sfunnel, such
// as `nft flush ruleset`, may have removed it.
func (t *Table) Check() (string, error) {
	exists, err := t.Exists()
	if err != nil {
		return "", err
	}
	tbl := t.table()
	if !exists {
		return fmt.Sprintf("nftables table inet %s is missing (nft flush ruleset?)", tbl.Name), nil
	}
	c, err := conn()
	if err != nil {
		return "", err
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return "", nftError("list nftables chains", err)
	}
	have := map[string]bool{}
	for _, ch := range chains {
		if ch.Table.Name == tbl.Name {
			have[ch.Name] = true
		}
	}
	for _, name := range []string{"ct_save", "ct_restore"} {
		if !have[name] {
			return fmt.Sprintf("nftables table inet %s lacks chain %s", tbl.Name, name), nil
		}
	}
	return "", nil
}
