#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test (unit, proptest,
# end-to-end over loopback with real LMDB directories, and the kill -9 crash test that runs
# the real binary). Stays within 20,000 file descriptors and a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace --all-targets
