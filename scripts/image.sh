#!/usr/bin/env bash
# Writes vfplug's container image as a docker-archive tarball, without Docker or a registry:
# /usr/local/bin/{vfplugd,vfplugctl,vfplug} and the shared libraries they load (as ldd lists
# them), nothing else (no shell). Load it with `ctr -n k8s.io images import`, `docker load` or
# `podman load`, or push it with skopeo. docs/helm.md says how the chart uses it.
#
#   scripts/image.sh [--tag vfplug:0.1.0] [--out target/vfplug-image.tar] [--profile release]
#                    [--bin-dir DIR]   (take the three binaries from DIR; no cargo build)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/docker-archive.sh
. "$repo/scripts/lib/docker-archive.sh"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)"
tag="vfplug:$version" out="$repo/target/vfplug-image.tar" profile=release bin_dir=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) tag="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --profile) profile="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "image.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
done
bins=(vfplugd vfplugctl vfplug)
if [ -z "$bin_dir" ]; then
    flag=(); [ "$profile" = release ] && flag=(--release)
    echo "image.sh: cargo build ${flag[*]} (vfplugd, vfplugctl, vfplug)" >&2
    (cd "$repo" && cargo build --quiet "${flag[@]}" -p vfplugd -p vfplug-cni --bins)
    bin_dir="${CARGO_TARGET_DIR:-$repo/target}/$profile"
fi
for b in "${bins[@]}"; do
    [ -x "$bin_dir/$b" ] || { echo "image.sh: no executable $bin_dir/$b" >&2; exit 1; }
done
mkdir -p "$(dirname "$out")"
root="$(mktemp -d "$(dirname "$out")/.rootfs.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev" "$root/run" "$root/var"
# As on the host: the runtime's CNI_NETNS paths are /var/run/netns/..., the chart mounts /run/netns.
ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"
for b in "${bins[@]}"; do
    install -m 0755 "$bin_dir/$b" "$root/usr/local/bin/$b"
    # Debug info stays on the build machine (a debug build's binaries shrink ~10x).
    if command -v strip >/dev/null; then strip --strip-debug "$root/usr/local/bin/$b"; fi
done
# The loader and every library, at the paths ldd resolves them to (symlinks followed).
libs="$(for b in "${bins[@]}"; do ldd "$bin_dir/$b"; done \
    | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p' | sort -u)"
for l in $libs; do
    mkdir -p "$root$(dirname "$l")"
    cp -L "$l" "$root$l"
done
echo 'root:x:0:0:root:/root:/sbin/nologin' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
docker_archive "$root" "$tag" "$out" '["/usr/local/bin/vfplugd"]'
echo "image.sh: $tag -> $out ($(du -h "$out" | cut -f1); $(echo "$libs" | wc -w) libraries)" >&2
