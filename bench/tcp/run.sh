#!/bin/bash
# TCP throughput through sfunnel's per-segment rewrites, offloads at their
# defaults: iperf3 (1 and 4 streams, client → server) between two network
# namespaces joined by a veth pair (MTU 1500), all in the same run, rounds
# interleaved so that the machine's noise hits every case alike. Medians of
# RUNS runs of DUR seconds. Cases:
#
#   plain          no sfunnel (reference for "unmatched")
#   unmatched      sfunnel funnel rules on both ends for another port (the
#                  segmentation device exists; iperf's flow doesn't match)
#   plain-nogso    no sfunnel, tso+gso off on both ends: the per-segment
#                  ceiling (reference for the funnels)
#   plain-nogso-tx no sfunnel, tso+gso+tx off on both ends (reference for
#                  TCP-in-UDP: per segment, checksummed in software)
#   funnel-udp     TCP funneled over UDP both ways, unfunneled at the peer
#   funnel-tcp     TCP funneled over TCP both ways
#   rewrite-udp    TCP-in-UDP both ways
#
# Writes its table into BENCHMARKS.md between <!-- tcp:begin --> and
# <!-- tcp:end --> (OUT=- prints it instead).
#
# Usage (root): bench/tcp/run.sh      RUNS=5 DUR=3 OUT=BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-5}
DUR=${DUR:-3}
OUT=${OUT:-BENCHMARKS.md}
SFUNNEL=${SFUNNEL:-bin/sfunnel}

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 3; }
command -v iperf3 >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iperf3 >/dev/null; }
[ -x "$SFUNNEL" ] || make build >/dev/null

sfx=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
A=sfbt-a-$sfx B=sfbt-b-$sfx
work=$(mktemp -d)
spid=
cleanup() {
	[ -n "$spid" ] && kill "$spid" 2>/dev/null || true
	"$SFUNNEL" --netns "$A" flush ruleset 2>/dev/null || true
	"$SFUNNEL" --netns "$B" flush ruleset 2>/dev/null || true
	ip netns del "$A" 2>/dev/null || true
	ip netns del "$B" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$A"
ip netns add "$B"
ip link add a0 netns "$A" type veth peer name b0 netns "$B"
ip -n "$A" addr add 192.0.2.1/24 dev a0
ip -n "$B" addr add 192.0.2.2/24 dev b0
ip -n "$A" link set a0 up
ip -n "$B" link set b0 up
ip -n "$A" link set lo up
ip -n "$B" link set lo up
ip netns exec "$B" iperf3 -s -p 5201 >/dev/null 2>&1 &
spid=$!
sleep 0.5

offloads() { # on|off [tx]
	for ns in "$A:a0" "$B:b0"; do
		if [ "${2:-}" = tx ]; then
			ip netns exec "${ns%%:*}" ethtool -K "${ns#*:}" tso "$1" gso "$1" tx "$1" >/dev/null 2>&1
		else
			ip netns exec "${ns%%:*}" ethtool -K "${ns#*:}" tso "$1" gso "$1" >/dev/null 2>&1
		fi
	done
}

rules() { # client-egress client-ingress server-egress server-ingress
	printf 'flush ruleset\ninterface a0 {\n\tegress {\n\t\t%s\n\t}\n\tingress {\n\t\t%s\n\t}\n}\n' "$1" "$2" >"$work/a.conf"
	printf 'flush ruleset\ninterface b0 {\n\tegress {\n\t\t%s\n\t}\n\tingress {\n\t\t%s\n\t}\n}\n' "$3" "$4" >"$work/b.conf"
	"$SFUNNEL" --netns "$A" -f "$work/a.conf"
	"$SFUNNEL" --netns "$B" -f "$work/b.conf"
}
flush() {
	"$SFUNNEL" --netns "$A" flush ruleset
	"$SFUNNEL" --netns "$B" flush ruleset
}

setup() {
	flush
	offloads on tx
	case $1 in
	plain) ;;
	unmatched) rules "tcp dport 9999 actions funnel udp dport 4000 sport 4000" "udp dport 4001 actions unfunnel tcp" \
		"tcp sport 9999 actions funnel udp dport 4001 sport 4001" "udp dport 4000 actions unfunnel tcp" ;;
	plain-nogso) offloads off ;;
	plain-nogso-tx) offloads off tx ;;
	funnel-udp) rules "tcp dport 5201 actions funnel udp dport 4000 sport 4000" "udp dport 4001 actions unfunnel tcp" \
		"tcp sport 5201 actions funnel udp dport 4001 sport 4001" "udp dport 4000 actions unfunnel tcp" ;;
	funnel-tcp) rules "tcp dport 5201 actions funnel tcp dport 179 sport 540" "tcp dport 540 sport 179 actions unfunnel tcp" \
		"tcp sport 5201 actions funnel tcp dport 540 sport 179" "tcp dport 179 sport 540 actions unfunnel tcp" ;;
	rewrite-udp) rules "tcp dport 5201 actions rewrite udp" "udp sport 5201 actions rewrite tcp" \
		"tcp sport 5201 actions rewrite udp" "udp dport 5201 actions rewrite tcp" ;;
	esac
}

