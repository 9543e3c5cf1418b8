#!/usr/bin/env bash
# Sets up, builds (release) and runs the gateway on its embedded defaults: plain TCP on
# 127.0.0.1:7400, data in ./gatehouse-data, one shard per available core. Stop with Ctrl-C
# (SIGINT): the gateway commits, syncs and exits.
#
#   scripts/run.sh [--tls] [--websocket] [gatehouse run flags...]
#
# --tls        also serve TLS on 127.0.0.1:7443, with a local CA and certificate made by
#              scripts/make-certs.sh in ./certs (clients trust certs/ca.pem)
# --websocket  also serve WebSocket on ws://127.0.0.1:7480/ (open docs/client.html)
# Other arguments go to `gatehouse run` (e.g. --shards 2, --config gatehouse.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
while [ $# -gt 0 ]; do
  case "$1" in
    --tls)
      scripts/make-certs.sh certs
      export GATEHOUSE_TLS__ENABLED=true
      shift ;;
    --websocket)
      export GATEHOUSE_WEBSOCKET__ENABLED=true
      shift ;;
    *) break ;;
  esac
done
scripts/setup.sh --no-browser
cargo build --release --bin gatehouse
echo "run: mint a token in another terminal with: target/release/gatehouse token --user 1"
exec target/release/gatehouse run "$@"
