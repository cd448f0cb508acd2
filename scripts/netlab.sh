#!/usr/bin/env bash
# An emulated cluster in network namespaces: one namespace per worker and one for
# the aggregator, joined by a bridge (in a namespace of its own), each worker's link
# rate-limited in both directions with tbf (this kernel has no netem). Runs COMMAND
# in the host namespace with the environment `inagg bench` reads to place its
# processes, and always tears everything down.
#   scripts/netlab.sh [--workers N] [--link-rate RATE] [--burst SIZE] [--mtu M]
#       [--aggregator-link-rate RATE] [--tcp-bulk K] [--tcp-probe] [--cross-out DIR]
#       [--tcp-congestion ALG] [--racks R --uplink-rate RATE] -- COMMAND...
#   scripts/netlab.sh --workers 4 --link-rate 1gbit -- target/release/inagg bench \
#       --workers 4 --elements 16777216 --codec f32,i8 --json
# Addresses come from 198.18.0.0/15 (reserved for benchmarking) and exist only inside
# the namespaces: the aggregator is 198.18.0.1, worker r 198.18.0.(10 + r).
# Cross traffic: --aggregator-link-rate shapes the aggregator's link too (both
# directions; unshaped without it), the bottleneck that a job and other traffic to
# the aggregator's host then share. --tcp-bulk K starts K bulk TCP flows (iperf3),
# each from a host of its own (198.18.1.(10 + k), its link shaped as the workers'),
# to the aggregator's namespace; --tcp-probe times 1 KiB request/response round trips
# (`inagg tcp-probe`) from one more such host to the aggregator's namespace. Both run
# from before COMMAND starts until it ends; then each flow's iperf3 JSON
# (DIR/bulk-K.json) and the probe's report (DIR/probe.json, every round trip with
# its send time) are written to
# --cross-out DIR (default inagg-out/cross). INAGG_BIN names the inagg binary for the
# probe (default target/release/inagg). --tcp-congestion ALG sets the TCP congestion
# control of every namespace (the flows, the probe, and Gloo or MPI placed in the
# lab), as net.ipv4.tcp_congestion_control; without it each namespace has the
# kernel's default (it must be in the host's net.ipv4.tcp_allowed_congestion_control).
# Racks: --racks R puts the workers on R rack bridges (rack k holds ranks
# floor(k * N / R) up to floor((k + 1) * N / R), the blocks rack aggregators serve),
# each joined to the spine bridge, where the aggregator and the cross-traffic hosts
# are, by an uplink shaped to --uplink-rate in both directions. A flat job's traffic
# then crosses the uplinks as in a cluster of racks under a spine. Each rack also has
# a namespace for its rack aggregator on its bridge (INAGG_NETLAB_RACK_NETNS followed
# by k, at the k-th address of INAGG_NETLAB_RACK_IPS; `inagg bench --racks R` starts
# them there), its link unshaped: in a cluster it is the rack's switch. The uplink of
# rack k is the veth ${INAGG_NETLAB_UPLINK_DEV}k (its spine end) in the namespace
# INAGG_NETLAB_BRIDGE_NETNS: its tx counter is what went down into the rack, its rx
# counter what came up.
# Needs root (or CAP_NET_ADMIN) for `ip netns`, and iperf3 for --tcp-bulk.
set -euo pipefail
WORKERS=4
RATE=1gbit
BURST=256kb
# Jumbo frames, as in the clusters inagg targets: the default 8 KiB chunk needs them
# (inagg sends with DF set; on 1500-byte links use --chunk-elements 360 for f32).
MTU=9000
AGG_RATE=""
BULK=0
PROBE=0
CROSS_OUT=inagg-out/cross
TCP_CC=""
RACKS=0
UPLINK_RATE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) WORKERS="$2"; shift 2 ;;
        --link-rate) RATE="$2"; shift 2 ;;
        --burst) BURST="$2"; shift 2 ;;
        --mtu) MTU="$2"; shift 2 ;;
        --aggregator-link-rate) AGG_RATE="$2"; shift 2 ;;
        --tcp-bulk) BULK="$2"; shift 2 ;;
        --tcp-probe) PROBE=1; shift ;;
        --cross-out) CROSS_OUT="$2"; shift 2 ;;
        --tcp-congestion) TCP_CC="$2"; shift 2 ;;
        --racks) RACKS="$2"; shift 2 ;;
        --uplink-rate) UPLINK_RATE="$2"; shift 2 ;;
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
# A rate in bits per second (empty if it is not one), for the line-rate bound
# `inagg bench` reports.
to_bps() {
    echo "$1" | awk '
        /^[0-9.]+gbit$/ { sub(/gbit/, ""); print $0 * 1e9; next }
        /^[0-9.]+mbit$/ { sub(/mbit/, ""); print $0 * 1e6; next }
        /^[0-9.]+kbit$/ { sub(/kbit/, ""); print $0 * 1e3; next }
        /^[0-9.]+(bit)?$/ { sub(/bit/, ""); print $0 + 0; next }
        { print "" }'
}
bps="$(to_bps "$RATE")"
if [ -z "$bps" ]; then
    echo "netlab: --link-rate must look like 1gbit, 100mbit or 500kbit" >&2
    exit 2
