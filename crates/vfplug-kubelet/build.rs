//! Compiles the kubelet protos in `<workspace>/proto/kubelet` with protox (pure Rust, so no
//! `protoc` is needed on the build machine) and generates tonic server and client code for all
//! three APIs: the plugin serves DevicePlugin and pluginregistration.Registration and is a client
//! of v1beta1.Registration and PodResourcesLister; the `testing` fake kubelet is the mirror image.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let files = [
        "kubelet/deviceplugin/v1beta1/api.proto",
        "kubelet/pluginregistration/v1/api.proto",
        "kubelet/podresources/v1/api.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(f).display());
    }
    let fds = protox::compile(files, [&proto_root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
