#!/usr/bin/env bash
# The WebSocket layers the agent link could run on (tungstenite as configured today,
# tokio-websockets, fastwebsockets, framing of our own), compared in isolation on the
# link's traffic pattern over loopback TCP: `netbore-bench ws-layers` (bench/src/wslayer.rs).
#
#   bench/ws-layers.sh        # 11 rounds, about 2.5 minutes on 2 cores
#   bench/ws-layers.sh 5      # fewer rounds
#
# Prints Markdown tables: medians over the rounds, and ratios against tungstenite taken
# within each round (CPU per message or per MB holds better than the rates here).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-11}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

(cd "$ROOT/bench" && cargo build --release --quiet)

# One benchmark at a time on this machine.
exec 9>/tmp/netbore-bench.lock
flock -n 9 || { echo "[ws-layers] waiting for another benchmark (/tmp/netbore-bench.lock)" >&2; flock 9; }

"$CARGO_TARGET_DIR/release/netbore-bench" ws-layers "$ROUNDS"
