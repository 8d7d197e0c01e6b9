//! The dataplane: the embedded XDP program, loaded, attached and fed from a [`Plan`].
//!
//! - [`Dataplane::load`] loads the program with maps of its own (tests, benchmarks);
//!   [`Dataplane::load_pinned`] loads it on the maps pinned in a [`pins::Pins`] directory,
//!   adopting what a previous agent left there;
//! - [`Dataplane::attach`] puts it on a NIC; with pins, the attachment is a pinned BPF link
//!   that outlives the agent, and an attachment found pinned is taken over atomically;
//! - [`apply`] writes a plan into the maps (as a diff into adopted ones);
//! - [`writer::MapWriter`] owns the maps and flips a service's active backend;
//! - [`flows`] reads and sweeps the connection table;
//! - [`counters`] reads the per-CPU counters.
//!
//! [`Plan`]: crate::plan::Plan

pub mod apply;
pub mod carry;
pub mod counters;
pub mod flows;
pub mod pins;
pub mod writer;

use anyhow::{anyhow, Context, Result};
use aya::{
    programs::{
        links::FdLink,
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{map_names, PASS_PROGRAM_NAME, PROGRAM_NAME};

use crate::config::XdpModeSetting;
use carry::OldTable;
use pins::{MapShape, Pins, PINNED_MAPS};
pub use writer::MapWriter;

/// The compiled XDP program, embedded at build time.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The loaded program and its attachments.
pub struct Dataplane {
    ebpf: Ebpf,
    attached: Vec<Attachment>,
    pins: Option<Pins>,
}

/// One NIC the program is attached to.
#[derive(Debug)]
pub struct Attachment {
    /// NIC name.
    pub iface: String,
    /// How it was attached.
    pub how: Attached,
    /// The NIC's index when it was attached (a NIC made again gets a new one).
    pub ifindex: u32,
    link: XdpLinkId,
}

/// How [`Dataplane::attach`] attached the program to a NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// A new attachment, in this mode.
    New(XdpModeSetting),
    /// The attachment an earlier agent pinned, taken over with its mode.
    Adopted,
}

/// What a pinned load found in the pin directory.
#[derive(Debug, Default)]
pub struct Adoption {
    /// The maps that were pinned with the shape the program needs, and are used as they are.
    pub kept_maps: Vec<String>,
    /// The connection table pinned with another capacity (`flows.max` changed), whose
    /// flows are to be copied into the new one ([`MapWriter::carry_flows`]); pinned back if
    /// dropped before [`OldTable::release`].
    pub old_table: Option<OldTable>,
}

impl Adoption {
    /// Whether the maps a running dataplane decides with were kept: the plan written into
    /// them is then a diff, and each service stays on the backend it was on.
    pub fn state_kept(&self) -> bool {
        [
            map_names::SERVICES,
            map_names::ACTIVE,
            map_names::BACKENDS,
            map_names::KEEP,
        ]
        .iter()
        .all(|name| self.kept(name))
    }

    /// Whether map `name` was kept.
    pub fn kept(&self, name: &str) -> bool {
        self.kept_maps.iter().any(|kept| kept == name)
    }
}

impl Dataplane {
    /// Loads the embedded program into the kernel (it is not attached anywhere yet) with a
    /// connection table of `max_flows` flows and maps of its own, and takes its maps.
    pub fn load(max_flows: u32) -> Result<(Self, MapWriter)> {
        Self::load_with(max_flows, None)
    }

    /// Loads the program on the maps pinned in `pins`: each pinned map with the shape this
    /// program needs is used as it is (the connection table, the counters, the services and
    /// their active backends carry on); any other map is made new and pinned. A connection
    /// table pinned with another capacity is handed back as [`Adoption::old_table`].
    pub fn load_pinned(max_flows: u32, pins: Pins) -> Result<(Self, MapWriter, Adoption)> {
        let expected = map_shapes(max_flows)?;
        let compatible = pins.keep_compatible(&expected)?;
        let mut resized = compatible.resized;
        let mut take = |name: &str| {
            let at = resized.iter().position(|(n, _, _)| n == name)?;
            let (_, map, capacity) = resized.swap_remove(at);
            Some((map, pins.map_path(name), capacity))
        };
        // Made before the load: if it fails, the old table is pinned back as it is dropped.
        let old_table = match (take(map_names::FLOWS), take(map_names::REPLIES)) {
            (Some((flows, at, capacity)), Some((replies, replies_at, _))) => {
                Some(OldTable::new((flows, at), (replies, replies_at), capacity)?)
            }
            _ => None,
        };
        let (dataplane, maps) = Self::load_with(max_flows, Some(pins))?;
        let adoption = Adoption {
            kept_maps: compatible.kept,
            old_table,
        };
        Ok((dataplane, maps, adoption))
    }

    fn load_with(max_flows: u32, pins: Option<Pins>) -> Result<(Self, MapWriter)> {
        raise_memlock_limit();
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::FLOWS, max_flows)
            .map_max_entries(map_names::REPLIES, max_flows);
        if let Some(pins) = &pins {
            for name in PINNED_MAPS {
                loader.map_pin_path(name, pins.map_path(name));
            }
        }
        let mut ebpf = loader.load(OBJECT).context(
            "cannot load the XDP program into the kernel (needs root or CAP_BPF + \
             CAP_NET_ADMIN, and memory for the connection table: see flows.max)",
        )?;
        let maps = MapWriter::take(&mut ebpf)?;
        let mut dataplane = Dataplane {
            ebpf,
            attached: Vec::new(),
            pins,
        };
        dataplane
            .program()?
            .load()
            .context("the kernel's verifier refused the XDP program")?;
        Ok((dataplane, maps))
    }

    /// The ring on which the program reports every flow it writes (when `SETTINGS` asks
    /// it to), for the pair peer. Not pinned: each agent reads its own program's ring, and a
    /// peer that reconnects gets the whole table anyway. Can be taken once.
    pub fn take_flow_reports(&mut self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        let map = self
            .ebpf
            .take_map(map_names::FLOW_SYNC)
            .ok_or_else(|| anyhow!("map {} already taken or missing", map_names::FLOW_SYNC))?;
        aya::maps::RingBuf::try_from(map).context("FLOW_SYNC is not a ring buffer")
    }

    /// The pin directory, when the dataplane is pinned.
    pub fn pins(&self) -> Option<&Pins> {
        self.pins.as_ref()
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
    ///
    /// With pins, an attachment pinned for `iface` by an earlier agent is taken over: the
    /// kernel swaps the program in it atomically (`BPF_LINK_UPDATE`), so not one frame goes
    /// unserved, and it keeps the mode it had. A new attachment is pinned.
    pub fn attach(&mut self, iface: &str, mode: XdpModeSetting) -> Result<Attached> {
        let ifindex = if_index(iface)?;
        if let Some(attachment) = self.attached.iter().find(|a| a.iface == iface) {
            if attachment.ifindex == ifindex {
                return Ok(attachment.how); // already attached by this dataplane (a reload)
            }
            // The NIC was deleted and made again: its old attachment went with it.
            tracing::info!(iface, "NIC made again; attaching anew");
            self.detach(iface)?;
        }
        if let Some(adopted) = self.adopt_link(iface)? {
            return Ok(adopted);
        }
        let program = self.program()?;
        let attempt =
            |program: &mut Xdp, mode: XdpModeSetting| program.attach(iface, xdp_mode(mode));
        let (mut link, mode) = match attempt(program, mode) {
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
        if let Some(path) = self.pins.as_ref().map(|p| p.link_path(iface)) {
            link = self.pin_link(iface, link, mode, &path)?;
        }
        self.attached.push(Attachment {
            iface: iface.to_string(),
            how: Attached::New(mode),
            ifindex,
            link,
        });
        Ok(Attached::New(mode))
    }

    /// Takes over the attachment pinned for `iface`, if there is a live one.
    fn adopt_link(&mut self, iface: &str) -> Result<Option<Attached>> {
        let Some(pins) = &self.pins else {
            return Ok(None);
        };
        let Some(link) = pins.pinned_link(iface)? else {
            return Ok(None);
        };
        let path = pins.link_path(iface);
        let link = XdpLink::try_from(link)
            .with_context(|| format!("{} is not an XDP link", path.display()))?;
        match self.program()?.attach_to_link(link) {
            Ok(id) => {
                self.attached.push(Attachment {
                    iface: iface.to_string(),
                    how: Attached::Adopted,
                    ifindex: if_index(iface)?,
                    link: id,
                });
                Ok(Some(Attached::Adopted))
            }
            Err(error) => {
                // The NIC the link was made for is gone (deleted, or re-created with a new
                // index): the link is dead; a new one is made.
                tracing::info!(iface, error = %error, "pinned attachment is no longer live; attaching anew");
                self.pins
                    .as_ref()
                    .expect("pins checked above")
                    .remove_link(iface)?;
                Ok(None)
            }
        }
    }

    /// Pins the attachment `link` of `iface` at `path`; the program keeps holding it.
    fn pin_link(
        &mut self,
        iface: &str,
        link: XdpLinkId,
        mode: XdpModeSetting,
        path: &std::path::Path,
    ) -> Result<XdpLinkId> {
        let program = self.program()?;
        let owned = program.take_link(link)?;
        let fd_link = match FdLink::try_from(owned) {
            Ok(fd_link) => fd_link,
            Err(_) => {
                // Attached through netlink (kernel before 5.9): there is no link to pin, and
                // handing it over dropped (detached) it. Attached again, it goes with the agent.
                tracing::warn!(
                    iface,
                    "this kernel has no BPF links for XDP: the attachment cannot be pinned and \
                     goes with the agent"
                );
                let link = program.attach(iface, xdp_mode(mode));
                return link.map_err(|e| attach_error(iface, e));
            }
        };
        let pinned = fd_link.pin(path).with_context(|| {
            format!("cannot pin the attachment of {iface} at {}", path.display())
        })?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|e| anyhow!("pinned link of {iface}: {e}"))?;
        // The link already runs this program: the update is a no-op that hands the link back
        // to the program, which then holds it like any attachment.
        Ok(program.attach_to_link(link)?)
    }

    /// The NICs the program is attached to.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attached
    }

    /// Detaches the program from NIC `iface` (unpinning its attachment first), if it is
    /// attached there or a pinned attachment is left for it.
    pub fn detach(&mut self, iface: &str) -> Result<()> {
        if let Some(pins) = &self.pins {
            pins.remove_link(iface)?;
        }
        if let Some(at) = self.attached.iter().position(|a| a.iface == iface) {
            let attachment = self.attached.remove(at);
            self.program()?
                .detach(attachment.link)
                .with_context(|| format!("cannot detach the XDP program from {iface}"))?;
        }
        Ok(())
    }

    /// Detaches the program from every NIC (dropping an unpinned dataplane does the same);
    /// pinned attachments are unpinned first.
    pub fn detach_all(&mut self) -> Result<()> {
        let attached = std::mem::take(&mut self.attached);
        for attachment in attached {
            if let Some(pins) = &self.pins {
                pins.remove_link(&attachment.iface)?;
            }
            self.program()?.detach(attachment.link).with_context(|| {
                format!("cannot detach the XDP program from {}", attachment.iface)
            })?;
            tracing::info!(iface = attachment.iface, "detached");
        }
        Ok(())
    }
}

