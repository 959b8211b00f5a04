#!/usr/bin/env bash
# Side-by-side benchmark: the origin directly, nginx as one reverse-proxy hop, Netbore
# (ws and wss), rathole 0.5 (tcp and websocket) and bore, on loopback only.
#
#   bench/run.sh            # full run (about 3 minutes on 2 cores after the release build), rewrites docs/benchmarks.md
#   bench/run.sh --quick    # shorter loads, skips the 10,000-tunnel step, prints the table only
#
# Every W1 and W2 also records the tunnel's CPU per request: the user+system time the
# tunnel's own processes (edge and agent, server and client, nginx workers) spent during the
# load, divided by the requests wrk completed. It holds better than requests/s on a noisy
# machine.
#
# Needs: wrk, curl, nginx (apt-get install wrk nginx), python3. Optional: rathole
# (`cargo install rathole`), bore (`cargo install bore-cli`); a system that is not
# installed gets "not installed" in its rows. Every process started here is stopped on
# exit; every load is bounded in time.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
QUICK=0
[[ ${1:-} == --quick ]] && QUICK=1
W1_SECS=10
W2_SECS=5
IDLE_STEPS="1000 10000"
if [[ $QUICK == 1 ]]; then
    W1_SECS=3
    W2_SECS=2
    IDLE_STEPS="1000"
fi
WS_ECHOS=3000

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

# One benchmark at a time on this machine (fixed ports, and two loads at once would
# measure each other): wait for any other bench/run.sh or bench/ab-edge.sh to finish.
exec 9>/tmp/netbore-bench.lock
if ! flock -n 9; then
    printf '[bench] another benchmark holds /tmp/netbore-bench.lock; waiting for it\n' >&2
    flock 9
fi
WORK=$(mktemp -d /tmp/netbore-bench.XXXXXX)
RESULTS=$WORK/results.txt
: >"$RESULTS"
PIDS=()

# Fixed loopback ports (this is not a test: nothing else should run beside it).
P_ORIGIN=18080
P_NGINX=18081
P_REST=18090 P_GRPC=18091 P_PUBLIC=18092 P_AGENTS=18093 P_ADMIN=18094
P_RH_CTRL=18100 P_RH_SVC=18101
P_BORE=18110
P_TCP=18130
P_REDIS=18120 P_PUBLIC2=18095 P_AGENTS2=18096 P_ADMIN2=18097 P_INT1=18098 P_INT2=18099

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
put() { echo "$1 $2 $3" >>"$RESULTS"; }   # system metric value

start() { # name cmd... : starts in the background, logs to $WORK/name.log
    local name=$1
    shift
    "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    echo $!
}

stop_all() {
    local p
    for p in "${PIDS[@]}"; do
        kill "$p" 2>/dev/null || true
    done
    for p in "${PIDS[@]}"; do
        wait "$p" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    stop_all
    [[ -f $WORK/nginx.pid ]] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
}
trap cleanup EXIT

