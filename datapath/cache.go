package datapath

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/gob"
	"sync"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Writers need the committed rules as syntax trees, and parsing ten
// thousand rules of canonical text takes seconds. So each generation also
// keeps a cache: the trees gob-encoded, keyed by a hash of the state
// record's rules and of this sfunnel binary's build id. The cache is never
// the format: a record written by another build, or any doubt, and the
// text is parsed instead.
//
// A commit that changes a few rules does not encode ten thousand trees
// again: the new generation links the previous generation's cache (the
// base, the same map) and writes a patch beside it — the rules not in the
// base, and every hook's rule order by handle. Patches accumulate until
// they hold many rules; then the cache is written whole again.
const (
	cacheBlob = "rules_cache"
	patchBlob = "rules_patch"
	// maxPatchRules: past this many rules outside the base, the cache is
	// written whole.
	maxPatchRules = 1024
)

// buildID identifies this binary (the Go build id note of its ELF file),
// so a cache written by another build of sfunnel is not trusted.
var buildID = sync.OnceValue(func() []byte {
	f, err := elf.Open("/proc/self/exe")
	if err != nil {
		return nil
	}
	defer f.Close()
	sec := f.Section(".note.go.buildid")
	if sec == nil {
		return nil
	}
	data, err := sec.Data()
	if err != nil || len(data) < 16 {
		return nil
	}
	return data
})

// cacheKey hashes what the cache must agree with: every set and rule of
// st (text and handle, in order) and the build id. Nil when this binary
// has no build id (no cache then).
func cacheKey(st *liveState) []byte {
	id := buildID()
	if id == nil {
		return nil
	}
	h := sha256.New()
	h.Write(id)
	var n [8]byte
	binary.LittleEndian.PutUint64(n[:], st.NextHandle)
	h.Write(n[:])
	for _, s := range st.Sets {
		h.Write([]byte(s.Text))
		h.Write([]byte{0})
	}
	for _, ifc := range st.Interfaces {
		h.Write([]byte(ifc.Name))
		for _, hk := range ifc.Hooks {
			h.Write([]byte{0, 1})
			h.Write([]byte(hk.Hook))
			for _, r := range hk.Rules {
				binary.LittleEndian.PutUint64(n[:], r.Handle)
				h.Write(n[:])
				h.Write([]byte(r.Text))
				h.Write([]byte{0})
			}
		}
	}
	return h.Sum(nil)
}

// cachePatch is a cache as a base plus changes.
type cachePatch struct {
	Base, Key  []byte // the base cache's key; the key the patched cache has
	Rules      []*grammar.Rule
	Sets       []*grammar.Set
	NextHandle uint64
	Hooks      []hookOrder
}

type hookOrder struct {
	Interface string
	Hook      grammar.Hook
	Handles   []uint64
}

// cacheBase is what a writer knows of the cache it read: the base's key
// and trees.
type cacheBase struct {
	key   []byte
	rules map[*grammar.Rule]bool
}

// writeCache stores rs, the trees of st's rules, in g (best effort): as a
// patch on cur's base when b read that base and few rules are new,
// else whole.
func (b *Backend) writeCache(cur, g *bpf.Gen, st *liveState, rs *ruleset.Ruleset) {
	key := cacheKey(st)
	if key == nil {
		return
	}
	base := b.cache
	b.cache = nil // the base of the next commit is what the next Load reads
	if base != nil && cur != nil {
		p := &cachePatch{Base: base.key, Key: key, Sets: rs.Sets, NextHandle: rs.NextHandle}
		for _, ifc := range rs.Interfaces {
			for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
				o := hookOrder{Interface: ifc.Name, Hook: h}
				for _, r := range ifc.Rules(h) {
					o.Handles = append(o.Handles, r.Handle)
					if !base.rules[r] {
						p.Rules = append(p.Rules, r)
					}
				}
				if len(o.Handles) > 0 {
					p.Hooks = append(p.Hooks, o)
				}
			}
		}
		if len(p.Rules) <= maxPatchRules {
			var buf bytes.Buffer
			if gob.NewEncoder(&buf).Encode(p) == nil && g.LinkBlob(cur, cacheBlob) == nil && g.WriteBlob(patchBlob, buf.Bytes()) == nil {
				return
			}
		}
	}
	var buf bytes.Buffer
	buf.Write(key)
	if err := gob.NewEncoder(&buf).Encode(rs); err != nil {
		return
	}
	g.WriteBlob(cacheBlob, buf.Bytes())
}

