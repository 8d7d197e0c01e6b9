//! The benches' traffic generator: an XDP program that `BPF_PROG_TEST_RUN` runs in
//! live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, as xdp-tools' xdp-trafficgen does) on
//! one pre-built UDP frame. Each run gives the frame the next flow of the configured range
//! (`SPREAD`), fixes its checksums and returns `XDP_TX`, which the kernel turns into a
//! transmission out of the NIC the run names: frames leave at several million per second
//! per core, with no system call per frame and no socket buffer.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    csum,
    trafficgen::{spread_field, Spread},
};

/// The range of flows (one entry, written before the run).
#[map]
static SPREAD: Array<Spread> = Array::with_max_entries(1, 0);

/// Frames sent so far on each CPU: the next frame's flow number.
#[map]
static SENT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Offsets in an Ethernet + IPv4 (no options) + UDP frame.
const IP_CHECK: usize = 14 + 10;
const IP_SRC: usize = 14 + 12;
const IP_DST: usize = 14 + 16;
const UDP_SRC: usize = 14 + 20;
const UDP_DST: usize = 14 + 20 + 2;
const UDP_CHECK: usize = 14 + 20 + 6;

/// Entry point: the next flow's frame, sent back out (`XDP_TX`).
#[xdp]
pub fn trafficgen(ctx: XdpContext) -> u32 {
    match next_flow(&ctx) {
        Some(()) => xdp_action::XDP_TX,
        None => xdp_action::XDP_ABORTED,
    }
}

/// Writes the next flow's address and port into the frame, with its checksums.
#[inline(always)]
fn next_flow(ctx: &XdpContext) -> Option<()> {
    let spread = SPREAD.get(0)?;
    let sent = SENT.get_ptr_mut(0)?;
    // SAFETY: a per-CPU array slot, valid for the run; only this CPU's run touches it.
    let n = unsafe {
        let n = *sent;
        *sent = n + 1;
        n
    };
    // Checked arithmetic: an empty range sends nothing (and the program has no path to a
    // panic, which the verifier would refuse).
    let flows = u64::from(spread.addrs) * u64::from(spread.ports);
    let flow = n.checked_rem(flows)? as u32;
    let addr = u32::from_be_bytes(spread.first_addr)
        .wrapping_add(flow.checked_div(spread.ports)?)
        .to_be_bytes();
    let port = u16::from_be_bytes(spread.first_port)
        .wrapping_add(flow.checked_rem(spread.ports)? as u16)
        .to_be_bytes();
    let (addr_at, port_at) = if spread.field == spread_field::DESTINATION {
        (IP_DST, UDP_DST)
    } else {
        (IP_SRC, UDP_SRC)
    };
    // The template's headers first: the frame's memory may hold a frame the switch
    // rewrote (a sent frame's page comes back to the generator as it was left).
    write(ctx, 0, spread.header)?;
    let h = &spread.header;
    let old_addr = [h[addr_at], h[addr_at + 1], h[addr_at + 2], h[addr_at + 3]];
    let old_port = [h[port_at], h[port_at + 1]];
    let ip_check = u16::from_be_bytes([h[IP_CHECK], h[IP_CHECK + 1]]);
    let udp_check = u16::from_be_bytes([h[UDP_CHECK], h[UDP_CHECK + 1]]);
    let ip_check = csum::replace4(ip_check, old_addr, addr);
    let udp_check = match csum::udp_replace4(udp_check, old_addr, addr) {
        0 => 0,
        check => match csum::replace2(check, old_port, port) {
            0 => 0xffff,
            check => check,
        },
    };
    write(ctx, addr_at, addr)?;
    write(ctx, port_at, port)?;
    write(ctx, IP_CHECK, ip_check.to_be_bytes())?;
    write(ctx, UDP_CHECK, udp_check.to_be_bytes())
}

/// A pointer to the `N` bytes at `offset` of the frame, if the frame holds them.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<*mut [u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    Some(start as *mut [u8; N])
}

#[inline(always)]
fn write<const N: usize>(ctx: &XdpContext, offset: usize, value: [u8; N]) -> Option<()> {
    // SAFETY: `bytes` checked that the N bytes lie inside the frame.
    unsafe { bytes::<N>(ctx, offset)?.write_unaligned(value) };
    Some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// License of the program; GPL-compatible so the kernel allows every helper it uses.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
