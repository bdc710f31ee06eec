#!/bin/sh
# sfunnel container entrypoint, compatible with sfunnel's container variables:
#   SFUNNEL_RULESET  rules (bare sfunnel rules, or a full sfunnel.conf); else the
#                    file /opt/sfunnel/src/ruleset (sfunnel's ConfigMap path) or
#                    /etc/sfunnel/sfunnel.conf; else sfunnel's default ruleset
#   IFACES           interfaces for bare rules (default: every interface but lo)
#   DIRECTION        ingress | egress | both (default: ingress, as sfunnel)
#   NETNS            named network namespace to work in (default: the container's)
#   CLEAN            1: remove everything sfunnel attached, then exit
#   DEBUG            1: full verifier logs and the resulting listing
#   N_ATTEMPTS, RETRY_DELAY  retries while interfaces come up (default 6, 3 s)
# No compiler is involved: rules are compiled to eBPF by sfunnel itself.
set -eu

SFUNNEL=${SFUNNEL:-/usr/sbin/sfunnel}
DIRECTION=${DIRECTION:-ingress}
N_ATTEMPTS=${N_ATTEMPTS:-6}
RETRY_DELAY=${RETRY_DELAY:-3}
DEBUG=${DEBUG:-0}
CLEAN=${CLEAN:-0}

set --
[ -n "${NETNS:-}" ] && set -- --netns "$NETNS"
[ "$DEBUG" = 1 ] && set -- "$@" -v

log() { echo "[sfunnel] $*"; }

if [ "$CLEAN" = 1 ]; then
	log "CLEAN=1: flushing the ruleset"
	exec "$SFUNNEL" "$@" flush ruleset
fi

case "$DIRECTION" in
ingress | egress | both) ;;
*) log "DIRECTION must be ingress, egress or both, not '$DIRECTION'"; exit 2 ;;
esac

rules=$(mktemp)
trap 'rm -f "$rules"' EXIT
if [ -n "${SFUNNEL_RULESET:-}" ]; then
	# sfunnel accepted rules separated by ';' on one line; so does sfunnel -f.
	printf '%s\n' "$SFUNNEL_RULESET" | tr ';' '\n' > "$rules"
elif [ -f /opt/sfunnel/src/ruleset ]; then
	cp /opt/sfunnel/src/ruleset "$rules"
elif [ -f /etc/sfunnel/sfunnel.conf ]; then
	cp /etc/sfunnel/sfunnel.conf "$rules"
else
	cat > "$rules" <<'RULES'
ip udp dport 2055 actions funnel encap tcp dport 179 sport 540 #Netflow
ip udp dport 4739 actions funnel encap tcp dport 179 sport 540 #IPFIX
ip udp dport 6343 actions funnel encap tcp dport 179 sport 540 #SFLOW
ip tcp dport 179 sport 540 actions unfunnel decap udp
RULES
fi

if [ -z "${IFACES:-}" ]; then
	if [ -n "${NETNS:-}" ]; then
		IFACES=$(ip -n "$NETNS" -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep -vx lo | tr '\n' ' ')
	else
		IFACES=$(ls /sys/class/net | grep -vx lo | tr '\n' ' ')
	fi
fi
ifaces=$(echo "$IFACES" | tr -s ' ,' ',' | sed 's/^,//; s/,$//')

log "interfaces: $ifaces, hook: $DIRECTION"
log "ruleset:"
sed 's/^/    /' "$rules"

i=1
while :; do
	if "$SFUNNEL" "$@" -f "$rules" --interface "$ifaces" --hook "$DIRECTION"; then
		break
	fi
	if [ "$i" -ge "$N_ATTEMPTS" ]; then
		log "giving up after $N_ATTEMPTS attempts"
		exit 1
	fi
	log "attempt $i failed; retrying in ${RETRY_DELAY}s"
	i=$((i + 1))
	sleep "$RETRY_DELAY"
done
log "attached"
[ "$DEBUG" = 1 ] && "$SFUNNEL" "$@" -a list ruleset
exit 0
