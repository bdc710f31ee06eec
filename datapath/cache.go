package datapath

import (
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/binary"
	"encoding/gob"
	"sync"

	"github.com/sfunnel/sfunnel/bpf"
	"github.com/sfunnel/sfunnel/ruleset"
)

// Writers need the committed rules as syntax trees, and parsing ten
// thousand rules of canonical text takes seconds. So each generation also
// keeps a cache: the trees gob-encoded, keyed by a hash of the state
// record's rules and of this sfunnel binary's build id. The cache is never
// the format: a record written by another build, or any doubt, and the
// text is parsed instead.
const cacheBlob = "rules_cache"

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

// writeCache stores rs, the trees of st's rules, in g (best effort).
func writeCache(g *bpf.Gen, st *liveState, rs *ruleset.Ruleset) {
	key := cacheKey(st)
	if key == nil {
		return
	}
	var b bytes.Buffer
	b.Write(key)
	if err := gob.NewEncoder(&b).Encode(rs); err != nil {
		return
	}
	g.WriteBlob(cacheBlob, b.Bytes())
}

// readCache returns the trees of st's rules from g's cache, nil when there
// is no cache that matches.
func readCache(g *bpf.Gen, st *liveState) *ruleset.Ruleset {
	key := cacheKey(st)
	if key == nil {
		return nil
	}
	data, err := g.ReadBlob(cacheBlob)
	if err != nil || len(data) < len(key) || !bytes.Equal(data[:len(key)], key) {
		return nil
	}
	var rs ruleset.Ruleset
	if err := gob.NewDecoder(bytes.NewReader(data[len(key):])).Decode(&rs); err != nil {
		return nil
	}
	return &rs
}
