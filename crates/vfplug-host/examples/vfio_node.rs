//! Writes the fake vfio node of [`vfplug_host::fixture::vfio_node`] under a directory, for
//! vfplugd run by hand or by a script (`scripts/demo-domain.sh`): `<dir>/sys` with one PF
//! (`ens1f0`) whose `n` VFs sit on vfio-pci, and `<dir>/config.yaml` with the vfio pool `vm`.
//! Prints the VFs' PCI addresses, one a line.
//!
//! `cargo run -p vfplug-host --example vfio_node -- <dir> [n=3]`

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(dir), n) = (args.next().map(PathBuf::from), args.next()) else {
        eprintln!("usage: vfio_node <dir> [n=3]");
        return ExitCode::from(2);
    };
    let n = match n.as_deref().map_or(Ok(3), str::parse::<u32>) {
        Ok(n) if n > 0 => n,
        _ => {
            eprintln!("vfio_node: n must be a positive number");
            return ExitCode::from(2);
        }
    };
    match vfplug_host::fixture::vfio_node(&dir, n) {
        Ok(vfs) => {
            for vf in vfs {
                println!("{vf}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vfio_node: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}
