# docker_archive ROOTFS TAG OUT CMD-JSON: writes a docker-archive tarball (manifest.json, one
# config, one layer) of the directory ROOTFS, tagged TAG, to OUT, with tar and sha256sum only:
# no Docker, no registry. `ctr images import`, `docker load` and `podman load` read it.
# Sourced by tests/k8s/cluster.sh (the lab's images) and scripts/image.sh (vfplug's image).
docker_archive() {
    local rootfs="$1" tag="$2" out="$3" cmd="$4" w
    w="$(mktemp -d "$(dirname "$out")/.image.XXXXXX")"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$w/layer.tar" .
    local diff; diff="$(sha256sum "$w/layer.tar" | cut -d' ' -f1)"
    cat >"$w/config.json" <<JSON
{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":$cmd},"rootfs":{"type":"layers","diff_ids":["sha256:$diff"]}}
JSON
    local cfg; cfg="$(sha256sum "$w/config.json" | cut -d' ' -f1)"
    mv "$w/config.json" "$w/$cfg.json"
    echo "[{\"Config\":\"$cfg.json\",\"RepoTags\":[\"$tag\"],\"Layers\":[\"layer.tar\"]}]" >"$w/manifest.json"
    tar --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$w" -cf "$out" manifest.json "$cfg.json" layer.tar
    rm -rf "$w"
}
