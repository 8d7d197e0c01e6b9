//! The configuration of the benches' traffic generator (`bench-ebpf`): an XDP program run
//! with `BPF_PROG_TEST_RUN` in live-frames mode, which sends one pre-built UDP frame over
//! and over, each copy with the next flow of a range of addresses and ports.

/// Which end of the frame's flow the generator varies.
pub mod spread_field {
    /// The source address and port (a client's frames to the VIP).
    pub const SOURCE: u32 = 0;
    /// The destination address and port (a backend's replies to its clients).
    pub const DESTINATION: u32 = 1;
}

/// The range of flows the generator spreads its frames over: flow `n` (the `n`-th frame,
/// modulo `addrs × ports`) has address `first_addr + n / ports` and port
/// `first_port + n % ports`, in the field [`spread_field`] names. Checksums are updated
/// to match.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spread {
    /// A [`spread_field`] constant.
    pub field: u32,
    /// Number of consecutive addresses.
    pub addrs: u32,
    /// Number of consecutive ports per address.
    pub ports: u32,
    /// First address (network order).
    pub first_addr: [u8; 4],
    /// First port (network order).
    pub first_port: [u8; 2],
    /// Padding; zero.
    pub pad: [u8; 2],
    /// The frame's headers (Ethernet, IPv4 without options, UDP) as built: written over
    /// each frame before its flow, because a sent frame's memory comes back to the
    /// generator with whatever the switch rewrote in it.
    pub header: [u8; HEADER_LEN],
    /// Padding; zero.
    pub tail: [u8; 2],
}

/// Length of [`Spread::header`].
pub const HEADER_LEN: usize = 14 + 20 + 8;

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, `Copy`, no padding, valid for any bytes.
unsafe impl aya::Pod for Spread {}