// readCache returns the trees of st's rules from g's cache, nil when there
// is no cache that matches. It notes the base for the next writeCache.
//
// pre, when not nil, is g's cache read and decoded meanwhile (prefetch).
func (b *Backend) readCache(g *bpf.Gen, st *liveState, pre <-chan *decodedCache) *ruleset.Ruleset {
	b.cache = nil
	key := cacheKey(st)
	if key == nil {
		return nil
	}
	var dc *decodedCache
	if pre != nil {
		if dc = <-pre; dc != nil && dc.gen != g.N {
			dc = nil // a commit was finished in between: read again
		}
	}
	if dc == nil {
		if dc = decodeCache(g); dc == nil {
			return nil
		}
	}
	data, rs := dc.key, dc.rs
	whole := bytes.Equal(data, key)
	p := dc.patch
	if !whole && (p == nil || !bytes.Equal(p.Key, key) || !bytes.Equal(p.Base, data)) {
		return nil
	}
	base := &cacheBase{key: data, rules: map[*grammar.Rule]bool{}}
	byHandle := map[uint64]*grammar.Rule{}
	for _, ifc := range rs.Interfaces {
		for _, r := range append(ifc.Ingress, ifc.Egress...) {
			base.rules[r] = true
			byHandle[r.Handle] = r
		}
	}
	b.cache = base
	if whole {
		return rs
	}
	for _, r := range p.Rules {
		byHandle[r.Handle] = r
	}
	out := &ruleset.Ruleset{Sets: p.Sets, NextHandle: p.NextHandle}
	for _, o := range p.Hooks {
		ifc := out.Interface(o.Interface)
		if ifc == nil {
			ifc = &ruleset.Interface{Name: o.Interface}
			out.Interfaces = append(out.Interfaces, ifc)
		}
		rules := make([]*grammar.Rule, len(o.Handles))
		for i, h := range o.Handles {
			if rules[i] = byHandle[h]; rules[i] == nil {
				b.cache = nil
				return nil
			}
		}
		if o.Hook == grammar.HookEgress {
			ifc.Egress = rules
		} else {
			ifc.Ingress = rules
		}
	}
	return out
}

// decodedCache is a generation's rules cache, decoded: the base's key and
// trees, and the patch on it if there is one.
type decodedCache struct {
	gen   uint64
	key   []byte
	rs    *ruleset.Ruleset
	patch *cachePatch
}

const cacheKeyLen = sha256.Size

// decodeCache reads and decodes g's cache (nil if it has none or it is
// corrupt); whether it matches the state record is readCache's call.
func decodeCache(g *bpf.Gen) *decodedCache {
	data, err := g.ReadBlob(cacheBlob)
	if err != nil || len(data) < cacheKeyLen {
		return nil
	}
	dc := &decodedCache{gen: g.N, key: data[:cacheKeyLen], rs: &ruleset.Ruleset{}}
	if err := gob.NewDecoder(bytes.NewReader(data[cacheKeyLen:])).Decode(dc.rs); err != nil {
		return nil
	}
	if pdata, err := g.ReadBlob(patchBlob); err == nil && pdata != nil {
		var p cachePatch
		if gob.NewDecoder(bytes.NewReader(pdata)).Decode(&p) == nil {
			dc.patch = &p
		}
	}
	return dc
}

// prefetchCache decodes the committed generation's cache in a goroutine,
// while the caller decodes the state record (two cores: about the time of
// the longer of the two instead of their sum).
func (b *Backend) prefetchCache() <-chan *decodedCache {
	s, err := b.existing()
	if err != nil || s == nil {
		return nil
	}
	g, err := s.Current()
	if err != nil || g == nil {
		return nil
	}
	out := make(chan *decodedCache, 1)
	go func() { out <- decodeCache(g) }()
	return out
}