cases="plain unmatched plain-nogso plain-nogso-tx funnel-udp funnel-tcp rewrite-udp"
for r in $(seq "$RUNS"); do
	for c in $cases; do
		setup "$c"
		for p in 1 4; do
			bps=$(ip netns exec "$A" iperf3 -c 192.0.2.2 -p 5201 -t "$DUR" -P "$p" -J 2>/dev/null |
				python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"])' 2>/dev/null || echo 0)
			echo "$c $p $bps" >>"$work/results"
			echo "run $r: $c P$p $(awk -v b="$bps" 'BEGIN{printf "%.2f", b/1e9}') Gbit/s" >&2
		done
	done
done
flush

table=$(python3 - "$work/results" "$RUNS" "$DUR" <<'EOF'
import sys, statistics, collections, datetime, platform
res = collections.defaultdict(list)
for line in open(sys.argv[1]):
    c, p, b = line.split()
    res[(c, int(p))].append(float(b))
med = {k: statistics.median(v) for k, v in res.items()}
def g(c, p): return med.get((c, p), 0) / 1e9
def ratio(a, b, p):
    return "%.2f" % (g(a, p) / g(b, p)) if g(b, p) else "n/a"
out = []
out.append("Measured %s on Linux %s, %d runs of %s s per case, medians; iperf3 client → server between two"
           " namespaces over veth (MTU 1500), offloads at their defaults unless the case says otherwise; the cases of"
           " a run are interleaved. `bench/tcp/run.sh` (`make bench-tcp`)." % (datetime.date.today(), platform.release(), int(sys.argv[2]), sys.argv[3]))
out.append("")
out.append("| case | 1 stream Gbit/s | 4 streams Gbit/s | ratio (1 / 4 streams) | against | goal |")
out.append("|---|---:|---:|---:|---|---|")
rows = [
    ("plain", None, None, ""),
    ("unmatched", "plain", "no sfunnel", "≥ 0.95"),
    ("plain-nogso", None, None, ""),
    ("plain-nogso-tx", None, None, ""),
    ("funnel-udp", "plain-nogso", "plain, tso+gso off", "≥ 0.9"),
    ("funnel-tcp", "plain-nogso", "plain, tso+gso off", "≥ 0.9"),
    ("rewrite-udp", "plain-nogso-tx", "plain, tso+gso+tx off", "≥ 0.9"),
]
for c, ref, refname, goal in rows:
    r = "%s / %s" % (ratio(c, ref, 1), ratio(c, ref, 4)) if ref else ""
    out.append("| %s | %.2f | %.2f | %s | %s | %s |" % (c, g(c, 1), g(c, 4), r, refname or "", goal))
print("\n".join(out))
EOF
)
if [ "$OUT" = - ]; then
	echo "$table"
	exit 0
fi
python3 - "$OUT" "$table" <<'EOF'
import sys
path, table = sys.argv[1], sys.argv[2]
text = open(path).read()
b, e = "<!-- tcp:begin -->", "<!-- tcp:end -->"
block = b + "\n" + table + "\n" + e
if b in text and e in text:
    text = text[:text.index(b)] + block + text[text.index(e) + len(e):]
else:
    text = text.rstrip("\n") + "\n\n## TCP through the rewrites (`make bench-tcp`)\n\n" + block + "\n"
open(path, "w").write(text)
EOF
echo "$table"
