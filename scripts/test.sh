#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test (unit, proptest,
# end-to-end over loopback with real LMDB directories, and the kill -9 crash test that runs
# the real binary), then a 10 s run of each fuzz target. Stays within 20,000 file descriptors
# and under 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
# The browser test (tests/browser.rs) must run here, not skip: setup.sh installed Chromium.
GATEHOUSE_REQUIRE_BROWSER=1 cargo test --workspace --all-targets
# Fuzzing, briefly: every target replays the kept crash inputs and explores for 10 s.
scripts/fuzz.sh --seconds 10
