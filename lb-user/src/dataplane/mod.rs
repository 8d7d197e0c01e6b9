//! The dataplane: the embedded XDP program, loaded, attached and fed from a [`Plan`].
//!
//! - [`Dataplane::load`] loads the program and takes ownership of its maps;
//! - [`Dataplane::attach`] puts it on a NIC (detached again on drop, also if the agent dies:
//!   attachments are kernel links owned by this process);
//! - [`writer::MapWriter`] writes the plan and flips a service's active backend;
//! - [`flows`] reads and sweeps the connection table;
//! - [`counters`] reads the per-CPU counters.

pub mod counters;
pub mod flows;
pub mod writer;

use anyhow::{anyhow, Context, Result};
use aya::{
    programs::{xdp::XdpLinkId, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use lb_common::{map_names, PASS_PROGRAM_NAME, PROGRAM_NAME};

use crate::config::XdpModeSetting;
pub use writer::MapWriter;

/// The compiled XDP program, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The loaded program and its attachments.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
}

/// One NIC the program is attached to.
#[derive(Debug)]
pub struct Attachment {
    /// NIC name.
    pub iface: String,
    /// The mode the kernel accepted.
    pub mode: XdpModeSetting,
    link: XdpLinkId,
}

impl Dataplane {
    /// Loads the embedded program into the kernel (it is not attached anywhere yet) with a
    /// connection table of `max_flows` flows, and takes its maps.
    pub fn load(max_flows: u32) -> Result<(Self, MapWriter)> {
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_names::FLOWS, max_flows)
            .map_max_entries(map_names::REPLIES, max_flows)
            .load(OBJECT)
            .context(
                "cannot load the XDP program into the kernel (needs root or CAP_BPF + \
                 CAP_NET_ADMIN, and memory for the connection table: see flows.max)",
            )?;
        let maps = MapWriter::take(&mut ebpf)?;
        let mut dataplane = Dataplane {
            ebpf,
            attached: Vec::new(),
        };
        dataplane
            .program()?
            .load()
            .context("the kernel's verifier refused the XDP program")?;
        Ok((dataplane, maps))
    }

    /// Forwards the program's log records (aya-log) to the agent's log, from a task of the
    /// current tokio runtime, for as long as the program is loaded.
    pub fn forward_logs(&mut self) -> Result<()> {
        let logger = aya_log::EbpfLogger::init(&mut self.ebpf)
            .context("cannot read the XDP program's log records")?;
        // SAFETY: the logger owns its ring-buffer fd, which stays open and unchanged for as
        // long as the logger lives, and the AsyncFd owns the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let mut logger =
            registered.map_err(|e| anyhow!("cannot watch the XDP program's log buffer: {e}"))?;
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = logger.readable_mut().await else {
                    return;
                };
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
        Ok(())
    }

    /// Hands the program's log records to `logger` instead: the caller drains them with
    /// `flush()` (tests read what the program logged this way).
    pub fn capture_logs<L: log::Log>(&mut self, logger: L) -> Result<aya_log::EbpfLogger<L>> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger)
            .context("cannot read the XDP program's log records")
    }

    /// The program, for attaching it or running it on test packets (`BPF_PROG_TEST_RUN`).
    pub fn program(&mut self) -> Result<&mut Xdp> {
        let program = self
            .ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PROGRAM_NAME} missing from the object file"))?;
        Ok(program.try_into()?)
    }

    /// Attaches the program to `iface` in `mode`. Native mode falls back to generic mode,
    /// with a warning, when the driver refuses it.
    pub fn attach(&mut self, iface: &str, mode: XdpModeSetting) -> Result<XdpModeSetting> {
        let program = self.program()?;
        let attempt = |program: &mut Xdp, mode: XdpModeSetting| {
            let flags = match mode {
                XdpModeSetting::Native => XdpMode::Driver,
                XdpModeSetting::Skb => XdpMode::Skb,
            };
            program.attach(iface, flags)
        };
        let (link, mode) = match attempt(program, mode) {
            Ok(link) => (link, mode),
            Err(native_error) if mode == XdpModeSetting::Native && !is_busy(&native_error) => {
                tracing::warn!(
                    iface,
                    error = %native_error,
                    "native XDP refused; attaching in generic (skb) mode, which is slower"
                );
                let link =
                    attempt(program, XdpModeSetting::Skb).map_err(|e| attach_error(iface, e))?;
                (link, XdpModeSetting::Skb)
            }
            Err(error) => return Err(attach_error(iface, error)),
        };
        self.attached.push(Attachment {
            iface: iface.to_string(),
            mode,
            link,
        });
        Ok(mode)
    }

    /// The NICs the program is attached to.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attached
    }

    /// Detaches the program from every NIC (dropping the dataplane does the same).
    pub fn detach_all(&mut self) -> Result<()> {
        let attached = std::mem::take(&mut self.attached);
        let program = self.program()?;
        for attachment in attached {
            program.detach(attachment.link).with_context(|| {
                format!("cannot detach the XDP program from {}", attachment.iface)
            })?;
            tracing::info!(iface = attachment.iface, "detached");
        }
        Ok(())
    }
}

/// The pass-through program attached to one NIC, detached on drop.
///
/// veth hands frames sent with `XDP_TX` or `XDP_REDIRECT` only to a peer that runs an XDP
/// program itself. Attach this to the far end of each veth the balancer sends into (a
/// container's or a test host's interface); real NICs do not need it.
pub struct PassProgram {
    _ebpf: Ebpf,
}

impl PassProgram {
    /// Loads the pass-through program and attaches it to `iface` (native mode).
    pub fn attach(iface: &str) -> Result<Self> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(OBJECT).context("cannot load the XDP object")?;
        let program: &mut Xdp = ebpf
            .program_mut(PASS_PROGRAM_NAME)
            .ok_or_else(|| anyhow!("program {PASS_PROGRAM_NAME} missing from the object file"))?
            .try_into()?;
        program
            .load()
            .context("the kernel refused the pass-through program")?;
        program
            .attach(iface, XdpMode::Driver)
            .map_err(|e| attach_error(iface, e))?;
        Ok(PassProgram { _ebpf: ebpf })
    }
}

/// Whether attaching failed because the NIC already carries an XDP program.
fn is_busy(error: &aya::programs::ProgramError) -> bool {
    use aya::programs::{xdp::XdpError, ProgramError};
    let errno = match error {
        ProgramError::SyscallError(e) => e.io_error.raw_os_error(),
        ProgramError::XdpError(XdpError::NetlinkError(e)) => e.raw_os_error(),
        _ => None,
    };
    matches!(errno, Some(libc::EBUSY) | Some(libc::EEXIST))
}

fn attach_error(iface: &str, error: aya::programs::ProgramError) -> anyhow::Error {
    if is_busy(&error) {
        anyhow!(
            "interface {iface:?} already carries an XDP program (another lb, or another tool); \
             stop it first (`ip link show {iface}` shows it)"
        )
    } else {
        anyhow::Error::new(error).context(format!("cannot attach the XDP program to {iface:?}"))
    }
}

/// Lifts RLIMIT_MEMLOCK for kernels that still charge BPF maps to it (before 5.11).
fn raise_memlock_limit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if result != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}
