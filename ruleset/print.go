package ruleset

import (
	"encoding/json"
	"io"
	"net/netip"
	"strings"

	"github.com/sfunnel/sfunnel/grammar"
)

// Listing options.
type ListOptions struct {
	Handles  bool               // -a: append `# handle N`
	Counters map[uint64]Counter // values for `counter packets N bytes M`
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
	var b strings.Builder
	if only == nil {
		for _, s := range rs.Sets {
			b.WriteString(grammar.FormatSet(s, ""))
			b.WriteByte('\n')
		}
	}
	po := o.print()
	for _, i := range rs.Interfaces {
		if only != nil && only.Interface != i.Name {
			continue
		}
		var hooks strings.Builder
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			rules := i.Rules(h)
			if len(rules) == 0 || (only != nil && only.HasHook && only.Hook != h) {
				continue
			}
			hooks.WriteString("\t" + h.String() + " {\n")
			for _, r := range rules {
				hooks.WriteString("\t\t" + grammar.FormatRule(r, po) + "\n")
			}
			hooks.WriteString("\t}\n")
		}
		// An interface or hook without rules does not exist in the ruleset.
		if hooks.Len() > 0 {
			b.WriteString("interface " + i.Name + " {\n" + hooks.String() + "}\n")
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Selector picks one interface, optionally one hook.
type Selector struct {
	Interface string
	Hook      grammar.Hook
	HasHook   bool
}

// The JSON schema of `sfunnel -j list …` (documented in sfunnel.8):
//
//	{"sfunnel": {"version": 1,
//	  "sets": [{"name": N, "type": T, "elements": ["192.0.2.0/24", "80", "1000-2000"]}],
//	  "interfaces": [{"name": IF, "hooks": [{"hook": "ingress"|"egress",
//	    "rules": [{"handle": H, "rule": CANONICAL TEXT,
//	               "counter": {"packets": P, "bytes": B}, "comment": C}]}]}]}}
//
// "counter" is present when the rule has a counter, "comment" when it has
// one. "rule" is exactly what `list ruleset` prints for the rule, without
// the counter values.
type jsonDoc struct {
	Sfunnel jsonRuleset `json:"sfunnel"`
}

type jsonRuleset struct {
	Version    int             `json:"version"`
	Sets       []jsonSet       `json:"sets"`
	Interfaces []jsonInterface `json:"interfaces"`
}

type jsonSet struct {
	Name     string   `json:"name"`
	Type     string   `json:"type"`
	Elements []string `json:"elements"`
}

type jsonInterface struct {
	Name  string     `json:"name"`
	Hooks []jsonHook `json:"hooks"`
}

type jsonHook struct {
	Hook  string     `json:"hook"`
	Rules []jsonRule `json:"rules"`
}

type jsonRule struct {
	Handle  uint64       `json:"handle"`
	Rule    string       `json:"rule"`
	Counter *jsonCounter `json:"counter,omitempty"`
	Comment string       `json:"comment,omitempty"`
}

type jsonCounter struct {
	Packets uint64 `json:"packets"`
	Bytes   uint64 `json:"bytes"`
}

func setElements(s *grammar.Set) []string {
	out := []string{}
	for _, p := range s.Prefixes {
		out = append(out, grammar.FormatPrefixes([]netip.Prefix{p}))
	}
	for _, r := range s.Ports {
		out = append(out, grammar.FormatRanges([]grammar.PortRange{r}))
	}
	return out
}

// WriteJSON prints rs in the documented JSON schema.
func WriteJSON(w io.Writer, rs *Ruleset, only *Selector, sets []*grammar.Set, o *ListOptions) error {
	doc := jsonDoc{Sfunnel: jsonRuleset{Version: 1, Sets: []jsonSet{}, Interfaces: []jsonInterface{}}}
	for _, s := range sets {
		doc.Sfunnel.Sets = append(doc.Sfunnel.Sets, jsonSet{Name: s.Name, Type: s.Type.String(), Elements: setElements(s)})
	}
	for _, i := range rs.Interfaces {
		if only != nil && only.Interface != i.Name {
			continue
		}
		ji := jsonInterface{Name: i.Name, Hooks: []jsonHook{}}
		for _, h := range []grammar.Hook{grammar.HookIngress, grammar.HookEgress} {
			rules := i.Rules(h)
			if len(rules) == 0 || (only != nil && only.HasHook && only.Hook != h) {
				continue
			}
			jh := jsonHook{Hook: h.String(), Rules: []jsonRule{}}
			for _, r := range rules {
				jr := jsonRule{Handle: r.Handle, Rule: grammar.FormatRule(r, nil), Comment: r.Comment}
				if r.Counter {
					c := o.Counters[r.Handle]
					jr.Counter = &jsonCounter{Packets: c.Packets, Bytes: c.Bytes}
				}
				jh.Rules = append(jh.Rules, jr)
			}
			ji.Hooks = append(ji.Hooks, jh)
		}
		doc.Sfunnel.Interfaces = append(doc.Sfunnel.Interfaces, ji)
	}
	enc := json.NewEncoder(w)
	return enc.Encode(doc)
}
