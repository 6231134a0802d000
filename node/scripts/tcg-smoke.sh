#!/usr/bin/env bash
# Boots the test guest for real through libvirt (TCG, `qemu:///system`) and checks what it
# reports on its serial console: the shape of domain the compute agent renders (direct kernel
# boot, a virtio disk on a qcow2 overlay over the raw image, the serial console to a file),
# plus a virtio NIC whose tap is moved into a network namespace that serves DHCP and a
# metadata document, and an ACPI shutdown.
#
# Usage: node/scripts/tcg-smoke.sh [RUNS]      (as root; RUNS boots one after another, default 1)
# Prints the time from `virsh create` to SHOAL-GUEST-UP for each boot and their median.
# Needs root; without it, it says why and skips, unless CI=true, where it fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

RUNS="${1:-1}"
BOOT_TIMEOUT=120
URI="qemu:///system"
GUEST_DIR="${SHOAL_GUEST_DIR:-$HOME/.cache/shoal/guest}"

if [[ $(id -u) -ne 0 ]]; then
  if [[ "${CI:-}" == true ]]; then
    echo "tcg-smoke.sh needs root (libvirtd, network namespaces) and CI=true forbids skipping" >&2
    exit 1
  fi
  echo "tcg-smoke.sh: skipped, it needs root (libvirtd, network namespaces)"
  exit 0
fi

bash node/scripts/libvirtd.sh
bash node/scripts/guest-image.sh "$GUEST_DIR" >/dev/null
DISK_LABEL="SHOAL-TEST-DISK v1"

WORK="$(mktemp -d /tmp/shoal-tcg-smoke.XXXXXX)"
DOMAIN=""
NETNS=""
TAP=""
PIDS=()
cleanup() {
  if [[ -n "$DOMAIN" ]]; then
    virsh -c "$URI" destroy "$DOMAIN" >/dev/null 2>&1 || true
  fi
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n "$NETNS" ]]; then
    ip netns del "$NETNS" 2>/dev/null || true
  fi
  # QEMU's exit removes the tap; this is for a failure between its creation and the move.
  if [[ -n "$TAP" ]] && ip link show "$TAP" >/dev/null 2>&1; then
    ip link del "$TAP" 2>/dev/null || true
  fi
  DOMAIN="" NETNS="" TAP="" PIDS=()
}
trap 'cleanup; rm -rf "$WORK"' EXIT

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# Waits until LINE_REGEX is in the console file; fails after SECONDS.
wait_for_line() {
  local file="$1" regex="$2" seconds="$3" deadline
  deadline=$(($(now_ms) + seconds * 1000))
  while (($(now_ms) < deadline)); do
    grep -qE "$regex" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "no line matching '$regex' in $file within ${seconds}s; the console says:" >&2
  tail -n 30 "$file" >&2 || true
  return 1
}

# A namespace with DHCP (busybox udhcpd) and the metadata address (python's http.server)
# behind the guest's tap: the guest's traffic never leaves it.
start_network() {
  local run="$1" dir="$WORK/net$run"
  mkdir -p "$dir/www/openstack/latest"
  printf '{"uuid": "%s", "name": "smoke-%s", "hostname": "smoke-%s"}\n' \
    "$(cat /proc/sys/kernel/random/uuid)" "$run" "$run" >"$dir/www/openstack/latest/meta_data.json"
  ip link set "$TAP" netns "$NETNS"
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" addr add 169.254.169.254/32 dev lo
  ip -n "$NETNS" addr add 10.99.0.1/24 dev "$TAP"
  ip -n "$NETNS" link set "$TAP" up
  cat >"$dir/udhcpd.conf" <<EOF
start 10.99.0.10
end 10.99.0.20
interface $TAP
lease_file $dir/udhcpd.leases
option subnet 255.255.255.0
option router 10.99.0.1
EOF
  : >"$dir/udhcpd.leases"
  ip netns exec "$NETNS" busybox udhcpd -f "$dir/udhcpd.conf" >"$dir/udhcpd.log" 2>&1 &
  PIDS+=($!)
  ip netns exec "$NETNS" python3 -m http.server --bind 169.254.169.254 --directory "$dir/www" 80 \
    >"$dir/http.log" 2>&1 &
  PIDS+=($!)
}

