#!/usr/bin/env bash
# Builds the guest vmlinux from Debian's linux-source-6.1 (or $KERNEL_SRC, a tarball or a tree)
# and caches it outside the repo, keyed by everything that shapes the result:
# the config fragment, this script and the kernel source's identity.
# Prints the path of the cached vmlinux on stdout; all build chatter goes to stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${PODVISOR_CACHE:-/var/cache/podvisor}
src=${KERNEL_SRC:-/usr/src/linux-source-6.1.tar.xz}
jobs=${JOBS:-$(nproc)}

if [ ! -e "$src" ]; then
  echo "kernel source $src not found (apt-get install linux-source-6.1, or set KERNEL_SRC)" >&2
  exit 1
fi
if [ -d "$src" ]; then
  src_id=$(cd "$src" && make -s kernelversion 2>/dev/null || echo tree)-$(realpath "$src")
else
  src_id=$(stat -c '%s-%Y' "$src")-$(basename "$src")
fi
key=$( { cat "$here/podvisor.config" "$here/build.sh"; echo "$src_id"; } | sha256sum | cut -c1-16)
out="$cache_root/kernel/$key"
if [ -s "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi

work="$cache_root/kernel/build-$key"
rm -rf "$work"
mkdir -p "$work"
if [ -d "$src" ]; then
  cp -a "$src/." "$work/linux"
else
  echo "unpacking $src" >&2
  tar -C "$work" -xf "$src"
  mv "$work"/linux-source-* "$work/linux"
fi
cd "$work/linux"
make -s tinyconfig >&2
scripts/kconfig/merge_config.sh -m .config "$here/podvisor.config" >&2
make -s olddefconfig >&2
# Every requested option must have survived olddefconfig; a silently dropped one would
# show up much later as a guest that cannot mount or connect.
missing=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=y) grep -qx "$line" .config || { echo "kernel config lost: $line" >&2; missing=1; } ;;
  esac
done < "$here/podvisor.config"
[ "$missing" = 0 ] || exit 1
echo "building vmlinux with $jobs jobs (about 15 minutes on 2 cores)" >&2
make -s -j"$jobs" vmlinux >&2
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
rm -rf "$out"
mv "$out.tmp" "$out"
cd /
rm -rf "$work"
echo "$out/vmlinux"
