#!/usr/bin/env bash
# Measures what scraping the admin endpoint costs the chat scenario: runs the same chat load
# with no scraper ("off"), with a scraper that fetches GET /metrics SCRAPES times over the run
# ("metrics"), and with the same scraper fetching GET /healthz instead ("healthz": the
# scraper's and HTTP's own cost, without the shards' snapshots), in turn, RUNS times each, and
# prints deliver p50/p99 of every run and the medians per mode.
#
#   scripts/scrape-under-load.sh [--runs 3] [--scrapes 1000] [--rate 50000] [--duration-s 10]
#                                [--modes "off metrics healthz"]
#
# One node of 2 shards and 100 users (as in docs/benchmarks.md's chat runs), loopback only.
# The scraper is one python3 process with a keep-alive-free HTTP client (one connection per
# scrape, like Prometheus), so its own cost per scrape is small. Bounded: every run stops by
# itself (the loadgen's --max-run-s) and the scraper stops after its count or 120 s.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=3 scrapes=1000 rate=50000 duration=10 modes="off metrics healthz"
while (($#)); do
  case "$1" in
    --runs) runs=$2; shift 2 ;;
    --scrapes) scrapes=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --duration-s) duration=$2; shift 2 ;;
    --modes) modes=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "scrape-under-load: unknown option $1" >&2; exit 2 ;;
  esac
done

dir=target/scrape-under-load
mkdir -p "$dir"
results="$dir/results.txt"
: > "$results"

scraper() { # waits for the node's admin address, then fetches $1 $scrapes times over the run
  python3 - "$dir/lt/node-0/stdout.log" "$scrapes" "$duration" "$1" <<'EOF'
import sys, time, http.client, re
log, n, dur, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
deadline = time.time() + 120
addr = None
while time.time() < deadline and addr is None:
    try:
        m = re.search(r"admin on http://([\d.]+):(\d+)", open(log).read())
        if m: addr = (m.group(1), int(m.group(2)))
    except FileNotFoundError:
        pass
    time.sleep(0.05)
if addr is None:
    sys.exit("scraper: no admin address")
# Scrape inside the send phase: it starts about 0.5 s after the node and lasts `dur` s.
time.sleep(1.0)
gap, done, worst, t0, body = (dur - 2.0) / n, 0, 0.0, time.time(), b""
while done < n and time.time() < deadline:
    s = time.time()
    try:
        c = http.client.HTTPConnection(*addr, timeout=5)
        c.request("GET", path); body = c.getresponse().read(); c.close()
    except OSError as e:
        print(f"scraper: stopped after {done} scrapes: {e}")
        break
    worst = max(worst, time.time() - s); done += 1
    time.sleep(max(0.0, t0 + done * gap - time.time()))
print(f"scraper: {done} requests for {path} in {time.time()-t0:.1f} s, slowest {worst*1000:.1f} ms, last body {len(body)} bytes")
EOF
}

for ((r = 1; r <= runs; r++)); do
  for mode in $modes; do
    rm -rf "$dir/lt"
    spid=
    if [ "$mode" != off ]; then scraper "/$mode" > "$dir/scraper.log" 2>&1 & spid=$!; fi
    scripts/loadtest.sh --dir "$dir/lt" --users 100 --nodes 1 -- chat --rate "$rate" \
      --duration-s "$duration" --cores 2 > "$dir/run-$r-$mode.log" 2>&1 || true
    if [ -n "$spid" ]; then wait "$spid" || true; cat "$dir/scraper.log"; fi
    python3 - "$dir/lt/report.json" "$r" "$mode" >> "$results" <<'EOF'
import json, sys
rep = json.load(open(sys.argv[1]))
d = rep["latency"]["deliver"]
print(sys.argv[2], sys.argv[3], rep["acked_per_s"], rep["loss"]["lost"], d["p50_us"], d["p99_us"])
EOF
    tail -1 "$results"
  done
done

echo
echo "run mode acked/s lost p50_us p99_us"
cat "$results"
python3 - "$results" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
for mode in dict.fromkeys(r[1] for r in rows):
    p99 = [int(r[5]) for r in rows if r[1] == mode]
    p50 = [int(r[4]) for r in rows if r[1] == mode]
    print(f"{mode}: median p50 {statistics.median(p50)} us, median p99 {statistics.median(p99)} us over {len(p99)} runs")
EOF
