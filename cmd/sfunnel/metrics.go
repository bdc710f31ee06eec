package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/sfunnel/sfunnel/datapath"
	"github.com/sfunnel/sfunnel/metrics"
)

// defaultMetricsAddr is where `sfunnel metrics` listens without an address.
const defaultMetricsAddr = ":9142"

type snapshotResult struct {
	s   *metrics.Snapshot
	err error
}

// metrics serves Prometheus metrics of the live datapath on
// http://ADDR/metrics until SIGINT/SIGTERM (`sfunnel metrics [ADDR]`).
//
// The kernel is read on this goroutine, whose thread --netns moved into
// the namespace (HTTP handlers run on other threads, in the namespace the
// process started in); the listening socket is made here too, so it is in
// that namespace.
func (a *app) metrics(args []string) int {
	if len(args) > 1 {
		fmt.Fprintln(a.stderr, "Error: usage: sfunnel metrics [ADDR]")
		return exitUsage
	}
	addr := defaultMetricsAddr
	if len(args) == 1 {
		addr = args[0]
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintf(a.stderr, "Error: metrics: %v\n", err)
		return exitError
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	reqs := make(chan chan snapshotResult)
	read := func() (*metrics.Snapshot, error) {
		reply := make(chan snapshotResult, 1)
		select {
		case reqs <- reply:
		case <-ctx.Done():
			return nil, errors.New("sfunnel metrics is stopping")
		}
		r := <-reply
		return r.s, r.err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", metrics.Handler(read))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	fmt.Fprintf(a.stderr, "sfunnel: metrics on http://%s/metrics\n", ln.Addr())

	rd := &metrics.Reader{B: datapath.New(datapath.Options{Verbose: a.opts.verbose, CtMarkMask: a.opts.ctMarkMask})}
	for {
		select {
		case reply := <-reqs:
			s, err := rd.Read()
			reply <- snapshotResult{s, err}
		case <-ctx.Done():
			shut, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			srv.Shutdown(shut)
			return exitOK
		}
	}
}
