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
  # conntrack: a disassociated floating IP's connections are flushed (dataplane kernel.rs)
  conntrack
  # peers in benchmarks and tests
  etcd-server etcd-client python3-venv
  # process-level tests
  procps psmisc curl iputils-ping
  # qemu-img and qemu-io judge our qcow2 files (kept if a newer one is installed)
  qemu-utils
  # libvirt and real TCG guest boots (libvirtd.sh starts the daemon without systemd)
  libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
  # config drives (genisoimage, isoinfo) and the vfat file system of ephemeral disks
  genisoimage dosfstools
  # the test guest's initramfs (guest-image.sh): a static busybox, packed with cpio
  busybox-static cpio
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

# Installs python package $2==$3 into the venv $1 (outside the clone) unless `$1/bin/$4 --version`
# already prints version $3.
install_pip_tool() {
  local venv="$1" package="$2" version="$3" bin="$4"
  if [[ -x "$venv/bin/$bin" ]] && "$venv/bin/$bin" --version 2>&1 | grep -qx "$bin $version"; then
    return
  fi
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$package==$version"
}

# The real `openstack` client for the end-to-end API tests (node/tests/t70_openstack_cli.rs).
# 10.5.0 is the newest release; it installs on Python 3.11.
OSC_VERSION=10.5.0
install_pip_tool "${SHOAL_OSC_VENV:-$HOME/.cache/shoal/osc-venv}" python-openstackclient "$OSC_VERSION" openstack

# OpenStack's API tests (Tempest), pinned; node/scripts/tempest/run.sh runs them against a
# three-node cluster.
TEMPEST_VERSION=47.0.0
install_pip_tool "${SHOAL_TEMPEST_VENV:-$HOME/.cache/shoal/tempest-venv}" tempest "$TEMPEST_VERSION" tempest
