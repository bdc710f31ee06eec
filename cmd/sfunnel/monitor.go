package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"

	"github.com/sfunnel/sfunnel/datapath"
)

// monitorInterval is how often the kernel's event counters are read.
const monitorInterval = 250 * time.Millisecond

// monitorEvent is one line of `sfunnel monitor` (and its -j form).
type monitorEvent struct {
	Event     string `json:"event"` // a datapath event name, or "program"
	Interface string `json:"interface"`
	Hook      string `json:"hook"`
	Count     uint64 `json:"count,omitempty"`  // new events since the last line
	Handle    uint64 `json:"handle,omitempty"` // the rule, for per-rule events
	Program   uint32 `json:"program,omitempty"`
	Mode      string `json:"mode,omitempty"`
}

func (e monitorEvent) String() string {
	s := fmt.Sprintf("%s %s %s", e.Interface, e.Hook, e.Event)
	if e.Event == "program" {
		return s + fmt.Sprintf(" %d (%s)", e.Program, e.Mode)
	}
	s += fmt.Sprintf(" +%d", e.Count)
	if e.Handle != 0 {
		s += fmt.Sprintf(" # handle %d", e.Handle)
	}
	return s
}

// monitor prints datapath events as they happen until SIGINT/SIGTERM: a
// program attached or replaced, and growth of the event counters (MTU
// exceeded per rule, invalid unfunnels, fragments passed, …).
func (a *app) monitor(b *datapath.Backend) func(out io.Writer) error {
	return func(out io.Writer) error {
		// The lock is for transactions; monitoring must not hold off others.
		a.release()
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		type key struct{ hook, event string }
		last := map[key]uint64{}
		progs := map[string]uint32{}
		first := true
		tick := time.NewTicker(monitorInterval)
		defer tick.Stop()
		for {
			status, err := b.Status()
			if err != nil {
				return err
			}
			var events []monitorEvent
			for _, h := range status {
				id := h.Ifname + " " + h.Hook.String()
				if prev, ok := progs[id]; !ok || prev != uint32(h.ProgID) {
					progs[id] = uint32(h.ProgID)
					if !first {
						events = append(events, monitorEvent{Event: "program", Interface: h.Ifname, Hook: h.Hook.String(), Program: uint32(h.ProgID), Mode: string(h.Mode)})
					}
				}
				names := make([]string, 0, len(h.Stats))
				for n := range h.Stats {
					names = append(names, n)
				}
				sort.Strings(names)
				for _, n := range names {
					k := key{id, n}
					if v := h.Stats[n]; v != last[k] {
						if !first && v > last[k] && n != "mtu-exceeded" {
							events = append(events, monitorEvent{Event: n, Interface: h.Ifname, Hook: h.Hook.String(), Count: v - last[k]})
						}
						last[k] = v
					}
				}
				handles := make([]uint64, 0, len(h.MTUExceeded))
				for hd := range h.MTUExceeded {
					handles = append(handles, hd)
				}
				sort.Slice(handles, func(i, j int) bool { return handles[i] < handles[j] })
				for _, hd := range handles {
					k := key{id, fmt.Sprintf("mtu %d", hd)}
					if v := h.MTUExceeded[hd]; v != last[k] {
						if !first && v > last[k] {
							events = append(events, monitorEvent{Event: "mtu-exceeded", Interface: h.Ifname, Hook: h.Hook.String(), Count: v - last[k], Handle: hd})
						}
						last[k] = v
					}
				}
			}
			first = false
			for _, e := range events {
				if a.opts.json {
					data, _ := json.Marshal(e)
					fmt.Fprintf(out, "%s\n", data)
				} else {
					fmt.Fprintln(out, e)
				}
			}
			if f, ok := out.(interface{ Sync() error }); ok {
				f.Sync()
			}
			select {
			case <-ctx.Done():
				return nil
			case <-tick.C:
			}
		}
	}
}
