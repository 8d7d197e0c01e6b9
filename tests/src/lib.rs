//! Test and benchmark support: checksum checks done by an independent packet library
//! (etherparse), never by the code under test, and the benchmarks of `cargo xtask bench`.
//! The namespace testbed both use is `lb_user::testbed`, shared with `lb demo`.

pub mod agent;
pub mod bench;
pub mod checks;
pub mod procfs;
pub mod restarts;
pub mod rig;
pub mod spoof;
pub mod testrun;
