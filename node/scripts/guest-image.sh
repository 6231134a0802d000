#!/usr/bin/env bash
# Builds a tiny bootable test guest from Debian packages only, for the TCG boots of the compute
# tests and the demo:
#   OUTDIR/vmlinuz     the kernel of Debian's linux-image-cloud-amd64, for direct kernel boot
#   OUTDIR/initrd.img  a gzip'd newc cpio: busybox-static, the virtio modules, an /init that
#                      reports on the serial console (the markers below) and then idles
#   OUTDIR/disk.raw    a 1 MiB raw disk, the "machine" image a test uploads; its first line is
#                      the label the guest prints back, so a test can see the disk it attached
#
# Usage: node/scripts/guest-image.sh OUTDIR
# Cached: when OUTDIR holds the outputs of this same script it does nothing. A change to this
# file rebuilds them (the stamp is its hash). The kernel is downloaded with `apt-get download`
# and unpacked with `dpkg-deb -x`; nothing is installed on the host.
#
# Boot it with `console=ttyS0` on the kernel command line. What /init prints, in order, each
# on a line of its own ending in a bare "\n" (the kernel's own lines before them end in
# "\r\n"; kernel messages are silenced first so they cannot split a marker line):
#   SHOAL-GUEST-INSMOD-FAILED <module>   only if a driver module did not load
#   SHOAL-GUEST-UP
#   SHOAL-GUEST-HOSTNAME <name>       from `shoal.hostname=NAME` on the command line, if given
#   SHOAL-GUEST-DISK <dev> <bytes> <label>      for each virtio disk (label: its first line)
#   SHOAL-GUEST-IP <address>  or  SHOAL-GUEST-NO-IP    DHCP on eth0, a few seconds at most
#   SHOAL-GUEST-METADATA <json on one line>  or  SHOAL-GUEST-NO-METADATA
#   SHOAL-GUEST-USER-DATA-START ... -END   around the output of user data that is a "#!" script
#   SHOAL-GUEST-DONE
# An ACPI power button press (`virsh shutdown`) prints SHOAL-GUEST-POWER-OFF and powers the
# guest off. Otherwise it idles; its kernel answers ping at the address it got.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT="$1"
DISK_LABEL="SHOAL-TEST-DISK v1"
# The kernel modules the guest loads. Their dependencies are added from each module's own
# `depends=` field, so another kernel version needs no change here.
WANT_MODULES=(virtio_pci virtio_blk virtio_net button evdev)

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
stamp="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

# One builder at a time per OUTDIR: tests may call this concurrently.
exec 9>"$OUT/.lock"
flock 9

outputs_ready() {
  [[ -s "$OUT/vmlinuz" && -s "$OUT/initrd.img" && -s "$OUT/disk.raw" ]] &&
    [[ "$(head -n1 "$OUT/.stamp" 2>/dev/null)" == "$stamp" ]]
}
print_paths() {
  echo "$OUT/vmlinuz"
  echo "$OUT/initrd.img"
  echo "$OUT/disk.raw"
}
if outputs_ready; then
  print_paths
  exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip /bin/busybox; do
  command -v "$tool" >/dev/null || {
    echo "$tool is missing: run node/scripts/install-deps.sh" >&2
    exit 1
  }
done
# Only a static busybox runs inside an initramfs without a libc.
if ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  echo "/bin/busybox is not busybox-static: run node/scripts/install-deps.sh" >&2
  exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/shoal-guest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- the kernel ---------------------------------------------------------------------------
# linux-image-cloud-amd64 is a metapackage; the kernel is the package it depends on.
resolve_kernel_package() {
  apt-cache depends --no-recommends --no-suggests linux-image-cloud-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-.*-cloud-amd64$/ { print $2; exit }'
}
KPKG="$(resolve_kernel_package)"
if [[ -z "$KPKG" ]]; then
  # A fresh machine may not have the package lists yet.
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
  KPKG="$(resolve_kernel_package)"
fi
if [[ -z "$KPKG" ]]; then
  echo "apt-cache knows no kernel package behind linux-image-cloud-amd64" >&2
  exit 1
fi
KVER_PKG="$(apt-cache show --no-all-versions "$KPKG" | awk '$1 == "Version:" { print $2; exit }')"
# apt drops to the _apt user to download: it must reach and write the download folder.
chmod 711 "$WORK"
mkdir "$WORK/deb"
if [[ $(id -u) -eq 0 ]] && getent passwd _apt >/dev/null; then
  chown _apt "$WORK/deb"
