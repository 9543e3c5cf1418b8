#!/usr/bin/env bash
# Pins a NIC's receive/transmit queue interrupts to chosen CPUs, one queue per CPU in turn.
# Dry run by default: prints what it would write and writes nothing.
#
#   scripts/pin-irqs.sh --list                          # every NIC's IRQs and their CPUs
#   scripts/pin-irqs.sh --iface eth0 --cpus 0-15        # dry run: IRQ N (name): current -> new
#   sudo scripts/pin-irqs.sh --iface eth0 --cpus 0-15 --apply
#
# A NIC's IRQs are read from /sys/class/net/IFACE/device/msi_irqs (for virtio NICs, from the
# PCI function above the virtio device), else by matching the interface name in
# /proc/interrupts. Queue IRQs whose name carries a queue number (eth0-TxRx-3,
# virtio2-input.3, mlx5_comp3@pci:...) go to CPU number (queue mod n) of --cpus, so a
# queue's receive and transmit IRQs share a CPU; queue IRQs without a number are spread round
# robin in IRQ order. Other IRQs (link state, config, async events) are left alone.
#
# irqbalance moves IRQs every few seconds: stop it, or ban these IRQs, or it will undo this.
# The pinning does not survive a reboot or a driver reload; run it again from a boot unit.
# docs/tuning.md explains where to put IRQs (the NUMA node of the NIC and of its shards).
#
# Exit status: 0 on success; 1 if the interface does not exist or has no IRQs, or --apply could
# not write one; 2 on bad usage or --apply without root. PROC_ROOT and SYS_ROOT (default /proc
# and /sys) point the script at another tree, for testing it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/pin-irqs.sh --list [--iface IFACE]
       scripts/pin-irqs.sh --iface IFACE [--cpus LIST] [--apply]

Options:
  --iface IFACE   network interface whose queue IRQs to pin (required unless --list)
  --cpus LIST     CPUs to spread them over, e.g. 0-15 or 0,2,4 or 0-7,16-23
                  [all online CPUs]
  --apply         write /proc/irq/N/smp_affinity_list (needs root); without it, a dry run
  --list          show each IRQ of each interface but lo, with its current CPUs
  -h, --help      this text

Stop irqbalance (systemctl disable --now irqbalance), or ban the IRQs it prints, before
--apply: otherwise irqbalance moves them back within seconds.
EOF
}

