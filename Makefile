# sfunnel — build, test, demo, install.
GO      ?= go
PREFIX  ?= /usr
DESTDIR ?=
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: all build test deps demo man install bench bench-datapath bench-tunnel bench-tcp bench-control bench-grammar crash-long fuzz clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o bin/sfunnel ./cmd/sfunnel

# deps installs the Debian packages the tests and the demo use.
deps:
	./scripts/install-deps.sh

# test runs every test: unit, kernel (BPF_PROG_TEST_RUN), netns end-to-end,
# CLI scripts, REPL on a pty, man page lint. Needs root for the kernel parts;
# with SFUNNEL_REQUIRE_KERNEL=1 a test that cannot run fails instead of skipping.
test: deps
	$(GO) vet ./...
	$(GO) test -count=1 -timeout 75m ./...

demo: build deps
	./scripts/demo.sh

man:
	groff -ww -z -man man/sfunnel.8 man/sfunnel.conf.5 man/sfunnel-tunnel.8
	@for m in man/*.[58]; do echo "== $$m"; MANWIDTH=80 man -l "$$m" | head -5; done

install: build
	install -D -m 0755 bin/sfunnel $(DESTDIR)$(PREFIX)/sbin/sfunnel
	install -D -m 0644 man/sfunnel.8 $(DESTDIR)$(PREFIX)/share/man/man8/sfunnel.8
	install -D -m 0644 man/sfunnel.conf.5 $(DESTDIR)$(PREFIX)/share/man/man5/sfunnel.conf.5
	@if [ -f man/sfunnel-tunnel.8 ]; then install -D -m 0644 man/sfunnel-tunnel.8 $(DESTDIR)$(PREFIX)/share/man/man8/sfunnel-tunnel.8; fi
	@for u in dist/systemd/*.service; do [ -f "$$u" ] && install -D -m 0644 "$$u" $(DESTDIR)/lib/systemd/system/$$(basename $$u) || true; done
	@if [ -f contrib/bash-completion/sfunnel ]; then install -D -m 0644 contrib/bash-completion/sfunnel $(DESTDIR)$(PREFIX)/share/bash-completion/completions/sfunnel; fi
	install -d $(DESTDIR)/etc/sfunnel

bench: bench-datapath

# Datapath benchmark (BPF_PROG_TEST_RUN, ratios to in-run reference programs).
# BenchmarkFastPath and BenchmarkTables (the default ruleset's rows, the large
# rulesets' rows alone, for A/B runs) are skipped.
bench-datapath:
	$(GO) test ./compiler -run '^$$' -bench . -skip 'FastPath$$|Tables$$' -count 9 -timeout 60m

# TCP through funnel / TCP-in-UDP with offloads on: iperf3 between namespaces,
# ratios to in-run references (plain, tso+gso off, tso+gso+tx off).
bench-tcp: build
	bench/tcp/run.sh

bench-tunnel: build
	@if [ -x bench/tunnel/run.sh ]; then bench/tunnel/run.sh; else echo "no tunnel benchmark yet"; fi

# Parsing a 10 000-rule file with the hand-written lexer and, as the in-run
# reference, participle's regexp lexer built from the same rules.
bench-grammar:
	$(GO) test ./grammar -run '^$$' -bench '10k' -count 5 -timeout 30m

# Control-plane benchmark against nft in the same run (apply, list,
# add/delete rule on a 10 000-rule hook; time and peak RSS); writes the
# "Control plane" section of BENCHMARKS.md.
bench-control: build
	$(GO) run ./bench/control -sfunnel bin/sfunnel -rules 10000 -runs 5 -o BENCHMARKS.md

# crash-long kills (and stops) sfunnel at every crash point of every tested commit
# (make test tests every second one), and changes with this binary hooks that
# sfunnel db6a702 committed (built from git history); see tests/crash.
crash-long:
	SFUNNEL_LONG=1 $(GO) test -count=1 -v -timeout 120m -run 'TestCrashAtEveryPoint|TestStoppedAtEveryPoint|TestUpgrade' ./tests/crash

# fuzz runs the parser fuzzer for 10 minutes, the lexer's differential
# fuzzer and the sealed-record fuzzer for 2 each.
fuzz:
	$(GO) test ./grammar -run '^$$' -fuzz FuzzParse -fuzztime 10m
	$(GO) test ./grammar -run '^$$' -fuzz FuzzLexer -fuzztime 2m
	$(GO) test ./tunnel/seal -run '^$$' -fuzz FuzzOpen -fuzztime 2m

clean:
	rm -rf bin
