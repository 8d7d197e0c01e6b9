//! The prober thread: a single-threaded tokio runtime of its own that runs every health
//! check of an engine, sees each answer or deadline, reads the kernel's link events, and
//! makes the decision and the flip right there.
//!
//! Kept apart from the agent's main runtime, a scrape of `/metrics`, a burst of control
//! requests or a slow log write cannot delay a deadline or a flip; optionally the thread is
//! real-time (`SCHED_FIFO`) or reniced ([`ProberConfig`]).

use anyhow::{anyhow, Context, Result};
use tokio::{runtime::Handle, sync::oneshot};

use crate::config::ProberConfig;

/// The running prober thread; dropping it stops the thread and everything on it.
pub struct ProberThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProberThread {
    /// Starts the thread with `scheduling`; an error when the scheduling cannot be had (a
    /// real-time priority without `CAP_SYS_NICE`, …).
    pub fn start(scheduling: &ProberConfig) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build the prober's runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let (ready, scheduled) = std::sync::mpsc::channel();
        let scheduling = scheduling.clone();
        let thread = std::thread::Builder::new()
            .name("lb-prober".into())
            .spawn(move || {
                let result = apply_scheduling(&scheduling);
                let failed = result.is_err();
                let _ = ready.send(result);
                if !failed {
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                }
                // The runtime goes here, with every task still on it.
            })
            .context("cannot start the prober thread")?;
        let mut prober = ProberThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        };
        scheduled
            .recv()
            .map_err(|_| anyhow!("the prober thread ended before it started"))
            .and_then(|result| result)
            .inspect_err(|_| prober.join())?;
        Ok(prober)
    }

    /// Where to spawn the probes.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    fn join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ProberThread {
    fn drop(&mut self) {
        self.join();
    }
}

/// Applies `scheduling` to the calling thread.
fn apply_scheduling(scheduling: &ProberConfig) -> Result<()> {
    if let Some(priority) = scheduling.realtime_priority {
        let param = libc::sched_param {
            sched_priority: i32::from(priority),
        };
        // SAFETY: sched_setscheduler(2) on the calling thread (pid 0) with a valid param.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!(
                    "cannot make the prober thread real-time (SCHED_FIFO {priority}): it needs \
                     CAP_SYS_NICE; remove prober.realtime_priority or grant it"
                )
            });
        }
    } else if scheduling.nice != 0 {
        // SAFETY: setpriority(2) on the calling thread (its tid) only.
        let done = unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                scheduling.nice,
            )
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| {
                format!(
                    "cannot set the prober thread's niceness to {}: a negative value needs \
                     CAP_SYS_NICE",
                    scheduling.nice
                )
            });
        }
    }
    Ok(())
}
