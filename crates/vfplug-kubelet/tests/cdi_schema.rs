//! The CDI spec files vfplugd writes validate against the CDI JSON schema (tests/cdi/schema.json:
//! CDI v1.1.0's schema, made as strict as its SPEC.md; see the file's `$comment`).
//!
//! The checker is the JSON-Schema subset that file uses (type, required, properties,
//! additionalProperties: false, items, minItems, pattern, enum, local `$ref`), and the
//! negative cases below prove that it rejects what CDI rejects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use vfplug_kubelet::cdi::{pool_spec, spec_file_name, write_spec};
use vfplug_kubelet::plugin::DeviceSpec;
use vfplug_kubelet::sriov::{RdmaInfo, SriovDevice, device_specs};

fn schema() -> Value {
    serde_json::from_str(include_str!("cdi/schema.json")).unwrap()
}

fn resolve<'a>(root: &'a Value, node: &'a Value) -> &'a Value {
    match node.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let path = r.strip_prefix("#/").expect("local $ref only");
            path.split('/').fold(root, |v, k| &v[k])
        }
        None => node,
    }
}

/// Every violation, as `path: what`.
fn check(root: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let s = resolve(root, schema);
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "boolean" => v.is_boolean(),
            other => panic!("type {other} not supported by this checker"),
        };
        if !ok {
            errs.push(format!("{at}: not {t}"));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        errs.push(format!("{at}: not one of {e:?}"));
    }
    if let (Some(p), Some(text)) = (s.get("pattern").and_then(Value::as_str), v.as_str())
        && !regex::Regex::new(p).unwrap().is_match(text)
    {
        errs.push(format!("{at}: {text:?} does not match {p}"));
    }
    if let Some(obj) = v.as_object() {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !obj.contains_key(r) {
                errs.push(format!("{at}: missing {r}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => check(root, ps, val, &format!("{at}.{k}"), errs),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errs.push(format!("{at}.{k}: unknown field"))
                }
                None => {}
            }
        }
    }
    if let Some(arr) = v.as_array() {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64)
            && (arr.len() as u64) < min
        {
            errs.push(format!("{at}: fewer than {min} items"));
        }
        if let Some(items) = s.get("items") {
            for (i, item) in arr.iter().enumerate() {
                check(root, items, item, &format!("{at}[{i}]"), errs);
            }
        }
    }
}

fn violations(doc: &Value) -> Vec<String> {
    let root = schema();
    let mut errs = Vec::new();
    check(&root, &root, doc, "$", &mut errs);
    errs
}

fn specs_of(dev: &SriovDevice) -> Vec<DeviceSpec> {
    device_specs(std::slice::from_ref(dev)).unwrap()
}

#[test]
fn written_pool_specs_validate() {
    let dir = tempfile::tempdir().unwrap();
    let mut noiommu = SriovDevice::vfio("0000:3b:02.1", 71);
    noiommu.noiommu = true;
    let mut rdma = SriovDevice::netdev("0000:3b:02.2");
    rdma.rdma = Some(RdmaInfo {
        devices: vec!["mlx5_3".into()],
        char_devices: vec![
            "/dev/infiniband/uverbs3".into(),
            "/dev/infiniband/rdma_cm".into(),
        ],
    });
    let mut vhost = SriovDevice::vfio("0000:3b:02.3", 72);
    vhost.vhost_net = true;
    let devs = [
        SriovDevice::vfio("0000:3b:02.0", 70),
        noiommu,
        rdma,
        vhost,
        SriovDevice::netdev("0000:3b:02.4"),
    ];
    let spec = pool_spec(
        "intel.com",
        devs.iter().map(|d| (d.pci.as_str(), specs_of(d))),
    )
    .unwrap();
    let file = spec_file_name("intel.com", "intel_sriov_dpdk");
    write_spec(dir.path(), &file, &spec).unwrap();
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(&file)).unwrap()).unwrap();
    assert_eq!(violations(&doc), Vec::<String>::new(), "{doc:#}");
    // The netdev VF has no nodes, so no entry (CDI refuses empty edits).
    let names: Vec<&str> = doc["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "0000:3b:02.0",
            "0000:3b:02.1",
            "0000:3b:02.2",
            "0000:3b:02.3"
        ]
    );
    // The no-IOMMU device's host node differs from its container path.
    assert_eq!(
        doc["devices"][1]["containerEdits"]["deviceNodes"][1],
        serde_json::json!({"path": "/dev/vfio/71", "hostPath": "/dev/vfio/noiommu-71", "permissions": "rw"})
    );
}

#[test]
fn the_checker_rejects_what_cdi_rejects() {
    let good = serde_json::json!({
        "cdiVersion": "0.5.0", "kind": "intel.com/net-pci",
        "devices": [{"name": "0000:3b:02.0", "containerEdits": {"deviceNodes": [
            {"path": "/dev/vfio/70", "hostPath": "/dev/vfio/70", "permissions": "rw"}]}}]
    });
    assert!(violations(&good).is_empty());
    let bad = |f: &dyn Fn(&mut Value), want: &str| {
        let mut d = good.clone();
        f(&mut d);
        let v = violations(&d);
        assert!(v.iter().any(|e| e.contains(want)), "{want}: {v:?}");
    };
    bad(&|d| d["devices"] = serde_json::json!([]), "fewer than 1");
    bad(&|d| d["kind"] = "net-pci".into(), "$.kind");
    bad(&|d| d["kind"] = "Intel.com/net-pci".into(), "$.kind");
    bad(&|d| d["devices"][0]["name"] = "-x".into(), "name");
    bad(
        &|d| d["devices"][0]["containerEdits"]["deviceNodes"] = serde_json::json!([]),
        "fewer than 1",
    );
    bad(
        &|d| d["devices"][0]["containerEdits"]["deviceNodes"][0]["permissions"] = "rwx".into(),
        "permissions",
    );
    bad(&|d| d["devices"][0]["extra"] = 1.into(), "unknown field");
    bad(
        &|d| {
            d.as_object_mut().unwrap().remove("cdiVersion");
        },
        "missing cdiVersion",
    );
    bad(
        &|d| d["devices"][0]["containerEdits"]["deviceNodes"][0]["path"] = "dev/x".into(),
        "path",
    );
}