fi
(cd "$WORK/deb" && apt-get download -q "$KPKG")
dpkg-deb -x "$WORK"/deb/"$KPKG"_*.deb "$WORK/kernel"
vmlinuz=("$WORK"/kernel/boot/vmlinuz-*)
config=("$WORK"/kernel/boot/config-*)
KREL="${vmlinuz[0]##*/vmlinuz-}"
MODDIR="$WORK/kernel/lib/modules/$KREL"

# --- the initramfs ------------------------------------------------------------------------
ROOT="$WORK/root"
mkdir -p "$ROOT"/{bin,dev,etc,lib/modules,proc,root,run,sbin,sys,tmp,usr/bin,usr/sbin}
cp /bin/busybox "$ROOT/bin/busybox"

# Module name -> file. Names in `depends=` use '_' where some file names use '-'.
declare -A MODFILE
while IFS= read -r f; do
  name="${f##*/}"
  name="${name%.ko}"
  MODFILE["${name//-/_}"]="$f"
done < <(find "$MODDIR" -name '*.ko')

# Depth-first over `depends=`, so every module comes after the ones it needs.
declare -A SEEN
ORDER=()
add_module() {
  local name="$1" file deps dep
  [[ -n "${SEEN[$name]:-}" ]] && return
  SEEN[$name]=1
  file="${MODFILE[$name]:-}"
  if [[ -z "$file" ]]; then
    # A driver built into this kernel has no .ko and needs no loading.
    grep -qE "/${name//_/[-_]}\.ko$" "$MODDIR/modules.builtin" && return
    echo "module $name is neither built into $KREL nor shipped as a .ko" >&2
    exit 1
  fi
  deps="$(tr '\0' '\n' <"$file" | sed -n 's/^depends=//p' | head -n1)"
  for dep in ${deps//,/ }; do
    add_module "${dep//-/_}"
  done
  ORDER+=("$name")
}
for m in "${WANT_MODULES[@]}"; do
  add_module "$m"
done
for name in "${ORDER[@]}"; do
  cp "${MODFILE[$name]}" "$ROOT/lib/modules/$name.ko"
done
printf '%s\n' "${ORDER[@]}" >"$ROOT/lib/modules/load-order"

# udhcpc runs this with the lease in its environment; busybox ships no default script.
cat >"$ROOT/etc/udhcpc.script" <<'EOF'
#!/bin/sh
case "$1" in
deconfig)
  ip addr flush dev "$interface"
  ip link set "$interface" up
  ;;
bound | renew)
  ip addr flush dev "$interface"
  ip addr add "$ip/${mask:-24}" dev "$interface"
  for r in $router; do
    ip route replace default via "$r" dev "$interface"
    break
  done
  # Classless static routes (option 121): "dest/len gateway" pairs; 0.0.0.0 means on-link.
  set -- $staticroutes
  while [ $# -ge 2 ]; do
    if [ "$2" = 0.0.0.0 ]; then
      ip route replace "$1" dev "$interface"
    else
      ip route replace "$1" via "$2" dev "$interface"
    fi
    shift 2
  done
  # Without any route the metadata address is tried on the link itself.
  ip route get 169.254.169.254 >/dev/null 2>&1 || ip route add 169.254.169.254/32 dev "$interface"
  : >/etc/resolv.conf
  for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
  [ -n "$hostname" ] && hostname "$hostname"
  echo "$ip" >/run/shoal-ip
  ;;
esac
exit 0
EOF

# busybox acpid maps the power button to the action file named here, under its -c folder.
echo "PWRF power-off" >"$ROOT/etc/acpid.conf"
mkdir -p "$ROOT/etc/acpi"
cat >"$ROOT/etc/acpi/power-off" <<'EOF'
#!/bin/sh
echo SHOAL-GUEST-POWER-OFF >/dev/console
poweroff -f
EOF

cat >"$ROOT/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node, so the kernel started us without a console.
exec </dev/console >/dev/console 2>&1
# Only emergencies from the kernel from here on: its messages would split our lines.
echo 1 >/proc/sys/kernel/printk
# Lines end in a bare newline, so each marker is exactly the line a reader matches.
stty -F /dev/console -onlcr 2>/dev/null

for m in $(cat /lib/modules/load-order); do
  insmod "/lib/modules/$m.ko" 2>/dev/null || echo "SHOAL-GUEST-INSMOD-FAILED $m"
done

for arg in $(cat /proc/cmdline); do
  case "$arg" in shoal.hostname=*) hostname "${arg#shoal.hostname=}" ;; esac
