//! What the `BPF_PROG_TEST_RUN` dataplane tests and the per-packet cost bench share: XDP
//! action codes, a namespace with the two NICs the program is planned on, and the test run
//! itself.

use anyhow::{anyhow, Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use lb_user::{
    config::Config,
    dataplane::{Dataplane, MapWriter},
    plan::{Plan, PlannedInterface},
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
    let (dataplane, maps) = Dataplane::load(plan.flows.max)?;
    maps.write_plan(&plan)?;
    Ok((plan, dataplane, maps))
}

/// Creates namespace `name` with a veth pair `t-cli` / `t-bck` (MACs above), both up, with
/// the switch host's addresses `198.18.1.1/24` and `198.18.2.1/24`, 198.19.0.0/16 (the
/// benches' many clients) routed through `t-cli`, and forwarding on, as on a routed switch
/// host; removed when the returned value is dropped.
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
    ns.ip(&["addr", "add", "198.18.1.1/24", "dev", "t-cli"])?;
    ns.ip(&["addr", "add", "198.18.2.1/24", "dev", "t-bck"])?;
    ns.ip(&["route", "add", "198.19.0.0/16", "dev", "t-cli"])?;
    // A routed switch host: the program's reverse-path check asks the kernel's FIB, which
    // answers for NICs that forward.
    ns.exec("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])?;
    Ok(ns)
}

/// The plan's entry for NIC `name`.
pub fn interface<'a>(plan: &'a Plan, name: &str) -> Result<&'a PlannedInterface> {
    plan.interfaces
        .iter()
        .find(|i| i.name == name)
        .ok_or_else(|| anyhow!("{name} missing from the plan"))
}

/// Runs `program` `repeat` times on `frame` as if it arrived on NIC `ifindex`: (action,
/// mean ns per run as the kernel measured it, the frame as the last run left it).
pub fn run(
    program: &mut Xdp,
    ifindex: u32,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, f64, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 512];
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let ctx: Vec<u8> = [0u32, frame.len() as u32, 0, ifindex, 0, 0]
        .iter()
        .flat_map(|v| v.to_ne_bytes())
        .collect();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, result.duration.as_nanos() as f64, out))
}
