//! Pins: the program's maps and its attachments to the NICs, kept in a bpffs directory so
//! that the dataplane forwards on while no agent runs, and a new agent adopts it.
//!
//! Layout of the directory (`pin_path`, default `/sys/fs/bpf/lb`):
//!
//! - `maps/NAME`: every map of [`PINNED_MAPS`] (the program's state: services, backends,
//!   the connection table, the counters);
//! - `links/IFACE`: the BPF link that attaches the program to NIC `IFACE`; the link, not
//!   the agent's process, holds the attachment, so it outlives the agent.
//!
//! The agent using a directory holds an exclusive `flock` on it: a second agent on the same
//! directory is refused, and so is `lb down` while an agent runs.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{MapData, MapInfo},
    programs::links::{FdLink, PinnedLink},
};
use lb_common::map_names;

/// The maps that are pinned, and so kept across agent restarts and upgrades: every map of
/// the program but its log buffer and its flow reports (`FLOW_SYNC`), which each agent
/// reads from the program it loaded.
pub const PINNED_MAPS: &[&str] = &[
    map_names::SERVICES,
    map_names::ACTIVE,
    map_names::BACKENDS,
    map_names::KEEP,
    map_names::ADMIN,
    map_names::VIPS,
    map_names::VIP_BITS,
    map_names::IFACES,
    map_names::LOCAL_ADDRS,
    map_names::FLOWS,
    map_names::REPLIES,
    map_names::SETTINGS,
    map_names::TX_PORTS,
    map_names::TRAFFIC,
    map_names::ACTIONS,
    map_names::EVENTS,
    map_names::ROLE,
];

/// The maps whose capacity the config sets (`flows.max`): pinned with another capacity, their
/// entries are carried over into the new ones (`super::carry`).
pub const RESIZABLE: &[&str] = &[map_names::FLOWS, map_names::REPLIES];

/// `f_type` of a bpf filesystem (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;
/// Where bpffs is mounted on a usual Linux host; mounted by the agent if it is not.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// The shape of a map: what must be equal for a pinned map to serve a new program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    /// `bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Capacity.
    pub max_entries: u32,
    /// Creation flags.
    pub flags: u32,
}

/// `BPF_F_RDONLY_PROG`: the kernel adds it to a device map's flags itself.
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

