#!/bin/bash
# Prints a directory holding the kernel of the nested-virtualization test's L1 VM (`vmlinuz`)
# and the modules that give it /dev/kvm on an (emulated) AMD CPU, uncompressed, plus
# `modules.order`, the order to insmod them in (dependencies first).
#
# The kernel is Debian's own (`linux-image-amd64`'s current dependency), fetched with apt: it
# is the only source of kernels reachable from the build machines, and it has KVM as modules.
# Cached under ${PODVISOR_CACHE:-/var/cache/podvisor}/l1-kernel/<package>_<version>/.
set -euo pipefail

cache_root=${PODVISOR_CACHE:-/var/cache/podvisor}/l1-kernel
# kvm-amd pulls in kvm, ccp and irqbypass (`modinfo -F depends` resolves them below); the rest
# carry a CNI interface into the L2 pod (tap, veth, tc ingress + u32 + mirred redirect).
wanted_modules=(kvm-amd tun veth sch_ingress cls_u32 act_mirred)

kernel_package() {
	apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
package=$(kernel_package)
# A machine whose package lists were never fetched (or were cleaned) knows no kernel yet.
if [ -z "$package" ]; then
	apt-get update -qq >&2
	package=$(kernel_package)
fi
[ -n "$package" ] || { echo "l1-kernel: no linux-image-<version> dependency of linux-image-amd64" >&2; exit 1; }
version=$(apt-cache policy "$package" | awk '/Candidate:/ {print $2}')
[ -n "$version" ] && [ "$version" != "(none)" ] || { echo "l1-kernel: $package has no candidate version" >&2; exit 1; }
# The module list is part of the key: a cache made for fewer modules must not be reused.
modules_key=$(printf '%s\n' "${wanted_modules[@]}" | sha256sum | cut -c1-12)
out=$cache_root/${package}_${version}_${modules_key}
if [ -f "$out/.complete" ]; then
	echo "$out"
	exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download drops privileges to _apt, which must be able to write here.
chmod 755 "$work"
(cd "$work" && apt-get download -qq "$package=$version" >&2)
dpkg-deb -x "$work"/"${package}"_*.deb "$work/root"
kernel_release=${package#linux-image-}
module_dir=$work/root/lib/modules/$kernel_release

# module name -> its file; names use '-' and '_' interchangeably.
module_file() {
	local name=${1//_/-} file
	file=$(find "$module_dir" \( -name "$name.ko*" -o -name "${name//-/_}.ko*" \) -print -quit)
	[ -n "$file" ] || { echo "l1-kernel: module $1 not in $package" >&2; exit 1; }
	echo "$file"
}

staging=$work/out
mkdir -p "$staging"
order=()
add_module() {
	local name=$1 file dep
	for done_name in "${order[@]}"; do [ "$done_name" = "$name" ] && return 0; done
	file=$(module_file "$name")
	for dep in $(modinfo -F depends "$file" | tr ',' ' '); do add_module "$dep"; done
	case $file in
	*.ko.xz) xz -dc "$file" >"$staging/$name.ko" ;;
	*.ko.zst) zstd -qdc "$file" >"$staging/$name.ko" ;;
	*.ko.gz) gzip -dc "$file" >"$staging/$name.ko" ;;
	*) cp "$file" "$staging/$name.ko" ;;
	esac
	order+=("$name")
}
for module in "${wanted_modules[@]}"; do add_module "$module"; done
printf '%s\n' "${order[@]}" >"$staging/modules.order"
cp "$work/root/boot/vmlinuz-$kernel_release" "$staging/vmlinuz"
echo "$package $version" >"$staging/package"
touch "$staging/.complete"

mkdir -p "$cache_root"
rm -rf "$out"
mv "$staging" "$out"
echo "$out"
