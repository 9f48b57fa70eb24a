//! Compiles `<workspace>/proto/vfplug/v1/node.proto` with protox (pure Rust: no `protoc` needed)
//! into tonic server code (for vfplugd) and client code (for the `vfplug` CNI shim).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let file = "vfplug/v1/node.proto";
    println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    let fds = protox::compile([file], [&proto_root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
