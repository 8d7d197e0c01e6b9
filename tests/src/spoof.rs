//! Packets with a forged source address, sent from inside a test namespace through a raw
//! socket: what a hostile client can put on the wire.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};
use etherparse::PacketBuilder;
use lb_user::testbed::netns::Netns;

/// Sends `count` UDP datagrams from `src` (any address, not necessarily the host's) with
/// source ports `first_port`, `first_port + 1`, … to `dst:dst_port`, from namespace `ns`.
pub fn send_udp(
    ns: &Netns,
    src: Ipv4Addr,
    first_port: u16,
    dst: Ipv4Addr,
    dst_port: u16,
    count: u16,
) -> Result<()> {
    ns.enter(move || -> Result<()> {
        // SAFETY: plain socket(2) call; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            bail!("raw socket: {}", std::io::Error::last_os_error());
        }
        let result = (|| -> Result<()> {
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(dst.octets()),
                },
                sin_zero: [0; 8],
            };
            for i in 0..count {
                let mut packet = Vec::new();
                PacketBuilder::ipv4(src.octets(), dst.octets(), 64)
                    .udp(first_port.wrapping_add(i), dst_port)
                    .write(&mut packet, b"spoofed")?;
                // SAFETY: sends `packet` (valid for its length) to `to`, a valid sockaddr_in.
                let sent = unsafe {
                    libc::sendto(
                        fd,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        (&to as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                if sent < 0 {
                    bail!("sendto: {}", std::io::Error::last_os_error());
                }
            }
            Ok(())
        })();
        // SAFETY: closes the descriptor opened above, once.
        unsafe { libc::close(fd) };
        result
    })?
}
