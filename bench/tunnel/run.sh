#!/bin/bash
# Tunnel throughput benchmark: iperf3 TCP (1 and 4 streams) between two
# network namespaces joined by a veth pair: directly, through OpenVPN (UDP,
# without cipher and with its default data cipher AES-256-GCM), through
# wireguard-go, and through every `sfunnel tunnel` mode, sealed (--key)
# and plain, all in the same run. Medians of RUNS runs of DUR seconds
# each. Writes its table into BENCHMARKS.md between <!-- tunnel:begin -->
# and <!-- tunnel:end --> (OUT=- prints it instead).
#
# Usage (root): bench/tunnel/run.sh      RUNS=3 DUR=4 OUT=BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-3}
DUR=${DUR:-4}
OUT=${OUT:-BENCHMARKS.md}

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 3; }
missing=()
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v openvpn >/dev/null || missing+=(openvpn)
command -v openssl >/dev/null || missing+=(openssl)
command -v wireguard-go >/dev/null || missing+=(wireguard-go)
command -v wg >/dev/null || missing+=(wireguard-tools)
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

# measure TARGET STREAMS: the median receiver throughput in Gbit/s, then
# all runs in brackets
measure() {
	local target=$1 streams=$2 vals=()
	for _ in $(seq "$RUNS"); do
		# A run that fails outright (iperf3 still busy with the last one)
		# is repeated, up to twice, rather than counted as 0.
		for _ in 1 2 3; do
			v=$(ip netns exec "$A" timeout $((DUR + 20)) iperf3 -c "$target" -P "$streams" -t "$DUR" -f g 2>/dev/null | awk '/receiver/ {v=$(NF-2)} END {print v}')
			[ -n "$v" ] && [ "$v" != 0 ] && break
			sleep 1
		done
		vals+=("${v:-0}")
	done
	printf '%s\n' "${vals[@]}" | sort -g | awk '{a[NR]=$1} END {m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f", m}'
	printf ' (%s)' "$(printf '%s ' "${vals[@]}" | sed 's/ $//')"
}

