"""A foreign gRPC client (Python grpcio) for vfplugd's unix sockets.

Generates stubs from the repository's proto/ at run time and calls either the device-plugin
service (--service deviceplugin) or the node API (--service node: List, Status, VmRecords) over a unix socket, with the
:authority chosen by --authority:
  path       the raw socket path (what kubelets before 1.26 and grpcio/grpc-java send)
  percent    the socket path percent-encoded
  localhost  "localhost"
  default    no override: whatever grpcio sends by default
Prints one JSON object with what each call returned; exits non-zero when a call fails.
"""
import argparse
import importlib
import json
import os
import re
import sys
import tempfile
import urllib.parse

import grpc
from grpc_tools import protoc


def run_protoc(root, rel, out):
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    return protoc.main(["protoc", "-I", root, "-I", include, "--python_out=" + out,
                        "--grpc_python_out=" + out, os.path.join(root, rel)])


def gen(proto_root, rel, out):
    if run_protoc(proto_root, rel, out) != 0:
        # Debian bookworm's grpc_tools bundles a protoc that refuses proto3 `optional`. Without
        # the label a field encodes the same on the wire (only presence tracking is lost), so a
        # stripped copy gives a client that speaks the same protocol.
        copy = tempfile.mkdtemp(prefix="vfplug-proto-")
        dst = os.path.join(copy, rel)
        os.makedirs(os.path.dirname(dst))
        with open(os.path.join(proto_root, rel)) as f:
            text = re.sub(r"^(\s*)optional\s+", r"\1", f.read(), flags=re.M)
        with open(dst, "w") as f:
            f.write(text)
        if run_protoc(copy, rel, out) != 0:
            sys.exit("protoc failed for %s" % rel)
    mod = rel[:-len(".proto")].replace("/", ".")
    return importlib.import_module(mod + "_pb2"), importlib.import_module(mod + "_pb2_grpc")


def channel(sock, mode):
    opts = []
    if mode == "path":
        opts.append(("grpc.default_authority", sock))
    elif mode == "percent":
        opts.append(("grpc.default_authority", urllib.parse.quote(sock, safe="")))
    elif mode == "localhost":
        opts.append(("grpc.default_authority", "localhost"))
    elif mode != "default":
        sys.exit("unknown --authority " + mode)
    return grpc.insecure_channel("unix:" + sock, options=opts)


def device_plugin(pb, rpc, ch, timeout):
    stub = rpc.DevicePluginStub(ch)
    out = {}
    opts = stub.GetDevicePluginOptions(pb.Empty(), timeout=timeout)
    out["options"] = {"get_preferred_allocation_available": opts.get_preferred_allocation_available}
    stream = stub.ListAndWatch(pb.Empty(), timeout=timeout)
    first = next(stream)
    stream.cancel()
    ids = [d.ID for d in first.devices if d.health == "Healthy"]
    out["devices"] = [d.ID for d in first.devices]
    pref = stub.GetPreferredAllocation(pb.PreferredAllocationRequest(container_requests=[
        pb.ContainerPreferredAllocationRequest(available_deviceIDs=ids, allocation_size=1)]),
        timeout=timeout)
    out["preferred"] = list(pref.container_responses[0].deviceIDs)
    alloc = stub.Allocate(pb.AllocateRequest(container_requests=[
        pb.ContainerAllocateRequest(devices_ids=out["preferred"])]), timeout=timeout)
    out["allocate_envs"] = dict(alloc.container_responses[0].envs)
    return out


def node(pb, rpc, ch, timeout):
    stub = rpc.NodeStub(ch)
    lst = stub.List(pb.ListRequest(), timeout=timeout)
    st = stub.Status(pb.StatusRequest(), timeout=timeout)
    recs = stub.VmRecords(pb.VmRecordsRequest(), timeout=timeout)
    # Phases by their enum names, as a reader of the proto sees them.
    phase = pb.VmPhase.Name
    vms = [{"pod": [v.pod_namespace, v.pod_name, v.pod_uid], "qmp_socket": v.qmp_socket,
            "nets": [{"name": n.name, "network": n.network, "pool": n.pool, "mac": n.mac,
                      "vlan": n.vlan, "actual": [n.actual.type, n.actual.pci_address],
                      "phase": phase(n.phase)} for n in v.nets],
            "hostdevs": [{"alias": h.alias, "pci_address": h.pci_address,
                          "parent_net": h.parent_net, "phase": phase(h.phase),
                          "reason": h.reason} for h in v.hostdevs]}
           for v in recs.vms]
    return {"vfs": [v.pci_address for v in lst.vfs], "status_reason": st.reason,
            "status_free": st.free, "vms": vms}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-root", required=True)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--service", choices=["deviceplugin", "node"], required=True)
    ap.add_argument("--authority", required=True)
    ap.add_argument("--timeout", type=float, default=10.0)
    a = ap.parse_args()
    out_dir = tempfile.mkdtemp(prefix="vfplug-stubs-")
    sys.path.insert(0, out_dir)
    if a.service == "deviceplugin":
        pb, rpc = gen(a.proto_root, "kubelet/deviceplugin/v1beta1/api.proto", out_dir)
        fn = device_plugin
    else:
        pb, rpc = gen(a.proto_root, "vfplug/v1/node.proto", out_dir)
        fn = node
    with channel(a.socket, a.authority) as ch:
        try:
            res = fn(pb, rpc, ch, a.timeout)
        except grpc.RpcError as e:
            print(json.dumps({"error": "%s: %s" % (e.code(), e.details())}))
            sys.exit(1)
    res["authority_mode"] = a.authority
    print(json.dumps(res))


if __name__ == "__main__":
    main()
