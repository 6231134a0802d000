#!/usr/bin/env bash
# Starts libvirtd (Debian 12's libvirt 9.0) by hand on a machine without systemd, so that
# `qemu:///system` answers for the compute agent and the guest tests. Idempotent: when libvirtd
# already answers it changes nothing and returns at once.
#
# How an operator runs it (as root, after node/scripts/install-deps.sh):
#   bash node/scripts/libvirtd.sh
#   virsh -c qemu:///system version      # answers now
# The daemons log to /var/log/libvirt/libvirtd.log and virtlogd.log, each guest's QEMU to
# /var/log/libvirt/qemu/NAME.log. To stop them: kill "$(cat /run/libvirtd.pid)" and
# kill "$(cat /run/virtlogd.pid)".
#
# What Debian's libvirt-daemon-system package and the systemd units would otherwise do, and
# which this script does instead (each found missing by trying):
#   - /var/log/libvirt: `libvirtd -d` exits at once without it (it opens its log file there);
#   - the libvirt-qemu user and group: Debian builds the QEMU driver with that default user,
#     and the driver refuses to start when it does not exist, even if qemu.conf overrides it;
#   - user = "root" / group = "root" in /etc/libvirt/qemu.conf: QEMU runs as root, so it can
#     read images and write console logs wherever the node keeps them;
#   - virtlogd: the QEMU driver sends each guest's QEMU output through it, and starting a
#     domain fails ("Failed to connect socket to '/run/libvirt/virtlogd-sock'") without it.
# The log shows errors about dnsmasq, D-Bus and dmidecode at start; none of them stops the
# QEMU driver (Shoal needs neither libvirt's networks nor firewalld).
set -euo pipefail

URI="qemu:///system"
QEMU_CONF=/etc/libvirt/qemu.conf
WAIT_SECONDS="${SHOAL_LIBVIRTD_WAIT:-30}"

answers() {
  timeout 10 virsh -c "$URI" version >/dev/null 2>&1
}

if [[ $(id -u) -ne 0 ]]; then
  echo "libvirtd.sh must run as root (it starts the system libvirtd)" >&2
  exit 1
fi
for tool in libvirtd virtlogd virsh qemu-system-x86_64; do
  command -v "$tool" >/dev/null || {
    echo "$tool is missing: run node/scripts/install-deps.sh" >&2
    exit 1
  }
done

# Under systemd, socket activation starts virtlogd on first use.
virtlogd_up() {
  pgrep -x virtlogd >/dev/null || [[ -d /run/systemd/system ]]
}

if answers && virtlogd_up; then
  exit 0
fi

mkdir -p /var/log/libvirt/qemu /run/libvirt /var/lib/libvirt/qemu /var/cache/libvirt

if ! getent group libvirt-qemu >/dev/null; then
  groupadd --system libvirt-qemu
fi
if ! getent passwd libvirt-qemu >/dev/null; then
  useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
    --shell /usr/sbin/nologin libvirt-qemu
fi

# Sets `KEY = "VALUE"` in qemu.conf: replaces an active line for KEY, else appends one.
set_qemu_conf() {
  local key="$1" value="$2"
  touch "$QEMU_CONF"
  if grep -qE "^[[:space:]]*$key[[:space:]]*=" "$QEMU_CONF"; then
    sed -i -E "s|^[[:space:]]*$key[[:space:]]*=.*|$key = \"$value\"|" "$QEMU_CONF"
  else
    printf '%s = "%s"\n' "$key" "$value" >>"$QEMU_CONF"
  fi
}
set_qemu_conf user root
set_qemu_conf group root

# -d daemonizes; each refuses a second copy through its pid file, so a racing run is harmless.
if ! virtlogd_up; then
  virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d
fi

for _ in $(seq 1 "$WAIT_SECONDS"); do
  if answers; then
    exit 0
  fi
  sleep 1
done
echo "libvirtd did not answer on $URI within ${WAIT_SECONDS}s; see /var/log/libvirt/libvirtd.log:" >&2
tail -n 20 /var/log/libvirt/libvirtd.log >&2 || true
exit 1
