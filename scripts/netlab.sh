#!/usr/bin/env bash
# An emulated cluster in network namespaces: one namespace per worker and one for
# the aggregator, joined by a bridge (in a namespace of its own), each worker's link
# rate-limited in both directions with tbf (this kernel has no netem). Runs COMMAND
# in the host namespace with the environment `inagg bench` reads to place its
# processes, and always tears everything down.
#   scripts/netlab.sh [--workers N] [--link-rate RATE] [--burst SIZE] [--mtu M] -- COMMAND...
#   scripts/netlab.sh --workers 4 --link-rate 1gbit -- target/release/inagg bench \
#       --workers 4 --elements 16777216 --codec f32,i8 --json
# Addresses come from 198.18.0.0/15 (reserved for benchmarking) and exist only inside
# the namespaces: the aggregator is 198.18.0.1, worker r 198.18.0.(10 + r).
# Needs root (or CAP_NET_ADMIN) for `ip netns`.
set -euo pipefail
WORKERS=4
RATE=1gbit
BURST=256kb
# Jumbo frames, as in the clusters inagg targets: the default 8 KiB chunk needs them
# (inagg sends with DF set; on 1500-byte links use --chunk-elements 360 for f32).
MTU=9000
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) WORKERS="$2"; shift 2 ;;
        --link-rate) RATE="$2"; shift 2 ;;
        --burst) BURST="$2"; shift 2 ;;
        --mtu) MTU="$2"; shift 2 ;;
        --) shift; break ;;
        *) echo "netlab: unknown flag $1 (usage: netlab.sh [--workers N] [--link-rate RATE] -- COMMAND...)" >&2; exit 2 ;;
    esac
done
if [ $# -eq 0 ]; then
    echo "netlab: no command given" >&2
    exit 2
fi
if ! [[ "$WORKERS" =~ ^[0-9]+$ ]] || [ "$WORKERS" -lt 1 ] || [ "$WORKERS" -gt 200 ]; then
    echo "netlab: --workers must be between 1 and 200" >&2
    exit 2
fi
# Rate in bits per second, for the line-rate bound `inagg bench` reports.
bps="$(echo "$RATE" | awk '
    /^[0-9.]+gbit$/ { sub(/gbit/, ""); print $0 * 1e9; next }
    /^[0-9.]+mbit$/ { sub(/mbit/, ""); print $0 * 1e6; next }
    /^[0-9.]+kbit$/ { sub(/kbit/, ""); print $0 * 1e3; next }
    /^[0-9.]+(bit)?$/ { sub(/bit/, ""); print $0 + 0; next }
    { print "" }')"
if [ -z "$bps" ]; then
    echo "netlab: --link-rate must look like 1gbit, 100mbit or 500kbit" >&2
    exit 2
fi

id="i$(( $$ % 100000 ))"
BR_NS="${id}-br"
AGG_NS="${id}-agg"
W_NS="${id}-w"
made=()
teardown() {
    for ns in "${made[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap teardown EXIT INT TERM

ns_add() {
    ip netns add "$1"
    made+=("$1")
    ip -n "$1" link set lo up
}
# A veth pair from namespace $1 (device $2, address $3) to the bridge.
attach() {
    local ns="$1" dev="$2" addr="$3" peer="b$2"
    ip link add "$dev" netns "$ns" mtu "$MTU" type veth peer name "$peer" netns "$BR_NS" mtu "$MTU"
    ip -n "$BR_NS" link set "$peer" master br0 up
    ip -n "$ns" addr add "$addr/15" dev "$dev"
    ip -n "$ns" link set "$dev" up
}

ns_add "$BR_NS"
ip -n "$BR_NS" link add br0 mtu "$MTU" type bridge
ip -n "$BR_NS" link set br0 up
ns_add "$AGG_NS"
attach "$AGG_NS" "${id}a" 198.18.0.1
for ((r = 0; r < WORKERS; r++)); do
    ns_add "${W_NS}${r}"
    attach "${W_NS}${r}" "${id}w${r}" "198.18.0.$((10 + r))"
    # Both directions of the worker's link: its own egress, and the bridge's
    # egress toward it.
    ip netns exec "${W_NS}${r}" tc qdisc add dev "${id}w${r}" root tbf \
        rate "$RATE" burst "$BURST" latency 50ms
    ip netns exec "$BR_NS" tc qdisc add dev "b${id}w${r}" root tbf \
        rate "$RATE" burst "$BURST" latency 50ms
done
# Large socket buffers, as on the host.
for ns in "$AGG_NS" $(for ((r = 0; r < WORKERS; r++)); do echo "${W_NS}${r}"; done); do
    ip netns exec "$ns" sysctl -q -w net.core.rmem_max=8388608 net.core.wmem_max=8388608 2>/dev/null || true
done
echo "netlab: $WORKERS workers on $RATE links, aggregator 198.18.0.1 (namespaces ${id}-*)" >&2

export INAGG_NETLAB_AGG_NETNS="$AGG_NS"
export INAGG_NETLAB_AGG_IP=198.18.0.1
export INAGG_NETLAB_WORKER_NETNS="$W_NS"
# Worker r's interface is ${INAGG_NETLAB_WORKER_DEV}r (Gloo's GLOO_SOCKET_IFNAME).
export INAGG_NETLAB_WORKER_DEV="${id}w"
export INAGG_NETLAB_LINK_BPS="$bps"
"$@"
