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

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ -n "${SFUNNEL_RULESET:-}" ]; then
	# sfunnel accepted rules separated by ';' on one line, each with an
	# optional '#' comment; split at every ';' outside double quotes (so
	# comment "netflow; v9" stays whole). The file is named after the
	# variable, so errors read SFUNNEL_RULESET:LINE:COL (LINE = the rule's
	# place in the variable).
	rules=SFUNNEL_RULESET
	printf '%s\n' "$SFUNNEL_RULESET" | awk '{
		out = ""; inq = 0; esc = 0
		for (i = 1; i <= length($0); i++) {
			c = substr($0, i, 1)
			if (inq && esc) { esc = 0 }
			else if (inq && c == "\\") { esc = 1 }
			else if (c == "\"") { inq = !inq }
			else if (!inq && c == ";") { print out; out = ""; continue }
			out = out c
		}
		print out
	}' > "$work/$rules"
elif [ -f /opt/sfunnel/src/ruleset ]; then
	rules=/opt/sfunnel/src/ruleset
elif [ -f /etc/sfunnel/sfunnel.conf ]; then
	rules=/etc/sfunnel/sfunnel.conf
else
	rules=default-ruleset
	cat > "$work/$rules" <<'RULES'
ip udp dport 2055 actions funnel encap tcp dport 179 sport 540 #Netflow
ip udp dport 4739 actions funnel encap tcp dport 179 sport 540 #IPFIX
ip udp dport 6343 actions funnel encap tcp dport 179 sport 540 #SFLOW
ip tcp dport 179 sport 540 actions unfunnel decap udp
RULES
fi
# Relative names are in $work; a ruleset file is used where it is, so its
# errors and includes name it.
cd "$work"

if [ -z "${IFACES:-}" ]; then
	if [ -n "${NETNS:-}" ]; then
		IFACES=$(ip -n "$NETNS" -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep -vx lo | tr '\n' ' ')
	else
		IFACES=$(ls /sys/class/net | grep -vx lo | tr '\n' ' ')
	fi
fi
ifaces=$(echo "$IFACES" | tr -s ' ,' ',' | sed 's/^,//; s/,$//')

log "interfaces: $ifaces, hook: $DIRECTION"
log "ruleset ($rules):"
sed 's/^/    /' "$rules"

# Mistakes in the rules do not go away by waiting: check them once without
# the kernel (a scratch state file) and stop at once if they are wrong.
# Only interfaces that do not exist yet are worth retrying for.
if ! "$SFUNNEL" "$@" --state "$work/check.state" -f "$rules" --interface "$ifaces" --hook "$DIRECTION" 2> "$work/check.err"; then
	if grep 'Error: ' "$work/check.err" | grep -qv 'Error: unknown interface '; then
		cat "$work/check.err" >&2
		log "the ruleset has errors; not retrying"
		exit 1
	fi
fi

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
