#!/usr/bin/env bash
# Finding 3 of issue 12, measured on the real binaries: RSS of netbore-edge and the agent
# before, at the peak of and one minute after an HTTP/2 header flood (HPACK turns a few
# bytes on the wire into a 56 KiB head), and an honest client's latency (from another
# loopback address, 127.0.0.2) before and during it. Figures go to docs/benchmarks.md.
#
#   scripts/memory-flood.sh [FLOOD_SECS [AFTER_SECS]]     # defaults: 15 and 60
#
# Environment: NETBORE_REFUSED_BYTES_PER_SECOND=0 turns the edge's pacing of refused
# clients off (to compare); NETBORE_FLOOD_AGENT_ARGS adds agent flags. Ports are chosen free on loopback; every process started here
# is stopped on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
# One measurement at a time on this machine (shared with bench/run.sh).
exec 9>/tmp/netbore-bench.lock
flock -n 9 || { echo "memory-flood: waiting for another benchmark (/tmp/netbore-bench.lock)" >&2; flock 9; }
FLOOD_SECS=${1:-15}
AFTER_SECS=${2:-60}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
(cd "$ROOT" && cargo build -q --bin netbore --bin netbore-edge --bin netbore-control \
    && cargo build -q -p netbore-e2e --example h2_flood)
BIN=$CARGO_TARGET_DIR/debug
FLOOD=$CARGO_TARGET_DIR/debug/examples/h2_flood
WORK=$(mktemp -d /tmp/netbore-flood.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; exit 1; }

P_ORIGIN=$(free_port) P_REST=$(free_port) P_GRPC=$(free_port) P_PUBLIC=$(free_port)
P_AGENTS=$(free_port) P_ADMIN=$(free_port)

"$FLOOD" origin 127.0.0.1:$P_ORIGIN >"$WORK/origin.log" 2>&1 & PIDS+=($!)
# Control's database in the run's own directory: the default file is shared by every
# control on the machine (and by other versions of it).
"$BIN/netbore-control" --rest-addr 127.0.0.1:$P_REST --grpc-addr 127.0.0.1:$P_GRPC \
    --database-url "sqlite://$WORK/control.db" \
    --domain localhost --public-url-template "http://{name}.localhost:$P_PUBLIC" \
    --edge "id=edge-1,url=ws://127.0.0.1:$P_AGENTS/v1/connect,region=local" >"$WORK/control.log" 2>&1 & PIDS+=($!)
wait_port $P_REST
wait_port $P_GRPC
"$BIN/netbore-edge" --public-addr 127.0.0.1:$P_PUBLIC --agent-addr 127.0.0.1:$P_AGENTS \
    --admin-addr 127.0.0.1:$P_ADMIN --domain localhost --edge-id edge-1 \
    --control-url http://127.0.0.1:$P_REST --control-grpc http://127.0.0.1:$P_GRPC \
    --advertise-url "ws://127.0.0.1:$P_AGENTS/v1/connect" >"$WORK/edge.log" 2>&1 & PIDS+=($!)
EDGE_PID=$!
wait_port $P_PUBLIC
# NETBORE_FLOOD_AGENT_ARGS: extra agent flags (e.g. --no-inspect: the inspector keeps
# the last 500 requests, flood heads included, by design).
# shellcheck disable=SC2086
"$BIN/netbore" http $P_ORIGIN --control "http://127.0.0.1:$P_REST" --name flood ${NETBORE_FLOOD_AGENT_ARGS:-} >"$WORK/agent.log" 2>&1 & PIDS+=($!)
AGENT_PID=$!
for _ in $(seq 1 200); do
    curl -sf -o /dev/null -H "Host: flood.localhost" "http://127.0.0.1:$P_PUBLIC/" && break
    sleep 0.1
done
echo "pacing: ${NETBORE_REFUSED_BYTES_PER_SECOND:-default}; agent flags: ${NETBORE_FLOOD_AGENT_ARGS:-none}; logs in $WORK"
"$FLOOD" attack 127.0.0.1:$P_PUBLIC flood.localhost $EDGE_PID $AGENT_PID "$FLOOD_SECS" "$AFTER_SECS"
curl -s "http://127.0.0.1:$P_ADMIN/metrics" | grep -E '^netbore_edge_(link_|paced_reads|errors_total\{code="(client_overloaded|tunnel_busy)")' || true
