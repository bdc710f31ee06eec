#!/usr/bin/env bash
# Installs the Debian packages sfunnel's tests and demo need, if missing.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have ip       || need+=(iproute2)
have ethtool  || need+=(ethtool)
have nft      || need+=(nftables)
have tcpdump  || need+=(tcpdump)
have groff    || need+=(groff)
have mandoc   || need+=(mandoc)
have man      || need+=(man-db)
have iperf3   || need+=(iperf3)
have socat    || need+=(socat)
have conntrack || need+=(conntrack)
# TCP-in-UDP's wire layout is checked against scapy (Debian's python3).
/usr/bin/python3 -c 'import scapy.all' >/dev/null 2>&1 || need+=(python3-scapy)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "missing packages: ${need[*]} (run as root to install them)" >&2
		exit 0
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${need[@]}"
fi