/// The index of NIC `iface`.
fn if_index(iface: &str) -> Result<u32> {
    let name = std::ffi::CString::new(iface).with_context(|| format!("bad NIC name {iface:?}"))?;
    // SAFETY: if_nametoindex reads one NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        anyhow::bail!("network interface {iface:?} does not exist");
    }
    Ok(index)
}

fn xdp_mode(mode: XdpModeSetting) -> XdpMode {
    match mode {
        XdpModeSetting::Native => XdpMode::Driver,
        XdpModeSetting::Skb => XdpMode::Skb,
    }
}

/// The shape each pinned map must have for this program with a table of `max_flows`.
fn map_shapes(max_flows: u32) -> Result<Vec<(&'static str, MapShape)>> {
    let object = aya_obj::Object::parse(OBJECT).context("cannot parse the embedded XDP object")?;
    PINNED_MAPS
        .iter()
        .map(|name| {
            let map = object
                .maps
                .get(*name)
                .ok_or_else(|| anyhow!("map {name} missing from the XDP object file"))?;
            let max_entries = if *name == map_names::FLOWS || *name == map_names::REPLIES {
                max_flows
            } else {
                map.max_entries()
            };
            Ok((
                *name,
                MapShape {
                    map_type: map.map_type(),
                    key_size: map.key_size(),
                    value_size: map.value_size(),
                    max_entries,
                    flags: map.map_flags(),
                },
            ))
        })
        .collect()
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
