//! Reverse-path check of a new client: would the switch host send packets to the client's
//! address out of the NIC the packet came in on, to the MAC it came from? Asked of the
//! kernel's own routing and neighbour tables (`bpf_fib_lookup`), once per new flow.
//!
//! The kernel answers only for a NIC with IPv4 forwarding on (as on a routed switch host);
//! on one with forwarding off the check cannot be made and passes (the agent warns).

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibLookup, BPF_FIB_LKUP_RET_FWD_DISABLED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};

/// `AF_INET`.
const AF_INET: u8 = 2;

/// Whether the host routes `src` out of NIC `ifindex`, and — when it knows the next hop's
/// MAC — to `mac`. A next hop the host has not resolved yet (no neighbour entry) passes on
/// the route alone; so does every source on a NIC with forwarding off.
#[inline(always)]
pub fn leads_back(ctx: &XdpContext, src: [u8; 4], ifindex: u32, mac: &[u8; 6]) -> bool {
    // SAFETY: `bpf_fib_lookup` is a plain C struct of integers and unions of integers;
    // all-zero is a valid value.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.ifindex = ifindex;
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(src);
    // An output lookup bound to the ingress NIC: only routes through that NIC match, and it
    // works whether or not the host forwards.
    // SAFETY: the helper reads and writes `params`, which lives on this stack frame, for the
    // size passed; `ctx.ctx` is the program's own context.
    let result = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<FibLookup>() as i32,
            BPF_FIB_LOOKUP_OUTPUT,
        )
    };
    match result as u32 {
        BPF_FIB_LKUP_RET_FWD_DISABLED => true,
        BPF_FIB_LKUP_RET_SUCCESS => params.ifindex == ifindex && params.dmac == *mac,
        BPF_FIB_LKUP_RET_NO_NEIGH => params.ifindex == ifindex,
        _ => false,
    }
}
