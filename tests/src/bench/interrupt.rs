//! Ctrl-C during a benchmark: the handler only raises a flag; the bench checks it between
//! steps and returns an error, so every namespace, process and XDP attachment is dropped
//! (and removed) on the way out.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc, OnceLock,
};

use anyhow::{bail, Context, Result};

/// Raised by SIGINT or SIGTERM.
static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

fn flag() -> &'static Arc<AtomicBool> {
    INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Installs the handler for SIGINT and SIGTERM.
pub fn install() -> Result<()> {
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, flag().clone())
            .context("cannot install the interrupt handler")?;
    }
    Ok(())
}

/// Fails once an interrupt arrived, so that the caller unwinds and cleans up.
pub fn check() -> Result<()> {
    if flag().load(Ordering::SeqCst) {
        bail!("interrupted: cleaning up");
    }
    Ok(())
}

/// Sleeps `duration` in small steps, failing early on an interrupt.
pub fn sleep(duration: std::time::Duration) -> Result<()> {
    let end = std::time::Instant::now() + duration;
    loop {
        check()?;
        let now = std::time::Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(std::time::Duration::from_millis(50)));
    }
}
