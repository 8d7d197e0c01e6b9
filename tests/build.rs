//! Builds the benches' XDP programs (`bench-ebpf`: the live-frame traffic generator) so
//! that the benches can embed the object file; set `AYA_BUILD_SKIP=1` to skip it.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../lb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "bench-ebpf",
            root_dir: "../bench-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
