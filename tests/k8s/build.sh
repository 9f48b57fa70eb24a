#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl from Debian's `kubernetes` source package (1.20.2) and
# installs etcd, containerd, runc and the CNI plugins from Debian, for the real Kubernetes test tier.
#
# Recipe and the reasons behind each step: ../shared/research/k8s-lab.md. The binaries are cached
# outside the repository, keyed by the source package's version, so a machine builds them once:
#   $K8S_CACHE/<version>/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,kubelet,kubectl}
# (the controller-manager creates ServiceAccounts' token secrets, collects garbage of owned
# objects and finishes namespace deletions; the scheduler places pods by the node's allocatable).
# K8S_CACHE defaults to /var/cache/vfplug/k8s. Needs root (apt). Idempotent: with the cache filled it
# only checks the packages and prints the paths. Nothing here is committed.
set -euo pipefail

CACHE="${K8S_CACHE:-/var/cache/vfplug/k8s}"
SOURCES=/etc/apt/sources.list.d/debian.sources
SRC_SOURCES=/etc/apt/sources.list.d/vfplug-deb-src.sources
export DEBIAN_FRONTEND=noninteractive
t0=$(date +%s)
step() { printf '[k8s-build %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
[ "$(id -u)" = 0 ] || { echo "build.sh: needs root (apt-get)" >&2; exit 1; }

# Runtime packages: etcd (server + etcdctl for the readiness check), containerd, runc, CNI plugins,
# and what the build and the images need (rsync for make, gcc for the static pause, busybox-static),
# and curl for cluster.sh's kubelet health check.
if [ -f "$SOURCES" ] && ! grep -q 'bookworm-backports' "$SOURCES"; then
    step "adding bookworm-backports to the Suites: line of $SOURCES"
    sed -i -E '/^Suites:/{/bookworm-security/!s/$/ bookworm-backports/}' "$SOURCES"
    apt-get update -qq
fi
pkgs="etcd-server etcd-client containerd runc containernetworking-plugins rsync gcc libc6-dev busybox-static openssl iproute2 iptables conntrack curl"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    step "apt-get install$missing"
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The source package's version keys the cache.
if [ ! -f "$SRC_SOURCES" ]; then
    step "adding a deb-src entry for the configured suites"
    sed -e 's/^Types: deb$/Types: deb-src/' "$SOURCES" > "$SRC_SOURCES"
    apt-get update -qq
fi
version="$(apt-cache showsrc kubernetes 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -1)"
[ -n "$version" ] || { echo "build.sh: no kubernetes source package found (deb-src entry?)" >&2; exit 1; }
out="$CACHE/$version/bin"
COMPONENTS="kubectl kubelet kube-apiserver kube-controller-manager kube-scheduler"
cached=1
for what in $COMPONENTS; do [ -x "$out/$what" ] || cached=0; done
if [ "$cached" = 1 ]; then
    step "cached: $out (kubernetes $version)"
    exit 0
fi

mkdir -p "$CACHE/$version/src" "$out"
work="$CACHE/$version/src"
if [ ! -d "$work/tree" ]; then
    step "downloading src:kubernetes $version"
    (cd "$work" && apt-get source --download-only -qq kubernetes >/dev/null)
    orig="$(ls "$work"/kubernetes_*.orig.tar.* | head -1)"
    mkdir -p "$work/tree.tmp"
    tar -xf "$orig" -C "$work/tree.tmp" --strip-components=1
    mv "$work/tree.tmp" "$work/tree"
fi

# Go from bookworm-backports; the vendored reflect2 1.0.1 crashes under Go >= 1.18, Debian's 1.0.2 does not.
if ! ls /usr/lib/go-1.22/bin/go >/dev/null 2>&1; then
    step "installing golang-1.22-go from bookworm-backports"
    apt-get install -y -qq -t bookworm-backports --no-install-recommends golang-1.22-go >/dev/null
fi
dpkg -s golang-github-modern-go-reflect2-dev >/dev/null 2>&1 \
    || apt-get install -y -qq --no-install-recommends golang-github-modern-go-reflect2-dev >/dev/null
rdir="$work/tree/vendor/github.com/modern-go/reflect2"
if [ ! -f "$rdir/.vfplug-replaced" ]; then
    step "replacing vendored modern-go/reflect2 with Debian's 1.0.2"
    rm -rf "$rdir" && cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$rdir" && touch "$rdir/.vfplug-replaced"
fi

export PATH="/usr/lib/go-1.22/bin:$PATH" GO111MODULE=off GOFLAGS= GOCACHE="$CACHE/gocache"
for what in $COMPONENTS; do
    [ -x "$out/$what" ] && continue
    step "make WHAT=cmd/$what (kube-apiserver takes 5-10 min on 2 cores)"
    (cd "$work/tree" && make WHAT="cmd/$what" >"$CACHE/$version/make-$what.log" 2>&1) \
        || { tail -30 "$CACHE/$version/make-$what.log" >&2; exit 1; }
    # Copied under a temporary name and renamed: an interrupted copy never looks cached.
    cp "$work/tree/_output/bin/$what" "$out/$what.tmp" && mv "$out/$what.tmp" "$out/$what"
done
step "built: $out (kubernetes $version)"
