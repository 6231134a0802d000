#!/usr/bin/env bash
# Runs OpenStack's API tests (Tempest) against a three-node `shoal dev` cluster on loopback:
# starts the cluster, writes tempest.conf from it (gen_conf.py), runs the tests listed in
# include.txt minus exclude.txt, prints Tempest's summary, stops the cluster. Exits non-zero
# when a listed test fails or is missing.
#
#   SHOAL_BIN                  the shoal binary (default: $CARGO_TARGET_DIR/debug/shoal)
#   SHOAL_TEMPEST_VENV         Tempest's venv (default: ~/.cache/shoal/tempest-venv; see
#                              install-deps.sh)
#   SHOAL_TEMPEST_CONCURRENCY  test workers (default 2)
#   SHOAL_TEMPEST_KEEP=1       keep the cluster directory, tempest.log and the workspace
#   extra arguments            passed to `tempest run` (e.g. --regex to run more than the list)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../../.." && pwd)"
target="${CARGO_TARGET_DIR:-$HOME/.cache/shoal/target}"
shoal="${SHOAL_BIN:-$target/debug/shoal}"
venv="${SHOAL_TEMPEST_VENV:-$HOME/.cache/shoal/tempest-venv}"
include="$here/include.txt"
exclude="$here/exclude.txt"

if ! grep -qvE '^\s*(#|$)' "$include"; then
  echo "tempest: $include lists no tests; nothing to run"
  exit 0
fi
for f in "$shoal" "$venv/bin/tempest"; do
  [[ -x "$f" ]] || { echo "tempest: $f is missing (build shoal; run install-deps.sh)" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/shoal-tempest.XXXXXX")"
dev_pid=""
stop() {
  local rc=$?
  if [[ -n "$dev_pid" ]] && kill -0 "$dev_pid" 2>/dev/null; then
    # `shoal dev` stops its node processes on SIGTERM.
    kill -TERM "$dev_pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$dev_pid" 2>/dev/null || break; sleep 1; done
    kill -KILL "$dev_pid" 2>/dev/null || true
  fi
  # Servers Tempest left (a class that failed before its clean-up) would outlive the cluster
  # as domains of the shared libvirtd: the cluster's instance directories name them.
  local uri
  uri="$(sed -n 's/^libvirt_uri *= *"\(.*\)"/\1/p' "$work/cluster/node1/node.toml" 2>/dev/null | head -1)"
  for dir in "$work"/cluster/node*/instances/*/; do
    [[ -d "$dir" && -n "$uri" ]] || continue
    local uuid
    uuid="$(basename "$dir")"
    virsh -c "$uri" destroy "$uuid" >/dev/null 2>&1 || true
    virsh -c "$uri" undefine --nvram "$uuid" >/dev/null 2>&1 || virsh -c "$uri" undefine "$uuid" >/dev/null 2>&1 || true
  done
  if [[ "${SHOAL_TEMPEST_KEEP:-0}" == 1 || $rc -ne 0 ]]; then
    echo "tempest: cluster, tempest.log and workspace kept in $work"
  else
    rm -rf "$work"
  fi
  exit $rc
}
trap stop EXIT
trap 'exit 130' INT TERM

# Two Tempest workers hold up to a dozen 1-vCPU servers at once, and the multi-node tests
# need room for one more on the host a server already took: this machine's two cores at
# Nova's initial ratio of 4 (8 vCPUs a host) are too few. 16 is Nova's ratio before Stein,
# the one its gate ran Tempest with.
# As root each node runs its network agent in a namespace of its own (`--netns`): ports,
# router interfaces and floating IPs then reach the states Neutron reports, which Tempest
# waits for. Without root the cluster has no datapath and those tests wait out their timeout.
netns=()
if [[ "$(id -u)" == 0 ]]; then
  netns=(--netns)
else
  echo "tempest: not root, so the cluster runs without network agents (router tests will fail)" >&2
fi
SHOAL_CPU_ALLOCATION_RATIO=16 "$shoal" dev --nodes 3 "${netns[@]}" --dir "$work/cluster" >"$work/dev.log" 2>&1 &
dev_pid=$!
for _ in $(seq 1 180); do
  grep -q "nodes running" "$work/dev.log" && break
  if ! kill -0 "$dev_pid" 2>/dev/null; then
    cat "$work/dev.log" >&2
    echo "tempest: shoal dev exited before the cluster was up" >&2
    exit 1
  fi
  sleep 1
done
grep -q "nodes running" "$work/dev.log" || { cat "$work/dev.log" >&2; echo "tempest: cluster not up after 180s" >&2; exit 1; }

# A workspace registry of our own, so nothing lands in ~/.tempest.
"$venv/bin/tempest" init --workspace-path "$work/workspaces.yaml" "$work/ws" >/dev/null
"$venv/bin/python" "$here/gen_conf.py" --openrc "$work/cluster/node1/admin-openrc" \
  --out "$work/ws/etc/tempest.conf"

cd "$work/ws"
set +e
"$venv/bin/tempest" run --concurrency "${SHOAL_TEMPEST_CONCURRENCY:-2}" \
  --include-list "$include" --exclude-list "$exclude" "$@"
rc=$?
set -e

# Every line of the include list must have matched a test that ran: a typo or a test renamed
# in a new Tempest must not pass silently.
# (`stestr last` exits 1 when the run had failures; the stream is complete all the same.)
ran="$({ "$venv/bin/stestr" last --subunit || true; } | "$venv/bin/subunit-ls" || true)"
missing=0
while IFS= read -r line; do
  re="${line%%#*}"
  re="$(sed -E 's/^[[:space:]]+|[[:space:]]+$//g' <<<"$re")"
  [[ -z "$re" ]] && continue
  if ! grep -qE "$re" <<<"$ran"; then
    echo "tempest: no test ran for include-list line: $re" >&2
    missing=1
  fi
done <"$include"
((rc == 0 && missing == 0)) || exit 1
echo "tempest: every listed test passed ($root)"
