#!/usr/bin/env bash
# A one-node Kubernetes 1.20 cluster on this machine for the real Kubernetes test tier (issue 10):
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd and the kubelet, all
# started as plain processes (no systemd, no Docker), with images built and imported locally (no
# registry). The binaries come from tests/k8s/build.sh's cache; recipe and pitfalls:
# docs/k8s-lab.md and shared/research/k8s-lab.md.
#
#   tests/k8s/cluster.sh up               # idempotent; writes $K8S_LAB_DIR/env
#   tests/k8s/cluster.sh env              # prints the env file (sourceable)
#   tests/k8s/cluster.sh restart-kubelet  # stops and starts the kubelet process only
#   tests/k8s/cluster.sh status
#   tests/k8s/cluster.sh running          # exit 0 when every daemon of this lab dir runs
#   tests/k8s/cluster.sh down             # stops everything, unmounts, leaves nothing running
#
# Every file lives under the lab dir ${K8S_LAB_DIR:-/tmp/vfplug-k8s}, except what the kubelet 1.20
# and containerd 1.6 hard-code and `down` cleans up:
#   /var/lib/kubelet/device-plugins  the kubelet's device-plugin dir (kubelet.sock; plugins dial it)
#   /var/log/pods, /var/log/containers  container logs and their symlinks
#   /var/run/netns/cni-*             the pod network namespaces containerd's CRI creates
#   /run/containerd/s/               containerd shims' sockets
# Needs root. Never wrapped in `timeout`: on expiry it kills the whole process group, and the
# daemons started here are their own sessions (setsid) so that nothing but `down` stops them.
set -euo pipefail

