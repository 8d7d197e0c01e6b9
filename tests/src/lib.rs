//! Test support: checksum checks done by an independent packet library (etherparse), never by
//! the code under test. The namespace testbed the end-to-end tests use is
//! `lb_user::testbed`, shared with `lb demo`.

pub mod checks;