impl MapShape {
    /// Whether a map of this shape (as the kernel reports it) serves where `needed` is.
    pub fn matches(&self, needed: &MapShape) -> bool {
        let flags = |s: &MapShape| s.flags & !BPF_F_RDONLY_PROG;
        MapShape {
            flags: flags(self),
            ..*self
        } == MapShape {
            flags: flags(needed),
            ..*needed
        }
    }
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// What [`Pins::keep_compatible`] found among the pinned maps.
#[derive(Debug, Default)]
pub struct Compatible {
    /// The maps pinned with the shape the program needs, used as they are.
    pub kept: Vec<String>,
    /// The maps of [`RESIZABLE`] pinned with the shape the program needs but another
    /// capacity, by name: unpinned, and open here for their entries to be copied over, with
    /// their old capacity.
    pub resized: Vec<(String, MapData, u32)>,
}

/// A locked pin directory.
#[derive(Debug)]
pub struct Pins {
    dir: PathBuf,
    /// Holds the `flock` for as long as the agent uses the directory.
    _lock: File,
}

impl Pins {
    /// Opens (creating it if needed) and locks pin directory `dir`, mounting bpffs on
    /// `/sys/fs/bpf` first if `dir` is under it and nothing is mounted there.
    pub fn open(dir: &Path) -> Result<Self> {
        ensure_bpffs(dir)?;
        for sub in ["maps", "links"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .with_context(|| format!("cannot create pin directory {}", path.display()))?;
        }
        let lock = lock(dir)?.ok_or_else(|| {
            anyhow!(
                "another lb agent uses pin directory {} (only one agent per directory; give \
                 each agent its own pin_path)",
                dir.display()
            )
        })?;
        Ok(Pins {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    /// Whether nothing is pinned here (no map, no attachment): the dataplane is new.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(names_in(&self.dir.join("maps"))?.is_empty()
            && names_in(&self.dir.join("links"))?.is_empty())
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where map `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    /// Where the link of NIC `iface` is pinned.
    pub fn link_path(&self, iface: &str) -> PathBuf {
        self.dir.join("links").join(iface)
    }

    /// Compares every pinned map with the shape the new program needs (`expected`); a map
    /// whose shape differs is unpinned, so the loader creates a new one (the old one lives
    /// on for as long as the running program uses it). A map that differs only in capacity
    /// and may be resized ([`RESIZABLE`]) is opened before its pin goes, so that its entries
    /// can be copied into the new one.
    pub fn keep_compatible(&self, expected: &[(&str, MapShape)]) -> Result<Compatible> {
        let mut compatible = Compatible::default();
        for (name, shape) in expected {
            let path = self.map_path(name);
            if !path.exists() {
                continue;
            }
            let pinned = match map_shape(&path) {
                Ok(pinned) => pinned,
                Err(e) => {
                    tracing::warn!(map = name, error = %format!("{e:#}"), "pinned map unreadable; starting a new one");
                    remove_pin(&path)?;
                    continue;
                }
            };
            if pinned.matches(shape) {
                compatible.kept.push(name.to_string());
                continue;
            }
            let resized = pinned.matches(&MapShape {
                max_entries: pinned.max_entries,
                ..*shape
            });
            if resized && RESIZABLE.contains(name) {
                tracing::info!(
                    map = name,
                    pinned = pinned.max_entries,
                    needed = shape.max_entries,
                    "pinned map has another capacity (flows.max changed); starting a new one"
                );
                let old = MapData::from_pin(&path)
                    .with_context(|| format!("cannot open pinned map {}", path.display()))?;
                compatible
                    .resized
                    .push((name.to_string(), old, pinned.max_entries));
            } else {
                tracing::warn!(
                    map = name,
                    pinned = %pinned,
                    needed = %shape,
                    "pinned map has another shape (new program version or config); starting a new one"
                );
            }
            remove_pin(&path)?;
        }
        Ok(compatible)
    }

    /// The link pinned for NIC `iface`, if any.
    pub fn pinned_link(&self, iface: &str) -> Result<Option<FdLink>> {
        let path = self.link_path(iface);
        if !path.exists() {
            return Ok(None);
        }
        let link = PinnedLink::from_pin(&path)
            .with_context(|| format!("cannot open pinned link {}", path.display()))?;
        Ok(Some(FdLink::from(link)))
    }

    /// The NIC names that have a pinned link.
    pub fn link_names(&self) -> Result<Vec<String>> {
        names_in(&self.dir.join("links"))
    }

    /// Removes the pinned link of NIC `iface`: the program is detached from it once no
    /// process holds the link either.
    pub fn remove_link(&self, iface: &str) -> Result<()> {
        remove_pin(&self.link_path(iface))
    }
}

/// What [`remove`] took away.
#[derive(Debug, Default)]
pub struct Removed {
    /// NICs whose attachment was removed.
    pub links: Vec<String>,
    /// Maps unpinned.
    pub maps: Vec<String>,
}

impl Removed {
    /// What was removed from `dir`, one line per NIC and a last line for the maps, as
    /// `lb down` prints it.
    pub fn describe(&self, dir: &Path) -> String {
        if self.links.is_empty() && self.maps.is_empty() {
            return format!("nothing pinned in {}\n", dir.display());
        }
        let mut text = String::new();
        for iface in &self.links {
            text.push_str(&format!("detached from {iface}\n"));
        }
        text.push_str(&format!(
            "removed {} maps and {}\n",
            self.maps.len(),
            dir.display()
        ));
        text
    }
}

/// Whether an agent uses pin directory `dir` (holds its lock).
pub fn in_use(dir: &Path) -> Result<bool> {
    Ok(dir.exists() && lock(dir)?.is_none())
}

/// Removes pin directory `dir` and everything in it (`lb down`): every attachment goes
/// (the program is detached from each NIC), then every map. Refused while an agent uses
/// the directory.
pub fn remove(dir: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    if !dir.exists() {
        return Ok(removed);
    }
    let Some(_lock) = lock(dir)? else {
        bail!(
            "an lb agent is running on pin directory {}; `lb down` asks it to remove the \
             dataplane through its control socket",
            dir.display()
        );
    };
    for (sub, list) in [("links", &mut removed.links), ("maps", &mut removed.maps)] {
        let path = dir.join(sub);
        for name in names_in(&path)? {
            remove_pin(&path.join(&name))?;
            list.push(name);
        }
        if path.exists() {
            std::fs::remove_dir(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    std::fs::remove_dir(dir).with_context(|| {
        format!(
            "cannot remove {} (something else is pinned in it?)",
            dir.display()
        )
    })?;
    Ok(removed)
}

/// The shape of the map pinned at `path`.
fn map_shape(path: &Path) -> Result<MapShape> {
    let info = MapInfo::from_pin(path)
        .with_context(|| format!("cannot read pinned map {}", path.display()))?;
    let map_type = info
        .map_type()
        .with_context(|| format!("unknown type of pinned map {}", path.display()))?;
    Ok(MapShape {
        map_type: map_type as u32,
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

fn names_in(dir: &Path) -> Result<Vec<String>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn remove_pin(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove pin {}", path.display())),
    }
}

/// Takes the exclusive lock of `dir`; `None` when another process holds it.
fn lock(dir: &Path) -> Result<Option<File>> {
    let file = File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
    // SAFETY: flock on a file descriptor this function owns; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(error).with_context(|| format!("cannot lock {}", dir.display()))
}

/// Whether `path` is on a bpf filesystem.
fn on_bpffs(path: &Path) -> Result<bool> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("invalid path {}", path.display()))?;
    // SAFETY: statfs reads a NUL-terminated path and writes one struct on this stack frame.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot statfs {}", path.display()));
    }
    Ok(stat.f_type as u32 == BPF_FS_MAGIC)
}

/// Makes sure `dir` can be created on a bpf filesystem.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    // The nearest existing ancestor tells which filesystem `dir` will be on.
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if on_bpffs(existing)? {
        return Ok(());
    }
    let root = Path::new(BPF_FS_ROOT);
    if !dir.starts_with(root) || existing != root {
        bail!(
            "pin_path {} is not on a bpf filesystem; mount one (mount -t bpf bpf DIR) or \
             use a directory under {BPF_FS_ROOT}",
            dir.display()
        );
    }
    tracing::info!("mounting the bpf filesystem on {BPF_FS_ROOT}");
    let source = c"bpf";
    let target = c"/sys/fs/bpf";
    // SAFETY: mount reads NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(
            "cannot mount the bpf filesystem on /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)",
        );
    }
    Ok(())
}