LAB="${K8S_LAB_DIR:-/tmp/vfplug-k8s}"
CACHE="${K8S_CACHE:-/var/cache/vfplug/k8s}"
NODE_NAME="${K8S_NODE_NAME:-vfplug-node}"
API_PORT="${K8S_API_PORT:-16443}"
ETCD_PORT="${K8S_ETCD_PORT:-12379}"
ETCD_PEER_PORT="${K8S_ETCD_PEER_PORT:-12380}"
SERVICE_CIDR=10.96.0.0/24
SERVICE_IP=10.96.0.1
POD_CIDR=10.244.0.0/24
BRIDGE=vfplugk8s0
# The kubelet dials device plugins here whatever its --root-dir (kubelet 1.20 hard-codes it).
DEVICE_PLUGIN_DIR=/var/lib/kubelet/device-plugins
IMAGE_PREFIX=vfplug.local
t0=$(date +%s)
step() { printf '[k8s-lab %4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
die() { echo "cluster.sh: $*" >&2; exit 1; }

# --- binaries ------------------------------------------------------------------------------------
COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl"
find_bin() {
    if [ -n "${K8S_BIN_DIR:-}" ]; then echo "$K8S_BIN_DIR"; return; fi
    local d best=""
    for d in $(ls -d "$CACHE"/*/bin 2>/dev/null | sort -V); do
        local ok=1 c
        for c in $COMPONENTS; do [ -x "$d/$c" ] || ok=0; done
        [ "$ok" = 1 ] && best="$d"
    done
    echo "$best"
}
BIN="$(find_bin)"
KUBECTL="$BIN/kubectl"
CTR_SOCK="$LAB/containerd/containerd.sock"
ADMIN_KUBECONFIG="$LAB/admin.kubeconfig"
k() { "$KUBECTL" --kubeconfig "$ADMIN_KUBECONFIG" "$@"; }
ctr_() { ctr --address "$CTR_SOCK" -n k8s.io "$@"; }

# --- processes -----------------------------------------------------------------------------------
# Each daemon: $LAB/run/<name>.pid, log $LAB/log/<name>.log.
pid_of() { local f="$LAB/run/$1.pid"; [ -f "$f" ] && cat "$f" || true; }
alive() { local p; p="$(pid_of "$1")"; [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }
start() { # name cmd...
    local name="$1"; shift
    if alive "$name"; then step "$name already running (pid $(pid_of "$name"))"; return; fi
    mkdir -p "$LAB/run" "$LAB/log"
    echo "=== $(date -u +%FT%TZ) $*" >>"$LAB/log/$name.log"
    setsid "$@" >>"$LAB/log/$name.log" 2>&1 </dev/null &
    echo $! >"$LAB/run/$name.pid"
    step "$name started (pid $!, log $LAB/log/$name.log)"
}
stop() { # name: SIGTERM, up to 15 s, then SIGKILL
    local name="$1" p i
    p="$(pid_of "$name")"
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
        kill -TERM "$p" 2>/dev/null || true
        for i in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$p" 2>/dev/null; then
            step "$name (pid $p) ignored SIGTERM for 15 s: SIGKILL"
            kill -KILL "$p" 2>/dev/null || true
        fi
        step "$name stopped (pid $p)"
    fi
    rm -f "$LAB/run/$name.pid"
}
fail_with_log() { # name message
    echo "cluster.sh: $2" >&2
    echo "--- last 40 lines of $LAB/log/$1.log ---" >&2
    tail -n 40 "$LAB/log/$1.log" >&2 || true
    exit 1
}
wait_for() { # name what seconds cmd...: polls cmd every 0.5 s, progress every 5 s
    local name="$1" what="$2" secs="$3" start_s; shift 3
    start_s=$(date +%s)
    local last=$start_s
    until "$@" >/dev/null 2>&1; do
        alive "$name" || fail_with_log "$name" "$name exited while waiting for $what"
        local now; now=$(date +%s)
        [ $(( now - start_s )) -ge "$secs" ] && fail_with_log "$name" "$what not within ${secs} s"
        if [ $(( now - last )) -ge 5 ]; then step "waiting for $what ($(( now - start_s )) s)"; last=$now; fi
        sleep 0.5
    done
    step "$what ($(( $(date +%s) - start_s )) s)"
}

# --- node address --------------------------------------------------------------------------------
# The kubelet refuses a loopback --node-ip; the apiserver advertises the same address.
node_ip() {
    if [ -n "${K8S_NODE_IP:-}" ]; then echo "$K8S_NODE_IP"; return; fi
    ip -4 -o addr show scope global | awk '{split($4, a, "/"); print a[1]; exit}'
}

# --- certificates --------------------------------------------------------------------------------
# One CA; X.509 v3 leaf certificates with subjectAltNames (rustls, which kube-rs uses, rejects a
# CA certificate used as a server certificate and ignores the CN).
pki() {
    local ip="$1" d="$LAB/pki"
    mkdir -p "$d"
    if [ -f "$d/ca.crt" ] && [ -f "$d/node-ip" ] && [ "$(cat "$d/node-ip")" = "$ip" ]; then return; fi
    step "certificates (openssl) for node IP $ip"
    rm -f "$d"/*
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$d/ca.key" -out "$d/ca.crt" -days 3650 \
        -subj "/CN=vfplug-lab-ca" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null
    leaf() { # name subject extKeyUsage [san]
        local name="$1" subj="$2" eku="$3" san="${4:-}"
        openssl req -newkey rsa:2048 -nodes -keyout "$d/$name.key" -out "$d/$name.csr" \
            -subj "$subj" 2>/dev/null
        {
            echo "basicConstraints=critical,CA:FALSE"
            echo "keyUsage=critical,digitalSignature,keyEncipherment"
            echo "extendedKeyUsage=$eku"
            [ -n "$san" ] && echo "subjectAltName=$san"
        } >"$d/$name.ext"
        openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial \
            -out "$d/$name.crt" -days 3650 -extfile "$d/$name.ext" 2>/dev/null
        rm -f "$d/$name.csr" "$d/$name.ext"
    }
    leaf apiserver "/CN=kube-apiserver" serverAuth \
        "IP:$ip,IP:127.0.0.1,IP:$SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
    leaf admin "/O=system:masters/CN=vfplug-lab-admin" clientAuth
    leaf kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
    leaf apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
    leaf controller-manager "/CN=system:kube-controller-manager" clientAuth
    leaf scheduler "/CN=system:kube-scheduler" clientAuth
    # Service-account tokens: signed by the apiserver (TokenRequest) and the controller-manager.
    openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
    openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
    echo "$ip" >"$d/node-ip"
}

kubeconfig() { # file user cert key server  (certificates embedded: the file stands alone)
    local file="$1" user="$2" cert="$3" key="$4" server="$5"
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vfplug-lab
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$LAB/pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 "$cert")
    client-key-data: $(base64 -w0 "$key")
contexts:
- name: vfplug-lab
  context: {cluster: vfplug-lab, user: $user}
current-context: vfplug-lab
EOF
    chmod 600 "$file"
}

# --- images --------------------------------------------------------------------------------------
# docker_archive: scripts/lib/docker-archive.sh (tar and sha256sum; no Docker, no registry).
# shellcheck source=../../scripts/lib/docker-archive.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/scripts/lib/docker-archive.sh"
images() {
    local d="$LAB/images"
    mkdir -p "$d"
    if [ ! -f "$d/pause.tar" ]; then
        step "image $IMAGE_PREFIX/pause:lab (static, gcc)"
        mkdir -p "$d/pause-root"
        cat >"$d/pause.c" <<'EOF'
/* The sandbox's first process: holds the pod's namespaces, reaps orphans, exits on INT/TERM. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) { (void)sig; while (waitpid(-1, NULL, WNOHANG) > 0) {} }
int main(void) {
    struct sigaction q = {0}, r = {0};
    q.sa_handler = quit; sigaction(SIGINT, &q, NULL); sigaction(SIGTERM, &q, NULL);
    r.sa_handler = reap; r.sa_flags = SA_NOCLDSTOP; sigaction(SIGCHLD, &r, NULL);
    for (;;) pause();
}
EOF
        gcc -static -O2 -o "$d/pause-root/pause" "$d/pause.c"
        docker_archive "$d/pause-root" "$IMAGE_PREFIX/pause:lab" "$d/pause.tar" '["/pause"]'
    fi
    [ -x /bin/busybox ] || die "no /bin/busybox (apt-get install busybox-static)"
    if [ ! -f "$d/busybox.tar" ] || [ ! -f "$d/vm.tar" ]; then
        step "images $IMAGE_PREFIX/busybox:lab and $IMAGE_PREFIX/vm:lab (busybox-static)"
        rm -rf "$d/busybox-root" "$d/vm-root"
        mkdir -p "$d/busybox-root/bin" "$d/busybox-root/etc" "$d/busybox-root/tmp" \
            "$d/busybox-root/proc" "$d/busybox-root/sys" "$d/busybox-root/dev"
        cp /bin/busybox "$d/busybox-root/bin/busybox"
        local a
        for a in $(/bin/busybox --list); do
            [ "$a" = busybox ] || ln -s busybox "$d/busybox-root/bin/$a"
        done
        echo 'root:x:0:0:root:/root:/bin/sh' >"$d/busybox-root/etc/passwd"
        echo 'root:x:0:' >"$d/busybox-root/etc/group"
        chmod 1777 "$d/busybox-root/tmp"
        docker_archive "$d/busybox-root" "$IMAGE_PREFIX/busybox:lab" "$d/busybox.tar" '["sh"]'
        # The VM pod stand-in: busybox in /bin, and the merged-/usr links of Debian so that the
        # host's /usr, mounted read-only at /usr (hostPath), runs /usr/bin/qemu-system-x86_64:
        # its ELF interpreter is /lib64/ld-linux-x86-64.so.2 and its libraries are found in
        # /lib/x86_64-linux-gnu through the loader's built-in multiarch paths.
        cp -a "$d/busybox-root" "$d/vm-root"
        ln -s usr/lib "$d/vm-root/lib"
        ln -s usr/lib64 "$d/vm-root/lib64"
        ln -s bin "$d/vm-root/sbin"
        mkdir -p "$d/vm-root/usr" "$d/vm-root/var/run"
        docker_archive "$d/vm-root" "$IMAGE_PREFIX/vm:lab" "$d/vm.tar" '["sh"]'
    fi
    local i
    for i in pause busybox vm; do
        ctr_ images import "$d/$i.tar" >/dev/null 2>"$d/import-$i.err" \
            || { cat "$d/import-$i.err" >&2; die "importing $d/$i.tar failed"; }
    done
    step "images imported: $(ctr_ images ls -q | grep -c "^$IMAGE_PREFIX/") of 3 ($IMAGE_PREFIX/{pause,busybox,vm}:lab)"
}

# --- configuration files -------------------------------------------------------------------------
containerd_config() {
    mkdir -p "$LAB/containerd" "$LAB/cni/bin" "$LAB/cni/net.d" "$LAB/cni/ipam"
    # Debian's plugins, linked into the lab's bin dir (tests may add their own, e.g. vfplug).
    local p
    for p in /usr/lib/cni/*; do ln -sfn "$p" "$LAB/cni/bin/$(basename "$p")"; done
    cat >"$LAB/containerd/config.toml" <<EOF
version = 2
root = "$LAB/containerd/root"
state = "$LAB/containerd/state"
[grpc]
  address = "$CTR_SOCK"
[ttrpc]
  address = "$LAB/containerd/containerd.sock.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$LAB/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$IMAGE_PREFIX/pause:lab"
  # No CAP_SYS_RESOURCE here: without this runc fails "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$LAB/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$LAB/cni/bin"
    conf_dir = "$LAB/cni/net.d"
EOF
    # containerd watches conf_dir with inotify and picks up a file *created* there (cp), not
    # one renamed into it (mv). Written before containerd starts it is read at start anyway.
    local tmp="$LAB/cni/10-vfplug-lab.conflist.tmp"
    cat >"$tmp" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "vfplug-lab",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$LAB/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF
    if ! cmp -s "$tmp" "$LAB/cni/net.d/10-vfplug-lab.conflist"; then
        cp "$tmp" "$LAB/cni/net.d/10-vfplug-lab.conflist"
    fi
    rm -f "$tmp"
}

kubelet_config() {
    mkdir -p "$LAB/kubelet" "$LAB/kubelet-volume-plugins"
    cat >"$LAB/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
# Device-plugin capacity changes reach the node object within a second (default 10 s).
nodeStatusUpdateFrequency: 1s
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $LAB/pki/ca.crt}
authorization: {mode: AlwaysAllow}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
readOnlyPort: 0
serializeImagePulls: false
# The images are imported, not pulled: image GC must never remove them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "50Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
volumePluginDir: $LAB/kubelet-volume-plugins
EOF
}

# --- commands ------------------------------------------------------------------------------------
start_kubelet() {
    start kubelet "$BIN/kubelet" \
        --config "$LAB/kubelet-config.yaml" \
        --kubeconfig "$LAB/kubelet.kubeconfig" \
        --root-dir "$LAB/kubelet" \
        --cert-dir "$LAB/kubelet/pki" \
        --hostname-override "$NODE_NAME" \
        --node-ip "$(cat "$LAB/pki/node-ip")" \
        --container-runtime remote \
        --container-runtime-endpoint "unix://$CTR_SOCK" \
        --pod-infra-container-image "$IMAGE_PREFIX/pause:lab" \
        --v 1
}

node_ready() {
    [ "$(k get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}
kubelet_healthy() { curl -fsS http://127.0.0.1:10248/healthz; }

up() {
    [ "$(id -u)" = 0 ] || die "needs root"
    [ -n "$BIN" ] || die "no Kubernetes binaries ($COMPONENTS) under $CACHE/*/bin: run tests/k8s/build.sh"
    local c
    for c in etcd etcdctl containerd ctr runc gcc openssl curl ip; do
        command -v "$c" >/dev/null || die "no $c in PATH: run tests/k8s/build.sh (it installs the Debian packages)"
    done
    local ip; ip="$(node_ip)"
    [ -n "$ip" ] || die "no global IPv4 address on this host (set K8S_NODE_IP)"
    mkdir -p "$LAB" "$LAB/log" "$LAB/run"
    step "lab dir $LAB, binaries $BIN, node $NODE_NAME at $ip"
    pki "$ip"
    local server="https://$ip:$API_PORT"
    kubeconfig "$ADMIN_KUBECONFIG" vfplug-lab-admin "$LAB/pki/admin.crt" "$LAB/pki/admin.key" "$server"
    kubeconfig "$LAB/kubelet.kubeconfig" "system:node:$NODE_NAME" "$LAB/pki/kubelet.crt" "$LAB/pki/kubelet.key" "$server"
    kubeconfig "$LAB/controller-manager.kubeconfig" system:kube-controller-manager \
        "$LAB/pki/controller-manager.crt" "$LAB/pki/controller-manager.key" "$server"
    kubeconfig "$LAB/scheduler.kubeconfig" system:kube-scheduler "$LAB/pki/scheduler.crt" "$LAB/pki/scheduler.key" "$server"

    start etcd etcd --name vfplug-lab --data-dir "$LAB/etcd" \
        --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster "vfplug-lab=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls ""
    wait_for etcd "etcd healthy" 60 etcdctl --endpoints "http://127.0.0.1:$ETCD_PORT" endpoint health

    start kube-apiserver "$BIN/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
        --bind-address 0.0.0.0 --secure-port "$API_PORT" --advertise-address "$ip" --insecure-port 0 \
        --tls-cert-file "$LAB/pki/apiserver.crt" --tls-private-key-file "$LAB/pki/apiserver.key" \
        --client-ca-file "$LAB/pki/ca.crt" \
        --kubelet-client-certificate "$LAB/pki/apiserver-kubelet-client.crt" \
        --kubelet-client-key "$LAB/pki/apiserver-kubelet-client.key" \
        --kubelet-preferred-address-types InternalIP,Hostname \
        --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
        --allow-privileged=true \
        --service-cluster-ip-range "$SERVICE_CIDR" \
        --service-account-issuer https://kubernetes.default.svc.cluster.local \
        --service-account-key-file "$LAB/pki/sa.pub" \
        --service-account-signing-key-file "$LAB/pki/sa.key" \
        --profiling=false --v 1
    wait_for kube-apiserver "kube-apiserver ready" 120 k get --raw /readyz

    start kube-controller-manager "$BIN/kube-controller-manager" \
        --kubeconfig "$LAB/controller-manager.kubeconfig" \
        --authentication-kubeconfig "$LAB/controller-manager.kubeconfig" \
        --authorization-kubeconfig "$LAB/controller-manager.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port 0 --port 0 --leader-elect=false \
        --service-account-private-key-file "$LAB/pki/sa.key" --root-ca-file "$LAB/pki/ca.crt" \
        --use-service-account-credentials=true --controllers '*,-nodeipam,-cloud-node-lifecycle' \
        --profiling=false --v 1
    start kube-scheduler "$BIN/kube-scheduler" \
        --kubeconfig "$LAB/scheduler.kubeconfig" \
        --authentication-kubeconfig "$LAB/scheduler.kubeconfig" \
        --authorization-kubeconfig "$LAB/scheduler.kubeconfig" \
        --bind-address 127.0.0.1 --secure-port 0 --port 0 --leader-elect=false --profiling=false --v 1

    containerd_config
    start containerd containerd --config "$LAB/containerd/config.toml"
    wait_for containerd "containerd answering" 60 ctr --address "$CTR_SOCK" version
    images

    kubelet_config
    mkdir -p "$DEVICE_PLUGIN_DIR"
    start_kubelet
    wait_for kubelet "kubelet healthz" 120 kubelet_healthy
    wait_for kubelet "node $NODE_NAME Ready" 180 node_ready

    rbac
    write_env "$ip"
    step "up: KUBECONFIG=$ADMIN_KUBECONFIG; env file $LAB/env"
}

# The vfplugd ServiceAccount and a kubeconfig with its token (the tokens controller of
# kube-controller-manager creates the token secret). deploy/rbac/*.yaml, when the repository has
# it, binds the roles vfplugd needs.
rbac() {
    k apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata: {name: vfplug}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: vfplugd, namespace: vfplug}
EOF
    local repo f
    repo="$(cd "$(dirname "$0")/../.." && pwd)"
    for f in "$repo"/deploy/rbac/*.yaml; do
        [ -f "$f" ] || continue
        k apply -f "$f" >/dev/null || die "kubectl apply -f $f failed"
        step "applied $f"
    done
    local secret="" i
    for i in $(seq 1 120); do
        secret="$(k -n vfplug get serviceaccount vfplugd -o 'jsonpath={.secrets[0].name}' 2>/dev/null || true)"
        [ -n "$secret" ] && break
        sleep 0.5
    done
    [ -n "$secret" ] || fail_with_log kube-controller-manager "no token secret for ServiceAccount vfplug/vfplugd within 60 s"
    local token
    token="$(k -n vfplug get secret "$secret" -o 'jsonpath={.data.token}' | base64 -d)"
    [ -n "$token" ] || die "secret vfplug/$secret has no token"
    cat >"$LAB/vfplugd.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: vfplug-lab
  cluster:
    server: https://$(cat "$LAB/pki/node-ip"):$API_PORT
    certificate-authority-data: $(base64 -w0 "$LAB/pki/ca.crt")
users:
- name: vfplugd
  user:
    token: $token
contexts:
- name: vfplug-lab
  context: {cluster: vfplug-lab, user: vfplugd, namespace: vfplug}
current-context: vfplug-lab
EOF
    chmod 600 "$LAB/vfplugd.kubeconfig"
    step "ServiceAccount vfplug/vfplugd: kubeconfig $LAB/vfplugd.kubeconfig (token of secret $secret)"
}

write_env() {
    cat >"$LAB/env" <<EOF
# Written by tests/k8s/cluster.sh up; sourceable. The vfplug-k8slab tests read it (VFPLUG_K8S_ENV).
K8S_LAB_DIR=$LAB
KUBECONFIG=$ADMIN_KUBECONFIG
KUBECTL=$KUBECTL
K8S_BIN_DIR=$BIN
K8S_API_SERVER=https://$1:$API_PORT
NODE_NAME=$NODE_NAME
NODE_IP=$1
KUBELET_DIR=$LAB/kubelet
KUBELET_DEVICE_PLUGIN_DIR=$DEVICE_PLUGIN_DIR
KUBELET_PLUGINS_REGISTRY_DIR=$LAB/kubelet/plugins_registry
KUBELET_POD_RESOURCES_SOCKET=$LAB/kubelet/pod-resources/kubelet.sock
CONTAINERD_SOCKET=$CTR_SOCK
CNI_CONF_DIR=$LAB/cni/net.d
CNI_BIN_DIR=$LAB/cni/bin
POD_CIDR=$POD_CIDR
IMAGE_PAUSE=$IMAGE_PREFIX/pause:lab
IMAGE_BUSYBOX=$IMAGE_PREFIX/busybox:lab
IMAGE_VM=$IMAGE_PREFIX/vm:lab
VFPLUGD_KUBECONFIG=$LAB/vfplugd.kubeconfig
VFPLUGD_NAMESPACE=vfplug
VFPLUGD_SERVICE_ACCOUNT=vfplugd
CLUSTER_SH=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
EOF
}

restart_kubelet() {
    [ -n "$BIN" ] || die "no Kubernetes binaries under $CACHE"
    alive kube-apiserver || die "the cluster is not up (no kube-apiserver)"
    stop kubelet
    start_kubelet
    wait_for kubelet "kubelet healthz" 120 kubelet_healthy
    wait_for kubelet "node $NODE_NAME Ready" 120 node_ready
}

# Every mount below the lab dir (pod volumes, container rootfs, shm), deepest first.
unmount_all() {
    local m
    for m in $(awk '{print $2}' /proc/self/mounts | grep "^$LAB/" | sort -r); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || echo "cluster.sh: cannot unmount $m" >&2
    done
}

# The network namespaces of this lab's containers still running, as nsfs inode numbers.
lab_netns_inodes() {
    local t pid
    ctr_ tasks ls 2>/dev/null | awk 'NR > 1 {print $2}' | while read -r pid; do
        stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null || true
    done | sort -u
}

# containerd 1.6 pins pod network namespaces at the hard-coded /var/run/netns/cni-*; only those
# of this lab's containers (matched by inode) are removed, never another runtime's.
remove_lab_netns() { # inodes...
    local f ino
    for f in /var/run/netns/cni-*; do
        [ -e "$f" ] || continue
        ino="$(stat -L -c %i "$f" 2>/dev/null || true)"
        case " $* " in *" $ino "*) umount "$f" 2>/dev/null || umount -l "$f" 2>/dev/null || true; rm -f "$f" ;; esac
    done
}

# The kubelet 1.20 writes container logs to the hard-coded /var/log/pods/<ns>_<pod>_<uid>/ with
# symlinks in /var/log/containers; it removes them in its housekeeping, which may not come
# before `down`. Only the directories of this lab's pods (by UID) and links into them go.
remove_pod_logs() { # uids...
    local uid l
    for uid in "$@"; do
        rm -rf /var/log/pods/*_"$uid"
        for l in /var/log/containers/*.log; do
            [ -L "$l" ] || continue
            case "$(readlink "$l")" in */var/log/pods/*_"$uid"/*) rm -f "$l" ;; esac
        done
    done
}

lab_pod_uids() {
    { ls "$LAB/kubelet/pods" 2>/dev/null || true
      if alive kube-apiserver && [ -n "$BIN" ]; then
          k get pods --all-namespaces -o 'jsonpath={range .items[*]}{.metadata.uid}{"\n"}{end}' 2>/dev/null || true
      fi
    } | sort -u
}

down() {
    # First: no test may take a stopped cluster for a running one.
    rm -f "$LAB/env"
    local uids; uids="$(lab_pod_uids | tr '\n' ' ')"
    # Pods first, through the kubelet, while everything is up: the kubelet tears down their
    # sandboxes (CNI DEL, netns, volumes) and only then removes them from the API.
    if alive kube-apiserver && alive kubelet && [ -f "$ADMIN_KUBECONFIG" ] && [ -n "$BIN" ]; then
        step "deleting all pods (the kubelet tears them down)"
        k delete pods --all-namespaces --all --grace-period 1 --timeout 60s >/dev/null 2>&1 \
            || step "pods not all gone within 60 s; their containers are killed below"
    fi
    local netns=""
    alive containerd && netns="$(lab_netns_inodes | tr '\n' ' ')"
    stop kube-scheduler
    stop kube-controller-manager
    stop kubelet
    # Whatever containers remain: kill their tasks (their shims exit with them).
    if alive containerd; then
        local c
        for c in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks kill -s KILL "$c" >/dev/null 2>&1 || true; done
        sleep 1
        for c in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks delete -f "$c" >/dev/null 2>&1 || true; done
    fi
    stop containerd
    # Shims that outlived containerd (they are their own processes, named by our config's paths).
    local p
    for p in $(pgrep -f "containerd-shim-runc-v2 .*-address $CTR_SOCK" 2>/dev/null || true); do
        kill -KILL "$p" 2>/dev/null || true
    done
    stop kube-apiserver
    stop etcd
    unmount_all
    remove_lab_netns $netns
    remove_pod_logs $uids
    if ip link show "$BRIDGE" >/dev/null 2>&1; then ip link delete "$BRIDGE" 2>/dev/null || true; fi
    # The kubelet's checkpoint in its hard-coded device-plugin dir (plugins remove their own sockets).
    rm -f "$DEVICE_PLUGIN_DIR/kubelet.sock" "$DEVICE_PLUGIN_DIR/kubelet_internal_checkpoint" \
        "$DEVICE_PLUGIN_DIR/DEPRECATION"
    step "down: nothing of the lab runs; files stay in $LAB (rm -rf it for a fresh start), env file removed"
}

status() {
    local n
    for n in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet; do
        if alive "$n"; then echo "$n: running (pid $(pid_of "$n"))"; else echo "$n: stopped"; fi
    done
    if alive kube-apiserver; then node_ready && echo "node $NODE_NAME: Ready" || echo "node $NODE_NAME: not Ready"; fi
}

running() {
    local n
    for n in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet; do
        alive "$n" || return 1
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    env) [ -f "$LAB/env" ] || die "no $LAB/env: run '$0 up'"; cat "$LAB/env" ;;
    restart-kubelet) restart_kubelet ;;
    status) status ;;
    running) running ;;
    *) echo "usage: $0 up|down|env|restart-kubelet|status|running" >&2; exit 2 ;;
esac
