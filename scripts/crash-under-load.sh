#!/usr/bin/env bash
# Crash safety under load: runs the loadgen's chat, offline and groups scenarios against one gateway
# node, kills the node with SIGKILL at random moments several times, restarts it on the same
# data directory each time, and lets the loadgen's loss check prove that no message the
# gateway acknowledged was lost (and that order held per sender and recipient).
#
#   scripts/crash-under-load.sh [--kills 3] [--scenarios "chat offline groups"] [--users 200]
#                               [--rate 5000] [--messages 1000000] [--seed N] [--dir DIR]
#
# Loopback only, bounded: each scenario runs at most --max-run-s (120 s) and is then stopped.
# Kills land at uniformly random moments in the scenario's busy window (seeded by --seed, so a
# failing run can be repeated). Exit 0 when every scenario lost nothing, 1 otherwise.
# groups: 10 x --users users in groups of 100 (all online, so member shards use the group
# log), at 3/5 x --rate group messages/s (about 300,000 member-deliveries/s by default).
# Members ACK 50 ms after they read (--ack-delay-ms), so that every kill finds deliveries not
# yet ACKed. Every acknowledged message must reach every other member (distinct (member,
# message) pairs; redeliveries after a restart are counted apart).
set -euo pipefail
cd "$(dirname "$0")/.."

kills=3 scenarios="chat offline groups" users=200 rate=5000 messages=1000000 seed=$RANDOM
dir=target/crash-under-load port=7700 max_run=120
while (($#)); do
  case "$1" in
    --kills) kills=$2; shift 2 ;;
    --scenarios) scenarios=$2; shift 2 ;;
    --users) users=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --messages) messages=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "crash-under-load: unknown option $1" >&2; exit 2 ;;
  esac
done
RANDOM=$seed
echo "crash-under-load: seed $seed, $kills kills per scenario"

cargo build --release -q -p gatehouse -p loadgen
bin=target/release
key=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
fails=0

start_node() { # $1: scenario dir
  GATEHOUSE_LOG=warn "$bin/gatehouse" run --config "$1/gatehouse.toml" >> "$1/node.out" 2>> "$1/node.err" &
  node_pid=$!
  for _ in $(seq 100); do
    [ "$(grep -c listening "$1/node.out" 2>/dev/null)" -gt "$starts" ] && break
    kill -0 "$node_pid" 2>/dev/null || break
    sleep 0.1
  done
  starts=$((starts + 1))
  [ "$(grep -c listening "$1/node.out")" -ge "$starts" ] || { echo "crash-under-load: node did not start" >&2; cat "$1/node.err" >&2; exit 1; }
}

for scenario in $scenarios; do
  sd="$dir/$scenario"
  rm -rf "$sd" && mkdir -p "$sd"
  cat > "$sd/gatehouse.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
shards = 2
[store]
data_dir = "$sd/data"
map_size_mib = 1024
sync = "batch"
[auth]
key_hex = "$key"
[admin]
enabled = false
[limits]
connect_rate_per_source = 0
send_rate_per_s = 0
TOML
  starts=0
  start_node "$sd"
  n=$users
  case $scenario in
    chat) args=(chat --rate "$rate" --duration-s 20); window=20 ;;
    offline) args=(offline --messages "$messages"); window=8 ;;
    groups) n=$((users * 10)); args=(groups --group-size 100 --rate $((rate * 3 / 5)) --duration-s 20 --ack-delay-ms 50); window=20 ;;
    *) echo "crash-under-load: unknown scenario $scenario" >&2; exit 2 ;;
  esac
  "$bin/loadgen" run "${args[@]}" --users "$n" --gateway "127.0.0.1:$port" --key-hex "$key" \
    --reconnect --cores 1 --drain-timeout-s 60 --max-run-s "$max_run" --report "$sd/report.json" \
    > "$sd/loadgen.out" 2>&1 &
  lg=$!
  # Kill times: sorted random moments in the busy window (after a 0.5 s warm-up).
  times=$(for ((k = 0; k < kills; k++)); do echo $((500 + RANDOM % (window * 1000))); done | sort -n)
  t0=$(date +%s%3N)
  for t in $times; do
    now=$(($(date +%s%3N) - t0))
    ((t > now)) && sleep "$(awk "BEGIN{print ($t - $now) / 1000}")"
    kill -0 "$lg" 2>/dev/null || break
    kill -9 "$node_pid" 2>/dev/null || true
    wait "$node_pid" 2>/dev/null || true
    echo "crash-under-load: $scenario: SIGKILL at $(($(date +%s%3N) - t0)) ms; restarting"
    sleep 0.$((RANDOM % 9 + 1))
    start_node "$sd"
  done
  set +e
  wait "$lg"
  rc=$?
  set -e
  kill "$node_pid" 2>/dev/null || true
  wait "$node_pid" 2>/dev/null || true
  tail -14 "$sd/loadgen.out"
  verdict=no
  if [ -f "$sd/report.json" ]; then
    verdict=$(python3 - "$sd/report.json" "$scenario" "$starts" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l, c = r["loss"], r["counters"]
if sys.argv[2] == "groups":
    exp, got = c.get("group_expected", 0), c.get("group_delivered", 0)
    print(f"crash-under-load: groups: {int(sys.argv[3]) - 1} kills, acked {c['acked']}, "
          f"member-deliveries {got} of {exp} expected, missing {exp - got}, "
          f"duplicates {c.get('group_duplicates', 0)}, reconnects {c.get('reconnects', 0)}",
          file=sys.stderr)
    print("yes" if exp > 0 and got == exp else "no")
    sys.exit(0)
print(f"crash-under-load: {sys.argv[2]}: {int(sys.argv[3]) - 1} kills, acked {l['acked']}, "
      f"delivered {l['delivered_distinct']} distinct, lost {l['lost']}, duplicates {l['duplicates']}, "
      f"reordered {l['reordered']}, reconnects {c.get('reconnects', 0)}", file=sys.stderr)
print("yes" if l["lost"] == 0 and l["reordered"] == 0 and l["acked"] > 0 else "no")
PY
)
  fi
  if [ "$rc" = 1 ] || [ "$verdict" != yes ]; then
    echo "crash-under-load: $scenario: FAILED (loadgen exit $rc)" >&2
    fails=$((fails + 1))
  else
    echo "crash-under-load: $scenario: nothing acknowledged was lost (loadgen exit $rc)"
  fi
done
exit $((fails > 0))
