#!/usr/bin/env bash
# Runs the wire-protocol decoder fuzz target for a bounded time.
#
#   fuzz/run.sh [SECONDS]     (default 60)
#
# Installs cargo-fuzz if it is missing. Exits 0 when the time runs out without a
# finding, non-zero on a finding (the crashing input is left in
# fuzz/artifacts/decode_frame/; reproduce it from fuzz/ with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run decode_frame artifacts/decode_frame/<file>`).
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-60}"
if ! [[ "$secs" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS]   (a positive whole number of seconds, default 60)" >&2
  exit 2
fi

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v cargo-fuzz >/dev/null; then
  echo "cargo-fuzz not found; installing it with cargo install" >&2
  cargo install --locked cargo-fuzz
fi

# cargo-fuzz passes nightly-only flags (-Z sanitizer=address, ...); RUSTC_BOOTSTRAP
# lets the stable toolchain accept them. The corpus persists between runs (it is
# git-ignored) so each run starts where the last one stopped.
mkdir -p corpus/decode_frame
set -x
RUSTC_BOOTSTRAP=1 cargo fuzz run decode_frame corpus/decode_frame -- \
  -max_total_time="$secs" -max_len=4096 -print_final_stats=1
