//! The chart rendered by the real helm: lint, the values schema's refusals, every path value
//! reaching vfplugd, RBAC and CRD equal to deploy/, and the manifests valid against Kubernetes'
//! own schemas (kubernetes-validate, strict) of 1.25 and 1.37. The chart on a real node is the
//! k8s tier's `tests/k8s/tests/chart.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use vfplug_chart::{chart_dir, docs, helm, kubernetes_validate, one, path_str, render, repo, run};
use vfplug_host::prereq;

fn minimal() -> Value {
    json!({"config": {"pools": [{"name": "sriov", "deviceMode": "vfio", "selectors": {"pfNames": ["ens1f0"]}}]}})
}

fn merged(mut base: Value, extra: Value) -> Value {
    fn merge(a: &mut Value, b: Value) {
        match (a, b) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }
    merge(&mut base, extra);
    base
}

fn container<'a>(ds: &'a Value, name: &str) -> &'a Value {
    let spec = &ds["spec"]["template"]["spec"];
    spec["containers"]
        .as_array()
        .into_iter()
        .chain(spec["initContainers"].as_array())
        .flatten()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env<'a>(c: &'a Value, name: &str) -> Option<&'a str> {
    c["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)?
        .get("value")?
        .as_str()
}

/// The hostPath behind the mount of `c` at `path` (and that the mount is there).
fn host_path_at<'a>(ds: &'a Value, c: &Value, path: &str) -> &'a str {
    let m = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("nothing mounted at {path}: {}", c["volumeMounts"]));
    let v = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == m["name"])
        .unwrap();
    v["hostPath"]["path"].as_str().expect("a hostPath")
}

#[test]
fn lint_is_clean() {
    let Some(helm) = prereq::need("lint_is_clean", helm()) else {
        return;
    };
    let out = run(
        &helm,
        &[
            "lint",
            "--strict",
            path_str(&chart_dir()),
            "--set",
            "config.pools[0].name=a",
        ],
    );
    assert!(out.ok, "helm lint:\n{}{}", out.stdout, out.stderr);
}