proc=${PROC_ROOT:-/proc}
sys=${SYS_ROOT:-/sys}
iface="" cpus_arg="" apply=0 list=0
while (($#)); do
  case "$1" in
    --iface|--cpus)
      if (($# < 2)) || [ -z "$2" ]; then echo "pin-irqs: $1 needs a value (see --help)" >&2; exit 2; fi
      if [ "$1" = --iface ]; then iface=$2; else cpus_arg=$2; fi
      shift 2 ;;
    --iface=*) iface=${1#--iface=}; shift ;;
    --cpus=*) cpus_arg=${1#--cpus=}; shift ;;
    --apply) apply=1; shift ;;
    --list) list=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "pin-irqs: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if ((list && apply)); then
  echo "pin-irqs: --list only reads; leave out --apply" >&2; exit 2
fi
if ((!list)) && [ -z "$iface" ]; then
  echo "pin-irqs: give --iface IFACE (or --list to see the interfaces); see --help" >&2; exit 2
fi
if ((apply)) && [ "$(id -u)" != 0 ]; then
  echo "pin-irqs: --apply writes $proc/irq/N/smp_affinity_list and needs root; re-run with sudo (or drop --apply for a dry run)" >&2
  exit 2
fi

# "0-3,8,10-11" -> "0 1 2 3 8 10 11" (in the order given, without repeats). Fails on bad input.
expand_cpus() {
  local part a b c out="" seen=" "
  local IFS=,
  for part in $1; do
    if [[ "$part" =~ ^([0-9]+)-([0-9]+)$ ]]; then
      a=$((10#${BASH_REMATCH[1]})) b=$((10#${BASH_REMATCH[2]}))
      ((a <= b)) || return 1
    elif [[ "$part" =~ ^[0-9]+$ ]]; then
      a=$((10#$part)) b=$a
    else
      return 1
    fi
    for ((c = a; c <= b; c++)); do
      [[ "$seen" == *" $c "* ]] && continue
      seen+="$c " out+="$c "
    done
  done
  [ -n "$out" ] || return 1
  printf '%s' "${out% }"
}

online=$(cat "$sys/devices/system/cpu/online" 2>/dev/null || echo 0)
online_cpus=$(expand_cpus "$online") || { echo "pin-irqs: cannot parse $sys/devices/system/cpu/online: $online" >&2; exit 2; }

# IRQ number -> action name, from /proc/interrupts (last field), preferring /sys/kernel/irq.
declare -A irq_names=()
while read -r first rest; do
  n=${first%:}
  [[ "$first" == *: && "$n" =~ ^[0-9]+$ ]] || continue
  irq_names[$n]=${rest##* }
done < "$proc/interrupts"
irq_name() {
  local a=""
  [ -r "$sys/kernel/irq/$1/actions" ] && a=$(cat "$sys/kernel/irq/$1/actions" 2>/dev/null || true)
  a=${a%%,*}
  printf '%s' "${a:-${irq_names[$1]:-?}}"
}

# True if NAME mentions interface IFACE as a whole word (eth1 is not in eth10-TxRx-0).
names_iface() {
  local name=$1 ifc=$2 before after
  [[ "$name" == *"$ifc"* ]] || return 1
  before=${name%%"$ifc"*}
  after=${name#*"$ifc"}
  [[ -z "$before" || "$before" == *[^[:alnum:]] ]] && [[ -z "$after" || "$after" == [^[:alnum:]]* ]]
}

# Sets $found_irqs to the IRQs of IFACE (sorted, space-separated) and $found_via to where they
# came from. Called directly, not in $(...), so that both reach the caller.
found_irqs="" found_via=""
iface_irqs() {
  local ifc=$1 dev vdev="" irqs="" n f
  dev="$sys/class/net/$ifc/device"
  found_via=""
  if [ -e "$dev" ] && [ "$(basename "$(readlink -f "$dev/subsystem" 2>/dev/null || true)")" = virtio ]; then
    vdev=$(basename "$(readlink -f "$dev")")       # e.g. virtio2; its IRQs are virtio2-*
  fi
  if [ -d "$dev/msi_irqs" ] && [ -z "$vdev" ]; then
    for f in "$dev/msi_irqs"/*; do
      [ -e "$f" ] && irqs+="${f##*/} "
    done
    found_via="$dev/msi_irqs"
  elif [ -n "$vdev" ] && [ -d "$dev/../msi_irqs" ]; then
    for f in "$dev/../msi_irqs"/*; do
      [ -e "$f" ] || continue
      n=${f##*/}
      [[ "$(irq_name "$n")" == "$vdev-"* ]] && irqs+="$n "
    done
    found_via="$(readlink -f "$dev/..")/msi_irqs ($vdev)"
  fi
  if [ -z "${irqs// /}" ]; then
    irqs=""
    for n in "${!irq_names[@]}"; do
      if names_iface "$(irq_name "$n")" "$ifc" || { [ -n "$vdev" ] && [[ "$(irq_name "$n")" == "$vdev-"* ]]; }; then
        irqs+="$n "
      fi
    done
    found_via="$proc/interrupts (names mentioning $ifc${vdev:+ or $vdev-})"
  fi
  found_irqs=""
  # shellcheck disable=SC2086 # $irqs is a list of numbers, split on purpose
  [ -z "${irqs// /}" ] || found_irqs=$(printf '%s\n' $irqs | sort -n | tr '\n' ' ')
  found_irqs=${found_irqs% }
}

# Queue number in an IRQ name, or "" for a queue IRQ without one; fails for non-queue IRQs.
queue_of() {
  local name=$1 ifc=$2 rest
  shopt -s nocasematch
  if [[ "$name" == "$ifc" || "$name" =~ (config|async|ctrl|control|misc|event|lsc|link|mbx|mgmnt|admin|err|other) ]]; then
    shopt -u nocasematch; return 1
  fi
  if [[ "$name" =~ (txrx|tx-rx|rx|tx|input|output|comp|fp|queue)[-._]?([0-9]+) ]]; then
    printf '%s' "$((10#${BASH_REMATCH[2]}))"
  else
    rest=${name#"$ifc"-}
    [[ "$rest" != "$name" && "$rest" =~ ^[0-9]+$ ]] && printf '%s' "$((10#$rest))"
  fi
  shopt -u nocasematch
  return 0
}

affinity() { cat "$proc/irq/$1/smp_affinity_list" 2>/dev/null || echo "?"; }
# Kernel-managed IRQs (spread by the driver) have a read-only smp_affinity_list.
# (Mode bits, not `test -w`: root may open any file for writing, and the write then fails.)
managed() {
  local f="$proc/irq/$1/smp_affinity_list" mode
  [ -e "$f" ] || return 1
  mode=$(stat -c %a "$f")
  (((8#$mode >> 6 & 2) == 0))
}

iface_node() { # NUMA node of the NIC's device, or -1
  local dev="$sys/class/net/$1/device" f
  for f in "$dev/numa_node" "$dev/../numa_node"; do
    [ -r "$f" ] && { cat "$f"; return; }
  done
  echo -1
}

describe_iface() {
  local ifc=$1 dev="$sys/class/net/$1/device" driver node
  driver=$(basename "$(readlink -f "$dev/driver" 2>/dev/null || echo unknown)")
  node=$(iface_node "$ifc")
  printf '%s (driver %s%s)' "$ifc" "$driver" "$([ "$node" -ge 0 ] 2>/dev/null && echo ", NUMA node $node")"
}

list_iface() { # prints one interface's IRQs; returns 1 if it has none
  local ifc=$1 irqs n name kind
  if [ ! -e "$sys/class/net/$ifc/device" ]; then
    echo "$ifc: virtual interface (no device), no IRQs"
    return 1
  fi
  iface_irqs "$ifc"
  irqs=$found_irqs
  if [ -z "$irqs" ]; then
    echo "$(describe_iface "$ifc"): no IRQs found in $found_via"
    return 1
  fi
  echo "$(describe_iface "$ifc"): IRQs from $found_via"
  for n in $irqs; do
    name=$(irq_name "$n")
    if queue_of "$name" "$ifc" >/dev/null; then kind=queue; else kind=other; fi
    managed "$n" && kind+=", kernel-managed"
    printf '  IRQ %s (%s): CPUs %s  [%s]\n' "$n" "$name" "$(affinity "$n")" "$kind"
  done
}

all_ifaces=()
for p in "$sys"/class/net/*; do
  [ -e "$p" ] || continue
  [ "$(basename "$p")" = lo ] && continue
  all_ifaces+=("$(basename "$p")")
done

if [ -n "$iface" ] && [ ! -e "$sys/class/net/$iface" ]; then
  echo "pin-irqs: no interface '$iface' (interfaces: ${all_ifaces[*]:-none besides lo})" >&2
  exit 1
fi

if ((list)); then
  if [ -n "$iface" ]; then
    list_iface "$iface" || true
    exit 0
  fi
  if ((${#all_ifaces[@]} == 0)); then
    echo "pin-irqs: no network interfaces found besides lo"
    exit 0
  fi
  for ifc in "${all_ifaces[@]}"; do list_iface "$ifc" || true; done
  exit 0
fi

# --- pin one interface -----------------------------------------------------------------------

if [ -n "$cpus_arg" ]; then
  cpus=$(expand_cpus "$cpus_arg") || { echo "pin-irqs: bad --cpus '$cpus_arg' (want e.g. 0-15 or 0,2,4)" >&2; exit 2; }
  for c in $cpus; do
    [[ " $online_cpus " == *" $c "* ]] || { echo "pin-irqs: CPU $c is not online (online: $online)" >&2; exit 2; }
  done
else
  cpus=$online_cpus
fi
read -r -a cpu_arr <<< "$cpus"
ncpu=${#cpu_arr[@]}

if [ ! -e "$sys/class/net/$iface/device" ]; then
  echo "pin-irqs: $iface is a virtual interface (no device), so it has no IRQs to pin" >&2
  exit 1
fi
iface_irqs "$iface"
irqs=$found_irqs
if [ -z "$irqs" ]; then
  echo "pin-irqs: found no IRQs for $iface in $found_via" >&2
  exit 1
fi

if ((apply)); then mode="applying"; else mode="dry run; nothing is written"; fi
echo "pin-irqs: $(describe_iface "$iface"), IRQs from $found_via"
echo "pin-irqs: spreading queue IRQs over CPUs $(echo "$cpus" | tr ' ' ',') ($mode)"
node=$(iface_node "$iface")
if [ "$node" -ge 0 ] 2>/dev/null && [ -r "$sys/devices/system/node/node$node/cpulist" ]; then
  node_list=$(cat "$sys/devices/system/node/node$node/cpulist")
  node_cpus=" $(expand_cpus "$node_list" || true) "
  far=""
  for c in $cpus; do [[ "$node_cpus" == *" $c "* ]] || far+="$c "; done
  if [ -n "$far" ]; then
    echo "pin-irqs: warning: CPUs ${far% } are not on $iface's NUMA node $node (CPUs $node_list); its packets would cross sockets" >&2
  fi
fi

rr=0 n_set=0 n_same=0 n_fail=0 n_managed=0 pinned=""
for n in $irqs; do
  name=$(irq_name "$n")
  cur=$(affinity "$n")
  if ! q=$(queue_of "$name" "$iface"); then
    echo "IRQ $n ($name): $cur (not a queue IRQ; left alone)"
    continue
  fi
  if [ -n "$q" ]; then
    cpu=${cpu_arr[$((q % ncpu))]}
  else
    cpu=${cpu_arr[$((rr % ncpu))]}
    rr=$((rr + 1))
  fi
  if managed "$n"; then
    echo "IRQ $n ($name): $cur -> $cpu (kernel-managed: read-only, the driver spreads it; skipped)"
    n_managed=$((n_managed + 1))
    continue
  fi
  pinned+="$n "
  if [ "$cur" = "$cpu" ]; then
    echo "IRQ $n ($name): $cur -> $cpu (already)"
    n_same=$((n_same + 1))
  elif ((apply)); then
    if err=$(printf '%s\n' "$cpu" 2>&1 > "$proc/irq/$n/smp_affinity_list"); then
      echo "IRQ $n ($name): $cur -> $cpu (set; now $(affinity "$n"))"
      n_set=$((n_set + 1))
    else
      echo "IRQ $n ($name): $cur -> $cpu FAILED: ${err#*line [0-9]*: }"
      n_fail=$((n_fail + 1))
    fi
  else
    echo "IRQ $n ($name): $cur -> $cpu"
    n_set=$((n_set + 1))
  fi
done

if ((apply)); then
  echo "pin-irqs: $n_set set, $n_same already there, $n_managed kernel-managed, $n_fail failed"
else
  echo "pin-irqs: $n_set would change, $n_same already there, $n_managed kernel-managed; --apply (as root) writes them"
fi
if [ -n "$pinned" ]; then
  ban=$(for n in $pinned; do printf -- '--banirq=%s ' "$n"; done)
  if command -v pgrep >/dev/null 2>&1 && pgrep -x irqbalance >/dev/null 2>&1; then
    echo "pin-irqs: warning: irqbalance is running and will move these IRQs back." >&2
  else
    echo "pin-irqs: note: irqbalance is not running now; if it starts at boot it will move these IRQs back." >&2
  fi
  echo "pin-irqs: stop it (systemctl disable --now irqbalance), or ban these IRQs in /etc/default/irqbalance" >&2
  echo "pin-irqs: (or /etc/sysconfig/irqbalance): IRQBALANCE_ARGS=\"${ban% }\"" >&2
fi
((n_fail == 0)) || exit 1
