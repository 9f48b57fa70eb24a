//! `vfplugd`, the vfplug node daemon: argument parsing and wiring only. The engine is in
//! `vfplug-agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio_util::sync::CancellationToken;
use vfplug_agent::options::{AgentOptions, Registration, SyncMode};

/// SR-IOV virtual functions for Kubernetes: device plugin, CNI backend and hotplug executor.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Node name (defaults to the hostname).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Pool config: vfplug YAML, or sriov-network-device-plugin's JSON `resourceList` unchanged.
    #[arg(long, env = "VFPLUG_CONFIG", default_value = "/etc/vfplug/config.yaml")]
    config: PathBuf,
    /// Root of sysfs (stands for /sys).
    #[arg(long, env = "VFPLUG_SYSFS_ROOT", default_value = "/sys")]
    sysfs_root: PathBuf,
    /// Root of device nodes for lookups (DeviceSpecs still name /dev).
    #[arg(long, env = "VFPLUG_DEV_ROOT", default_value = "/dev")]
    dev_root: PathBuf,
    /// The kubelet's root directory (its --root-dir); the three kubelet paths below default
    /// from it.
    #[arg(long, env = "VFPLUG_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// The kubelet's device-plugin directory, with its kubelet.sock [default:
    /// <kubelet-dir>/device-plugins].
    #[arg(long, env = "VFPLUG_DEVICE_PLUGIN_DIR")]
    device_plugin_dir: Option<PathBuf>,
    /// The directory the kubelet's plugin watcher watches [default:
    /// <kubelet-dir>/plugins_registry].
    #[arg(long, env = "VFPLUG_PLUGINS_REGISTRY_DIR")]
    plugins_registry_dir: Option<PathBuf>,
    /// The kubelet's PodResources socket [default: <kubelet-dir>/pod-resources/kubelet.sock].
    #[arg(long, env = "VFPLUG_POD_RESOURCES_SOCKET")]
    pod_resources_socket: Option<PathBuf>,
    /// Where the ledger is kept.
    #[arg(long, env = "VFPLUG_STATE_DIR", default_value = "/var/lib/vfplug")]
    state_dir: PathBuf,
    /// Where device-info files (Network Plumbing WG device-info spec) are written.
    #[arg(
        long,
        env = "VFPLUG_DEVICE_INFO_DIR",
        default_value = "/var/run/k8s.cni.cncf.io/devinfo/dp"
    )]
    device_info_dir: PathBuf,
    /// Prefix of the resource names of pools that name none (sriov-network-device-plugin's
    /// `--resource-prefix`). Default: the config format's own (`intel.com` for
    /// sriov-network-device-plugin JSON, `vfplug.io` for vfplug YAML).
    #[arg(long, env = "VFPLUG_RESOURCE_PREFIX")]
    resource_prefix: Option<String>,
    /// Write one CDI spec file per pool and answer Allocate with CDI device names instead of
    /// device specs (sriov-network-device-plugin's `--use-cdi`).
    #[arg(long, env = "VFPLUG_USE_CDI")]
    use_cdi: bool,
    /// Where the CDI spec files go (the runtime's dynamic CDI directory).
    #[arg(long, env = "VFPLUG_CDI_DIR", default_value = "/var/run/cdi")]
    cdi_dir: PathBuf,
    /// Kubelet registration mode.
    #[arg(long, env = "VFPLUG_REGISTRATION", value_enum, default_value_t = RegistrationArg::Auto)]
    registration: RegistrationArg,
    /// Address of the /healthz, /readyz and /metrics endpoint.
    #[arg(long, env = "VFPLUG_HTTP_ADDR", default_value = "127.0.0.1:9464")]
    http_addr: SocketAddr,
    /// Full inventory resync interval in seconds (event-driven refresh happens in between).
    #[arg(long, env = "VFPLUG_RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
    /// Interval of the kubelet PodResources poll in seconds.
    #[arg(long, env = "VFPLUG_PODRESOURCES_SECONDS", default_value_t = 5)]
    podresources_seconds: u64,
    /// Seconds a kubelet allocation that PodResources does not report is kept before its VF
    /// counts as free again (the pod's container may not exist yet when PodResources is asked).
    #[arg(long, env = "VFPLUG_KUBELET_ALLOC_GRACE_SECONDS", default_value_t = 60)]
    kubelet_alloc_grace_seconds: u64,
    /// Compact the ledger's log into a snapshot after this many records.
    #[arg(long, env = "VFPLUG_LEDGER_COMPACT_AFTER", default_value_t = 1024)]
    ledger_compact_after: usize,
    /// Seconds a detach from a VM waits for the guest to acknowledge the unplug before the CNI
    /// call returns with the unplug pending (vfplugd finishes it when the guest does).
    #[arg(long, env = "VFPLUG_UNPLUG_WAIT_SECONDS", default_value_t = 5)]
    unplug_wait_seconds: u64,
    /// Id prefix of the hotplug-capable pcie-root-ports in VM pods' QEMU.
    #[arg(long, env = "VFPLUG_VM_PORT_PREFIX", default_value = "vfplug-rp")]
    vm_port_prefix: String,
    /// Uids a VM pod's QMP socket may be owned by (comma-separated; 107 is the qemu user of
    /// KubeVirt's launcher image).
    #[arg(
        long,
        env = "VFPLUG_QMP_TRUSTED_UIDS",
        value_delimiter = ',',
        default_value = "0,107"
    )]
    qmp_trusted_uids: Vec<u32>,
    /// The node API socket (gRPC, root-only) that the `vfplug` CNI plugin talks to.
    #[arg(
        long,
        env = "VFPLUG_SOCKET",
        default_value = "/run/vfplug/vfplugd.sock"
    )]
    socket: PathBuf,
    /// How VF settings (MAC, VLAN, spoofchk, trust, rates) reach the PF: real netlink, or a
    /// simulated PF kept in memory, for nodes without SR-IOV (demo, tests).
    #[arg(long, env = "VFPLUG_VF_NETLINK", value_enum, default_value_t = VfNetlinkArg::Netlink)]
    vf_netlink: VfNetlinkArg,
    /// With `--vf-netlink simulated`: keep the simulated PF's VF settings in this file, so they
    /// survive a restart or a crash of vfplugd as a real PF's would (tests, demo).
    #[arg(long, env = "VFPLUG_SIM_PF_STATE")]
    sim_pf_state: Option<PathBuf>,
    /// FOR TESTS ONLY: hot-plug this QEMU device driver (e.g. `e1000e`) instead of `vfio-pci`
    /// with the VF, same id and root port, no host device: runs the VM sagas against a real QEMU
    /// on a host without VFIO. Never on a real node: the guest gets no VF.
    #[arg(long, env = "VFPLUG_VM_STAND_IN_DEVICE")]
    vm_stand_in_device: Option<String>,
    /// FOR TESTS ONLY (crash injection): SIGKILL vfplugd at this named step of the attach or
    /// detach saga; an unknown name refuses to start and lists the valid ones
    /// (docs/vm-pods.md, "Crash safety").
    #[arg(long, env = "VFPLUG_FAILPOINT")]
    failpoint: Option<String>,
    /// The Domain controller (docs/domain.md): `auto` runs it when a kubeconfig (this flag's
    /// file, `KUBECONFIG`, `~/.kube/config`) or the in-cluster config is found, `on` requires
    /// one, `off` never runs it.
    #[arg(long, env = "VFPLUG_CONTROLLER", value_enum, default_value_t = ControllerArg::Auto)]
    controller: ControllerArg,
    /// The kubeconfig of the Domain controller [default: KUBECONFIG, ~/.kube/config, or the
    /// in-cluster service account].
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "VFPLUG_LOG_JSON")]
    log_json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ControllerArg {
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum VfNetlinkArg {
    Netlink,
    Simulated,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RegistrationArg {
    Auto,
    Legacy,
    PluginsRegistry,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "vfplugd failed");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a terminal: a log file or journald gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // First: a typo in a failpoint must stop vfplugd before anything runs.
    if let Some(fp) =
        vfplug_executor::failpoint::arm(args.failpoint.as_deref()).context("--failpoint")?
    {
        tracing::warn!(
            failpoint = fp,
            "FOR TESTS ONLY: vfplugd SIGKILLs itself at this step"
        );
    }
    let vm_hostdev = match args.vm_stand_in_device.as_deref().map(str::trim) {
        None => vfplug_executor::HostdevModel::VfioPci,
        Some(d) if d.is_empty() || d.contains([',', '=', ' ']) => {
            anyhow::bail!(
                "--vm-stand-in-device {d:?}: give one QEMU device driver name, e.g. e1000e"
            )
        }
        Some(d) => {
            tracing::warn!(
                driver = d,
                "FOR TESTS ONLY: VMs get a stand-in {d} device instead of vfio-pci with the VF"
            );
            vfplug_executor::HostdevModel::StandIn(d.to_owned())
        }
    };
    if args.sim_pf_state.is_some() && !matches!(args.vf_netlink, VfNetlinkArg::Simulated) {
        anyhow::bail!("--sim-pf-state needs --vf-netlink simulated");
    }
    let node_name = match args.node_name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown-node".into()),
    };
    // The Domain controller's client first: `--controller on` without a usable kubeconfig
    // stops vfplugd before anything runs.
    let ctl_metrics = vfplug_controller::Metrics::default();
    let kube = match args.controller {
        ControllerArg::Off => None,
        mode => match vfplug_controller::client(args.kubeconfig.as_deref(), &ctl_metrics).await {
            Ok(c) => Some(c),
            Err(vfplug_controller::ClientError::NoConfig(why)) if mode == ControllerArg::Auto => {
                tracing::info!(reason = %why, "Domain controller off: no Kubernetes config found");
                None
            }
            Err(e) => return Err(e).context("--controller"),
        },
    };
    let pod_index = kube
        .as_ref()
        .map(|_| Arc::new(vfplug_agent::PodIndex::default()));
    let opts = AgentOptions {
        node_name: node_name.clone(),
        sysfs_root: args.sysfs_root,
        dev_root: args.dev_root,
        kubelet_dir: args.kubelet_dir,
        device_plugin_dir: args.device_plugin_dir,
        plugins_registry_dir: args.plugins_registry_dir,
        pod_resources_socket: args.pod_resources_socket,
        state_dir: args.state_dir,
        config_path: args.config,
        device_info_dir: args.device_info_dir,
        resource_prefix: args.resource_prefix,
        use_cdi: args.use_cdi,
        cdi_dir: args.cdi_dir,
        registration: match args.registration {
            RegistrationArg::Auto => Registration::Auto,
            RegistrationArg::Legacy => Registration::Legacy,
            RegistrationArg::PluginsRegistry => Registration::PluginsRegistry,
        },
        resync_interval: Duration::from_secs(args.resync_seconds.max(1)),
        poll_interval: Duration::from_millis(50),
        podresources_interval: Duration::from_secs(args.podresources_seconds.max(1)),
        node_socket: Some(args.socket),
        vf_netlink: match args.vf_netlink {
            VfNetlinkArg::Netlink => {
                Arc::new(vfplug_host::rtnl::RtVfNetlink::new().context("opening a netlink socket")?)
            }
            VfNetlinkArg::Simulated => {
                tracing::warn!("VF settings go to a simulated PF (--vf-netlink simulated)");
                match &args.sim_pf_state {
                    None => Arc::new(vfplug_host::sim::SimVfNetlink::default()),
                    Some(f) => Arc::new(
                        vfplug_host::sim::SimVfNetlink::persistent(
                            vfplug_host::sim::DriverProfile::default(),
                            f.clone(),
                        )
                        .with_context(|| format!("--sim-pf-state {}", f.display()))?,
                    ),
                }
            }
        },
        netdev_ops: Arc::new(
            vfplug_host::netdev::RtNetdevOps::new().context("opening vfplugd's own netns")?,
        ),
        driver_binder: None,
        kubelet_alloc_grace: Duration::from_secs(args.kubelet_alloc_grace_seconds),
        compact_after: args.ledger_compact_after.max(1),
        sync_mode: SyncMode::Group,
        metrics_interval: vfplug_agent::options::defaults::METRICS_INTERVAL,
        unplug_wait: Duration::from_secs(args.unplug_wait_seconds),
        vm_port_prefix: args.vm_port_prefix,
        vm_hostdev,
        qmp_trusted_uids: args.qmp_trusted_uids.into_iter().collect(),
        memlock: None,
        pod_index: pod_index.clone(),
    };

    let cancel = CancellationToken::new();
    spawn_signal_handler(cancel.clone())?;
    let agent = vfplug_agent::Agent::start(opts, cancel.clone())
        .await
        .context("starting the agent")?;
    let mut ctl_registry = prometheus_client::registry::Registry::default();
    ctl_metrics.register(&mut ctl_registry);
    if let (Some(client), Some(index)) = (kube, pod_index) {
        let (synced, _) = tokio::sync::watch::channel(false);
        let opts = vfplug_controller::Options {
            node: node_name.clone(),
            concurrency: 4,
        };
        tokio::spawn(tracing::Instrument::instrument(
            vfplug_controller::run(
                client,
                opts,
                vfplug_controller::AgentPort(agent.node()),
                index,
                cancel.child_token(),
                synced,
            ),
            tracing::info_span!("controller"),
        ));
    }
    let (addr, http) = vfplug_agent::http::serve_with(
        args.http_addr,
        agent.ready(),
        vec![agent.registry(), Arc::new(ctl_registry)],
        cancel.clone(),
    )
    .await
    .with_context(|| format!("binding the HTTP endpoint {}", args.http_addr))?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    // The HTTP endpoint is critical too: without /readyz and /metrics the DaemonSet is blind.
    let agent_done = agent.wait();
    tokio::pin!(agent_done);
    tokio::pin!(http);
    let outcome = tokio::select! {
        r = &mut agent_done => r.context("agent stopped with an error"),
        r = &mut http => {
            if cancel.is_cancelled() {
                agent_done.await.context("agent stopped with an error")
            } else {
                cancel.cancel();
                let _ = agent_done.await;
                match r {
                    Ok(()) => Err(anyhow::anyhow!("the HTTP endpoint stopped")),
                    Err(e) => Err(anyhow::anyhow!("the HTTP endpoint task failed: {e}")),
                }
            }
        }
    };
    cancel.cancel();
    outcome?;
    tracing::info!("vfplugd stopped");
    Ok(())
}

fn spawn_signal_handler(cancel: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            cancel.cancel();
            // A second signal means "now": do not wait for the orderly shutdown.
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
            tracing::warn!("second signal: aborting");
            std::process::exit(130);
        },
        tracing::info_span!("signals"),
    ));
    Ok(())
}
