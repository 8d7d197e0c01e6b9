//! Plain-data types and constants shared by the XDP program (`lb-ebpf`) and the agent
//! (`lb-user`).
//!
//! Every type that crosses the kernel boundary lives here, is `#[repr(C)]`, has no implicit
//! padding and stores addresses and ports in network byte order exactly as they appear on the
//! wire, so neither side ever converts them on the packet path.
#![no_std]
#![deny(missing_docs)]

pub mod csum;
pub mod maps;
pub mod trafficgen;

pub use maps::*;