wait_port() { # port [seconds]
    local i
    for ((i = 0; i < ${2:-20} * 20; i++)); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    log "port $1 never opened"
    return 1
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
# Anonymous memory (heap, stacks): RSS less the executable's and libraries' file pages,
# which a large binary touches at start and which are shared between processes.
anon_kib() { awk '/^Anonymous/ {print $2}' "/proc/$1/smaps_rollup" 2>/dev/null || echo 0; }
mem() { # system role pid: puts RSS and anonymous memory
    put "$1" "w4_${2}_rss_kib" "$(rss_kib "$3")"
    put "$1" "w4_${2}_anon_kib" "$(anon_kib "$3")"
}

# ------------------------------------------------------------------ build
# NETBORE_BENCH_BIN=DIR runs the netbore, netbore-edge and netbore-control found in DIR
# instead of building them (to compare an older build in the same conditions).
if [[ -n ${NETBORE_BENCH_BIN:-} ]]; then
    log "building (release): netbore-bench; Netbore binaries from $NETBORE_BENCH_BIN"
    BIN=$NETBORE_BENCH_BIN
else
    log "building (release): netbore, netbore-edge, netbore-control, netbore-bench"
    (cd "$ROOT" && cargo build --release -q --bin netbore --bin netbore-edge --bin netbore-control)
    BIN=$CARGO_TARGET_DIR/release
fi
(cd "$ROOT/bench" && cargo build --release -q)
TOOL=$CARGO_TARGET_DIR/release/netbore-bench

# Edges link to control with a credential control knows (docs/security.md, finding 1).
NETBORE_EDGE_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
NETBORE_EDGE_CREDENTIALS="*=sha256:$(printf %s "$NETBORE_EDGE_TOKEN" | sha256sum | cut -d' ' -f1)"
export NETBORE_EDGE_TOKEN NETBORE_EDGE_CREDENTIALS

# 10,000 idle agent links need 10,000 descriptors in the edge and in the load tool.
ulimit -n "$(ulimit -Hn)"

# 256 MiB upload source (page-cached after the first read).
head -c $((256 * 1024 * 1024)) /dev/zero >"$WORK/256m.bin"

for p in $P_ORIGIN $P_NGINX $P_REST $P_GRPC $P_PUBLIC $P_AGENTS $P_ADMIN $P_RH_CTRL $P_RH_SVC $P_BORE 7835 $P_TCP \
    $P_REDIS $P_PUBLIC2 $P_AGENTS2 $P_ADMIN2 $P_INT1 $P_INT2; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        log "port $p is in use: is another bench/run.sh (or a leftover of one) running?"
        exit 1
    fi
done

start origin "$TOOL" origin 127.0.0.1:$P_ORIGIN >/dev/null
wait_port $P_ORIGIN

# ------------------------------------------------------------------ workloads
# CPU time (clock ticks, user + system) of the processes in CPU_PIDS and their threads.
CPU_PIDS=()
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() {
    local p total=0 t
    for p in "${CPU_PIDS[@]}"; do
        # Fields 14 and 15 of /proc/PID/stat, counted after the command name's ')'.
        t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}') || t=0
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

wrk_run() { # system label conns secs url host -> puts rps, p50, p99 (microseconds), CPU/request
    local sys=$1 label=$2 conns=$3 secs=$4 url=$5 host=$6 out before after
    before=$(cpu_ticks)
    out=$(wrk -t1 -c"$conns" -d"${secs}s" --latency -H "Host: $host" "$url" 2>&1) || true
    after=$(cpu_ticks)
    echo "$out" >"$WORK/wrk-$sys-$label.txt"
    if [[ ${#CPU_PIDS[@]} -gt 0 ]]; then
        local reqs
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
        if [[ -n $reqs && $reqs -gt 0 ]]; then
            put "$sys" "${label}_cpu_us_per_req" \
                "$(awk -v t=$((after - before)) -v hz="$CLK_TCK" -v n="$reqs" 'BEGIN {printf "%.1f", t * 1e6 / hz / n}')"
        fi
    fi
    local rps p50 p99 errs
    rps=$(awk '/^Requests\/sec/ {printf "%.0f", $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out" | to_us)
    p99=$(awk '$1=="99%" {print $2}' <<<"$out" | to_us)
    errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
    [[ -n $errs ]] && log "$sys $label: $errs"
    put "$sys" "${label}_rps" "${rps:-err}"
    put "$sys" "${label}_p50_us" "${p50:-err}"
    put "$sys" "${label}_p99_us" "${p99:-err}"
}
to_us() {
    awk '{ v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v+0}
           else if (v ~ /ms$/) {sub(/ms$/,"",v); printf "%.0f\n", v*1000}
           else if (v ~ /s$/) {sub(/s$/,"",v); printf "%.0f\n", v*1000000} }'
}

stream_run() { # system base_url host -> puts dl/ul MB/s
    local sys=$1 base=$2 host=$3 dl ul
    dl=$(curl -sk --max-time 120 -o /dev/null -H "Host: $host" -w '%{speed_download}' "$base/256m" || echo 0)
    ul=$(curl -sk --max-time 120 -o /dev/null -H "Host: $host" -H 'Expect:' -T "$WORK/256m.bin" \
        -w '%{speed_upload}' "$base/upload" || echo 0)
    put "$sys" w3_download_MBps "$(awk -v b="$dl" 'BEGIN {printf "%.0f", b/1e6}')"
    put "$sys" w3_upload_MBps "$(awk -v b="$ul" 'BEGIN {printf "%.0f", b/1e6}')"
}

ws_run() { # system ws_url host
    local out
    out=$("$TOOL" ws-echo "$2" "$3" $WS_ECHOS 2>&1) || log "$1 ws-echo: $out"
    put "$1" w5_p50_us "$(sed -n 's/.*p50_us=\([0-9]*\).*/\1/p' <<<"$out")"
    put "$1" w5_p99_us "$(sed -n 's/.*p99_us=\([0-9]*\).*/\1/p' <<<"$out")"
}

all_loads() { # system http_base ws_base host
    local sys=$1 base=$2 wsb=$3 host=$4
    log "$sys: W1 (64 connections, ${W1_SECS}s)"
    wrk_run "$sys" w1 64 "$W1_SECS" "$base/1k" "$host"
    log "$sys: W2 (1 connection, ${W2_SECS}s)"
    wrk_run "$sys" w2 1 "$W2_SECS" "$base/1k" "$host"
    log "$sys: W3 (256 MiB down, up)"
    stream_run "$sys" "$base" "$host"
    log "$sys: W5 ($WS_ECHOS WebSocket echoes)"
    ws_run "$sys" "$wsb/ws" "$host"
}

first_byte() { # system url host cmd... -> puts w6_ms; sets FB_PID (the client's pid)
    local sys=$1 url=$2 host=$3 out
    shift 3
    out=$("$TOOL" first-byte "$url" "$host" 30 -- "$@" 2>>"$WORK/$sys-client.log") || true
    local ms
    FB_PID=$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' <<<"$out")
    ms=$(sed -n 's/.*ms=\([0-9.a-z]*\).*/\1/p' <<<"$out")
    put "$sys" w6_ms "${ms:-err}"
    if [[ -n $FB_PID ]]; then PIDS+=("$FB_PID"); else FB_PID=0; fi
}

# ------------------------------------------------------------------ direct
log "direct origin"
all_loads direct "http://127.0.0.1:$P_ORIGIN" "ws://127.0.0.1:$P_ORIGIN" "localhost"
mem direct server "${PIDS[0]}"

# ------------------------------------------------------------------ nginx
if command -v nginx >/dev/null; then
    log "nginx reverse proxy"
    mkdir -p "$WORK/nginx"
    cat >"$WORK/nginx.conf" <<EOF
worker_processes auto;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log $WORK/nginx/access.log;
    client_body_temp_path $WORK/nginx;
    proxy_temp_path $WORK/nginx;
    client_max_body_size 0;
    map \$http_upgrade \$connection_upgrade { default upgrade; '' ''; }
    upstream origin { server 127.0.0.1:$P_ORIGIN; keepalive 128; }
    server {
        listen 127.0.0.1:$P_NGINX;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Host \$host;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            # Stream both ways through 64 KiB buffers, never via temporary files.
            proxy_buffering on;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_max_temp_file_size 0;
            proxy_request_buffering off;
            client_body_buffer_size 64k;
        }
    }
}
EOF
    nginx -c "$WORK/nginx.conf" -e "$WORK/nginx/error.log"
    wait_port $P_NGINX
    CPU_PIDS=("$(cat "$WORK/nginx.pid")" $(pgrep -P "$(cat "$WORK/nginx.pid")"))
    all_loads nginx "http://127.0.0.1:$P_NGINX" "ws://127.0.0.1:$P_NGINX" "localhost"
    kill "$(cat "$WORK/nginx.pid")"
    rm -f "$WORK/nginx.pid"
    CPU_PIDS=()
else
    put nginx installed no
fi

# ------------------------------------------------------------------ netbore
# Extra flags for control and the edge (the TCP row sets a port range).
CONTROL_EXTRA=()
EDGE_EXTRA=()
netbore_stack() { # tls (0: none, 1: both listeners, 2: agent listener only) -> starts control and edge
    local scheme=ws edge_tls=() pub=http
    if [[ $1 == 1 ]]; then
        scheme=wss pub=https
        edge_tls=(--tls-self-signed --tls-self-signed-out "$WORK/ca.pem")
    elif [[ $1 == 2 ]]; then
        scheme=wss
        edge_tls=(--agent-tls-only --tls-self-signed --tls-self-signed-out "$WORK/ca.pem")
    fi
    start control "$BIN/netbore-control" --rest-addr 127.0.0.1:$P_REST --grpc-addr 127.0.0.1:$P_GRPC \
        --database-url sqlite::memory: \
        --domain localhost --public-url-template "$pub://{name}.localhost:$P_PUBLIC" \
        --edge "id=edge-1,url=$scheme://127.0.0.1:$P_AGENTS/v1/connect,region=local" \
        "${CONTROL_EXTRA[@]}" >/dev/null
    wait_port $P_REST
    wait_port $P_GRPC
    start edge "$BIN/netbore-edge" --public-addr 127.0.0.1:$P_PUBLIC --agent-addr 127.0.0.1:$P_AGENTS \
        --admin-addr 127.0.0.1:$P_ADMIN --domain localhost --edge-id edge-1 \
        --control-url http://127.0.0.1:$P_REST --control-grpc http://127.0.0.1:$P_GRPC \
        --advertise-url "$scheme://127.0.0.1:$P_AGENTS/v1/connect" "${edge_tls[@]}" \
        "${EDGE_EXTRA[@]}" >/dev/null
    wait_port $P_AGENTS
    wait_port $P_PUBLIC
    EDGE_PID=${PIDS[-1]}
}

netbore_run() { # system tls
    local sys=$1 tls=$2 pub=http wsp=ws ca=()
    if [[ $tls == 1 ]]; then
        pub=https wsp=wss ca=(--edge-ca "$WORK/ca.pem")
    elif [[ $tls == 2 ]]; then
        ca=(--edge-ca "$WORK/ca.pem")
    fi
    log "$sys"
    netbore_stack "$tls"
    local agent
    first_byte "$sys" "$pub://127.0.0.1:$P_PUBLIC/1k" "bench.localhost" \
        "$BIN/netbore" http $P_ORIGIN --control "http://127.0.0.1:$P_REST" --name bench \
        --connections 1 --state-dir "$WORK/state-$sys" "${ca[@]}"
    agent=$FB_PID
    sleep 1
    mem "$sys" server "$EDGE_PID"
    mem "$sys" client "$agent"
    CPU_PIDS=("$EDGE_PID" "$agent")
    all_loads "$sys" "$pub://127.0.0.1:$P_PUBLIC" "$wsp://127.0.0.1:$P_PUBLIC" "bench.localhost"
    put "$sys" w4_server_rss_after_load_kib "$(rss_kib "$EDGE_PID")"
    put "$sys" w4_client_rss_after_load_kib "$(rss_kib "$agent")"
    stop_all_but_origin
}

# The inspector's cost (issue 14): W1 and W2 with the agent's inspector on (the default,
# as in the netbore-ws row) and with --no-inspect, alternating on one stack, twice each.
netbore_inspect_run() {
    log "netbore-ws: inspector on / --no-inspect"
    netbore_stack 0
    local round mode agent
    for round in 1 2; do
        for mode in on off; do
            local flags=()
            [[ $mode == off ]] && flags=(--no-inspect)
            start "agent-$mode-$round" "$BIN/netbore" http $P_ORIGIN --control "http://127.0.0.1:$P_REST" \
                --name bench --connections 1 --state-dir "$WORK/state-inspect" "${flags[@]}" >/dev/null
            agent=${PIDS[-1]}
            local i
            for ((i = 0; i < 200; i++)); do
                curl -sf -o /dev/null -H "Host: bench.localhost" "http://127.0.0.1:$P_PUBLIC/1k" && break
                sleep 0.1
            done
            CPU_PIDS=("$EDGE_PID" "$agent")
            wrk_run "netbore-inspect-$mode" "w1_r$round" 64 "$W1_SECS" "http://127.0.0.1:$P_PUBLIC/1k" bench.localhost
            CPU_PIDS=()
            kill "$agent"
            wait "$agent" 2>/dev/null || true
            unset 'PIDS[-1]'
        done
    done
    stop_all_but_origin
}

# A raw TCP tunnel (`netbore tcp`), the row to set beside rathole tcp and bore: the same
# HTTP loads, carried as bytes on CONNECT streams of the agent's link.
netbore_tcp_run() {
    local sys=netbore-tcp agent
    log "$sys"
    CONTROL_EXTRA=(--tcp-ports "$P_TCP-$P_TCP")
    EDGE_EXTRA=(--tcp-ports "$P_TCP-$P_TCP" --tcp-host 127.0.0.1)
    netbore_stack 0
    CONTROL_EXTRA=()
    EDGE_EXTRA=()
    first_byte "$sys" "http://127.0.0.1:$P_TCP/1k" "localhost" \
        "$BIN/netbore" tcp $P_ORIGIN --control "http://127.0.0.1:$P_REST" --name benchtcp \
        --connections 1 --state-dir "$WORK/state-$sys"
    agent=$FB_PID
    sleep 1
    mem "$sys" server "$EDGE_PID"
    mem "$sys" client "$agent"
    CPU_PIDS=("$EDGE_PID" "$agent")
    all_loads "$sys" "http://127.0.0.1:$P_TCP" "ws://127.0.0.1:$P_TCP" "localhost"
    put "$sys" w4_server_rss_after_load_kib "$(rss_kib "$EDGE_PID")"
    put "$sys" w4_client_rss_after_load_kib "$(rss_kib "$agent")"
    stop_all_but_origin
}

stop_all_but_origin() {
    local keep=${PIDS[0]} p
    for p in "${PIDS[@]:1}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]:1}"; do wait "$p" 2>/dev/null || true; done
    PIDS=("$keep")
    CPU_PIDS=()
    sleep 0.5
}

netbore_idle() { # W4 with N idle tunnels, on a fresh stack
    log "netbore-ws: W4 idle tunnels ($IDLE_STEPS)"
    # The idle tool creates its tunnels anonymously from one address, as many agents
    # would from many addresses: lift control's per-address creation limit for it.
    CONTROL_EXTRA=(--anonymous-create-per-minute 0)
    EDGE_EXTRA=(--max-connections-per-address 0)
    netbore_stack 0
    CONTROL_EXTRA=()
    EDGE_EXTRA=()
    sleep 1
    local base have=0 n idle_pid
    base=$(rss_kib "$EDGE_PID")
    put netbore-ws w4_edge_base_rss_kib "$base"
    for n in $IDLE_STEPS; do
        : >"$WORK/idle-$n.log"
        start "idle-$n" "$TOOL" idle "http://127.0.0.1:$P_REST" $((n - have)) >/dev/null
        idle_pid=${PIDS[-1]}
        local i
        for ((i = 0; i < 600; i++)); do
            grep -q '^ready' "$WORK/idle-$n.log" && break
            kill -0 "$idle_pid" 2>/dev/null || break
            sleep 0.5
        done
        if ! grep -q '^ready' "$WORK/idle-$n.log"; then
            log "idle tool failed: $(tail -3 "$WORK/idle-$n.log")"
            put netbore-ws "w4_per_tunnel_${n}_bytes" err
            break
        fi
        log "$(head -1 "$WORK/idle-$n.log") (step to $n)"
        have=$n
        sleep 2
        local rss
        rss=$(rss_kib "$EDGE_PID")
        put netbore-ws "w4_edge_rss_${n}_kib" "$rss"
        put netbore-ws "w4_per_tunnel_${n}_bytes" $(((rss - base) * 1024 / n))
    done
    stop_all_but_origin
}

if [[ -x $BIN/netbore-edge ]]; then
    netbore_run netbore-ws 0
    netbore_run netbore-wss 1
    if "$BIN/netbore-edge" --help | grep -q -- --agent-tls-only; then
        netbore_run netbore-wss-agent 2
    fi
    netbore_tcp_run
    netbore_inspect_run
    netbore_idle
fi

# Edge-to-edge: the agent links to edge-1 only; the load goes to edge-2, which looks the
# tunnel up in Redis and forwards every request to edge-1's internal listener.
netbore_forward_run() {
    if ! command -v redis-server >/dev/null; then
        put netbore-e2e installed no
        return
    fi
    log "netbore-e2e (edge-to-edge forwarding)"
    start redis redis-server --port $P_REDIS --bind 127.0.0.1 --save '' --appendonly no >/dev/null
    wait_port $P_REDIS
    export NETBORE_INTERNAL_SECRET=bench-internal-secret-0123456789
    local redis=redis://127.0.0.1:$P_REDIS
    start control "$BIN/netbore-control" --rest-addr 127.0.0.1:$P_REST --grpc-addr 127.0.0.1:$P_GRPC \
        --database-url sqlite::memory: \
        --domain localhost --public-url-template "http://{name}.localhost:$P_PUBLIC" \
        --edge "id=edge-1,url=ws://127.0.0.1:$P_AGENTS/v1/connect,region=local" >/dev/null
    wait_port $P_REST
    wait_port $P_GRPC
    start edge "$BIN/netbore-edge" --public-addr 127.0.0.1:$P_PUBLIC --agent-addr 127.0.0.1:$P_AGENTS \
        --admin-addr 127.0.0.1:$P_ADMIN --domain localhost --edge-id edge-1 \
        --control-url http://127.0.0.1:$P_REST --control-grpc http://127.0.0.1:$P_GRPC \
        --advertise-url "ws://127.0.0.1:$P_AGENTS/v1/connect" \
        --redis-url "$redis" --internal-addr 127.0.0.1:$P_INT1 >/dev/null
    # edge-2 has no link to control, so it is never a candidate: no agent connects there.
    start edge2 "$BIN/netbore-edge" --public-addr 127.0.0.1:$P_PUBLIC2 --agent-addr 127.0.0.1:$P_AGENTS2 \
        --admin-addr 127.0.0.1:$P_ADMIN2 --domain localhost --edge-id edge-2 \
        --control-url http://127.0.0.1:$P_REST --control-grpc "" \
        --redis-url "$redis" --internal-addr 127.0.0.1:$P_INT2 >/dev/null
    wait_port $P_AGENTS
    wait_port $P_PUBLIC2
    start agent "$BIN/netbore" http $P_ORIGIN --control "http://127.0.0.1:$P_REST" --name bench \
        --connections 1 --state-dir "$WORK/state-e2e" >/dev/null
    local i
    for ((i = 0; i < 100; i++)); do
        curl -sf -o /dev/null -H "Host: bench.localhost" "http://127.0.0.1:$P_PUBLIC2/1k" && break
        sleep 0.2
    done
    CPU_PIDS=("${PIDS[@]:3}")
    all_loads netbore-e2e "http://127.0.0.1:$P_PUBLIC2" "ws://127.0.0.1:$P_PUBLIC2" "bench.localhost"
    unset NETBORE_INTERNAL_SECRET
    stop_all_but_origin
}
if [[ -x $BIN/netbore-edge ]]; then
    netbore_forward_run
fi

# ------------------------------------------------------------------ rathole
rathole_run() { # system transport
    local sys=$1 tr=$2
    log "$sys"
    cat >"$WORK/rh-server.toml" <<EOF
[server]
bind_addr = "127.0.0.1:$P_RH_CTRL"
[server.transport]
type = "$tr"
[server.services.bench]
token = "bench-token"
bind_addr = "127.0.0.1:$P_RH_SVC"
EOF
    cat >"$WORK/rh-client.toml" <<EOF
[client]
remote_addr = "127.0.0.1:$P_RH_CTRL"
[client.transport]
type = "$tr"
[client.services.bench]
token = "bench-token"
local_addr = "127.0.0.1:$P_ORIGIN"
EOF
    if [[ $tr == websocket ]]; then
        printf '[server.transport.websocket]\ntls = false\n' >>"$WORK/rh-server.toml"
        printf '[client.transport.websocket]\ntls = false\n' >>"$WORK/rh-client.toml"
    fi
    start "$sys-server" rathole --server "$WORK/rh-server.toml" >/dev/null
    local server=${PIDS[-1]} client
    wait_port $P_RH_CTRL
    first_byte "$sys" "http://127.0.0.1:$P_RH_SVC/1k" localhost rathole --client "$WORK/rh-client.toml"
    client=$FB_PID
    sleep 1
    mem "$sys" server "$server"
    mem "$sys" client "$client"
    CPU_PIDS=("$server" "$client")
    all_loads "$sys" "http://127.0.0.1:$P_RH_SVC" "ws://127.0.0.1:$P_RH_SVC" localhost
    stop_all_but_origin
}
if command -v rathole >/dev/null; then
    rathole_run rathole-tcp tcp
    rathole_run rathole-ws websocket
else
    put rathole-tcp installed no
    put rathole-ws installed no
fi

# ------------------------------------------------------------------ bore
if command -v bore >/dev/null; then
    log "bore"
    start bore-server bore server --min-port $P_BORE --max-port $P_BORE --bind-addr 127.0.0.1 >/dev/null
    server=${PIDS[-1]}
    wait_port 7835
    first_byte bore "http://127.0.0.1:$P_BORE/1k" localhost bore local $P_ORIGIN --to 127.0.0.1 --port $P_BORE
    client=$FB_PID
    sleep 1
    mem bore server "$server"
    mem bore client "$client"
    CPU_PIDS=("$server" "$client")
    all_loads bore "http://127.0.0.1:$P_BORE" "ws://127.0.0.1:$P_BORE" localhost
    stop_all_but_origin
else
    put bore installed no
fi

# ------------------------------------------------------------------ report
CMD="bench/run.sh${1:+ $1}"
python3 "$ROOT/bench/report.py" "$RESULTS" "$ROOT" "$CMD" "$QUICK"
log "raw results and logs in $WORK"
