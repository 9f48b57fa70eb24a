//! Runs inside the VM lab's L1 guest (see `vfplug_vmlab::agent`): creates VFs on the emulated igb PF,
//! binds one to vfio-pci and hotplugs it into a nested QEMU through vfplug-qmp. Exit status 0 only
//! if every step passed; the per-step lines on stdout are what the host test checks.

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = match vfplug_vmlab::agent::AgentArgs::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vmlab-guest-agent: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if vfplug_vmlab::agent::run(&args).await {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
