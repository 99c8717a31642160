#!/bin/sh
# Builds the static podvisor-agent and the guest initramfs around it.
# Usage: guest-agent/mkinitramfs.sh OUT_DIR
# Writes OUT_DIR/podvisor-agent and OUT_DIR/initramfs.cpio (uncompressed newc): /init is the
# agent, plus the empty directories it mounts on before it moves the root onto a tmpfs.
set -eu

out_dir=${1:?usage: $0 OUT_DIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
triple=x86_64-unknown-linux-gnu

cd "$repo"
# crt-static needs the explicit --target, or proc-macro crates are built static too and fail.
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
LIBSECCOMP_LINK_TYPE=static \
LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
CARGO_TARGET_DIR="$target_dir" \
    cargo build --release --target "$triple" -p podvisor-agent

mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
cp "$target_dir/$triple/release/podvisor-agent" "$out_dir/podvisor-agent.tmp"
mv "$out_dir/podvisor-agent.tmp" "$out_dir/podvisor-agent"

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
cp "$out_dir/podvisor-agent" "$staging/init"
chmod 0755 "$staging/init"
for dir in dev proc sys run tmp etc; do
    mkdir -m 0755 "$staging/$dir"
done
(cd "$staging" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
    > "$out_dir/initramfs.cpio.tmp"
mv "$out_dir/initramfs.cpio.tmp" "$out_dir/initramfs.cpio"
echo "$out_dir/initramfs.cpio"
