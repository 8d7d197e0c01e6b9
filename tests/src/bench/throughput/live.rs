//! The live-frames traffic generator: the `bench-ebpf` program run by
//! `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` (kernel 5.18+) on the sending
//! host's NIC. The kernel builds each frame from one template, the program gives it the
//! next flow of a range (addresses and ports, checksums fixed) and returns `XDP_TX`, and the
//! frame leaves through the NIC's `ndo_xdp_xmit`: no socket, no system call per frame.
//! It runs on a thread of its own inside the sending namespace, bounded in time, and counts
//! the frames it ran (the offered load).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::Array,
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
    Ebpf,
};
use lb_common::trafficgen::Spread;
use lb_user::testbed::netns::Netns;

use super::generator::{ifindex, pin_to};
use crate::bench::interrupt;

/// The benches' XDP object (built from `bench-ebpf` by this crate's build script).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-ebpf"));

/// Frames per `BPF_PROG_TEST_RUN` call. Each call sets up and tears down a page pool,
/// which costs milliseconds: 8192 frames per call held the generator to 0.3 Mpps. This
/// many take tens of milliseconds at 4 Mpps, still short enough to stop at once and to
/// count the offered frames within the window.
const FRAMES_PER_CALL: u32 = 262_144;
/// Frames the kernel hands the NIC per batch (its default, as xdp-trafficgen uses).
const BATCH: u32 = 64;

/// The generator program, loaded with its flow range, ready to run on NIC `ifindex` of
/// the calling thread's namespace.
pub struct LiveFrames {
    ebpf: Ebpf,
    ctx: Vec<u8>,
    frame: Vec<u8>,
}

impl LiveFrames {
    /// Loads the program for sending `frame` out of `iface`, spread over `spread`.
    pub fn load(iface: &str, frame: Vec<u8>, spread: Spread) -> Result<Self> {
        let ifindex = ifindex(iface)?;
        let mut ebpf = Ebpf::load(OBJECT).context("cannot load the generator's XDP object")?;
        let mut spreads: Array<_, Spread> = Array::try_from(
            ebpf.map_mut("SPREAD")
                .ok_or_else(|| anyhow!("map SPREAD missing"))?,
        )?;
        spreads.set(0, spread, 0)?;
        generator(&mut ebpf)?
            .load()
            .map_err(|e| anyhow!("{e:?}"))
            .context("the kernel refused the generator program")?;
        // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
        let ctx = [0u32, frame.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        Ok(LiveFrames { ebpf, ctx, frame })
    }

    /// Sends `count` frames (the next `count` flows of the range).
    pub fn send(&mut self, count: u32) -> Result<()> {
        let result = generator(&mut self.ebpf)?
            .test_run(TestRunOptions {
                data_in: Some(&self.frame),
                ctx_in: Some(&self.ctx),
                repeat: count,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN in live-frames mode (kernel 5.18 or later)")?;
        if result.return_value != 0 {
            return Err(anyhow!("live-frames run returned {}", result.return_value));
        }
        Ok(())
    }
}

/// The generator program of `ebpf`.
fn generator(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let program = ebpf
        .program_mut("trafficgen")
        .ok_or_else(|| anyhow!("program trafficgen missing from the bench object"))?;
    Ok(program.try_into()?)
}

/// Frames per burst of [`send_paced`]: fewer than a veth ring holds (256).
const PACED_BURST: u32 = 128;

/// Sends `count` frames of `frame` spread over `spread` out of `iface` of `ns`, in bursts
/// a veth ring can take with a pause between them, so that none is dropped on the way.
pub fn send_paced(
    ns: &Netns,
    iface: &str,
    frame: Vec<u8>,
    spread: Spread,
    count: u32,
) -> Result<()> {
    let iface = iface.to_string();
    ns.enter(move || -> Result<()> {
        let mut frames = LiveFrames::load(&iface, frame, spread)?;
        let mut left = count;
        while left > 0 {
            let burst = left.min(PACED_BURST);
            frames.send(burst)?;
            left -= burst;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })?
}

/// A live-frames generator running on its own thread.
pub struct Generator {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl Generator {
    /// Starts sending `frame`, spread over `spread`, out of `iface` of `ns`, for at most
    /// `limit` (or until stopped), on a thread pinned to `cpu` when given.
    pub fn start(
        ns: &Netns,
        iface: &str,
        frame: Vec<u8>,
        spread: Spread,
        limit: Duration,
        cpu: Option<usize>,
    ) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (flag, counter, iface) = (stop.clone(), sent.clone(), iface.to_string());
        let thread = ns.spawn(move || {
            if let Some(cpu) = cpu {
                pin_to(cpu)?;
            }
            let mut frames = LiveFrames::load(&iface, frame, spread)?;
            let end = Instant::now() + limit;
            while !flag.load(Ordering::Relaxed) && Instant::now() < end {
                interrupt::check()?;
                frames.send(FRAMES_PER_CALL)?;
                counter.fetch_add(u64::from(FRAMES_PER_CALL), Ordering::Relaxed);
            }
            Ok(())
        })?;
        Ok(Generator {
            stop,
            sent,
            thread: Some(thread),
        })
    }

    /// Frames run so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Stops the generator and returns the frames sent, or its error.
    pub fn stop(mut self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(result) => result?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(self.sent())
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
