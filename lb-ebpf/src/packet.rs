//! Bounds-checked access to the frame: the only place that turns packet offsets into
//! references.

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;

/// A mutable reference to a `T` at `offset` bytes into the frame, if the frame is long
/// enough to hold it.
///
/// `T` must be a plain-data header type (`#[repr(C)]`, any bit pattern valid, alignment 1 or
/// 2 — frames start 2-byte aligned).
#[inline(always)]
pub fn header_mut<'a, T>(ctx: &XdpContext, offset: usize) -> Option<&'a mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    // SAFETY: the range [start + offset, start + offset + size_of::<T>()) lies inside the
    // frame, which stays valid and exclusively ours for the whole program run; callers never
    // hold two references to overlapping headers at once.
    Some(unsafe { &mut *((start + offset) as *mut T) })
}

/// Length of the whole frame in bytes.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}
