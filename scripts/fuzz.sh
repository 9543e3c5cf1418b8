#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for a bounded time each: the frame decoder, the login
# token parser, the connection state machine, the WebSocket server side and the TLS server
# driver (before and after a real handshake) fed arbitrary byte streams.
#
#   scripts/fuzz.sh [--seconds N] [TARGET ...]     (default: 10 s each, every target)
#
# CI runs 10 s per target (scripts/test.sh); longer runs are for finding new inputs, e.g.
# `scripts/fuzz.sh --seconds 3600 frame_decoder`. Each run first replays the inputs kept in
# fuzz/regressions/TARGET/ (every crash found so far, also covered by a unit test), then
# explores from fuzz/corpus/TARGET/ (not committed). A crash exits non-zero and leaves its
# input in fuzz/artifacts/TARGET/: turn it into a regression test, then keep the input in
# fuzz/regressions/.
#
# cargo-fuzz needs unstable compiler flags (sanitizers, coverage instrumentation). It uses the
# nightly toolchain when rustup has one; otherwise the installed stable toolchain with
# RUSTC_BOOTSTRAP=1, which enables those flags for this build only.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=10
targets=()
while (($#)); do
  case "$1" in
    --seconds) seconds=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
((${#targets[@]})) || targets=(frame_decoder token_parser session_stream ws_session tls_session)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi
toolchain=()
if command -v rustup >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi

for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz: no target $t" >&2; exit 2; }
  mkdir -p "fuzz/corpus/$t" "fuzz/regressions/$t"
  echo "== fuzz $t for ${seconds}s"
  log="fuzz/target/fuzz-$t.log"
  mkdir -p fuzz/target
  if ! cargo "${toolchain[@]}" fuzz run "$t" "fuzz/corpus/$t" "fuzz/regressions/$t" -- \
    -max_total_time="$seconds" > "$log" 2>&1; then
    grep -E 'panicked|ERROR|SUMMARY|error' -A5 "$log" | head -40 >&2
    echo "fuzz: $t failed (full log: $log); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^Done' "$log"
done