done
echo
echo SHOAL-GUEST-UP
echo "SHOAL-GUEST-HOSTNAME $(hostname)"

# Wait (2 s at most) until every virtio disk (device id 2) has its block device.
want=$(cat /sys/bus/virtio/devices/*/device 2>/dev/null | grep -c '^0x0002$')
for _ in $(seq 1 20); do
  [ "$(ls -d /sys/block/vd* 2>/dev/null | wc -l)" -ge "$want" ] && break
  sleep 0.1
done
for dev in /sys/block/vd*; do
  [ -e "$dev" ] || continue
  name="${dev##*/}"
  bytes=$(($(cat "$dev/size") * 512))
  label="$(head -c 64 "/dev/$name" | head -n1 | tr -cd ' -~')"
  echo "SHOAL-GUEST-DISK $name $bytes $label"
done

if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip link set eth0 up
  udhcpc -i eth0 -s /etc/udhcpc.script -n -q -t 3 -T 2 -A 1 >/dev/null 2>&1
fi
if [ -s /run/shoal-ip ]; then
  echo "SHOAL-GUEST-IP $(cat /run/shoal-ip)"
  # Not `wget -T`: Debian's static busybox 1.35 crashes with it.
  meta="$(timeout 5 wget -q -O - http://169.254.169.254/openstack/latest/meta_data.json 2>/dev/null | tr -d '\r\n')"
  if [ -n "$meta" ]; then
    echo "SHOAL-GUEST-METADATA $meta"
  else
    echo SHOAL-GUEST-NO-METADATA
  fi
  # User data that is a script runs once, as cloud-init runs a "#!" part; its output goes
  # to the console.
  if timeout 5 wget -q -O /run/user-data http://169.254.169.254/openstack/latest/user_data 2>/dev/null &&
    [ "$(head -c 2 /run/user-data)" = "#!" ]; then
    chmod 755 /run/user-data
    echo SHOAL-GUEST-USER-DATA-START
    /run/user-data 2>&1
    echo SHOAL-GUEST-USER-DATA-END
  fi
else
  echo SHOAL-GUEST-NO-IP
  echo SHOAL-GUEST-NO-METADATA
fi

# `virsh shutdown` presses the ACPI power button; acpid turns that into a power-off.
ls /dev/input/event* >/dev/null 2>&1 && acpid -c /etc/acpi -a /etc/acpid.conf -l /dev/null
echo SHOAL-GUEST-DONE
# PID 1 must never exit. The kernel answers ping by itself.
while :; do sleep 3600; done
EOF
chmod 755 "$ROOT/init" "$ROOT/etc/udhcpc.script" "$ROOT/etc/acpi/power-off"

(cd "$ROOT" && find . -print0 | LC_ALL=C sort -z |
  cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
  gzip -9 -n >"$WORK/initrd.img"

# --- the disk -----------------------------------------------------------------------------
truncate -s 1M "$WORK/disk.raw"
printf '%s\n' "$DISK_LABEL" | dd of="$WORK/disk.raw" conv=notrunc status=none

# --- publish ------------------------------------------------------------------------------
cp "${vmlinuz[0]}" "$WORK/vmlinuz"
# The stamp goes first and comes back last, so a publish cut short is rebuilt next time;
# each file is renamed into place, so a reader never sees half of one.
rm -f "$OUT/.stamp"
for f in vmlinuz initrd.img disk.raw; do
  cp "$WORK/$f" "$OUT/.$f.new"
  mv -f "$OUT/.$f.new" "$OUT/$f"
done
{
  echo "$stamp"
  echo "kernel package: $KPKG $KVER_PKG"
  echo "kernel release: $KREL"
  grep -E '^CONFIG_VIRTIO_(BLK|NET|PCI)=' "${config[0]}"
  echo "modules loaded by /init: ${ORDER[*]:-none (all built in)}"
} >"$OUT/.stamp"
print_paths
