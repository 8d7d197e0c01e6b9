//! Test frames built to size, an `AF_PACKET` socket that sends whole frames past the qdisc
//! (for the flood bench), and thread pinning. The throughput generator is [`super::live`].

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, Context, Result};

/// Addresses and ports of one UDP flow, as the frame carries them.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    /// Source MAC (the sending host).
    pub src_mac: [u8; 6],
    /// Destination MAC (the switch's port).
    pub dst_mac: [u8; 6],
    /// Source address.
    pub src_ip: Ipv4Addr,
    /// Destination address.
    pub dst_ip: Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

/// Smallest frame [`frame`] builds: Ethernet + IPv4 + UDP headers.
pub const HEADERS: usize = 14 + 20 + 8;

/// Builds a UDP frame of exactly `len` bytes (Ethernet header included, no FCS) for `flow`,
/// with valid IPv4 and UDP checksums.
pub fn frame(flow: &Flow, len: usize) -> Result<Vec<u8>> {
    if len < HEADERS {
        bail!("a frame needs at least {HEADERS} bytes, {len} asked");
    }
    let payload = vec![0x5a; len - HEADERS];
    let mut out = Vec::with_capacity(len);
    etherparse::PacketBuilder::ethernet2(flow.src_mac, flow.dst_mac)
        .ipv4(flow.src_ip.octets(), flow.dst_ip.octets(), 64)
        .udp(flow.src_port, flow.dst_port)
        .write(&mut out, &payload)
        .context("cannot build the test frame")?;
    debug_assert_eq!(out.len(), len);
    Ok(out)
}

/// The index of NIC `iface` in the calling thread's namespace.
pub fn ifindex(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error()).context(format!("no NIC {iface}"));
    }
    Ok(ifindex)
}

/// An `AF_PACKET` socket bound to one NIC, sending whole frames past the qdisc.
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens the socket on `iface` of the calling thread's namespace.
    pub fn open(iface: &str) -> Result<Self> {
        let ifindex = ifindex(iface)?;
        // Protocol 0: this socket only sends, it never receives a copy of the traffic.
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: bind(2) reads `addr`, whose size we pass, on a descriptor we own.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context(format!("bind to {iface}"));
        }
        let one: libc::c_int = 1;
        // SAFETY: setsockopt(2) reads one int we pass by pointer and size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                std::ptr::addr_of!(one).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("PACKET_QDISC_BYPASS");
        }
        Ok(PacketSocket { fd })
    }

    /// Sends the messages of `headers` with one `sendmmsg`; returns how many the kernel took
    /// (`Ok(0)` when a queue was full).
    ///
    /// # Safety
    /// Every header must point at iovecs and data that stay valid for the call.
    unsafe fn sendmmsg(&self, headers: &mut [libc::mmsghdr]) -> Result<usize> {
        // SAFETY: the caller vouches for the headers; the kernel only reads them.
        let sent = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                headers.as_mut_ptr(),
                headers.len() as u32,
                0,
            )
        };
        if sent >= 0 {
            return Ok(sent as usize);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::ENOBUFS) | Some(libc::EAGAIN) => Ok(0),
            _ => Err(error).context("sendmmsg"),
        }
    }

    /// Sends each of `frames` once with one `sendmmsg`; returns how many the kernel took,
    /// from the first on (`Ok(0)` when a queue was full).
    pub fn send_each(&self, frames: &[Vec<u8>]) -> Result<usize> {
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        let mut headers: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .map(|iov| {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) header.
                let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
                header.msg_hdr.msg_iov = iov;
                header.msg_hdr.msg_iovlen = 1;
                header
            })
            .collect();
        // SAFETY: each header points at its own iovec, which points at its frame; all of
        // them outlive the call.
        unsafe { self.sendmmsg(&mut headers) }
    }
}

/// Pins the calling thread to CPU `cpu`.
pub fn pin_to(cpu: usize) -> Result<()> {
    pin(0, cpu)
}

/// Pins thread `pid` (0: the calling thread) to CPU `cpu`.
pub fn pin(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain old data; CPU_ZERO/CPU_SET only write into it, and
    // sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .context(format!("pin thread {pid} to CPU {cpu}"));
    }
    Ok(())
}
