//! Whether anyone listens to a topic: the state behind [`Bus::may_have_subscribers`] for a
//! backend whose server can be asked (a probe) and whose subscribers announce themselves (a
//! hello).
//!
//! - Subscriptions made through this process's bus count at once ([`Presence::local`]): a
//!   publisher in the same process never skips an event a subscriber of its own could get.
//! - A subscriber elsewhere announces itself when it subscribes (a hello, [`Presence::hello`]).
//! - A periodic probe asks the server whether the topic has subscribers at all, including ones
//!   that never say hello (another client library, a command-line tool); only a probe can turn
//!   the answer to "nobody" ([`Presence::probed`]), and only if no hello arrived since it
//!   started (a subscriber that came after the server answered).
//!
//! Until a first probe answered, the answer is "maybe" (events are published).
//!
//! [`Bus::may_have_subscribers`]: crate::bus::Bus::may_have_subscribers

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Presence {
    local: AtomicUsize,
    remote: AtomicBool,
    /// Hellos seen so far.
    hellos: AtomicU64,
}

impl Default for Presence {
    fn default() -> Self {
        Presence {
            local: AtomicUsize::new(0),
            remote: AtomicBool::new(true),
            hellos: AtomicU64::new(0),
        }
    }
}

/// Counts one subscription of this process while alive.
#[derive(Debug)]
pub(crate) struct LocalListener(Arc<Presence>);

impl Drop for LocalListener {
    fn drop(&mut self) {
        self.0.local.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Presence {
    /// A subscription of this process, counted until the guard drops.
    pub(crate) fn local(self: &Arc<Self>) -> LocalListener {
        self.local.fetch_add(1, Ordering::AcqRel);
        LocalListener(self.clone())
    }

    /// A subscriber elsewhere said hello.
    pub(crate) fn hello(&self) {
        self.hellos.fetch_add(1, Ordering::AcqRel);
        self.remote.store(true, Ordering::Release);
    }

    /// A probe is about to ask the server: the token to give [`Presence::probed`].
    pub(crate) fn probing(&self) -> u64 {
        self.hellos.load(Ordering::Acquire)
    }

    /// What the probe started with `token` found. "Nobody" counts only if no hello came since
    /// (hellos that arrived before the answer must have been noted first).
    pub(crate) fn probed(&self, token: u64, anybody: bool) {
        if anybody {
            self.remote.store(true, Ordering::Release);
        } else if self.hellos.load(Ordering::Acquire) == token {
            self.remote.store(false, Ordering::Release);
        }
    }

    /// Whether an event published now may reach someone.
    pub(crate) fn any(&self) -> bool {
        self.local.load(Ordering::Acquire) > 0 || self.remote.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maybe_until_a_probe_says_nobody() {
        let p = Arc::new(Presence::default());
        assert!(p.any());
        let t = p.probing();
        p.probed(t, false);
        assert!(!p.any());
        let t = p.probing();
        p.probed(t, true);
        assert!(p.any());
    }

    #[test]
    fn local_subscriptions_count_at_once_and_until_dropped() {
        let p = Arc::new(Presence::default());
        let t = p.probing();
        p.probed(t, false);
        let a = p.local();
        let b = p.local();
        assert!(p.any());
        drop(a);
        assert!(p.any());
        drop(b);
        assert!(!p.any());
    }

    #[test]
    fn a_hello_during_a_probe_wins_over_its_nobody() {
        let p = Arc::new(Presence::default());
        let t = p.probing();
        p.probed(t, false);
        let t = p.probing();
        p.hello(); // subscribed after the server answered the probe
        p.probed(t, false);
        assert!(p.any());
        // The next probe, started after the hello, may say nobody again (it left).
        let t = p.probing();
        p.probed(t, false);
        assert!(!p.any());
    }
}
