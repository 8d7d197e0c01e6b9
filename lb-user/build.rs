//! Builds the XDP program (`lb-ebpf`, nightly, `-Z build-std=core`) so that the agent can
//! embed the object file; set `AYA_BUILD_SKIP=1` to skip it.

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../lb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: "../lb-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
