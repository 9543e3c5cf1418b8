#!/usr/bin/env bash
# Compares the running kernel's sysctls with tuning/99-gatehouse.conf (or another sysctl.d
# file) and, with --apply, writes the ones that differ. Dry run by default.
#
#   scripts/apply-sysctl.sh                   # dry run: KEY  CURRENT -> WANT, marks changes
#   sudo scripts/apply-sysctl.sh --apply      # write them to /proc/sys (root only)
#   scripts/apply-sysctl.sh --file my.conf    # another file in sysctl.d format
#
# --apply changes the running kernel only. To keep the values across reboots, install the
# file: sudo cp tuning/99-gatehouse.conf /etc/sysctl.d/ && sudo sysctl --system
#
# Keys whose /proc/sys entry does not exist (conntrack not loaded, an older kernel) are
# skipped with a note. Exit status: 0 on success (a dry run with pending changes included),
# 1 if --apply could not write a key, 2 on bad usage, a missing file, or --apply without root.
# SYSCTL_ROOT (default /proc/sys) points the script at another tree, for testing it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/apply-sysctl.sh [--file FILE] [--apply]

Shows, for every key in FILE, the running value and the wanted one:
  KEY  CURRENT -> WANT  [would change | would LOWER a limit | ok | skipped]
and writes the differing ones to /proc/sys with --apply.

Options:
  --file FILE   sysctl.d file to read        [tuning/99-gatehouse.conf]
  --apply       write the values (needs root); without it nothing is written
  -h, --help    this text

--apply affects the running kernel only; to persist, copy the file to /etc/sysctl.d/ and
run `sysctl --system`. docs/tuning.md explains every value.
EOF
}

here=$(cd "$(dirname "$0")" && pwd)
file="$(dirname "$here")/tuning/99-gatehouse.conf"
apply=0 file_arg=""
root=${SYSCTL_ROOT:-/proc/sys}
while (($#)); do
  case "$1" in
    --file)
      (($# >= 2)) || { echo "apply-sysctl: --file needs a path" >&2; exit 2; }
      file=$2; file_arg=" --file $2"; shift 2 ;;
    --file=*) file=${1#--file=}; file_arg=" --file $file"; shift ;;
    --apply) apply=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "apply-sysctl: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

if [ ! -f "$file" ] || [ ! -r "$file" ]; then
  echo "apply-sysctl: cannot read $file" >&2
  exit 2
fi
if ((apply)) && [ "$(id -u)" != 0 ]; then
  echo "apply-sysctl: --apply writes $root and needs root; re-run with sudo (or drop --apply for a dry run)" >&2
  exit 2
fi

# sysctl.d key -> /proc/sys path. As in sysctl.d(5): if the first separator is '/', the key is
# already a path; otherwise '.' separates components and a '/' stands for a literal '.'
# (e.g. net/ipv4/conf/eth0.100/rp_filter == net.ipv4.conf.eth0/100.rp_filter).
key_path() {
  local k=$1 head
  head=${k%%[./]*}
  if [ "${k:${#head}:1}" = / ]; then
    printf '%s/%s' "$root" "$k"
  else
    printf '%s/%s' "$root" "$(printf '%s' "$k" | tr './' '/.')"
  fi
}

# Collapses runs of blanks (the kernel separates multi-value sysctls with tabs).
norm() { printf '%s' "$*" | tr -s '[:blank:]' ' ' | sed 's/^ //; s/ $//'; }

if ((apply)); then mode="applying"; else mode="dry run; nothing is written"; fi
echo "apply-sysctl: $file ($mode)"
printf '%-34s %-24s    %s\n' KEY CURRENT WANT

# Keys that are pure upper limits: a larger running value is never a problem.
declare -A ceilings=(
  [fs.nr_open]=1 [fs.file-max]=1 [net.core.somaxconn]=1 [net.ipv4.tcp_max_syn_backlog]=1
  [net.core.netdev_max_backlog]=1 [net.netfilter.nf_conntrack_max]=1 [vm.max_map_count]=1
)

n_change=0 n_ok=0 n_skip=0 n_fail=0 n_lower=0 lineno=0
while IFS= read -r line || [ -n "$line" ]; do
  lineno=$((lineno + 1))
  line=$(norm "$line")
  case "$line" in ''|'#'*|';'*) continue ;; esac
  if [[ "$line" != *=* ]]; then
    echo "apply-sysctl: $file:$lineno: not 'key = value', ignored: $line" >&2
    continue
  fi
  key=$(norm "${line%%=*}")
  want=$(norm "${line#*=}")
  key=${key#-}                       # '-key': failure ignored by systemd-sysctl; same here
  if [[ "$key" == *[*?]* ]]; then
    printf '%-34s %s\n' "$key" "skipped: glob patterns are not supported by this script"
    n_skip=$((n_skip + 1)); continue
  fi
  path=$(key_path "$key")
  if [ ! -e "$path" ]; then
    printf '%-34s %s\n' "$key" "skipped: $path does not exist (module not loaded, or an older kernel)"
    n_skip=$((n_skip + 1)); continue
  fi
  if ! cur=$(cat "$path" 2>/dev/null); then
    cur="(unreadable)"
  fi
  cur=$(norm "$cur")
  if [ "$cur" = "$want" ]; then
    printf '%-34s %-24s -> %-24s %s\n' "$key" "$cur" "$want" "ok"
    n_ok=$((n_ok + 1)); continue
  fi
  note="would change"
  # A ceiling that would go down: worth a second look (e.g. fs.file-max and fs.nr_open,
  # which systemd 240+ already raises to their maximum at boot).
  if [ -n "${ceilings[$key]:-}" ] && [[ "$cur" =~ ^[0-9]+$ && "$want" =~ ^[0-9]+$ ]] &&
    { ((${#cur} > ${#want})) || { ((${#cur} == ${#want})) && [[ "$cur" > "$want" ]]; }; }; then
    note="would LOWER a limit"
    n_lower=$((n_lower + 1))
  fi
  if ((apply)); then
    if err=$(printf '%s\n' "$want" 2>&1 > "$path"); then
      now=$(norm "$(cat "$path" 2>/dev/null || echo '(unreadable)')")
      if [ "$now" = "$want" ]; then note="changed"; else note="written, kernel reports $now"; fi
      n_change=$((n_change + 1))
    else
      err=${err#*line [0-9]*: }        # drop bash's "script: line N: " prefix
      note="FAILED: ${err:-write refused}"
      n_fail=$((n_fail + 1))
    fi
  else
    n_change=$((n_change + 1))
  fi
  printf '%-34s %-24s -> %-24s %s\n' "$key" "$cur" "$want" "$note"
done < "$file"

if ((apply)); then
  echo "apply-sysctl: $n_change changed, $n_ok already set, $n_skip skipped, $n_fail failed"
  echo "apply-sysctl: running kernel only; to persist: cp $file /etc/sysctl.d/ && sysctl --system"
  ((n_fail == 0)) || exit 1
else
  echo "apply-sysctl: $n_change would change ($n_lower of them lower a limit), $n_ok already set, $n_skip skipped"
  ((n_change == 0)) || echo "apply-sysctl: to write them: sudo $0 --apply$file_arg"
fi
