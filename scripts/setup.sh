#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and test Gatehouse. Idempotent; prints what it
# did. Needs: a Rust toolchain (cargo), a C compiler (glommio builds its bundled liburing, and
# aws-lc-rs builds AWS-LC for rustls), git (glommio's build script calls it), a Linux kernel
# with io_uring (5.8+), and, for the browser test only, Chromium (Debian's `chromium`).
# `--no-browser` skips Chromium (for machines that only run the gateway).
set -euo pipefail

browser=1
[ "${1:-}" = "--no-browser" ] && browser=0
missing=()
command -v cc >/dev/null 2>&1 || missing+=(gcc)
command -v git >/dev/null 2>&1 || missing+=(git)
command -v make >/dev/null 2>&1 || missing+=(make)
if [ "$browser" = 1 ] && ! command -v chromium >/dev/null 2>&1 \
  && ! command -v chromium-browser >/dev/null 2>&1 && [ -z "${GATEHOUSE_CHROMIUM:-}" ]; then
  missing+=(chromium)
fi
if ((${#missing[@]})); then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]} with apt-get"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install: ${missing[*]}" >&2
    exit 1
  fi
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs), then re-run" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      echo "setup: adding rustup component $component"
      rustup component add "$component"
    else
      echo "setup: cargo $component missing and no rustup to add it" >&2
      exit 1
    fi
  fi
done
if [ -r /proc/sys/kernel/io_uring_disabled ] && [ "$(cat /proc/sys/kernel/io_uring_disabled)" != 0 ]; then
  echo "setup: warning: kernel.io_uring_disabled=$(cat /proc/sys/kernel/io_uring_disabled); gatehouse needs io_uring" >&2
fi
echo "setup: ok ($(cargo --version))"
