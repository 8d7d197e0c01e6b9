//! What waking up alone costs on this machine: a thread that does nothing but wait on the
//! agent's own timer (its `PreciseTimer`, a periodic `timerfd` in a one-thread tokio
//! runtime) every millisecond, measured as the agent is. The agent's figure with 1 ms checks
//! is this floor plus the probes' sends and reads.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context, Result};
use lb_user::health::timer::PreciseTimer;

use crate::{bench::interrupt, procfs::own_thread_cpu};

/// CPU time of the waking thread over `window`, in % of one core, after `settle`.
pub fn measure(interval: Duration, settle: Duration, window: Duration) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = mpsc::channel();
    let waker = std::thread::Builder::new()
        .name("wake-floor".into())
        .spawn({
            let stop = stop.clone();
            move || wake_every(interval, &stop, &tid_tx)
        })
        .context("cannot start the wake-up thread")?;
    let measured = (|| -> Result<f64> {
        let tid: u32 = tid_rx
            .recv_timeout(Duration::from_secs(5))
            .context("the wake-up thread did not start")?;
        interrupt::sleep(settle)?;
        let before = own_thread_cpu(tid)?;
        let start = Instant::now();
        interrupt::sleep(window)?;
        let used = own_thread_cpu(tid)?.total - before.total;
        Ok(used / start.elapsed().as_secs_f64() * 100.0)
    })();
    stop.store(true, Ordering::Relaxed);
    let ended = waker
        .join()
        .map_err(|_| anyhow!("the wake-up thread panicked"))?;
    // The thread's own error first: it is why a measurement found no thread to read.
    ended?;
    measured
}

/// The thread's body: tells its id, then wakes every `interval` until `stop`.
fn wake_every(interval: Duration, stop: &AtomicBool, tid: &mpsc::Sender<u32>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot build the wake-up thread's runtime")?;
    runtime.block_on(async {
        let mut timer = PreciseTimer::new()?;
        // SAFETY: gettid has no preconditions.
        let id = unsafe { libc::gettid() };
        let _ = tid.send(u32::try_from(id).unwrap_or(0));
        while !stop.load(Ordering::Relaxed) {
            let next = timer.next_on_grid(Instant::now(), interval);
            timer.sleep_until(next, Some(interval)).await?;
        }
        Ok(())
    })
}

/// The report's sentence on the floor.
pub fn render(interval: Duration, percent: f64) -> String {
    format!(
        "For reference, a thread that only waits on the agent's timer (a periodic `timerfd` \
         in a one-thread tokio runtime) every {} ms and does nothing else costs \
         {percent:.2} % of one core on this machine (its own CPU time, \
         `/proc/self/task/TID/stat`): the part of the 1 ms rows above that waking every \
         millisecond costs (the scheduler, `epoll_wait`, the timer's read) before any probe \
         work.\n\n",
        interval.as_secs_f64() * 1000.0
    )
}
