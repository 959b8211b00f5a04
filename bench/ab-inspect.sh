#!/usr/bin/env bash
# The inspector's cost (issue 14) under W1: wrk -t1 -c64 -d10s through one edge and one
# agent, the agent (`netbore http`) alternating between the inspector on (the default)
# and --no-inspect on one control, origin and edge; four rounds (ROUNDS=n for more).
# Prints requests/s and agent and edge CPU per request (utime+stime from
# /proc/PID/stat), then the medians and the on ÷ off ratios.
#
#   bench/ab-inspect.sh [NETBORE_BIN ...]
#
# With no argument it measures the release build's `netbore`; with several, each binary
# runs both modes in every round, so an old and a new agent compare within one run.
# The agent's console goes to a file, as it would to a terminal or a pipe.
# Needs a release build (cargo build --release; bench/run.sh makes one), wrk and curl.
# Uses loopback ports 28180-28194.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# One benchmark at a time on this machine (see bench/run.sh).
exec 9>/tmp/netbore-bench.lock
flock -n 9 || { echo "[ab-inspect] waiting for another benchmark (/tmp/netbore-bench.lock)" >&2; flock 9; }
B=${CARGO_TARGET_DIR:-$ROOT/target}/release
AGENTS=("$@")
[[ ${#AGENTS[@]} == 0 ]] && AGENTS=("$B/netbore")
ROUNDS=${ROUNDS:-4}
W=$(mktemp -d)
export NETBORE_EDGE_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export NETBORE_EDGE_CREDENTIALS="*=sha256:$(printf %s "$NETBORE_EDGE_TOKEN" | sha256sum | cut -d' ' -f1)"
HZ=$(getconf CLK_TCK)
ticks() { sed 's/.*) //' /proc/$1/stat | awk '{print $12 + $13}'; }
$B/netbore-bench origin 127.0.0.1:28180 > $W/origin.log 2>&1 & O=$!
$B/netbore-control --database-url sqlite::memory: --rest-addr 127.0.0.1:28190 --grpc-addr 127.0.0.1:28191 --domain localhost --public-url-template "http://{name}.localhost:28192" --edge "id=edge-1,url=ws://127.0.0.1:28193/v1/connect,region=local" > $W/control.log 2>&1 & C=$!
sleep 1
$B/netbore-edge --public-addr 127.0.0.1:28192 --agent-addr 127.0.0.1:28193 --domain localhost --edge-id edge-1 --control-url http://127.0.0.1:28190 --control-grpc http://127.0.0.1:28191 --advertise-url ws://127.0.0.1:28193/v1/connect > $W/edge.log 2>&1 & E=$!
sleep 1
for round in $(seq "$ROUNDS"); do
  for a in "${!AGENTS[@]}"; do
    for mode in on off; do
      flags=(--inspect-addr 127.0.0.1:28194)
      [[ $mode == off ]] && flags=(--no-inspect)
      "${AGENTS[$a]}" http 28180 --control http://127.0.0.1:28190 --name bench --connections 1 --state-dir $W/state "${flags[@]}" > $W/agent.out 2> $W/agent.log & A=$!
      for i in $(seq 200); do curl -sf -o /dev/null -H "Host: bench.localhost" http://127.0.0.1:28192/1k && break; sleep 0.1; done
      wrk -t1 -c64 -d2s -H "Host: bench.localhost" http://127.0.0.1:28192/1k > /dev/null
      e0=$(ticks $E); a0=$(ticks $A)
      out=$(wrk -t1 -c64 -d10s -H "Host: bench.localhost" http://127.0.0.1:28192/1k)
      e1=$(ticks $E); a1=$(ticks $A)
      n=$(awk '/requests in/ {print $1}' <<<"$out"); rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
      awk -v w="agent$a-$mode" -v r=$round -v n=$n -v rps=$rps -v e=$((e1-e0)) -v a=$((a1-a0)) -v hz=$HZ \
        'BEGIN {printf "round %d %-10s req/s %6d  agent CPU/request %5.1f us  edge %5.1f us  requests %d\n", r, w, rps, a*1e6/hz/n, e*1e6/hz/n, n}' | tee -a $W/results
      kill $A; wait $A 2>/dev/null
    done
  done
done
kill $E $C $O; wait 2>/dev/null
echo "medians over $ROUNDS rounds:"
for a in "${!AGENTS[@]}"; do
  echo "agent$a = ${AGENTS[$a]}"
  for mode in on off; do
    grep " agent$a-$mode " $W/results | awk '{print $5, $8}' > $W/m-$mode
    rps=$(cut -d' ' -f1 $W/m-$mode | sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}')
    cpu=$(cut -d' ' -f2 $W/m-$mode | sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}')
    printf "  %-3s req/s %6.0f  agent CPU/request %5.1f us\n" $mode $rps $cpu
    declare "rps_$mode=$rps" "cpu_$mode=$cpu"
  done
  awk -v a=$rps_on -v b=$rps_off -v c=$cpu_on -v d=$cpu_off \
    'BEGIN {printf "  on / off: req/s %.2fx  agent CPU/request %.2fx\n", a/b, c/d}'
  # Per round, the ratio of the on run to the off run beside it.
  paste -d' ' <(grep " agent$a-on " $W/results | awk '{print $5, $8}') <(grep " agent$a-off " $W/results | awk '{print $5, $8}') |
    awk '{printf "  round %d on / off: req/s %.2fx  agent CPU/request %.2fx\n", NR, $1/$3, $2/$4}'
done
rm -rf $W
