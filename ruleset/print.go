package ruleset

import (
	"io"
	"os"
	"strings"

	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/nftjson"
)

// Listing options.
type ListOptions struct {
	Handles  bool               // -a: append `# handle N`
	Counters map[uint64]Counter // values for `counter packets N bytes M`
	Version  string             // sfunnel's version, for JSON metainfo
	// LeftAlone: by handle and reason, the packets a rule matched but left
	// untouched (printed as a comment after the rule; "left_alone" in JSON).
	LeftAlone map[uint64]map[string]uint64
}

func (o *ListOptions) print() *grammar.PrintOptions {
	p := &grammar.PrintOptions{Handles: o.Handles}
	if o.Counters != nil {
		p.Counter = func(h uint64) (uint64, uint64, bool) {
			c, ok := o.Counters[h]
			return c.Packets, c.Bytes, ok
		}
	}
	return p
}

// WriteText prints rs (or one interface/hook of it) in canonical form; the
// output is valid input to `sfunnel -f` and lists back byte-identically.
func WriteText(w io.Writer, rs *Ruleset, only *Selector, o *ListOptions) error {
	return WriteListing(w, ListingOf(rs), only, o)
}

// Selector picks one interface, optionally one hook.
type Selector struct {
	Interface string
	Hook      grammar.Hook
	HasHook   bool
}

// WriteJSON prints rs (or one interface/hook, or only sets) as a
// libnftables-json shaped document (package nftjson).
func WriteJSON(w io.Writer, rs *Ruleset, only *Selector, sets []*grammar.Set, o *ListOptions) error {
	data, err := nftjson.Marshal(nftjson.Encode(jsonListing(rs, only, sets, o)))
	if err != nil {
		return err
	}
	_, err = w.Write(data)
	return err
}

func jsonListing(rs *Ruleset, only *Selector, sets []*grammar.Set, o *ListOptions) *nftjson.Listing {
	l := &nftjson.Listing{Version: o.Version, Sets: sets}
	if o.LeftAlone != nil {
		l.LeftAlone = func(h uint64) map[string]uint64 { return o.LeftAlone[h] }
	}
	if o.Counters != nil {
		l.Counter = func(h uint64) (uint64, uint64) {
			c := o.Counters[h]
			return c.Packets, c.Bytes
		}
	}
	for _, i := range rs.Interfaces {
		if only != nil && only.Interface != i.Name {
			continue
		}
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			rules := i.Rules(h)
			if len(rules) == 0 || (only != nil && only.HasHook && only.Hook != h) {
				continue
			}
			l.Hooks = append(l.Hooks, nftjson.Hook{Interface: i.Name, Hook: h, Rules: rules})
		}
	}
	return l
}

// auditJSON is a test hook: with SFUNNEL_JSON_AUDIT=DIR, every listing is
// also written to DIR as JSON (listing-*.json), with the sets of the whole
// ruleset beside it (listing-*.sets.json, for @set references in a
// listing of one interface), so a test can check that every listing the
// tests produce validates against the schema and reads back.
func auditJSON(rs *Ruleset, only *Selector, sets []*grammar.Set, o *ListOptions) {
	dir := os.Getenv("SFUNNEL_JSON_AUDIT")
	if dir == "" {
		return
	}
	f, err := os.CreateTemp(dir, "listing-*.json")
	if err != nil {
		return
	}
	defer f.Close()
	WriteJSON(f, rs, only, sets, o)
	ctx, _ := nftjson.Marshal(nftjson.Encode(&nftjson.Listing{Version: o.Version, Sets: rs.Sets}))
	os.WriteFile(strings.TrimSuffix(f.Name(), ".json")+".sets.json", ctx, 0o644)
}