# both KEY TARGET: measures 1 and 4 streams into res[KEY/1] and res[KEY/4]
both() {
	res[$1/1]=$(measure "$2" 1)
	res[$1/4]=$(measure "$2" 4)
	echo "$1: ${res[$1/1]} | ${res[$1/4]}" >&2
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
both direct 192.0.2.2

# OpenVPN, UDP, peer to peer: without cipher, and with TLS and its default
# data cipher AES-256-GCM (self-signed certificates pinned by fingerprint).
for side in a b; do
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj "/CN=sfb-$side" \
		-keyout "$work/ovpn-$side.key" -out "$work/ovpn-$side.crt" 2>/dev/null
done
fp() { openssl x509 -in "$1" -noout -fingerprint -sha256 | cut -d= -f2; }
ovpn() { # ovpn KEY EXTRA-ARGS-FOR-BOTH...
	local key=$1; shift
	start "$B" ovb-$key openvpn --dev sfbtun --dev-type tun --proto udp --lport 1194 --ifconfig 203.0.113.102 203.0.113.101 --verb 1 "$@" ${OVB_ARGS[@]+"${OVB_ARGS[@]}"}
	local b=$last
	start "$A" ova-$key openvpn --dev sfbtun --dev-type tun --proto udp --remote 192.0.2.2 1194 --ifconfig 203.0.113.101 203.0.113.102 --verb 1 "$@" ${OVA_ARGS[@]+"${OVA_ARGS[@]}"}
	local a=$last
	for _ in $(seq 300); do grep -q "Initialization Sequence Completed" "$work/ova-$key.log" && break; sleep 0.05; done
	grep -q "Initialization Sequence Completed" "$work/ova-$key.log" || { cat "$work/ova-$key.log" "$work/ovb-$key.log" >&2; exit 1; }
	sleep 0.5
	both "$key" 203.0.113.102
	stopall "$a" "$b"
}
OVA_ARGS=() OVB_ARGS=()
ovpn openvpn-none --cipher none --auth none
OVB_ARGS=(--tls-server --dh none --cert "$work/ovpn-b.crt" --key "$work/ovpn-b.key" --peer-fingerprint "$(fp "$work/ovpn-a.crt")")
OVA_ARGS=(--tls-client --cert "$work/ovpn-a.crt" --key "$work/ovpn-a.key" --peer-fingerprint "$(fp "$work/ovpn-b.crt")")
ovpn openvpn-gcm --data-ciphers AES-256-GCM --verb 3
ovpn_gcm_cipher=$(grep -ho "Data Channel: cipher '[^']*'" "$work/ova-openvpn-gcm.log" | head -1 | cut -d"'" -f2 || true)

# wireguard-go (userspace WireGuard: ChaCha20-Poly1305).
wg genkey >"$work/wga.key"; wg genkey >"$work/wgb.key"
start "$A" wga env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f wga
a=$last
start "$B" wgb env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 wireguard-go -f wgb
b=$last
waitfor "$A" wga; waitfor "$B" wgb
sleep 0.3
ip netns exec "$A" wg set wga private-key "$work/wga.key" listen-port 51820 peer "$(wg pubkey <"$work/wgb.key")" endpoint 192.0.2.2:51820 allowed-ips 203.0.113.202/32
ip netns exec "$B" wg set wgb private-key "$work/wgb.key" listen-port 51820 peer "$(wg pubkey <"$work/wga.key")" endpoint 192.0.2.1:51820 allowed-ips 203.0.113.201/32
ip -n "$A" addr add 203.0.113.201/24 dev wga; ip -n "$B" addr add 203.0.113.202/24 dev wgb
ip -n "$A" link set wga up; ip -n "$B" link set wgb up
sleep 0.5
both wireguard-go 203.0.113.202
stopall "$a" "$b"

T="$work/tunneld"
K="$work/key"
# TCP over UDP: the client routes the server's own address into its TUN.
for variant in sealed plain sealed-nooffload; do
	keyargs=(--key "$K") off=true
	case $variant in
		plain) keyargs=() ;;
		sealed-nooffload) off=false ;;
	esac
	start "$B" tcpudp-$variant-b "$T" -i sfbtun -l 7472 --address 203.0.113.1/24 "${keyargs[@]}" --status-socket "$work/b.sock" --offload=$off
	b=$last
	start "$A" tcpudp-$variant-a "$T" -i sfbtun -l 7473 -b eth0 -e 7472 --address 198.51.100.1/32 "${keyargs[@]}" --status-socket "$work/a.sock" --offload=$off
	a=$last
	waitfor "$A" sfbtun; waitfor "$B" sfbtun
	ip -n "$A" route add 192.0.2.2/32 dev sfbtun
	both tcp-over-udp-$variant 192.0.2.2
	stopall "$a" "$b"
done

for tr in udp tcp; do
	for sealed in plain sealed; do
		keyargs=()
		[ $sealed = sealed ] && keyargs=(--key "$K")
		start "$B" ip$tr-$sealed-b "$T" -i sfbtun --carry ip --transport $tr --mode server -l 7000 --address 198.51.100.2/24 "${keyargs[@]}" --status-socket "$work/b.sock"
		b=$last
		start "$A" ip$tr-$sealed-a "$T" -i sfbtun --carry ip --transport $tr --mode client --remote 192.0.2.2:7000 --address 198.51.100.1/24 "${keyargs[@]}" --status-socket "$work/a.sock"
		a=$last
		waitfor "$A" sfbtun; waitfor "$B" sfbtun; sleep 1
		both ip-over-$tr-$sealed 198.51.100.2
		stopall "$a" "$b"
	done
done

