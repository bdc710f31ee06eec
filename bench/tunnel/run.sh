#!/bin/bash
# Tunnel throughput benchmark: iperf3 TCP between two network namespaces
# joined by a veth pair, directly, through OpenVPN (UDP, no cipher, no
# auth: what a user would otherwise reach for) and through every
# `sfunnel tunnel` mode, all in the same run. Medians of RUNS runs of DUR
# seconds each. Writes its table into BENCHMARKS.md between
# <!-- tunnel:begin --> and <!-- tunnel:end --> (OUT=- prints it instead).
#
# Usage (root): bench/tunnel/run.sh      RUNS=5 DUR=5 OUT=BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-5}
DUR=${DUR:-5}
OUT=${OUT:-BENCHMARKS.md}

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 3; }
missing=()
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v openvpn >/dev/null || missing+=(openvpn)
if [ ${#missing[@]} -gt 0 ]; then
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
sfx=$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')
A=sfb-a-$sfx B=sfb-b-$sfx
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	sleep 0.5
	ip netns del "$A" 2>/dev/null || true
	ip netns del "$B" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

go build -o "$work/tunneld" ./bench/tunnel/tunneld
"$work/tunneld" genkey "$work/key"

ip netns add "$A"; ip netns add "$B"
ip -n "$A" link set lo up; ip -n "$B" link set lo up
ip link add sfbv0 netns "$A" type veth peer name eth0 netns "$B"
ip -n "$A" link set sfbv0 name eth0
ip -n "$A" addr add 192.0.2.1/24 dev eth0; ip -n "$B" addr add 192.0.2.2/24 dev eth0
ip -n "$A" link set eth0 up; ip -n "$B" link set eth0 up

ip netns exec "$B" iperf3 -s -D --pidfile "$work/iperf3.pid"
sleep 0.3
pids+=("$(cat "$work/iperf3.pid")")

# start NS NAME CMD... runs a daemon in NS, remembers its PID as $last
start() {
	local ns=$1 name=$2; shift 2
	ip netns exec "$ns" "$@" >"$work/$name.log" 2>&1 &
	last=$!
	pids+=("$last")
}

# measure TARGET: prints the median receiver throughput in Gbit/s
measure() {
	local target=$1 vals=()
	for _ in $(seq "$RUNS"); do
		v=$(ip netns exec "$A" timeout $((DUR + 20)) iperf3 -c "$target" -t "$DUR" -f g 2>/dev/null | awk '/receiver/ {print $(NF-2)}')
		vals+=("${v:-0}")
	done
	printf '%s\n' "${vals[@]}" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", m}'
	printf ' (%s)' "$(printf '%s ' "${vals[@]}" | sed 's/ $//')"
}

# waitfor NS IF: until the device exists
waitfor() {
	for _ in $(seq 100); do ip -n "$1" link show "$2" >/dev/null 2>&1 && return 0; sleep 0.05; done
	echo "$2 did not appear in $1" >&2; return 1
}

stopall() {
	for p in "$@"; do kill "$p" 2>/dev/null || true; done
	for p in "$@"; do while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; done
}

declare -A res
res[direct]=$(measure 192.0.2.2)

start "$B" ovb openvpn --dev sfbtun --dev-type tun --proto udp --lport 1194 --ifconfig 203.0.113.102 203.0.113.101 --cipher none --auth none --verb 1
b=$last
start "$A" ova openvpn --dev sfbtun --dev-type tun --proto udp --remote 192.0.2.2 1194 --ifconfig 203.0.113.101 203.0.113.102 --cipher none --auth none --verb 1
a=$last
for _ in $(seq 200); do grep -q "Initialization Sequence Completed" "$work/ova.log" && break; sleep 0.05; done
sleep 0.5
res[openvpn]=$(measure 203.0.113.102)
stopall "$a" "$b"

T="$work/tunneld"
K="$work/key"
# TCP over UDP: the client routes the server's own address into its TUN.
for off in true false; do
	start "$B" tcpudp-b "$T" -i sfbtun -l 7472 --address 203.0.113.1/24 --key "$K" --status-socket "$work/b.sock" --offload=$off
	b=$last
	start "$A" tcpudp-a "$T" -i sfbtun -l 7473 -b eth0 -e 7472 --address 198.51.100.1/32 --key "$K" --status-socket "$work/a.sock" --offload=$off
	a=$last
	waitfor "$A" sfbtun; waitfor "$B" sfbtun
	ip -n "$A" route add 192.0.2.2/32 dev sfbtun
	if [ $off = true ]; then res[tcp-over-udp]=$(measure 192.0.2.2); else res[tcp-over-udp-nooffload]=$(measure 192.0.2.2); fi
	stopall "$a" "$b"
done

for tr in udp tcp; do
	start "$B" ip$tr-b "$T" -i sfbtun --carry ip --transport $tr --mode server -l 7000 --address 198.51.100.2/24 --key "$K" --status-socket "$work/b.sock"
	b=$last
	start "$A" ip$tr-a "$T" -i sfbtun --carry ip --transport $tr --mode client --remote 192.0.2.2:7000 --address 198.51.100.1/24 --key "$K" --status-socket "$work/a.sock"
	a=$last
	waitfor "$A" sfbtun; waitfor "$B" sfbtun; sleep 1
	res[ip-over-$tr]=$(measure 198.51.100.2)
	stopall "$a" "$b"
done

num() { echo "${1%% *}"; }
ovpn=$(num "${res[openvpn]}")
direct=$(num "${res[direct]}")
table=$(
	echo "<!-- tunnel:begin -->"
	echo "## Userspace tunnels (\`sfunnel tunnel\`)"
	echo
	echo "iperf3 TCP, one stream, ${DUR} s, median of ${RUNS} runs (all runs in brackets), between two network"
	echo "namespaces joined by a veth pair (MTU 1500), all in one run of \`bench/tunnel/run.sh\`."
	echo "$(date -u +%Y-%m-%d), kernel $(uname -r), $(nproc) vCPU, $(openvpn --version | head -1 | cut -d' ' -f1-2)."
	echo
	echo "| path | Gbit/s (median) | × OpenVPN | × direct | runs |"
	echo "|---|---:|---:|---:|---|"
	for k in direct openvpn tcp-over-udp ip-over-udp ip-over-tcp tcp-over-udp-nooffload; do
		v=$(num "${res[$k]}")
		runs=${res[$k]#* }
		label=$k
		case $k in
			direct) label="direct (veth, no tunnel)" ;;
			openvpn) label="OpenVPN, UDP, --cipher none --auth none" ;;
			tcp-over-udp) label="sfunnel tunnel, TCP over UDP (authenticated)" ;;
			ip-over-udp) label="sfunnel tunnel --carry ip --transport udp" ;;
			ip-over-tcp) label="sfunnel tunnel --carry ip --transport tcp" ;;
			tcp-over-udp-nooffload) label="sfunnel tunnel, TCP over UDP, --offload=false (no TSO/GSO/GRO)" ;;
		esac
		echo "| $label | $v | $(awk -v a="$v" -v b="$ovpn" 'BEGIN{printf (b>0)?"%.1f":"-", a/b}') | $(awk -v a="$v" -v b="$direct" 'BEGIN{printf (b>0)?"%.2f":"-", a/b}') | $runs |"
	done
	echo
	worst=$(for k in tcp-over-udp ip-over-udp ip-over-tcp; do num "${res[$k]}"; done | sort -g | head -1)
	verdict=$(awk -v a="$worst" -v b="$ovpn" 'BEGIN{print (b>0 && a>=4*b)?"met":"missed"}')
	echo "Goal: every tunnel mode (offloads on, the default) at least 4× OpenVPN: **$verdict** (slowest mode $(awk -v a="$worst" -v b="$ovpn" 'BEGIN{printf (b>0)?"%.1f":"-", a/b}')×)."
	echo "Defaults: TUN MTU 1492 (TCP over UDP), 1452 (IP over UDP), 1500 (IP over TCP); OpenVPN's tun MTU 1500."
	echo "TUN offloads (virtio-net headers, TSO) plus UDP GSO/GRO and recvmmsg/sendmmsg batches carry most of the gain (compare the last row)."
	echo "<!-- tunnel:end -->"
)
if [ "$OUT" = - ]; then
	echo "$table"
	exit 0
fi
[ -f "$OUT" ] || printf '# Benchmarks\n' >"$OUT"
if grep -q '<!-- tunnel:begin -->' "$OUT"; then
	awk -v t="$table" '
		/<!-- tunnel:begin -->/ {print t; skip=1; next}
		/<!-- tunnel:end -->/ {skip=0; next}
		!skip {print}' "$OUT" >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"
else
	printf '\n%s\n' "$table" >>"$OUT"
fi
echo "$table"
