#!/usr/bin/env bash
# The main job: a local 3-node Shoal cluster on loopback doing real work. Builds shoal, starts
# `shoal dev --nodes 3`, shows the cluster status, writes a key through node1 and reads it back
# linearizably through node3; then, with the real `openstack` client, uploads a qcow2 image
# through node1, lists it through node2, pulls it into node3's cache from its replicas and
# downloads it through node3; then boots a real guest (a Debian cloud kernel and a busybox
# initramfs, as kernel/ramdisk/machine images) with `openstack server create --wait` through
# node1, lists it through node2, prints its console marker, stops, starts and deletes it; then
# boots a second guest on another node whose user data pings the first over VXLAN; then stops
# the cluster. As root the guests run under QEMU through libvirtd (started here if it is not
# running) and each node's datapath gets its own underlay namespace (`shoal dev --netns`);
# otherwise the nodes drive libvirt's test hypervisor and nothing really boots.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash node/scripts/install-deps.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shoal/target}"
cargo build --release --locked -p shoal
SHOAL="$CARGO_TARGET_DIR/release/shoal"
DIR="$(mktemp -d /tmp/shoal-demo.XXXXXX)"
if [[ $(id -u) -eq 0 ]]; then
  bash node/scripts/libvirtd.sh
  LIBVIRT=(--libvirt-uri qemu:///system --virt-type qemu --netns)
  REAL_GUEST=1
else
  echo "not root: the nodes drive libvirt's test hypervisor; the guest will not really boot" >&2
  LIBVIRT=(--libvirt-uri test:///default)
  REAL_GUEST=0
fi
"$SHOAL" dev --nodes 3 --dir "$DIR" "${LIBVIRT[@]}" &
DEV=$!
trap 'kill -TERM $DEV 2>/dev/null; wait $DEV 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 1 180); do
  [[ -f "$DIR/node1/admin-openrc" ]] && break
  kill -0 $DEV 2>/dev/null || { echo "shoal dev exited; logs in $DIR" >&2; exit 1; }
  sleep 1
done
# shellcheck disable=SC1091
source "$DIR/node1/admin-openrc"
# Wait until all three members are healthy.
for _ in $(seq 1 120); do
  n=$("$SHOAL" status --json 2>/dev/null | grep -c '"healthy": true' || true)
  [[ "$n" == 3 ]] && break
  sleep 1
done
echo "== shoal status"
"$SHOAL" status
api3=$("$SHOAL" status --json | python3 -c 'import json,sys; m=[m for m in json.load(sys.stdin)["members"] if m["name"]=="node3"][0]; print(m["api"])')
echo "== write through node1"
"$SHOAL" kv put demo/greeting "hello from node1"
echo "== linearizable read through node3 ($api3)"
OS_AUTH_URL="http://$api3/identity/v3" "$SHOAL" kv get demo/greeting

OSC="${SHOAL_OPENSTACK_BIN:-$HOME/.cache/shoal/osc-venv/bin/openstack}"
api2=$("$SHOAL" status --json | python3 -c 'import json,sys; m=[m for m in json.load(sys.stdin)["members"] if m["name"]=="node2"][0]; print(m["api"])')
echo "== a 64 MiB qcow2 image (16 MiB written) uploaded through node1"
qemu-img create -q -f qcow2 "$DIR/demo.qcow2" 64M
qemu-io -f qcow2 -c "write -P 0x5a 0 16M" "$DIR/demo.qcow2" >/dev/null
id=$("$OSC" image create --file "$DIR/demo.qcow2" --disk-format qcow2 --container-format bare \
  demo-image -f value -c id)
echo "== image list and show through node2 ($api2)"
OS_AUTH_URL="http://$api2/identity/v3" "$OSC" image list
OS_AUTH_URL="http://$api2/identity/v3" "$OSC" image show "$id" \
  -c status -c size -c disk_format -c checksum
echo "== node3 pulls it from the nodes that hold its chunks"
OS_AUTH_URL="http://$api3/identity/v3" "$SHOAL" image pull "$id"
echo "== download through node3, compared with the original"
OS_AUTH_URL="http://$api3/identity/v3" "$OSC" image save --file "$DIR/back.qcow2" "$id"
cmp "$DIR/demo.qcow2" "$DIR/back.qcow2" && echo "identical: $(sha256sum <"$DIR/back.qcow2" | cut -c1-16)..."

echo "== a bootable guest: kernel (aki), ramdisk (ari) and machine image (ami) from Debian packages"
GUEST="$HOME/.cache/shoal/guest"
bash node/scripts/guest-image.sh "$GUEST" >/dev/null
kernel=$("$OSC" image create --disk-format aki --container-format aki --file "$GUEST/vmlinuz" \
  guest-kernel -f value -c id)
ramdisk=$("$OSC" image create --disk-format ari --container-format ari --file "$GUEST/initrd.img" \
  guest-ramdisk -f value -c id)
"$OSC" image create --disk-format ami --container-format ami --file "$GUEST/disk.raw" \
  --property kernel_id="$kernel" --property ramdisk_id="$ramdisk" guest -f value -c id >/dev/null
"$OSC" flavor create --vcpus 1 --ram 256 --disk 1 m1.tiny -f value -c id >/dev/null
echo "== a tenant network (VXLAN) and subnet"
"$OSC" network create demo-net -c id -c provider:segmentation_id -c mtu
"$OSC" subnet create --network demo-net --subnet-range 10.20.0.0/24 demo-subnet \
  -c cidr -c gateway_ip -c allocation_pools
echo "== openstack server create --wait through node1"
start=$(date +%s.%N)
"$OSC" server create --flavor m1.tiny --image guest --network demo-net --wait demo-vm \
  -c id -c status -c OS-EXT-SRV-ATTR:host -c OS-EXT-SRV-ATTR:instance_name
echo "ACTIVE after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
echo "== server list through node2"
OS_AUTH_URL="http://$api2/identity/v3" "$OSC" server list
if [[ $REAL_GUEST == 1 ]]; then
  echo "== the guest's console, read through node3"
  for _ in $(seq 1 120); do
    out=$(OS_AUTH_URL="http://$api3/identity/v3" "$OSC" console log show demo-vm)
    grep -q SHOAL-GUEST-DONE <<<"$out" && break
    sleep 1
  done
  grep SHOAL-GUEST <<<"$out"
  grep -q SHOAL-GUEST-UP <<<"$out" || { echo "the guest did not come up" >&2; exit 1; }

  echo "== a second guest, on another node, pings the first over VXLAN (its user data)"
  read -r ip1 host1 < <("$OSC" server show demo-vm -f json | python3 -c '
import json, sys
s = json.load(sys.stdin)
a = s["addresses"]
ip = a["demo-net"][0] if isinstance(a, dict) else a.split("=")[1].split(",")[0]
print(ip, s["OS-EXT-SRV-ATTR:host"])')
  other=node1; [[ $host1 == node1 ]] && other=node2
  printf '#!/bin/sh\nif ping -c 3 -W 2 %s; then echo SHOAL-PING-OK; else echo SHOAL-PING-FAILED; fi\n' \
    "$ip1" >"$DIR/ping.sh"
  "$OSC" server create --flavor m1.tiny --image guest --network demo-net \
    --availability-zone "nova:$other" --user-data "$DIR/ping.sh" --wait demo-vm2 \
    -c id -c status -c OS-EXT-SRV-ATTR:host
  for _ in $(seq 1 120); do
    out=$("$OSC" console log show demo-vm2)
    grep -q SHOAL-GUEST-DONE <<<"$out" && break
    sleep 1
  done
  grep -E 'SHOAL-GUEST-IP|SHOAL-PING|bytes from' <<<"$out"
  grep -q SHOAL-PING-OK <<<"$out" || { echo "demo-vm2 ($other) could not ping demo-vm ($host1)" >&2; exit 1; }
  "$OSC" server delete --wait demo-vm2
fi
echo "== stop, start, delete"
"$OSC" server stop demo-vm
for _ in $(seq 1 60); do
  [[ $("$OSC" server show demo-vm -f value -c status) == SHUTOFF ]] && break
  sleep 1
done
"$OSC" server show demo-vm -f value -c status
"$OSC" server start demo-vm
for _ in $(seq 1 60); do
  [[ $("$OSC" server show demo-vm -f value -c status) == ACTIVE ]] && break
  sleep 1
done
"$OSC" server show demo-vm -f value -c status
"$OSC" server delete --wait demo-vm
echo "deleted; servers left: $("$OSC" server list -f value | wc -l)"
