#!/usr/bin/env bash
# A/B of two whole builds of the tunnel (edge and agent both, e.g. a change to the
# agent link): the two alternate on one control and origin, ROUNDS rounds (default 3).
# Each round, through one edge and one agent (--no-inspect):
#   W1  wrk -t1 -c64 -d10s of a 1 KiB GET: requests/s, edge and agent CPU per request;
#   W3  256 MiB download and upload with curl: MB/s, edge and agent CPU per MB.
# CPU is utime+stime from /proc/PID/stat, so it holds better than rates on a busy
# machine. Ends with the median after/before ratio of each figure.
#
#   ROUNDS=5 bench/ab-link.sh BEFORE_DIR AFTER_DIR    # dirs holding netbore-edge and netbore
#
# Needs release builds, wrk and curl. Uses loopback ports 28080-28093.
set -u
[[ $# == 2 ]] || { echo "usage: $0 BEFORE_DIR AFTER_DIR (each with netbore-edge and netbore)" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-3}
# One benchmark at a time on this machine (see bench/run.sh).
exec 9>/tmp/netbore-bench.lock
flock -n 9 || { echo "[ab-link] waiting for another benchmark (/tmp/netbore-bench.lock)" >&2; flock 9; }
declare -A DIR=([before]=$1 [after]=$2)
B=$2
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf $W' EXIT
export NETBORE_EDGE_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
export NETBORE_EDGE_CREDENTIALS="*=sha256:$(printf %s "$NETBORE_EDGE_TOKEN" | sha256sum | cut -d' ' -f1)"
HZ=$(getconf CLK_TCK)
ticks() { sed 's/.*) //' /proc/$1/stat | awk '{print $12 + $13}'; }
head -c $((256 * 1024 * 1024)) /dev/zero > $W/256m.bin
$B/netbore-bench origin 127.0.0.1:28080 > $W/origin.log 2>&1 &
$B/netbore-control --database-url sqlite::memory: --rest-addr 127.0.0.1:28090 --grpc-addr 127.0.0.1:28091 --domain localhost --public-url-template "http://{name}.localhost:28092" --edge "id=edge-1,url=ws://127.0.0.1:28093/v1/connect,region=local" > $W/control.log 2>&1 &
sleep 1
URL=http://127.0.0.1:28092
H="Host: bench.localhost"
for round in $(seq "$ROUNDS"); do
  for which in before after; do
    d=${DIR[$which]}
    "$d/netbore-edge" --public-addr 127.0.0.1:28092 --agent-addr 127.0.0.1:28093 --domain localhost --edge-id edge-1 --control-url http://127.0.0.1:28090 --control-grpc http://127.0.0.1:28091 --advertise-url ws://127.0.0.1:28093/v1/connect > $W/edge-$which-$round.log 2>&1 & E=$!
    sleep 1
    "$d/netbore" http 28080 --control http://127.0.0.1:28090 --name bench --connections 1 --state-dir $W/state --no-inspect > $W/agent-$which-$round.log 2>&1 & A=$!
    for i in $(seq 200); do curl -sf -o /dev/null -H "$H" $URL/1k && break; sleep 0.1; done
    wrk -t1 -c64 -d2s -H "$H" $URL/1k > /dev/null
    e0=$(ticks $E); a0=$(ticks $A)
    out=$(wrk -t1 -c64 -d10s -H "$H" $URL/1k)
    e1=$(ticks $E); a1=$(ticks $A)
    n=$(awk '/requests in/ {print $1}' <<<"$out"); rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
    dl=$(curl -s --max-time 120 -o /dev/null -H "$H" -w '%{speed_download}' $URL/256m)
    e2=$(ticks $E); a2=$(ticks $A)
    ul=$(curl -s --max-time 120 -o /dev/null -H "$H" -H 'Expect:' -T $W/256m.bin -w '%{speed_upload}' $URL/upload)
    e3=$(ticks $E); a3=$(ticks $A)
    awk -v w=$which -v r=$round -v n=$n -v rps=$rps -v hz=$HZ -v dl=$dl -v ul=$ul \
      -v e1=$((e1-e0)) -v a1=$((a1-a0)) -v e2=$((e2-e1)) -v a2=$((a2-a1)) -v e3=$((e3-e2)) -v a3=$((a3-a2)) \
      'BEGIN {mb = 256 * 1.048576
              printf "round %d %-6s W1 req/s %6d CPU/req edge %5.1f agent %5.1f us | W3 down %5.0f MB/s CPU/MB edge %5.2f agent %5.2f ms | up %5.0f MB/s CPU/MB edge %5.2f agent %5.2f ms\n",
                r, w, rps, e1*1e6/hz/n, a1*1e6/hz/n, dl/1e6, e2*1e3/hz/mb, a2*1e3/hz/mb, ul/1e6, e3*1e3/hz/mb, a3*1e3/hz/mb}' | tee -a $W/rows
    kill $A $E; wait $A $E 2>/dev/null
  done
done
# Median over rounds of after ÷ before, figure by figure (fields as printed above).
python3 - "$W/rows" <<'EOF'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    r, which = line.split()[1:3]
    nums = [float(x) for x in re.findall(r"-?\d+\.?\d*", line.split(which, 1)[1])]
    rows.setdefault(int(r), {})[which] = nums
names = ["W1 req/s", "W1 edge CPU/req", "W1 agent CPU/req", "W3 down MB/s", "down edge CPU/MB",
         "down agent CPU/MB", "W3 up MB/s", "up edge CPU/MB", "up agent CPU/MB"]
# The numbers in a row: "1" of W1, then the figures (W3 labels add "3"s): keep the figures.
def figures(nums):
    return [nums[1], nums[2], nums[3], nums[5], nums[6], nums[7], nums[8], nums[9], nums[10]]
print("median after/before over %d rounds:" % len(rows))
for i, name in enumerate(names):
    ratios = [figures(v["after"])[i] / figures(v["before"])[i]
              for v in rows.values() if "after" in v and "before" in v and figures(v["before"])[i]]
    if ratios:
        print("  %-18s %.2fx (%.2f-%.2f)" % (name, statistics.median(ratios), min(ratios), max(ratios)))
EOF
