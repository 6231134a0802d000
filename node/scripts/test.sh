#!/usr/bin/env bash
# The test command: installs what it needs, then formatting, lints and every test.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash node/scripts/install-deps.sh
# The real guest boots (node/tests/t87_guest_boot.rs) need libvirtd; there is no systemd.
if [[ $(id -u) -eq 0 ]]; then
  bash node/scripts/libvirtd.sh
fi
# The target directory lives outside the clone so a kept machine reuses it between runs.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/shoal/target}"
export CARGO_TERM_COLOR=never
# A CI build is built once: incremental caches would only double the target directory's size.
export CARGO_INCREMENTAL=0
mkdir -p "$CARGO_TARGET_DIR"
echo "free disk before the build:$(df -h --output=avail "$CARGO_TARGET_DIR" | tail -1)"
start=$(date +%s)
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
echo "build finished after $(( $(date +%s) - start ))s"
cargo test --workspace --locked
echo "tests finished after $(( $(date +%s) - start ))s"
# OpenStack's own API tests against a three-node cluster of the binary just built.
bash node/scripts/tempest/run.sh
echo "tempest finished after $(( $(date +%s) - start ))s"
