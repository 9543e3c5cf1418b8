#!/usr/bin/env bash
# Runs a loadgen scenario against as many gateway processes (nodes) as this box's open-file
# limit requires, on loopback only, and writes the loadgen's JSON report.
#
#   scripts/loadtest.sh [options] -- <loadgen run options>
#   scripts/loadtest.sh --users 1000000 -- idle --duration-s 30 --ping-interval-s 30
#   scripts/loadtest.sh --users 100 -- chat --rate 100000 --duration-s 10
#
# Options (before --):
#   --users N          users/connections (passed to the loadgen too)       [1000]
#   --nodes N          gateway processes; 0 = derived from the fd limit     [0]
#   --shards N         shards per gateway process                          [1 if nodes>1, else 2]
#   --sync POLICY      store.sync of the gateways (always|batch|none)      [batch]
#   --dir DIR          where node data, configs, logs and the report go    [target/loadtest]
#   --port BASE        node i listens on 127.0.0.1:(BASE+i)                [7500]
#   --keep             leave the gateways running afterwards
#   --tls              clients connect over TLS: a local CA and certificate are made with
#                      scripts/make-certs.sh, node i serves TLS on 127.0.0.1:(BASE+1000+i)
#   --bin DIR          use prebuilt gatehouse and loadgen binaries from DIR (no cargo build;
#                      for a box without a Rust toolchain)                 [target/release]
#   --gateway-cpus L   run the gateways under `taskset -c L` (shards pin to the first CPUs
#                      of L, LMDB commit threads float over L)             [all]
#   --loadgen-cpus L   run the loadgen under `taskset -c L`, so that it does not share the
#                      gateways' cores on a many-core box                  [all]
#
# Each node is a standalone gateway that owns the users with ids::owner_node(user, nodes) == i
# (documented in docs/architecture.md); the loadgen sends every user to its node. What this
# script raises (the soft open-file limit, and sysctls when run as root and they are lower than
# needed) it prints, and it puts the sysctls back when it exits. Every run is bounded: the
# loadgen stops by itself (--max-run-s, default 600 s) and the gateways are stopped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

users=1000 nodes=0 shards=0 sync=batch dir=target/loadtest port=7500 keep=0 tls=0
bin='' gateway_cpus='' loadgen_cpus=''
while (($#)); do
  case "$1" in
    --users) users=$2; shift 2 ;;
    --nodes) nodes=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --sync) sync=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --tls) tls=1; shift ;;
    --bin) bin=$2; shift 2 ;;
    --gateway-cpus) gateway_cpus=$2; shift 2 ;;
    --loadgen-cpus) loadgen_cpus=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "loadtest: unknown option $1 (loadgen options go after --)" >&2; exit 2 ;;
  esac
