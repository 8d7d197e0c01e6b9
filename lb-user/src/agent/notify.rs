//! systemd's notification protocol (`Type=notify`): `READY=1` once the dataplane is
//! attached (or adopted) and the endpoints serve, `RELOADING=1` … `READY=1` around a
//! reload, `STOPPING=1` at the end, and `WATCHDOG=1` from the agent's own loop while its
//! engine runs. Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// The agent serves.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A reload starts.
pub fn reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The agent stops (the dataplane stays).
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The agent's loop is alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to feed the watchdog: half the service manager's `WatchdogSec`, if it set one.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}