boot_once() {
  local run="$1" dir="$WORK/run$run" start up_ms done_ms
  mkdir -p "$dir"
  DOMAIN="shoal-smoke-$$-$run"
  NETNS="shoal-smoke-$$-$run"
  TAP="shsmk$$r$run"
  TAP="${TAP:0:15}"
  ip netns add "$NETNS"
  qemu-img create -q -f qcow2 -b "$GUEST_DIR/disk.raw" -F raw "$dir/overlay.qcow2"
  cat >"$dir/domain.xml" <<EOF
<domain type='qemu'>
  <name>$DOMAIN</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$GUEST_DIR/vmlinuz</kernel>
    <initrd>$GUEST_DIR/initrd.img</initrd>
    <cmdline>console=ttyS0 shoal.hostname=smoke-$run</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$dir/overlay.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='ethernet'>
      <target dev='$TAP'/>
      <model type='virtio'/>
    </interface>
    <serial type='file'>
      <source path='$dir/console.log'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='$dir/console.log'/>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
EOF
  start=$(now_ms)
  virsh -c "$URI" create "$dir/domain.xml" >/dev/null
  start_network "$run"
  wait_for_line "$dir/console.log" '^SHOAL-GUEST-UP$' "$BOOT_TIMEOUT"
  up_ms=$(($(now_ms) - start))
  wait_for_line "$dir/console.log" '^SHOAL-GUEST-DONE$' 60
  done_ms=$(($(now_ms) - start))
  local expect
  for expect in \
    "^SHOAL-GUEST-HOSTNAME smoke-$run\$" \
    "^SHOAL-GUEST-DISK vda 1048576 $DISK_LABEL\$" \
    '^SHOAL-GUEST-IP 10\.99\.0\.(1[0-9]|20)$' \
    "^SHOAL-GUEST-METADATA \{\"uuid\": \"[0-9a-f-]{36}\", \"name\": \"smoke-$run\""; do
    grep -qE "$expect" "$dir/console.log" || {
      echo "boot $run: no line matching '$expect'; the console says:" >&2
      grep SHOAL- "$dir/console.log" >&2
      exit 1
    }
  done
  if grep -q '^SHOAL-GUEST-INSMOD-FAILED' "$dir/console.log"; then
    echo "boot $run: a driver module did not load:" >&2
    grep '^SHOAL-GUEST-INSMOD-FAILED' "$dir/console.log" >&2
    exit 1
  fi
  # The kernel answers ping: the guest is reachable at the address it reported.
  local ip
  ip="$(sed -n 's/^SHOAL-GUEST-IP //p' "$dir/console.log")"
  ip netns exec "$NETNS" ping -c 1 -W 5 "$ip" >/dev/null || {
    echo "boot $run: the guest does not answer ping at $ip" >&2
    exit 1
  }
  # `virsh shutdown` presses the ACPI power button; the transient domain then disappears.
  virsh -c "$URI" shutdown "$DOMAIN" >/dev/null
  local gone=""
  for _ in $(seq 1 300); do
    virsh -c "$URI" domstate "$DOMAIN" >/dev/null 2>&1 || { gone=1; break; }
    sleep 0.1
  done
  if [[ -z "$gone" ]]; then
    echo "boot $run: the guest ignored the ACPI shutdown for 30 s" >&2
    exit 1
  fi
  grep -q '^SHOAL-GUEST-POWER-OFF$' "$dir/console.log" || {
    echo "boot $run: the domain went away without the guest's power-off line" >&2
    exit 1
  }
  DOMAIN=""
  cleanup
  echo "boot $run: SHOAL-GUEST-UP ${up_ms} ms, SHOAL-GUEST-DONE ${done_ms} ms after virsh create; the guest said:"
  grep '^SHOAL-' "$dir/console.log" | sed 's/^/  /'
  UP_MS="$up_ms"
}

# Not in a $(subshell): the EXIT trap must see the domain and namespace a failed boot leaves.
times=()
for run in $(seq 1 "$RUNS"); do
  boot_once "$run"
  times+=("$UP_MS")
done
median="$(printf '%s\n' "${times[@]}" | sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : int((a[NR / 2] + a[NR / 2 + 1]) / 2) }')"
echo "tcg-smoke: $RUNS boot(s) passed; virsh create -> SHOAL-GUEST-UP: ${times[*]} ms; median ${median} ms"
