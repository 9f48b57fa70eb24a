//! One plugin run, parsed: environment + config + the effective VF settings, with every check
//! that needs no I/O. [`Invocation::parse`] is what the fuzzer and the property tests drive.

use std::collections::HashMap;

use vfplug_api::CniCode;
use vfplug_core::{MacAddr, VfConfig};

use crate::config::NetConf;
use crate::env::{self, CniEnv, Command};
use crate::error::CniError;
use crate::version::CniVersion;

/// Where the effective MAC came from (precedence: `runtimeConfig.mac` > `CNI_ARGS` `MAC=` >
/// `mac`, as in sriov-cni).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacSource {
    /// `runtimeConfig.mac`.
    RuntimeConfig,
    /// `CNI_ARGS` `MAC=`.
    CniArgs,
    /// The config's `mac`.
    Config,
}

impl MacSource {
    /// The key or variable a message names.
    pub fn key(self) -> &'static str {
        match self {
            Self::RuntimeConfig => "runtimeConfig.mac",
            Self::CniArgs => "CNI_ARGS MAC",
            Self::Config => "mac",
        }
    }
}

/// A parsed, validated plugin run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The environment.
    pub env: CniEnv,
    /// The config (absent only for VERSION, which does not read stdin).
    pub conf: Option<NetConf>,
    /// The VF settings to ask for: the config's, with the effective MAC. Validated for ADD and
    /// CHECK.
    pub vf: VfConfig,
    /// Where `vf.mac` came from.
    pub mac_source: Option<MacSource>,
    /// The config as read, handed unchanged to the delegated IPAM plugin.
    pub stdin: Vec<u8>,
}

impl Invocation {
    /// Parses and checks a run: environment variables from `vars`, config from `stdin`.
    pub fn parse(vars: &HashMap<String, String>, stdin: &[u8]) -> Result<Self, CniError> {
        let env = CniEnv::parse(vars)?;
        if env.command == Command::Version {
            return Ok(Self {
                env,
                conf: None,
                vf: VfConfig::default(),
                mac_source: None,
                stdin: Vec::new(),
            });
        }
        let conf = NetConf::parse(stdin, env.command)?;
        let strict = matches!(env.command, Command::Add | Command::Check);

        if let Some(ipam) = &conf.ipam
            && env.path.is_empty()
        {
            return Err(CniError::env(format!(
                "{}: needed to find the IPAM plugin {:?}, but it is empty or unset",
                env::PATH,
                ipam.plugin_type
            )));
        }
        match env.command {
            // Neither deviceID nor pool: refused by vfplugd, which can say which VF the kubelet
            // gave this pod (run.rs asks it before any IPAM work).
            // A 0.1.0/0.2.0 result is nothing but ip4/ip6 objects; without an address it cannot
            // be written (libcni: "cannot convert: no valid IP addresses"), so refuse before
            // any VF is touched rather than after.
            Command::Add
                if conf.cni_version.is_legacy()
                    && conf.ipam.is_none()
                    && conf.prev_result.as_ref().is_none_or(|p| p.ips.is_empty()) =>
            {
                return Err(CniError::config(format!(
                    "ipam: a cniVersion {} result is an ip4/ip6 object and needs an address, so \
                     this config needs ipam (or cniVersion 0.3.0 or later)",
                    conf.cni_version
                )));
            }
            Command::Check if conf.prev_result.is_none() => {
                return Err(CniError::config(
                    "prevResult: CHECK needs the result of the previous ADD",
                ));
            }
            Command::Gc if conf.valid_attachments.is_none() => {
                return Err(CniError::config(format!(
                    "{}: GC needs the list of attachments to keep",
                    crate::config::VALID_ATTACHMENTS
                )));
            }
            _ => {}
        }

        let (mac, mac_source) = effective_mac(&conf, env.args.mac);
        let vf = VfConfig {
            mac,
            ..conf.vf.clone()
        };
        if strict && let Err(e) = vf.validate() {
            // The MAC's message names where it came from; a bad one from CNI_ARGS is an
            // environment error.
            return Err(match (e.field, mac_source) {
                ("mac", Some(MacSource::CniArgs)) => {
                    CniError::env(format!("{}: {}", env::ARGS, e.message))
                }
                ("mac", Some(src)) => CniError::config(format!("{}: {}", src.key(), e.message)),
                _ => CniError::config(format!("{}: {}", e.field, e.message)),
            });
        }
        Ok(Self {
            env,
            conf: Some(conf),
            vf,
            mac_source,
            stdin: stdin.to_vec(),
        })
    }

    /// The version to write results and errors in.
    pub fn version(&self) -> CniVersion {
        self.conf
            .as_ref()
            .map_or(CniVersion::LATEST, |c| c.cni_version)
    }

    /// The config (present for every command but VERSION).
    pub fn conf(&self) -> Result<&NetConf, CniError> {
        self.conf
            .as_ref()
            .ok_or_else(|| CniError::new(CniCode::Internal, "no network config for this command"))
    }
}

/// The MAC to ask for, and its source.
pub fn effective_mac(
    conf: &NetConf,
    cni_args_mac: Option<MacAddr>,
) -> (Option<MacAddr>, Option<MacSource>) {
    if let Some(m) = conf.runtime_config.mac {
        (Some(m), Some(MacSource::RuntimeConfig))
    } else if let Some(m) = cni_args_mac {
        (Some(m), Some(MacSource::CniArgs))
    } else if let Some(m) = conf.vf.mac {
        (Some(m), Some(MacSource::Config))
    } else {
        (None, None)
    }
}

/// The version an error should be printed in: the config's if it can be read, else the newest.
pub fn error_version(stdin: &[u8]) -> CniVersion {
    NetConf::peek_version(stdin).unwrap_or(CniVersion::LATEST)
}