fi
if [ -n "$AGG_RATE" ] && [ -z "$(to_bps "$AGG_RATE")" ]; then
    echo "netlab: --aggregator-link-rate must look like 1gbit, 100mbit or 500kbit" >&2
    exit 2
fi
if ! [[ "$RACKS" =~ ^[0-9]+$ ]] || [ "$RACKS" -gt "$WORKERS" ]; then
    echo "netlab: --racks must be between 0 and --workers ($WORKERS)" >&2
    exit 2
fi
if [ "$RACKS" -gt 0 ] && [ -z "$(to_bps "$UPLINK_RATE")" ]; then
    echo "netlab: --racks needs --uplink-rate like 1gbit, 100mbit or 500kbit" >&2
    exit 2
fi
if [ "$RACKS" -eq 0 ] && [ -n "$UPLINK_RATE" ]; then
    echo "netlab: --uplink-rate needs --racks" >&2
    exit 2
fi
if ! [[ "$BULK" =~ ^[0-9]+$ ]] || [ "$BULK" -gt 50 ]; then
    echo "netlab: --tcp-bulk must be between 0 and 50" >&2
    exit 2
fi
# A namespace may take only the algorithms the host allows.
if [ -n "$TCP_CC" ] && ! grep -qw -- "$TCP_CC" /proc/sys/net/ipv4/tcp_allowed_congestion_control; then
    echo "netlab: --tcp-congestion $TCP_CC is not allowed in namespaces here (net.ipv4.tcp_allowed_congestion_control: $(cat /proc/sys/net/ipv4/tcp_allowed_congestion_control); the host's root may add it there if it is in tcp_available_congestion_control)" >&2
    exit 2
fi
if [ "$BULK" -gt 0 ] && ! command -v iperf3 >/dev/null; then
    echo "netlab: --tcp-bulk needs iperf3 (apt-get install iperf3)" >&2
    exit 2
fi
INAGG_BIN="${INAGG_BIN:-$(cd "$(dirname "$0")/.." && pwd)/target/release/inagg}"
if [ "$PROBE" = 1 ] && [ ! -x "$INAGG_BIN" ]; then
    echo "netlab: --tcp-probe needs the inagg binary at $INAGG_BIN (cargo build --release, or set INAGG_BIN)" >&2
    exit 2
fi

id="i$(( $$ % 100000 ))"
BR_NS="${id}-br"
AGG_NS="${id}-agg"
W_NS="${id}-w"
T_NS="${id}-t"
made=()
cross=()
teardown() {
    for p in "${cross[@]}"; do kill "$p" 2>/dev/null || true; done
    for ns in "${made[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
}
trap teardown EXIT INT TERM

ns_add() {
    ip netns add "$1"
    made+=("$1")
    ip -n "$1" link set lo up
}
# A veth pair from namespace $1 (device $2, address $3) to bridge $4 (br0, the
# spine, unless given).
attach() {
    local ns="$1" dev="$2" addr="$3" peer="b$2" bridge="${4:-br0}"
    ip link add "$dev" netns "$ns" mtu "$MTU" type veth peer name "$peer" netns "$BR_NS" mtu "$MTU"
    ip -n "$BR_NS" link set "$peer" master "$bridge" up
    ip -n "$ns" addr add "$addr/15" dev "$dev"
    ip -n "$ns" link set "$dev" up
}

