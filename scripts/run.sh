#!/usr/bin/env bash
# Sets up, builds (release) and runs the gateway on its embedded defaults: plain TCP on
# 127.0.0.1:7400, data in ./gatehouse-data, one shard per available core. Extra arguments go
# to `gatehouse run` (e.g. --shards 2, --config gatehouse.toml). Stop with Ctrl-C (SIGINT):
# the gateway commits, syncs and exits.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --bin gatehouse
echo "run: mint a token in another terminal with: target/release/gatehouse token --user 1"
exec target/release/gatehouse run "$@"