num() { echo "${1%% *}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b>0) printf "%.1f", a/b; else printf "-" }'; }
cipher=$(grep -ho "sealed with [a-z0-9-]*" "$work/tcpudp-sealed-a.log" | head -1 | cut -d' ' -f3)
table=$(
	echo "<!-- tunnel:begin -->"
	echo "## Userspace tunnels (\`sfunnel tunnel\`)"
	echo
	echo "iperf3 TCP, 1 and 4 parallel streams, ${DUR} s, median of ${RUNS} runs (all runs in brackets), between two network"
	echo "namespaces joined by a veth pair (MTU 1500), all in one run of \`bench/tunnel/run.sh\` (\`make bench-tunnel\`)."
	echo "$(date -u +%Y-%m-%d), kernel $(uname -r), $(nproc) vCPU (shared with other jobs: compare ratios, not absolutes),"
	echo "$(openvpn --version | head -1 | cut -d' ' -f1-2) (data cipher ${ovpn_gcm_cipher:-?}), wireguard-go $(wireguard-go --version 2>/dev/null | awk '{print $NF}' | head -1), sfunnel sealed with $cipher."
	echo
	echo "| path | 1 stream Gbit/s | 4 streams Gbit/s | 1 stream × WireGuard-go | × OpenVPN AES-256-GCM | × OpenVPN no cipher | × same mode plain | runs (1 / 4 streams) |"
	echo "|---|---:|---:|---:|---:|---:|---:|---|"
	for k in direct openvpn-none openvpn-gcm wireguard-go tcp-over-udp-sealed ip-over-udp-sealed ip-over-tcp-sealed tcp-over-udp-plain ip-over-udp-plain ip-over-tcp-plain tcp-over-udp-sealed-nooffload; do
		v1=$(num "${res[$k/1]}"); v4=$(num "${res[$k/4]}")
		label=$k plain=-
		case $k in
			direct) label="direct (veth, no tunnel)" ;;
			openvpn-none) label="OpenVPN, UDP, --cipher none --auth none" ;;
			openvpn-gcm) label="OpenVPN, UDP, TLS, AES-256-GCM" ;;
			wireguard-go) label="wireguard-go (ChaCha20-Poly1305)" ;;
			tcp-over-udp-sealed) label="sfunnel tunnel, TCP over UDP, sealed"; plain=$(ratio "$v1" "$(num "${res[tcp-over-udp-plain/1]}")") ;;
			tcp-over-udp-plain) label="sfunnel tunnel, TCP over UDP, plain (no --key)" ;;
			ip-over-udp-sealed) label="sfunnel tunnel --carry ip --transport udp, sealed"; plain=$(ratio "$v1" "$(num "${res[ip-over-udp-plain/1]}")") ;;
			ip-over-tcp-sealed) label="sfunnel tunnel --carry ip --transport tcp, sealed"; plain=$(ratio "$v1" "$(num "${res[ip-over-tcp-plain/1]}")") ;;
			ip-over-udp-plain) label="sfunnel tunnel --carry ip --transport udp, plain (no --key)" ;;
			ip-over-tcp-plain) label="sfunnel tunnel --carry ip --transport tcp, plain (no --key)" ;;
			tcp-over-udp-sealed-nooffload) label="sfunnel tunnel, TCP over UDP, sealed, --offload=false" ;;
		esac
		echo "| $label | $v1 | $v4 | $(ratio "$v1" "$(num "${res[wireguard-go/1]}")") | $(ratio "$v1" "$(num "${res[openvpn-gcm/1]}")") | $(ratio "$v1" "$(num "${res[openvpn-none/1]}")") | $plain | ${res[$k/1]#* } / ${res[$k/4]#* } |"
	done
	echo
	verdict() { awk -v a="$1" -v b="$2" -v f="$3" 'BEGIN{print (b>0 && a>=f*b)?"met":"**missed**"}'; }
	rx() { awk -v a="$1" -v b="$2" 'BEGIN{printf (b>0)?"%.2f":"-", a/b}'; }
	for n in 1 4; do
		wg=$(num "${res[wireguard-go/$n]}"); og=$(num "${res[openvpn-gcm/$n]}"); on=$(num "${res[openvpn-none/$n]}")
		echo "$n stream(s):"
		for k in tcp-over-udp-sealed ip-over-udp-sealed ip-over-tcp-sealed; do
			v=$(num "${res[$k/$n]}")
			line="- $k: ≥ 5× wireguard-go $(verdict "$v" "$wg" 5) ($(rx "$v" "$wg")×), ≥ 6× OpenVPN AES-256-GCM $(verdict "$v" "$og" 6) ($(rx "$v" "$og")×)"
			p=$(num "${res[${k%-sealed}-plain/$n]}")
			line="$line, ≥ 0.7× plain $(verdict "$v" "$p" 0.7) ($(rx "$v" "$p")×)"
			echo "$line"
		done
		for k in tcp-over-udp-plain ip-over-udp-plain ip-over-tcp-plain; do
			v=$(num "${res[$k/$n]}")
			echo "- $k: ≥ 4× OpenVPN without cipher $(verdict "$v" "$on" 4) ($(rx "$v" "$on")×)"
		done
		echo
	done
	echo "Defaults: TUN MTU 1492 (TCP over UDP), 1452 (IP over UDP), 1500 (IP over TCP), 32 bytes less over UDP when sealed"
	echo "(sealed IP over TCP seals one record per batch of packets, up to 64 KiB);"
	echo "OpenVPN's tun MTU 1500; WireGuard's 1420."
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
