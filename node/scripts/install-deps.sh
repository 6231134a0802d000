#!/usr/bin/env bash
# Installs the system packages Shoal builds and tests with, on Debian (bookworm). Idempotent.
set -euo pipefail

PACKAGES=(
  # build: bindgen for librocksdb-sys, clang for the eBPF programs
  clang libclang-dev llvm pkg-config build-essential
  # RocksDB from Debian instead of a 14-minute bundled C++ build
  librocksdb-dev
  # eBPF datapath and its namespace tests
  libbpf-dev bpftool iproute2 nftables tcpdump netsniff-ng ethtool
  # peers in benchmarks and tests
  etcd-server etcd-client python3-venv
  # process-level tests
  procps psmisc curl iputils-ping
  # qemu-img and qemu-io judge our qcow2 files (kept if a newer one is installed)
  qemu-utils
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "cargo is not installed: install Rust 1.95 with rustup first" >&2
  exit 1
fi