ns_add "$BR_NS"
ip -n "$BR_NS" link add br0 mtu "$MTU" type bridge
ip -n "$BR_NS" link set br0 up
# Both directions of a host's link at RATE: its own egress (device $2 in namespace
# $1), and the bridge's egress toward it.
shape() {
    ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$3" burst "$BURST" latency 50ms
    ip netns exec "$BR_NS" tc qdisc add dev "b$2" root tbf rate "$3" burst "$BURST" latency 50ms
}
ns_add "$AGG_NS"
attach "$AGG_NS" "${id}a" 198.18.0.1
if [ -n "$AGG_RATE" ]; then shape "$AGG_NS" "${id}a" "$AGG_RATE"; fi
# Rack k: bridge br(k + 1), and its uplink: veth ${id}u$k on the rack's bridge to
# ${id}s$k on the spine's, each end shaped on its egress.
for ((k = 0; k < RACKS; k++)); do
    ip -n "$BR_NS" link add "br$((k + 1))" mtu "$MTU" type bridge
    ip -n "$BR_NS" link set "br$((k + 1))" up
    ip -n "$BR_NS" link add "${id}u$k" mtu "$MTU" type veth peer name "${id}s$k" mtu "$MTU"
    ip -n "$BR_NS" link set "${id}u$k" master "br$((k + 1))" up
    ip -n "$BR_NS" link set "${id}s$k" master br0 up
    for dev in "${id}u$k" "${id}s$k"; do
        ip netns exec "$BR_NS" tc qdisc add dev "$dev" root tbf rate "$UPLINK_RATE" burst "$BURST" latency 50ms
    done
done
# Each rack's aggregator (`inagg bench --racks`), on its rack's bridge, unshaped: in
# a cluster it is the rack's switch. Rack k is 198.18.2.(10 + k).
R_NS="${id}-r"
rack_ips=""
for ((k = 0; k < RACKS; k++)); do
    ns_add "${R_NS}${k}"
    attach "${R_NS}${k}" "${id}r${k}" "198.18.2.$((10 + k))" "br$((k + 1))"
    rack_ips="${rack_ips:+$rack_ips,}198.18.2.$((10 + k))"
done
for ((r = 0; r < WORKERS; r++)); do
    ns_add "${W_NS}${r}"
    bridge=br0
    # Rank r's rack: the k with floor(k * N / R) <= r < floor((k + 1) * N / R), the
    # blocks rack aggregators serve (docs/protocol.md 8.5).
    if [ "$RACKS" -gt 0 ]; then bridge="br$((((r + 1) * RACKS - 1) / WORKERS + 1))"; fi
    attach "${W_NS}${r}" "${id}w${r}" "198.18.0.$((10 + r))" "$bridge"
    shape "${W_NS}${r}" "${id}w${r}" "$RATE"
done
# Cross-traffic hosts: one per bulk flow, one more for the probe.
hosts=$((BULK + PROBE))
for ((k = 0; k < hosts; k++)); do
    ns_add "${T_NS}${k}"
    attach "${T_NS}${k}" "${id}t${k}" "198.18.1.$((10 + k))"
    shape "${T_NS}${k}" "${id}t${k}" "$RATE"
done
# Large socket buffers, as on the host, and the TCP congestion control asked for.
for ns in "$AGG_NS" $(for ((r = 0; r < WORKERS; r++)); do echo "${W_NS}${r}"; done) \
    $(for ((k = 0; k < RACKS; k++)); do echo "${R_NS}${k}"; done) \
    $(for ((k = 0; k < hosts; k++)); do echo "${T_NS}${k}"; done); do
    ip netns exec "$ns" sysctl -q -w net.core.rmem_max=8388608 net.core.wmem_max=8388608 2>/dev/null || true
    if [ -n "$TCP_CC" ]; then
        ip netns exec "$ns" sysctl -q -w net.ipv4.tcp_congestion_control="$TCP_CC"
    fi
