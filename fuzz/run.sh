#!/usr/bin/env bash
# Runs the wire-protocol fuzz targets for a bounded total time.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     (default 60 seconds, all targets)
#
# The targets: decode_frame (the frame decoder and handshake parsers), connection
# (message sequences fed to one conn::Connection) and ws_frame (the agent link's
# WebSocket frame decoder and fragment reassembly, netbore_protocol::ws). SECONDS is
# the budget for the whole run, split evenly between the targets run (at least 1 s
# each), so CI's fuzz time (NETBORE_CI_FUZZ_SECS in .ci/run) does not grow with the
# number of targets. All are built once, up front.
#
# Installs cargo-fuzz if it is missing. Exits 0 when the time runs out without a
# finding, non-zero on a finding (the crashing input is left in
# fuzz/artifacts/<target>/; reproduce it from fuzz/ with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>`).
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS] [TARGET...]   (a positive whole number of seconds, default 60)" >&2
  exit 2
fi
shift || true
all_targets=(decode_frame connection ws_frame)
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  targets=("${all_targets[@]}")
fi
for t in "${targets[@]}"; do
  if [ ! -f "fuzz_targets/$t.rs" ]; then
    echo "unknown fuzz target '$t' (known: ${all_targets[*]})" >&2
    exit 2
  fi
done
per=$(( secs / ${#targets[@]} ))
if [ "$per" -lt 1 ]; then
  per=1
fi

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
  echo "cargo-fuzz not found; installing it with cargo install" >&2
  cargo install --locked cargo-fuzz
fi

# cargo-fuzz passes nightly-only flags (-Z sanitizer=address, ...); RUSTC_BOOTSTRAP
# lets the stable toolchain accept them. The corpus persists between runs (it is
# git-ignored) so each run starts where the last one stopped.
set -x
RUSTC_BOOTSTRAP=1 cargo fuzz build
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" "corpus/$t" -- \
    -max_total_time="$per" -max_len=4096 -print_final_stats=1
done
