//! End to end, upgrades: a new agent whose program needs maps of another shape than the
//! pinned ones (another `flows.max`, a map whose layout changed) takes over from the
//! running dataplane while a client asks the VIP 10 000 times a second, and not one request
//! goes unanswered; what can be kept is kept, also when such a start fails.

use std::time::Duration;

use lb_common::map_names;
use lb_user::testbed::{topology::Testbed, Host};
use tests::{
    agent::{lb_on, start_agent},
    restarts::{assert_all_answered_by, config, flow_age, testbed, LISTEN, PERIOD},
};

/// The shape of map `name` as pinned on the testbed: (value size, capacity).
fn pinned_shape(bed: &Testbed, name: &str) -> (u32, u32) {
    let info = aya::maps::MapInfo::from_pin(bed.pin_path().join("maps").join(name)).unwrap();
    (info.value_size(), info.max_entries())
}

/// [`config`] with a connection table of `max` flows.
fn sized_config(max: u32) -> String {
    format!("{}\n[flows]\nmax = {max}\n", config())
}

#[test]
fn a_restart_with_another_table_size_carries_the_connection_table_over() {
    let (mut bed, _turn) = testbed("lbup-resize");
    let capacity = |bed: &Testbed| pinned_shape(bed, map_names::FLOWS).1;
    let agent = start_agent(&mut bed, &sized_config(4096), LISTEN);
    assert_eq!(capacity(&bed), 4096);
    let stream = bed.udp_stream(30_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // `flows.max` changes only with a restart, which makes the table anew.
    assert!(bed.processes[agent].terminate().unwrap());
    let second = start_agent(&mut bed, &sized_config(8192), LISTEN);
    let answers = stream.join().unwrap().unwrap();
    assert_all_answered_by(&answers, "master");
    assert_eq!(capacity(&bed), 8192);
    assert!(flow_age(&bed) >= 3.0, "the flow was not carried over");
    assert!(bed.processes[second].terminate().unwrap());
}

#[test]
fn an_upgrade_whose_program_changes_a_maps_layout_keeps_the_rest() {
    let (mut bed, _turn) = testbed("lbup-layout");
    let agent = start_agent(&mut bed, &config(), LISTEN);
    let needed = pinned_shape(&bed, map_names::TRAFFIC);
    let stream = bed.udp_stream(30_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(bed.processes[agent].terminate().unwrap());

    // As if the running version had kept its traffic counters in another layout: the
    // pinned TRAFFIC is replaced by a map of 8-byte values (the bench program's counter).
    let path = bed.pin_path().join("maps").join(map_names::TRAFFIC);
    std::fs::remove_file(&path).unwrap();
    let mut other = aya::Ebpf::load(tests::bench::throughput::live::OBJECT).unwrap();
    other.map_mut("SENT").unwrap().pin(&path).unwrap();
    assert_ne!(pinned_shape(&bed, map_names::TRAFFIC), needed);
    drop(other);

    let second = start_agent(&mut bed, &config(), LISTEN);
    let answers = stream.join().unwrap().unwrap();
    assert_all_answered_by(&answers, "master");
    assert_eq!(pinned_shape(&bed, map_names::TRAFFIC), needed);
    assert!(flow_age(&bed) >= 3.0, "the connection table was not kept");
    assert!(bed.processes[second].terminate().unwrap());
}

#[test]
fn a_failed_start_with_another_table_size_leaves_the_old_table_pinned() {
    let (mut bed, _turn) = testbed("lbup-fail");
    let agent = start_agent(&mut bed, &sized_config(4096), LISTEN);
    let stream = bed.udp_stream(40_000, PERIOD).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(bed.processes[agent].terminate().unwrap());

    // Another XDP program on s0 in place of the dataplane's: the next start, with a table
    // of another size, fails as it attaches there, after it took the old table's pins.
    std::fs::remove_file(bed.pin_path().join("links").join("s0")).unwrap();
    let foreign = bed
        .switch
        .spawn(|| lb_user::dataplane::PassProgram::attach("s0"))
        .unwrap()
        .join()
        .unwrap()
        .unwrap();
    let path = bed.write_file("bigger.toml", &sized_config(8192)).unwrap();
    let (ok, _, err) = lb_on(
        &bed,
        Host::Switch,
        &["run", "--config", path.to_str().unwrap()],
    );
    assert!(!ok, "the agent started on a NIC another program holds");
    assert!(err.contains("s0"), "{err}");
    assert_eq!(
        pinned_shape(&bed, map_names::FLOWS).1,
        4096,
        "the old table was not put back"
    );
    drop(foreign);

    let second = start_agent(&mut bed, &sized_config(4096), LISTEN);
    let answers = stream.join().unwrap().unwrap();
    assert_all_answered_by(&answers, "master");
    assert!(flow_age(&bed) >= 3.0, "the connection table was lost");
    assert!(bed.processes[second].terminate().unwrap());
}
