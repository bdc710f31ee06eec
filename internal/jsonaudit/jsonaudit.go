// Package jsonaudit checks sfunnel's JSON documents for tests: each one
// validates against nftjson.Schema and reads back (nftjson.Parse) to the
// same document. It is imported by tests only, so the validator library
// stays out of the sfunnel binary.
package jsonaudit

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"sync"

	"github.com/santhosh-tekuri/jsonschema/v5"

	"github.com/sfunnel/sfunnel/grammar"
	"github.com/sfunnel/sfunnel/nftjson"
)

var (
	schemaOnce sync.Once
	schema     *jsonschema.Schema
	schemaErr  error
)

// Validate checks doc against nftjson.Schema.
func Validate(doc []byte) error {
	schemaOnce.Do(func() {
		c := jsonschema.NewCompiler()
		c.Draft = jsonschema.Draft2020
		if schemaErr = c.AddResource("schema.json", bytes.NewReader(nftjson.Schema)); schemaErr == nil {
			schema, schemaErr = c.Compile("schema.json")
		}
	})
	if schemaErr != nil {
		return fmt.Errorf("compile schema: %w", schemaErr)
	}
	var v any
	if err := json.Unmarshal(doc, &v); err != nil {
		return err
	}
	return schema.Validate(v)
}

// RoundTrip reads doc back with nftjson.Parse and checks that listing the
// result gives doc again (handles and counter values aside: a read-back
// ruleset has its own). setsDoc, if not nil, declares the sets that rules
// of doc may reference without doc listing them.
func RoundTrip(doc, setsDoc []byte) error {
	lookup := map[string]grammar.SetType{}
	if setsDoc != nil {
		cmds, _, err := nftjson.Parse("sets.json", setsDoc, nil)
		if err != nil {
			return fmt.Errorf("sets: %v", err)
		}
		for _, c := range cmds {
			if c.Kind == grammar.CmdDefineSet {
				lookup[c.Set.Name] = c.Set.Type
			}
		}
	}
	cmds, srcs, err := nftjson.Parse("listing.json", doc, &grammar.Options{LookupSet: func(n string) (grammar.SetType, bool) {
		t, ok := lookup[n]
		return t, ok
	}})
	if err != nil {
		return fmt.Errorf("read back: %s", grammar.FormatError(err, srcs))
	}
	var meta struct {
		Nftables []map[string]struct {
			Version string `json:"version"`
		} `json:"nftables"`
	}
	json.Unmarshal(doc, &meta)
	version := ""
	if len(meta.Nftables) > 0 {
		version = meta.Nftables[0]["metainfo"].Version
	}
	again, err := nftjson.Marshal(nftjson.FromCommands(version, cmds))
	if err != nil {
		return err
	}
	a, b := normalize(doc), normalize(again)
	if !reflect.DeepEqual(a, b) {
		ja, _ := json.Marshal(a)
		jb, _ := json.Marshal(b)
		return fmt.Errorf("read back differs:\n listed: %s\n reread: %s", ja, jb)
	}
	return nil
}

// normalize drops handles and zeroes counter values.
func normalize(doc []byte) any {
	var v any
	json.Unmarshal(doc, &v)
	var walk func(any)
	walk = func(x any) {
		switch t := x.(type) {
		case map[string]any:
			delete(t, "handle")
			delete(t, "left_alone")
			if c, ok := t["counter"].(map[string]any); ok {
				c["packets"], c["bytes"] = 0.0, 0.0
			}
			for _, y := range t {
				walk(y)
			}
		case []any:
			for _, y := range t {
				walk(y)
			}
		}
	}
	walk(v)
	return v
}

// CheckDir validates and round-trips every listing-*.json in dir (written
// by sfunnel under SFUNNEL_JSON_AUDIT=dir); it returns how many it checked
// and one error per bad listing.
func CheckDir(dir string) (int, []error) {
	files, _ := filepath.Glob(filepath.Join(dir, "listing-*.json"))
	sort.Strings(files)
	n := 0
	var errs []error
	for _, f := range files {
		if strings.HasSuffix(f, ".sets.json") {
			continue
		}
		n++
		doc, err := os.ReadFile(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		sets, _ := os.ReadFile(strings.TrimSuffix(f, ".json") + ".sets.json")
		if err := Validate(doc); err != nil {
			errs = append(errs, fmt.Errorf("%s does not validate: %v\n%s", filepath.Base(f), err, doc))
			continue
		}
		if err := RoundTrip(doc, sets); err != nil {
			errs = append(errs, fmt.Errorf("%s: %v", filepath.Base(f), err))
		}
	}
	return n, errs
}