done
(($# > 0)) || { echo "loadtest: give the loadgen scenario after --, e.g. -- idle --duration-s 30" >&2; exit 2; }

if [ -z "$bin" ]; then
  cargo build --release -q -p gatehouse -p loadgen
  bin=target/release
fi
gateway_wrap=() loadgen_wrap=()
[ -z "$gateway_cpus" ] || gateway_wrap=(taskset -c "$gateway_cpus")
[ -z "$loadgen_cpus" ] || loadgen_wrap=(taskset -c "$loadgen_cpus")

# Open files: raise the soft limit to the hard one; never assume a number.
hard=$(ulimit -Hn)
if [ "$(ulimit -Sn)" != "$hard" ]; then
  echo "loadtest: raising the open-file soft limit $(ulimit -Sn) -> $hard"
  ulimit -Sn "$hard"
fi
fdlimit=$(ulimit -Sn)
per_node=$((fdlimit - 1000))
if [ "$nodes" = 0 ]; then
  nodes=$(((users + per_node - 1) / per_node))
  [ "$nodes" -ge 1 ] || nodes=1
fi
if [ "$shards" = 0 ]; then
  if [ "$nodes" -gt 1 ]; then shards=1; else shards=2; fi
fi
cpus=$(if [ -n "$gateway_cpus" ]; then taskset -c "$gateway_cpus" nproc; else nproc; fi)
# Many nodes per core: a 5 ms heartbeat in each would cost a noticeable share of the CPU
# (measured: ~20% at 53 nodes on 2 cores), so the period grows with the node count.
if [ "$nodes" -gt 2 ]; then heartbeat_ms=50; else heartbeat_ms=5; fi

# Sysctls that many connections need; raised only if lower, and restored on exit.
declare -A old_sysctl=()
want_sysctl() { # key value
  local f=/proc/sys/${1//.//} cur
  [ -w "$f" ] || return 0
  cur=$(cat "$f")
  if [ "${cur%%[[:space:]]*}" -lt "${2%% *}" ] 2>/dev/null; then
    old_sysctl[$1]=$cur
    echo "$2" > "$f" && echo "loadtest: sysctl $1: $cur -> $2 (restored on exit)"
  fi
}
restore() {
  for k in "${!old_sysctl[@]}"; do
    echo "${old_sysctl[$k]}" > "/proc/sys/${k//.//}" && echo "loadtest: sysctl $k restored to ${old_sysctl[$k]}"
  done
  if [ "$keep" = 0 ] && [ -n "${pids:-}" ]; then
    kill -TERM $pids 2>/dev/null || true
    wait $pids 2>/dev/null || true
  fi
}
trap restore EXIT
want_sysctl net.core.somaxconn 65535
want_sysctl net.ipv4.tcp_max_syn_backlog 65535

mkdir -p "$dir"
tls_args=()
if [ "$tls" = 1 ]; then
  scripts/make-certs.sh "$dir/certs" >/dev/null
  tls_args=(--tls --tls-ca "$dir/certs/ca.pem")
fi
key=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')
pids="" gateways=""
for ((i = 0; i < nodes; i++)); do
  nd="$dir/node-$i"
  rm -rf "$nd" && mkdir -p "$nd"
  cat > "$nd/gatehouse.toml" <<EOF
[server]
listen = "127.0.0.1:$((port + i))"
shards = $shards
first_cpu = $(((i * shards) % cpus))
backlog = 65535
max_connections_per_shard = $((per_node + 1000))
[store]
data_dir = "$nd/data"
map_size_mib = 1024
sync = "$sync"
[auth]
key_hex = "$key"
[runtime]
heartbeat_ms = $heartbeat_ms
# A few loadgen users stand in for many real ones, from few source addresses: the per-source
# connection and per-connection SEND limits would measure themselves, not the gateway.
[limits]
connect_rate_per_source = 0
send_rate_per_s = 0
[cluster]
node_id = $i
nodes = $nodes
[tls]
enabled = $([ "$tls" = 1 ] && echo true || echo false)
listen = "127.0.0.1:$((port + 1000 + i))"
cert_file = "$dir/certs/server.pem"
key_file = "$dir/certs/server.key"
EOF
  GATEHOUSE_LOG=warn GATEHOUSE_ADMIN__LISTEN=127.0.0.1:0 "${gateway_wrap[@]}" "$bin/gatehouse" run --config "$nd/gatehouse.toml" > "$nd/stdout.log" 2> "$nd/stderr.log" &
  pids="$pids $!"
  if [ "$tls" = 1 ]; then
    gateways="$gateways,127.0.0.1:$((port + 1000 + i))"
  else
    gateways="$gateways,127.0.0.1:$((port + i))"
  fi
done
pid_list=$(echo $pids | tr ' ' ',')
for ((i = 0; i < nodes; i++)); do
  for _ in $(seq 100); do grep -q listening "$dir/node-$i/stdout.log" 2>/dev/null && break; sleep 0.1; done
  grep -q listening "$dir/node-$i/stdout.log" || { echo "loadtest: node $i did not start:" >&2; cat "$dir/node-$i/stderr.log" >&2; exit 1; }
done
echo "loadtest: $nodes gateway node(s) x $shards shard(s) up (open-file limit $fdlimit); running loadgen"

set +e
"${loadgen_wrap[@]}" "$bin/loadgen" run "$@" --users "$users" --gateway "${gateways#,}" --key-hex "$key" \
  --gateway-pids "$pid_list" --report "$dir/report.json" "${tls_args[@]}"
rc=$?
set -e
echo "loadtest: loadgen exit status $rc; report: $dir/report.json; node logs: $dir/node-*/"
exit $rc
