#!/usr/bin/env bash
# VM lab setup: installs QEMU 10 from bookworm-backports and caches a Debian 6.12 kernel, the kernel
# modules the lab guests need, and a static busybox. Idempotent: a second run only checks.
#
# Nothing downloaded here is committed. Cache dir: $VMLAB_CACHE (default tests/vmlab/.cache, gitignored).
# Needs root for apt-get (QEMU install); everything else runs as any user.
#
# Layout written (read by the vfplug-vmlab crate, see src/lab.rs):
#   $CACHE/kernel/vmlinuz           the 6.12 kernel (bzImage)
#   $CACHE/kernel/release           its uname -r
#   $CACHE/kernel/modules/*.ko      uncompressed modules, dependencies included
#   $CACHE/kernel/modules.order     module names, dependencies first (insmod order)
#   $CACHE/busybox                  static busybox
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${VMLAB_CACHE:-$here/.cache}"
# Modules the L1 guest loads: the igb PF (+igbvf for completeness), VFIO, and 9p over virtio to see the
# host's /usr and the run directory. Dependencies are resolved from each module's own modinfo.
MODULES="${VMLAB_MODULES:-igb igbvf vfio vfio_iommu_type1 vfio_pci 9p 9pnet_virtio virtio_pci}"
SOURCES=/etc/apt/sources.list.d/debian.sources
export DEBIAN_FRONTEND=noninteractive

t0=$(date +%s.%N)
step() { printf '[setup %6.1fs] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || echo 0)" "$*"; }
need_root() { if [ "$(id -u)" != 0 ]; then echo "setup.sh: $1 needs root" >&2; exit 1; fi; }

mkdir -p "$CACHE/debs" "$CACHE/kernel/modules"

# --- 1. apt: bookworm-backports + QEMU 10 (igb SR-IOV emulation needs QEMU >= 8) -------------------
apt_updated=0
if [ -f "$SOURCES" ] && ! grep -q 'bookworm-backports' "$SOURCES"; then
    need_root "adding bookworm-backports"
    step "adding bookworm-backports to the Suites: line of $SOURCES"
    # Only the main stanza (the one listing plain 'bookworm'), never the security one.
    sed -i -E '/^Suites:/{/bookworm-security/!s/$/ bookworm-backports/}' "$SOURCES"
    apt-get update -qq
    apt_updated=1
fi
qemu_ok() { command -v qemu-system-x86_64 >/dev/null && qemu-system-x86_64 -device help 2>/dev/null | grep -q '"igb"'; }
if ! qemu_ok; then
    need_root "installing qemu-system-x86"
    [ "$apt_updated" = 1 ] || { step "apt-get update"; apt-get update -qq; apt_updated=1; }
    step "installing qemu-system-x86 from bookworm-backports (--no-install-recommends: ~16 MB instead of ~165 MB)"
    apt-get install -y -qq -t bookworm-backports --no-install-recommends qemu-system-x86 >/dev/null
fi
step "$(qemu-system-x86_64 --version | head -1)"

# --- 2. kernel + busybox .debs (downloaded, never installed) ---------------------------------------
if [ ! -s "$CACHE/kernel/vmlinuz" ] || [ ! -s "$CACHE/kernel/modules.order" ]; then
    [ "$apt_updated" = 1 ] || { step "apt-get update"; apt-get update -qq || true; apt_updated=1; }
    # The backports metapackage names the current 6.12 ABI; we want its -unsigned build (same bits, no
    # signing shim dependency).
    kpkg="$(apt-cache depends -t bookworm-backports linux-image-amd64 2>/dev/null \
            | sed -n -E 's/^\s*Depends: (linux-image-6\.12[^ ]*-amd64)$/\1/p' | head -1)"
    [ -n "$kpkg" ] || { echo "setup.sh: no 6.12 kernel found in bookworm-backports" >&2; exit 1; }
    kpkg="${kpkg%-unsigned}-unsigned"
    step "downloading $kpkg"
    (cd "$CACHE/debs" && rm -f linux-image-*.deb && apt-get download -qq "$kpkg")
    kroot="$CACHE/kroot"
    rm -rf "$kroot"
    step "extracting kernel"
    dpkg -x "$CACHE"/debs/linux-image-*.deb "$kroot"
    rel="$(ls "$kroot/lib/modules" | head -1)"
    cp "$kroot/boot/vmlinuz-$rel" "$CACHE/kernel/vmlinuz"
    echo "$rel" > "$CACHE/kernel/release"
    cp "$kroot/boot/config-$rel" "$CACHE/kernel/config"
    rm -f "$CACHE"/kernel/modules/*.ko
    # Resolve dependencies from each module's .modinfo ("depends=a,b") without kmod/depmod; emit in
    # post-order so every module follows its dependencies.
    declare -A seen=()
    order=()
    find_ko() { find "$kroot/lib/modules/$rel" -name "$1.ko*" -o -name "${1//_/-}.ko*" | head -1; }
    visit() {
        local name="${1//-/_}"
        [ -z "${seen[$name]:-}" ] || return 0
        seen[$name]=1
        local f; f="$(find_ko "$name")"
        if [ -z "$f" ]; then
            # Built into the kernel (e.g. virtio_pci on some configs): nothing to load.
            return 0
        fi
        local out="$CACHE/kernel/modules/$name.ko"
        case "$f" in
            *.xz) xz -dc "$f" > "$out" ;;
            *.zst) zstd -qdc "$f" > "$out" ;;
            *) cp "$f" "$out" ;;
        esac
        local deps; deps="$(grep -a -o -E 'depends=[A-Za-z0-9_,-]*' "$out" | head -1 | cut -d= -f2)"
        local d
        for d in ${deps//,/ }; do visit "$d"; done
        order+=("$name")
    }
    for m in $MODULES; do visit "$m"; done
    printf '%s\n' "${order[@]}" > "$CACHE/kernel/modules.order"
    rm -rf "$kroot" "$CACHE"/debs/linux-image-*.deb   # ~120 MB we no longer need
    step "kernel $rel, modules: $(tr '\n' ' ' < "$CACHE/kernel/modules.order")"
fi

if [ ! -x "$CACHE/busybox" ]; then
    [ "$apt_updated" = 1 ] || { step "apt-get update"; apt-get update -qq || true; apt_updated=1; }
    step "downloading busybox-static"
    (cd "$CACHE/debs" && rm -f busybox-static_*.deb && apt-get download -qq busybox-static)
    bb="$CACHE/bbroot"; rm -rf "$bb"
    dpkg -x "$CACHE"/debs/busybox-static_*.deb "$bb"
    cp "$bb/bin/busybox" "$CACHE/busybox"
    rm -rf "$bb"
fi

step "ready: cache $CACHE ($(du -sh "$CACHE" | cut -f1)); kernel $(cat "$CACHE/kernel/release")"
