#!/bin/bash
# Builds the initramfs of the nested end-to-end test's L1 VM (see tests/nested/init) and writes
# it, gzip-compressed, to $1. Its inputs come from the environment (the test sets them all):
#   L1_KERNEL_DIR     tests/nested/l1-kernel.sh's directory (modules + modules.order)
#   PODVISOR_BIN      the daemon (also the VMM: `podvisor vmm`)
#   L2_KERNEL         the pod guest's kernel and initramfs (build/vmlinux, build/initramfs.cpio)
#   L2_INITRD
#   VIRTIOFSD         virtiofsd
#   CLIENT            podvisor-nested-client
#   REGISTRY_BIN      docker-registry, and the storage directory of a registry holding $IMAGE
#   REGISTRY_STORAGE
#   IMAGE             the reference the client pulls inside L1 (127.0.0.1:5000/...)
#   BUSYBOX           a static busybox (the L1 userland)
set -euo pipefail

out=$1
here=$(cd "$(dirname "$0")" && pwd)
for var in L1_KERNEL_DIR PODVISOR_BIN L2_KERNEL L2_INITRD VIRTIOFSD CLIENT REGISTRY_BIN \
	REGISTRY_STORAGE IMAGE BUSYBOX; do
	[ -n "${!var:-}" ] || { echo "mkinitramfs: $var is not set" >&2; exit 1; }
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,l2,modules,proc,sys,dev,run,tmp,var/lib,var/log,lib64}

# A binary and the shared libraries it loads, at the paths the loader looks them up at.
add_binary() {
	local source=$1 name=$2
	cp "$source" "$root/bin/$name"
	# Debug builds are mostly debug info: the L1 VM unpacks every byte under emulation.
	strip --strip-debug "$root/bin/$name" 2>/dev/null || true
	ldd "$source" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
		mkdir -p "$root$(dirname "$lib")"
		cp -L "$lib" "$root$lib"
	done
}

cp "$BUSYBOX" "$root/bin/busybox"
for applet in $("$BUSYBOX" --list); do
	[ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
add_binary "$PODVISOR_BIN" podvisor
add_binary "$VIRTIOFSD" virtiofsd
add_binary "$REGISTRY_BIN" docker-registry
add_binary "$CLIENT" podvisor-nested-client
# The L2 pod's network: Debian's CNI plugins (static Go binaries).
mkdir -p "$root/cni"
for plugin in ptp host-local; do cp "/usr/lib/cni/$plugin" "$root/cni/"; done

cp "$L2_KERNEL" "$root/l2/vmlinux"
cp "$L2_INITRD" "$root/l2/initramfs.cpio"
while read -r module; do
	cp "$L1_KERNEL_DIR/$module.ko" "$root/modules/"
done <"$L1_KERNEL_DIR/modules.order"
cp "$L1_KERNEL_DIR/modules.order" "$root/modules/"
cp -a "$REGISTRY_STORAGE" "$root/registry"
echo "$IMAGE" >"$root/etc/nested-image"
# The daemon's registry client panics without system CA certificates, even for a plain-HTTP
# registry (reqwest's Client::new() in oci-client's fallback): give L1 the host's.
mkdir -p "$root/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
install -m 0755 "$here/init" "$root/init"

(cd "$root" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -1) >"$out.tmp"
mv "$out.tmp" "$out"
