#!/usr/bin/env bash
# A/B of two netbore-edge builds under W1: wrk -t1 -c64 -d10s through one edge and one
# agent (--no-inspect), the two edge binaries alternating on one control, origin and agent
# build, three rounds; prints requests/s and edge and agent CPU per request
# (utime+stime from /proc/PID/stat).
#
#   bench/ab-edge.sh EDGE_BEFORE EDGE_AFTER
#
# Needs a release build (cargo build --release; bench/run.sh makes one), wrk and curl.
# Uses loopback ports 28080-28093.
set -u
[[ $# == 2 ]] || { echo "usage: $0 EDGE_BEFORE EDGE_AFTER" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# One benchmark at a time on this machine (see bench/run.sh).
exec 9>/tmp/netbore-bench.lock
flock -n 9 || { echo "[ab-edge] waiting for another benchmark (/tmp/netbore-bench.lock)" >&2; flock 9; }
B=${CARGO_TARGET_DIR:-$ROOT/target}/release
declare -A EDGE=([before]=$1 [after]=$2)
W=$(mktemp -d)
export NETBORE_EDGE_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export NETBORE_EDGE_CREDENTIALS="*=sha256:$(printf %s "$NETBORE_EDGE_TOKEN" | sha256sum | cut -d' ' -f1)"
HZ=$(getconf CLK_TCK)
ticks() { sed 's/.*) //' /proc/$1/stat | awk '{print $12 + $13}'; }
$B/netbore-bench origin 127.0.0.1:28080 > $W/origin.log 2>&1 & O=$!
$B/netbore-control --database-url sqlite::memory: --rest-addr 127.0.0.1:28090 --grpc-addr 127.0.0.1:28091 --domain localhost --public-url-template "http://{name}.localhost:28092" --edge "id=edge-1,url=ws://127.0.0.1:28093/v1/connect,region=local" > $W/control.log 2>&1 & C=$!
sleep 1
for round in 1 2 3; do
  for which in before after; do
    "${EDGE[$which]}" --public-addr 127.0.0.1:28092 --agent-addr 127.0.0.1:28093 --domain localhost --edge-id edge-1 --control-url http://127.0.0.1:28090 --control-grpc http://127.0.0.1:28091 --advertise-url ws://127.0.0.1:28093/v1/connect > $W/edge-$which-$round.log 2>&1 & E=$!
    sleep 1
    $B/netbore http 28080 --control http://127.0.0.1:28090 --name bench --connections 1 --state-dir $W/state --no-inspect > $W/agent.log 2>&1 & A=$!
    for i in $(seq 200); do curl -sf -o /dev/null -H "Host: bench.localhost" http://127.0.0.1:28092/1k && break; sleep 0.1; done
    wrk -t1 -c64 -d2s -H "Host: bench.localhost" http://127.0.0.1:28092/1k > /dev/null
    e0=$(ticks $E); a0=$(ticks $A)
    out=$(wrk -t1 -c64 -d10s -H "Host: bench.localhost" http://127.0.0.1:28092/1k)
    e1=$(ticks $E); a1=$(ticks $A)
    n=$(awk '/requests in/ {print $1}' <<<"$out"); rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
    awk -v w=$which -v r=$round -v n=$n -v rps=$rps -v e=$((e1-e0)) -v a=$((a1-a0)) -v hz=$HZ \
      'BEGIN {printf "round %d %-6s req/s %6d  edge CPU/request %5.1f us  agent %5.1f us  requests %d\n", r, w, rps, e*1e6/hz/n, a*1e6/hz/n, n}'
    kill $A $E; wait $A $E 2>/dev/null
  done
done
kill $C $O; wait 2>/dev/null
rm -rf $W
