#!/usr/bin/env bash
# make demo: sfunnel's default ruleset between two network namespaces.
#
#   router (192.0.2.1, r0) ──veth── collector (192.0.2.2, c0)
#
# The router funnels NetFlow (2055), IPFIX (4739) and sFlow (6343) over
# TCP 179 (sport 540) at r0 egress; the collector unfunnels at c0 ingress.
# We send real UDP datagrams, print what crossed the wire (captured on c0,
# before TC ingress), what the collector's sockets received, and the counters.
set -euo pipefail
cd "$(dirname "$0")/.."
SF=${SF:-$PWD/bin/sfunnel}
# Names of this run only: cleanup must never delete another run's namespaces.
R=sfdemo-router-$$ C=sfdemo-collector-$$
tmp=$(mktemp -d)
pids=()

cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	"$SF" --netns $R flush ruleset 2>/dev/null || true
	"$SF" --netns $C flush ruleset 2>/dev/null || true
	ip netns del $R 2>/dev/null || true
	ip netns del $C 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT
[ "$(id -u)" -eq 0 ] || { echo "make demo needs root (network namespaces, BPF)" >&2; exit 3; }

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Two namespaces joined by a veth pair"
ip netns add $R
ip netns add $C
ip link add r0 netns $R type veth peer name c0 netns $C
ip -n $R addr add 192.0.2.1/24 dev r0
ip -n $C addr add 192.0.2.2/24 dev c0
ip -n $R link set r0 up
ip -n $C link set c0 up
ip -n $R link set lo up
ip -n $C link set lo up
# veth never finalises CHECKSUM_PARTIAL packets, so tcpdump would show the
# seeds a NIC completes on the way out; with tx checksumming off the kernel
# completes them before they leave, and the capture shows final checksums.
ip netns exec $R ethtool -K r0 tx off >/dev/null
echo "router r0 192.0.2.1  <->  collector c0 192.0.2.2   (r0: tx checksum offload off)"

cat > "$tmp/router.conf" <<'CONF'
flush ruleset
define flow_ports = { 2055, 4739, 6343 }   # NetFlow, IPFIX, sFlow
interface r0 {
	egress {
		ip udp dport $flow_ports counter actions funnel tcp dport 179 sport 540 comment "flows to the LB port"
	}
}
CONF
cat > "$tmp/collector.conf" <<'CONF'
flush ruleset
interface c0 {
	ingress {
		ip tcp dport 179 sport 540 counter actions unfunnel udp
	}
}
CONF
step "Router ruleset (sfunnel --netns $R -f router.conf)"
cat "$tmp/router.conf"
"$SF" --netns $R -f "$tmp/router.conf"
step "Collector ruleset (sfunnel --netns $C -f collector.conf)"
cat "$tmp/collector.conf"
"$SF" --netns $C -f "$tmp/collector.conf"

# What crosses the wire: tcpdump on c0 sees packets before TC ingress.
ip netns exec $C tcpdump -i c0 -nn -vv -X -l -c 3 'ip proto 6' > "$tmp/wire.txt" 2>/dev/null &
pids+=($!)
for port in 2055 4739 6343; do
	ip netns exec $C socat -u UDP4-RECV:$port,bind=192.0.2.2 OPEN:"$tmp/got.$port",creat,append &
	pids+=($!)
done
sleep 1

step "Sending one datagram to each port from the router"
for port in 2055 4739 6343; do
	msg="telemetry record for port $port"
	ip netns exec $R bash -c "echo '$msg' > /dev/udp/192.0.2.2/$port"
	echo "sent to 192.0.2.2:$port  \"$msg\""
done
sleep 1

step "On the wire (captured on c0): UDP inside TCP 540 -> 179, SYN, seq 0xcafebabe"
cat "$tmp/wire.txt"

step "Received by the collector's UDP sockets (unfunneled)"
ok=0
for port in 2055 4739 6343; do
	if [ -s "$tmp/got.$port" ]; then
		printf 'port %s: %s' "$port" "$(cat "$tmp/got.$port")"; echo
		ok=$((ok + 1))
	else
		echo "port $port: nothing received"
	fi
done

step "Counters (sfunnel list ruleset)"
echo "# router"
"$SF" --netns $R list ruleset
echo "# collector"
"$SF" --netns $C list ruleset

step "Result"
if [ $ok -eq 3 ]; then
	echo "all 3 datagrams funneled over TCP/179 and delivered intact"
else
	echo "only $ok of 3 datagrams delivered" >&2
	exit 1
fi
