//! Time arithmetic that never panics. Durations come from users (flags, configuration files,
//! library callers): `Utc::now() + ` a duration of 10^11 days panics in chrono, and so does an
//! `Instant` pushed past its range. Where a duration is configured it is checked (a typed error
//! says how long it may be); everywhere else it is capped at [`FAR`], a hundred years, which
//! every clock here can add and subtract.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// The longest duration any computation uses: a hundred years.
pub(crate) const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);

/// `d`, at most [`FAR`]: safe to add to any `Instant` or `DateTime` of this century.
pub(crate) fn capped(d: Duration) -> Duration {
    d.min(FAR)
}

/// `d` (at most [`FAR`]) as a chrono span.
pub(crate) fn span(d: Duration) -> TimeDelta {
    TimeDelta::from_std(capped(d)).unwrap_or_else(|_| TimeDelta::days(36_500))
}

/// `t + d`, with `d` at most [`FAR`].
pub(crate) fn after(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_add_signed(span(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `t - d`, with `d` at most [`FAR`].
pub(crate) fn before(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t.checked_sub_signed(span(d))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `t` in microseconds since the epoch: the time key of every task index (in process, Redis
/// scores, NATS headers) and of list cursors.
pub(crate) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_saturate_instead_of_panicking() {
        let huge = Duration::from_secs(99_999_999_999 * 86_400);
        let now = Utc::now();
        assert_eq!(after(now, huge), after(now, FAR));
        assert_eq!(before(now, huge), before(now, FAR));
        assert!(after(now, huge) > now && before(now, huge) < now);
        let _ = std::time::Instant::now() + capped(Duration::MAX);
        let _ = tokio::time::Instant::now() + capped(Duration::MAX);
        assert_eq!(
            after(now, Duration::from_secs(2)),
            now + TimeDelta::seconds(2)
        );
    }
}
