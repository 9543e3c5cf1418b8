#!/usr/bin/env bash
# Runs the test suite N times (default 12) and, if any test process runs longer than LIMIT
# seconds (default 45), writes its threads' states and gdb backtraces to target/hangs/ and
# kills it. For chasing rare executor stalls; needs gdb. Bounded: N runs of at most 400 s.
#   scripts/hunt-hangs.sh [N] [LIMIT]
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-12} limit=${2:-45}
out=target/hangs
mkdir -p "$out"
cargo test --workspace --no-run -q || exit 1
for i in $(seq 1 "$runs"); do
  timeout 400 cargo test --workspace -q > "$out/run-$i.log" 2>&1 &
  runner=$!
  while kill -0 $runner 2>/dev/null; do
    sleep 5
    for p in $(pgrep -f "target/debug/deps/"); do
      et=$(ps -o etimes= -p "$p" 2>/dev/null | tr -d ' ')
      if [ -n "$et" ] && [ "$et" -gt "$limit" ]; then
        f="$out/hang-run$i-pid$p.txt"
        { echo "$(tr '\0' ' ' < /proc/$p/cmdline) running ${et}s"
          for t in /proc/$p/task/*; do echo "$(cat $t/comm) $(awk '{print $3, $14+$15}' $t/stat)"; done
          timeout 60 gdb -p "$p" -batch -ex "thread apply all bt 40" 2>&1; } > "$f"
        kill "$p"
        echo "hunt-hangs: run $i: test process $p ran ${et}s; threads in $f"
      fi
    done
  done
  wait $runner
  echo "hunt-hangs: run $i exit status $?"
done
