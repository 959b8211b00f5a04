#!/usr/bin/env bash
# Runs the wire-protocol decoder fuzz target for a bounded time (default 60 s).
# Exits non-zero on a finding (the crashing input is left in fuzz/artifacts/).
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-60}"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# cargo-fuzz uses nightly-only sanitizer flags; the stable toolchain accepts them
# with RUSTC_BOOTSTRAP.
mkdir -p corpus/decode_frame
RUSTC_BOOTSTRAP=1 cargo fuzz run decode_frame corpus/decode_frame -- \
  -max_total_time="$secs" -max_len=4096 -print_final_stats=1
