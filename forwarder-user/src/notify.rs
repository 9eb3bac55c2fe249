//! The service manager's readiness protocol (sd_notify): systemd's `Type=notify` units wait
//! for `READY=1`, which forwarder sends only once every program is attached and the config
//! is applied, so a supervisor that starts clients after it never sees them refused. Without
//! `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        debug!("sd_notify: {e}");
    }
}

/// Programs attached, config applied: forwarding works.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts (systemd wants the monotonic time with it, for `Type=notify-reload`).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}