done
cross_note=""
if [ "$BULK" -gt 0 ]; then cross_note=", $BULK bulk TCP flows"; fi
if [ "$PROBE" = 1 ]; then cross_note="$cross_note, a TCP probe"; fi
if [ -n "$TCP_CC" ]; then cross_note="$cross_note, TCP with $TCP_CC"; fi
if [ "$RACKS" -gt 0 ]; then cross_note="$cross_note, in $RACKS racks behind $UPLINK_RATE uplinks"; fi
echo "netlab: $WORKERS workers on $RATE links, aggregator 198.18.0.1${AGG_RATE:+ on a $AGG_RATE link}$cross_note (namespaces ${id}-*)" >&2

# Cross traffic toward the aggregator's namespace, running until COMMAND ends.
if [ "$hosts" -gt 0 ]; then
    mkdir -p "$CROSS_OUT"
    rm -f "$CROSS_OUT"/bulk-*.json "$CROSS_OUT"/probe.json
fi
for ((k = 0; k < BULK; k++)); do
    port=$((5201 + k))
    ip netns exec "$AGG_NS" iperf3 --server --one-off --port "$port" >/dev/null 2>&1 &
    cross+=("$!")
done
if [ "$PROBE" = 1 ]; then
    ip netns exec "$AGG_NS" "$INAGG_BIN" tcp-probe --serve 198.18.0.1:7000 >/dev/null &
    cross+=("$!")
fi
sleep 0.5
bulk=()
for ((k = 0; k < BULK; k++)); do
    # Time enough to outlast COMMAND; stopped with SIGINT when it ends, after which
    # iperf3 still writes its JSON.
    ip netns exec "${T_NS}${k}" iperf3 --client 198.18.0.1 --port "$((5201 + k))" \
        --time 86400 --json >"$CROSS_OUT/bulk-$k.json" 2>&1 &
    bulk+=("$!")
done
probe=""
if [ "$PROBE" = 1 ]; then
    ip netns exec "${T_NS}${BULK}" "$INAGG_BIN" tcp-probe --to 198.18.0.1:7000 \
        --requests 10000000 --interval-ms 10 --json --samples >"$CROSS_OUT/probe.json" &
    probe="$!"
fi
# Let the bulk flows reach their share before COMMAND starts.
if [ "$hosts" -gt 0 ]; then sleep 2; fi
stop_cross() {
    for p in "${bulk[@]}" $probe; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${bulk[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "$probe" ] && ! wait "$probe"; then
        echo "netlab: the TCP probe failed (its report, if any, is in $CROSS_OUT/probe.json)" >&2
    fi
}

export INAGG_NETLAB_AGG_NETNS="$AGG_NS"
export INAGG_NETLAB_AGG_IP=198.18.0.1
export INAGG_NETLAB_WORKER_NETNS="$W_NS"
# Worker r's interface is ${INAGG_NETLAB_WORKER_DEV}r (Gloo's GLOO_SOCKET_IFNAME).
export INAGG_NETLAB_WORKER_DEV="${id}w"
export INAGG_NETLAB_LINK_BPS="$bps"
# The aggregator's link, where --aggregator-link-rate shapes it: every rank's bytes
# cross it, so it bounds the line rate too.
if [ -n "$AGG_RATE" ]; then export INAGG_NETLAB_AGG_LINK_BPS="$(to_bps "$AGG_RATE")"; fi
# The cross-traffic hosts' namespaces are ${INAGG_NETLAB_TCP_NETNS}k, k < HOSTS.
export INAGG_NETLAB_TCP_NETNS="$T_NS"
export INAGG_NETLAB_TCP_HOSTS="$hosts"
export INAGG_NETLAB_RACKS="$RACKS"
export INAGG_NETLAB_BRIDGE_NETNS="$BR_NS"
export INAGG_NETLAB_UPLINK_DEV="${id}s"
# Rack k's aggregator runs in ${INAGG_NETLAB_RACK_NETNS}k at the k-th of these.
if [ "$RACKS" -gt 0 ]; then
    export INAGG_NETLAB_RACK_NETNS="$R_NS"
    export INAGG_NETLAB_RACK_IPS="$rack_ips"
fi
status=0
"$@" || status=$?
stop_cross
if [ "$hosts" -gt 0 ]; then echo "netlab: cross traffic's reports in $CROSS_OUT" >&2; fi
exit "$status"
