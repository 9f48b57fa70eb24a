//! Helpers of the chart tests: where the chart is, how to run `helm` and
//! `kubernetes-validate`, and rendered manifests as JSON values. The tests are in `tests/`;
//! the chart itself and its docs are `deploy/helm/vfplug` and `docs/helm.md`.
//!
//! `helm` is `$HELM` or the first on `PATH` (`scripts/get-chart-tools.sh` installs the pinned one);
//! `kubernetes-validate` is `$KUBERNETES_VALIDATE` or the first on `PATH`. Without them a test
//! prints `SKIP` or, with `VFPLUG_REQUIRE=1`, fails (vfplug_host::prereq).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    repo().join("deploy/helm/vfplug")
}

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `name` from `$<var>` or `PATH`; `Err` says how to get it.
pub fn tool(var: &str, name: &str, how: &str) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(p.into());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("no {name} (set {var} or put it on PATH; {how})"))
}

/// The helm binary.
pub fn helm() -> Result<PathBuf, String> {
    tool(
        "HELM",
        "helm",
        "scripts/get-chart-tools.sh installs helm 3.10.1",
    )
}

/// The kubernetes-validate binary.
pub fn kubernetes_validate() -> Result<PathBuf, String> {
    tool(
        "KUBERNETES_VALIDATE",
        "kubernetes-validate",
        "pip install kubernetes-validate",
    )
}

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Output {
    /// Exit success.
    pub ok: bool,
    /// stdout.
    pub stdout: String,
    /// stderr.
    pub stderr: String,
}

/// Runs `bin args`, capturing both streams.
pub fn run(bin: &Path, args: &[&str]) -> Output {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `helm template` of the chart with the values file `values` (JSON is YAML): each document as
/// JSON, or `Err(stderr)` when helm refused.
pub fn render(helm: &Path, values: &Value) -> Result<Vec<Value>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("values.json");
    std::fs::write(&file, values.to_string()).map_err(|e| e.to_string())?;
    let chart = chart_dir();
    let out = run(
        helm,
        &[
            "template",
            "vfplug",
            path_str(&chart),
            "--namespace",
            "vfplug-system",
            "--values",
            path_str(&file),
        ],
    );
    if !out.ok {
        return Err(out.stderr);
    }
    docs(&out.stdout)
}

/// The YAML documents of `text` as JSON values (empty documents left out).
pub fn docs(text: &str) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(d).map_err(|e| e.to_string())?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The one document of `kind` in `docs`.
pub fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} expected, got {}", found.len());
    found[0]
}

/// A path as `&str` (the repository's paths are UTF-8).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