#[test]
fn defaults_render_vfplugd_with_the_host_paths_it_uses() {
    let Some(helm) = prereq::need(
        "defaults_render_vfplugd_with_the_host_paths_it_uses",
        helm(),
    ) else {
        return;
    };
    let docs = render(&helm, &minimal()).unwrap();
    let mut kinds: Vec<_> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet",
            "ServiceAccount"
        ]
    );
    let ds = one(&docs, "DaemonSet");
    let spec = &ds["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["serviceAccountName"], "vfplug");
    let d = container(ds, "vfplugd");
    assert_eq!(d["securityContext"]["privileged"], true);
    for (var, path) in [
        ("VFPLUG_SYSFS_ROOT", "/sys"),
        ("VFPLUG_DEV_ROOT", "/dev"),
        ("VFPLUG_KUBELET_DIR", "/var/lib/kubelet"),
        ("VFPLUG_STATE_DIR", "/var/lib/vfplug"),
        (
            "VFPLUG_DEVICE_INFO_DIR",
            "/var/run/k8s.cni.cncf.io/devinfo/dp",
        ),
        ("VFPLUG_CDI_DIR", "/var/run/cdi"),
    ] {
        assert_eq!(env(d, var), Some(path), "{var}");
        assert_eq!(host_path_at(ds, d, path), path, "{var}");
    }
    assert_eq!(
        env(d, "VFPLUG_DEVICE_PLUGIN_DIR"),
        Some("/var/lib/kubelet/device-plugins")
    );
    assert_eq!(env(d, "VFPLUG_SOCKET"), Some("/run/vfplug/vfplugd.sock"));
    assert_eq!(host_path_at(ds, d, "/run/vfplug"), "/run/vfplug");
    assert_eq!(env(d, "VFPLUG_HTTP_ADDR"), Some("127.0.0.1:9464"));
    assert_eq!(env(d, "VFPLUG_CONTROLLER"), Some("auto"));
    assert_eq!(d["readinessProbe"]["httpGet"]["path"], "/readyz");
    // containerd refuses a HostToContainer mount whose source it finds on a private mount, and
    // it looks the path up without following symlinks: /var/run/netns would be found on `/`.
    let propagated: Vec<_> = d["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["mountPropagation"] == "HostToContainer")
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert_eq!(propagated, ["/var/lib/kubelet", "/run/netns"]);
    assert_eq!(host_path_at(ds, d, "/run/netns"), "/run/netns");
    let init = container(ds, "install-cni");
    assert_eq!(
        init["command"],
        json!(["/usr/local/bin/vfplug", "install", "/opt/cni/bin"])
    );
    assert_eq!(host_path_at(ds, init, "/opt/cni/bin"), "/opt/cni/bin");
    let cm = one(&docs, "ConfigMap");
    let cfg: Value = serde_yaml::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(cfg, minimal()["config"]);
}

#[test]
fn every_path_value_reaches_vfplugd_and_no_default_is_left() {
    let Some(helm) = prereq::need(
        "every_path_value_reaches_vfplugd_and_no_default_is_left",
        helm(),
    ) else {
        return;
    };
    let paths = json!({
        "sysfsRoot": "/lab/sys", "devRoot": "/lab/dev", "kubeletDir": "/lab/kubelet",
        "devicePluginDir": "/lab/dp", "stateDir": "/lab/state", "socketDir": "/lab/run",
        "deviceInfoDir": "/lab/devinfo", "cdiDir": "/lab/cdi", "cniBinDir": "/lab/cni",
        "netnsDir": "/lab/netns",
    });
    let docs = render(&helm, &merged(minimal(), json!({"paths": paths}))).unwrap();
    let ds = one(&docs, "DaemonSet");
    let d = container(ds, "vfplugd");
    for (var, path) in [
        ("VFPLUG_SYSFS_ROOT", "/lab/sys"),
        ("VFPLUG_DEV_ROOT", "/lab/dev"),
        ("VFPLUG_KUBELET_DIR", "/lab/kubelet"),
        ("VFPLUG_DEVICE_PLUGIN_DIR", "/lab/dp"),
        ("VFPLUG_STATE_DIR", "/lab/state"),
        ("VFPLUG_DEVICE_INFO_DIR", "/lab/devinfo"),
        ("VFPLUG_CDI_DIR", "/lab/cdi"),
    ] {
        assert_eq!(env(d, var), Some(path), "{var}");
        assert_eq!(host_path_at(ds, d, path), path, "{var}");
    }
    assert_eq!(env(d, "VFPLUG_SOCKET"), Some("/lab/run/vfplugd.sock"));
    assert_eq!(host_path_at(ds, d, "/lab/netns"), "/lab/netns");
    assert_eq!(
        host_path_at(ds, container(ds, "install-cni"), "/lab/cni"),
        "/lab/cni"
    );
    // Nothing of the host's defaults is left anywhere in the DaemonSet.
    let text = ds.to_string();
    for default in [
        "/sys",
        "/dev",
        "/var/lib",
        "/run/vfplug",
        "/run/netns",
        "/var/run",
        "/opt/cni",
    ] {
        assert!(
            !text.contains(&format!("\"{default}")),
            "{default} still named: {text}"
        );
    }
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    let Some(helm) = prereq::need("bad_values_are_refused_naming_the_field", helm()) else {
        return;
    };
    let cases = [
        (json!({"controller": "maybe"}), "controller"),
        (json!({"controler": "on"}), "controler"),
        (json!({"paths": {"stateDir": "var/lib/vfplug"}}), "stateDir"),
        (json!({"http": {"port": 70000}}), "port"),
        (json!({"vfNetlink": "fake"}), "vfNetlink"),
        (json!({"registration": "kubelet"}), "registration"),
        (json!({"image": {"pullPolicy": "Sometimes"}}), "pullPolicy"),
        (json!({"existingConfigMap": "mine"}), "existingConfigMap"),
        (json!({"config": 3}), "config"),
    ];
    for (extra, field) in cases {
        let err = render(&helm, &merged(minimal(), extra.clone()))
            .expect_err(&format!("{extra} was accepted"));
        assert!(
            err.contains(field),
            "{extra}: error does not name {field}:\n{err}"
        );
    }
    let err = render(&helm, &json!({})).expect_err("no config accepted");
    assert!(err.contains("set `config`"), "{err}");
}

#[test]
fn an_sriov_device_plugin_json_config_passes_through_unchanged() {
    let Some(helm) = prereq::need(
        "an_sriov_device_plugin_json_config_passes_through_unchanged",
        helm(),
    ) else {
        return;
    };
    let peer = r#"{"resourceList": [{"resourceName": "intel_sriov_netdevice", "selectors": {"vendors": ["8086"], "drivers": ["iavf"]}}]}"#;
    let docs = render(&helm, &json!({"config": peer})).unwrap();
    let cm = one(&docs, "ConfigMap");
    assert_eq!(cm["data"]["config.yaml"].as_str().unwrap().trim_end(), peer);
    // An existing ConfigMap: none rendered, the DaemonSet mounts the named one.
    let docs = render(&helm, &json!({"existingConfigMap": "site-pools"})).unwrap();
    assert!(docs.iter().all(|d| d["kind"] != "ConfigMap"));
    let ds = one(&docs, "DaemonSet");
    let vols = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap();
    assert!(vols.iter().any(|v| v["configMap"]["name"] == "site-pools"));
}

#[test]
fn rbac_and_crd_are_the_ones_in_deploy() {
    let Some(helm) = prereq::need("rbac_and_crd_are_the_ones_in_deploy", helm()) else {
        return;
    };
    let docs = render(&helm, &minimal()).unwrap();
    let rendered = one(&docs, "ClusterRole");
    let deploy = vfplug_chart::docs(
        &std::fs::read_to_string(repo().join("deploy/rbac/vfplugd.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        rendered["rules"],
        one(&deploy, "ClusterRole")["rules"],
        "deploy/helm/vfplug/templates/rbac.yaml and deploy/rbac/vfplugd.yaml differ"
    );
    let binding = one(&docs, "ClusterRoleBinding");
    assert_eq!(binding["subjects"][0]["name"], "vfplug");
    assert_eq!(binding["subjects"][0]["namespace"], "vfplug-system");
    let crd = "domains.vfplug.io.yaml";
    assert_eq!(
        std::fs::read_to_string(chart_dir().join("crds").join(crd)).unwrap(),
        std::fs::read_to_string(repo().join("deploy/crds").join(crd)).unwrap(),
        "the chart's CRD differs from deploy/crds/{crd} (VFPLUG_BLESS=1 cargo test -p vfplug-crd --test crd writes both)"
    );
}

#[test]
fn manifests_are_valid_kubernetes_objects() {
    let test = "manifests_are_valid_kubernetes_objects";
    let Some(helm) = prereq::need(test, helm()) else {
        return;
    };
    let Some(validate) = prereq::need(test, kubernetes_validate()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let full = merged(
        minimal(),
        json!({
            "useCdi": true, "resourcePrefix": "example.com", "log": {"json": true},
            "apiServer": {"host": "10.0.0.1", "port": 6443}, "extraArgs": ["--unplug-wait-seconds", "9"],
            "extraEnv": [{"name": "A", "value": "b"}], "nodeSelector": {"sriov": "true"},
            "podAnnotations": {"a": "b"}, "paths": {"devicePluginDir": "/elsewhere/dp"},
        }),
    );
    let bad = merged(
        minimal(),
        json!({"extraEnv": [{"name": "A", "valeu": "b"}]}),
    );
    for (name, values, valid) in [
        ("defaults", minimal(), true),
        ("full", full, true),
        ("bad", bad, false),
    ] {
        let vfile = dir.path().join(format!("{name}.json"));
        std::fs::write(&vfile, values.to_string()).unwrap();
        let out = run(
            &helm,
            &[
                "template",
                "vfplug",
                path_str(&chart_dir()),
                "--include-crds",
                "--values",
                path_str(&vfile),
            ],
        );
        assert!(out.ok, "{name}: {}", out.stderr);
        assert!(
            docs(&out.stdout).unwrap().len() >= 6,
            "{name}: CRD and the five objects"
        );
        let manifest = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&manifest, &out.stdout).unwrap();
        for version in ["1.25.0", "1.37.0"] {
            let v = run(&validate, &["--strict", "-k", version, path_str(&manifest)]);
            let said = format!("{}{}", v.stdout, v.stderr);
            if valid {
                assert!(v.ok, "{name} against {version}:\n{said}");
                assert_eq!(
                    said.matches("passed").count(),
                    6,
                    "{name} against {version}:\n{said}"
                );
            } else {
                // The control: a misspelt field fails, so the validator does validate.
                assert!(
                    !v.ok && said.contains("valeu"),
                    "{name} against {version}:\n{said}"
                );
            }
        }
    }
}
