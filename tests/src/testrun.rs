//! What the `BPF_PROG_TEST_RUN` dataplane tests and the per-packet cost bench share: XDP
//! action codes, and a namespace with the two NICs the program is planned on.

use anyhow::Result;
use lb_user::{
    config::Config,
    dataplane::{Dataplane, MapWriter},
    plan::Plan,
    testbed::netns::{veth, Netns},
};

/// `XDP_ABORTED`.
pub const XDP_ABORTED: u32 = 0;
/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;
/// `XDP_TX`.
pub const XDP_TX: u32 = 3;
/// `XDP_REDIRECT`.
pub const XDP_REDIRECT: u32 = 4;

/// MAC of `t-cli`, the client-facing NIC.
pub const CLIENT_IF_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
/// MAC of `t-bck`, the backend-facing NIC.
pub const BACKEND_IF_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
/// MAC of the client host.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x02];
/// MAC of the master backend.
pub const MASTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x02];

/// Loads the program and writes the plan of agent config `config` into its maps (inside
/// the namespace whose NICs the config names).
pub fn load(config: &str) -> Result<(Plan, Dataplane, MapWriter)> {
    let config = Config::parse(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let plan = runtime.block_on(Plan::resolve(&config, &[]))?;
    let (dataplane, mut maps) = Dataplane::load()?;
    maps.write_plan(&plan)?;
    Ok((plan, dataplane, maps))
}

/// Creates namespace `name` with a veth pair `t-cli` / `t-bck` (MACs above), both up;
/// removed when the returned value is dropped.
pub fn namespace(name: &str) -> Result<Netns> {
    let ns = Netns::new(name)?;
    veth(
        &ns,
        "t-cli",
        "02:00:00:00:01:01",
        &ns,
        "t-bck",
        "02:00:00:00:02:01",
    )?;
    Ok(ns)
}
