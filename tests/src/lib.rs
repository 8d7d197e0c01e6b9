//! Test support for the end-to-end and dataplane tests: network namespaces that clean up
//! after themselves, child processes that are killed on drop, and checksum checks done by an
//! independent packet library (etherparse), never by the code under test.
//!
//! Every address used is in 198.18.0.0/15 and lives inside namespaces the tests create.

pub mod checks;
pub mod netns;
pub mod process;
pub mod testbed;
