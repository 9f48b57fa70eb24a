//! `vfplug`: the CNI plugin binary. Reads the `CNI_*` environment and (except for VERSION) the
//! network config on stdin, runs the command, and prints only the protocol's JSON on stdout:
//! the result (ADD, VERSION), nothing (other commands), or the error object with exit code 1.
//! Logs go to stderr, or to the config's `logFile`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::Context;
use vfplug_cni::config::{LogLevel, MAX_CONFIG_BYTES, NetConf};
use vfplug_cni::{CniError, Command, ErrorResult, Invocation, invocation, run};

fn main() -> ExitCode {
    // `vfplug install DIR` (the Helm chart's init container); never when a runtime calls it.
    if std::env::var_os(vfplug_cni::env::COMMAND).is_none()
        && std::env::args_os().nth(1).is_some_and(|a| a == "install")
    {
        return install();
    }
    let vars = match cni_vars() {
        Ok(v) => v,
        Err(e) => return fail(&e, &[]),
    };
    // VERSION reads no stdin (the runtime may not close it), starts no runtime, dials nothing.
    if vars.get(vfplug_cni::env::COMMAND).map(String::as_str) == Some(Command::Version.as_str()) {
        return print(&run::version_output());
    }
    let stdin = match read_stdin() {
        Ok(b) => b,
        Err(e) => return fail(&e, &[]),
    };
    let inv = match Invocation::parse(&vars, &stdin) {
        Ok(i) => i,
        Err(e) => return fail(&e, &stdin),
    };
    init_logging(inv.conf.as_ref());
    if let Some(c) = &inv.conf {
        if !c.unknown_keys.is_empty() {
            tracing::debug!(keys = ?c.unknown_keys, "config keys vfplug does not use (other plugins' or mistakes)");
        }
        if !inv.env.args.ignored.is_empty() {
            tracing::debug!(keys = ?inv.env.args.ignored, "CNI_ARGS keys ignored (IgnoreUnknown)");
        }
    }
    tracing::debug!(command = %inv.env.command, container = %inv.env.container_id, ifname = %inv.env.ifname, "start");
    match run::run_blocking(&inv) {
        Ok(Some(out)) => print(&out),
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code, details = %e.details, "{} failed: {}", inv.env.command, e.msg);
            fail(&e, &stdin)
        }
    }
}

/// The `CNI_*` variables of the process environment. One that is not UTF-8 is an error naming it.
fn cni_vars() -> Result<HashMap<String, String>, CniError> {
    let mut out = HashMap::new();
    for (k, v) in std::env::vars_os() {
        let Some(k) = k.to_str().filter(|k| k.starts_with("CNI_")) else {
            continue;
        };
        let v = v
            .into_string()
            .map_err(|_| CniError::env(format!("{k} is not valid UTF-8")))?;
        out.insert(k.to_owned(), v);
    }
    Ok(out)
}

/// Stdin up to one byte over the limit, so the config parser can tell "too large".
fn read_stdin() -> Result<Vec<u8>, CniError> {
    let mut buf = Vec::new();
    std::io::stdin()
        .lock()
        .take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| CniError::new(vfplug_api::CniCode::Io, format!("cannot read stdin: {e}")))?;
    Ok(buf)
}

fn init_logging(conf: Option<&NetConf>) {
    let level = conf.and_then(|c| c.log_level).unwrap_or(LogLevel::Info);
    let file = conf.and_then(|c| c.log_file.as_deref());
    let builder = tracing_subscriber::fmt()
        .with_max_level(level_of(level))
        .with_ansi(false)
        .with_target(false);
    if let Some(path) = file {
        match open_log(path) {
            Ok(f) => {
                builder.with_writer(std::sync::Mutex::new(f)).init();
                return;
            }
            Err(e) => {
                builder.with_writer(std::io::stderr).init();
                tracing::warn!("logFile: {e:#}; logging to stderr");
                return;
            }
        }
    }
    builder.with_writer(std::io::stderr).init();
}

fn open_log(path: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))
}

fn level_of(l: LogLevel) -> tracing::Level {
    match l {
        LogLevel::Error => tracing::Level::ERROR,
        LogLevel::Warn => tracing::Level::WARN,
        LogLevel::Info => tracing::Level::INFO,
        LogLevel::Debug => tracing::Level::DEBUG,
        LogLevel::Trace => tracing::Level::TRACE,
    }
}

fn print(json: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{json}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfplug: cannot write the result to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `vfplug install DIR`: copies this binary to `DIR/vfplug`.
fn install() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(2).collect();
    let [dir] = args.as_slice() else {
        eprintln!("usage: vfplug install DIR   (copies this CNI plugin to DIR/vfplug)");
        return ExitCode::from(2);
    };
    let done = std::env::current_exe()
        .context("cannot find this binary")
        .and_then(|exe| {
            vfplug_cni::install::install(&exe, dir.as_ref(), vfplug_cni::install::PLUGIN_NAME)
                .map_err(anyhow::Error::from)
        });
    match done {
        Ok(path) => {
            eprintln!("vfplug: installed {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vfplug: install failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the error object (in the config's version if it can be read) and exits with 1.
fn fail(e: &CniError, stdin: &[u8]) -> ExitCode {
    let obj = ErrorResult::new(e, invocation::error_version(stdin));
    let json = serde_json::to_string(&obj).unwrap_or_else(|_| {
        format!(
            r#"{{"cniVersion":"1.1.0","code":{},"msg":"error"}}"#,
            e.code
        )
    });
    let _ = print(&json);
    ExitCode::FAILURE
}
