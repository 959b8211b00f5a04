#!/usr/bin/env bash
# W4 alone, in about a minute: memory of idle tunnels on the edge and of an idle agent.
#
#   bench/idle.sh              # 1,000 then 10,000 idle tunnels
#   bench/idle.sh 1000 5000    # other steps (cumulative tunnel counts)
#
# On a fresh control and edge (ws, no TLS): one real agent (`netbore http --connections 1`)
# whose RSS and anonymous memory are read one second after its tunnel answers; then
# `netbore-bench idle` creates tunnels at control and holds one agent link per tunnel
# (real hello, token and welcome). Per tunnel = (edge memory − edge memory before the
# idle tool) ÷ tunnels, for RSS and for anonymous memory (RSS less file pages); "tool per
# link" is the anonymous memory of the process holding the agent ends of the links
# divided by its links. Prints
# `name value` lines; `..._settled_bytes` is read IDLE_SETTLE seconds (default 30) later,
# once the links have been quiet for a heartbeat interval and freed memory has decayed. NETBORE_BENCH_BIN=DIR runs the binaries found in DIR instead of
# building them (to compare two builds). Uses loopback ports 18180-18185; takes the
# machine-wide benchmark lock like bench/run.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STEPS=("$@")
# Seconds to wait after each step before the "settled" figure (0: none).
SETTLE=${IDLE_SETTLE:-30}
[[ ${#STEPS[@]} == 0 ]] && STEPS=(1000 10000)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

exec 9>/tmp/netbore-bench.lock
if ! flock -n 9; then
    printf '[idle] another benchmark holds /tmp/netbore-bench.lock; waiting for it\n' >&2
    flock 9
fi
WORK=$(mktemp -d /tmp/netbore-idle.XXXXXX)
PIDS=()
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
log() { printf '[idle %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
start() { # name cmd...
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
}
wait_port() {
    local i
    for ((i = 0; i < 400; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    log "port $1 never opened"
    return 1
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
anon_kib() { awk '/^Anonymous/ {print $2}' "/proc/$1/smaps_rollup"; }
# The edge's heap as jemalloc sees it (allocated, active, metadata, resident bytes), from
# its /metrics; zeros when the build does not export them.
heap() {
    curl -s "http://127.0.0.1:$P_ADMIN/metrics" | awk '
        /^netbore_heap_allocated_bytes / {a = $2} /^netbore_heap_active_bytes / {c = $2}
        /^netbore_heap_metadata_bytes / {m = $2} /^netbore_heap_resident_bytes / {r = $2}
        END {printf "%d %d %d %d\n", a, c, m, r}'
}

P_ORIGIN=18180 P_REST=18181 P_GRPC=18182 P_PUBLIC=18183 P_AGENTS=18184 P_ADMIN=18185
if [[ -n ${NETBORE_BENCH_BIN:-} ]]; then
    BIN=$NETBORE_BENCH_BIN
else
    log "building (release): netbore, netbore-edge, netbore-control"
    (cd "$ROOT" && cargo build --release -q --bin netbore --bin netbore-edge --bin netbore-control)
    BIN=$CARGO_TARGET_DIR/release
fi
(cd "$ROOT/bench" && cargo build --release -q)
TOOL=$CARGO_TARGET_DIR/release/netbore-bench
NETBORE_EDGE_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
NETBORE_EDGE_CREDENTIALS="*=sha256:$(printf %s "$NETBORE_EDGE_TOKEN" | sha256sum | cut -d' ' -f1)"
export NETBORE_EDGE_TOKEN NETBORE_EDGE_CREDENTIALS
ulimit -n "$(ulimit -Hn)"

start origin "$TOOL" origin 127.0.0.1:$P_ORIGIN
wait_port $P_ORIGIN
start control "$BIN/netbore-control" --rest-addr 127.0.0.1:$P_REST --grpc-addr 127.0.0.1:$P_GRPC \
    --database-url sqlite::memory: --domain localhost \
    --public-url-template "http://{name}.localhost:$P_PUBLIC" \
    --edge "id=edge-1,url=ws://127.0.0.1:$P_AGENTS/v1/connect,region=local" \
    --anonymous-create-per-minute 0
wait_port $P_REST
wait_port $P_GRPC
start edge "$BIN/netbore-edge" --public-addr 127.0.0.1:$P_PUBLIC --agent-addr 127.0.0.1:$P_AGENTS \
    --admin-addr 127.0.0.1:$P_ADMIN --domain localhost --edge-id edge-1 \
    --control-url http://127.0.0.1:$P_REST --control-grpc http://127.0.0.1:$P_GRPC \
    --advertise-url "ws://127.0.0.1:$P_AGENTS/v1/connect" --max-connections-per-address 0
EDGE=${PIDS[-1]}
wait_port $P_AGENTS
wait_port $P_PUBLIC

# One real agent, idle after its first proxied response.
start agent "$BIN/netbore" http $P_ORIGIN --control "http://127.0.0.1:$P_REST" --name idle \
    --connections 1 --state-dir "$WORK/state"
AGENT=${PIDS[-1]}
for ((i = 0; i < 200; i++)); do
    curl -sf -o /dev/null -H "Host: idle.localhost" "http://127.0.0.1:$P_PUBLIC/1k" && break
    sleep 0.1
done
sleep 1
echo "agent_rss_kib $(rss_kib "$AGENT")"
echo "agent_anon_kib $(anon_kib "$AGENT")"

base_rss=$(rss_kib "$EDGE") base_anon=$(anon_kib "$EDGE")
echo "edge_base_rss_kib $base_rss"
echo "edge_base_anon_kib $base_anon"
read -r base_alloc base_active base_meta base_res <<<"$(heap)"
have=0 prev=0
for n in "${STEPS[@]}"; do
    start "idle-$n" "$TOOL" idle "http://127.0.0.1:$P_REST" $((n - have))
    t=${PIDS[-1]}
    for ((i = 0; i < 600; i++)); do
        grep -q '^ready' "$WORK/idle-$n.log" && break
        kill -0 "$t" 2>/dev/null || break
        sleep 0.5
    done
    if ! grep -q '^ready' "$WORK/idle-$n.log"; then
        log "idle tool failed: $(tail -3 "$WORK/idle-$n.log")"
        exit 1
    fi
    log "$(head -1 "$WORK/idle-$n.log") (step to $n)"
    have=$n
    sleep 2
    rss=$(rss_kib "$EDGE") anon=$(anon_kib "$EDGE")
    echo "edge_rss_${n}_kib $rss"
    echo "edge_per_tunnel_rss_${n}_bytes $(((rss - base_rss) * 1024 / n))"
    echo "edge_per_tunnel_anon_${n}_bytes $(((anon - base_anon) * 1024 / n))"
    # Idle for real: past a heartbeat interval (15 s: the links give their burst's
    # buffers back) and jemalloc's 10 s decay (freed handshake memory leaves RSS).
    if [[ $SETTLE -gt 0 ]]; then
        sleep "$SETTLE"
        rss=$(rss_kib "$EDGE")
        echo "edge_per_tunnel_rss_${n}_settled_bytes $(((rss - base_rss) * 1024 / n))"
        # Where it goes: live allocations, the pages holding them, bookkeeping, and
        # all the resident pages jemalloc maps.
        read -r alloc active meta res <<<"$(heap)"
        echo "edge_per_tunnel_heap_allocated_${n}_bytes $(((alloc - base_alloc) / n))"
        echo "edge_per_tunnel_heap_active_${n}_bytes $(((active - base_active) / n))"
        echo "edge_per_tunnel_heap_metadata_${n}_bytes $(((meta - base_meta) / n))"
        echo "edge_per_tunnel_heap_resident_${n}_bytes $(((res - base_res) / n))"
    fi
    # Each step's tool holds only the links it opened (its own start-up memory included).
    echo "tool_per_link_anon_${n}_bytes $(($(anon_kib "$t") * 1024 / (n - prev)))"
    prev=$n
done
log "logs in $WORK"
