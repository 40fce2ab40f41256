//! Time arithmetic that never panics. Durations come from users (flags, configuration files,
//! library callers): `Utc::now() + ` a duration of 10^11 days panics in chrono, and so does an
//! `Instant` pushed past its range. Where a duration is configured it is checked (a typed error
//! says how long it may be); everywhere else it is capped at [`FAR`], a hundred years, which
//! every clock here can add and subtract.
//!
//! Durations written by people (`"1m30s"`, `"250ms"`, `"2h 30m"`, or a bare number of seconds)
//! are read here too, by [`parse_duration`] and the serde helpers [`duration_serde`] and
//! [`duration_opt`], and written back by [`format_duration`]: the configuration, the traits'
//! types and the CLI all use them.

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

/// Parses a duration written by a person: units `ms`, `s`, `m`, `h`, `d` (and `w`, `us`,
/// `ns`, and long forms such as `min`, `hours`, `days`), combined as in `1m30s` or `1h 2m`,
/// or a bare number of seconds (`30`, `0.5`). At most a hundred years (`36500d`): longer is a
/// typo, and no clock can add it.
///
/// ```
/// use agent_orchestra::config::parse_duration;
/// use std::time::Duration;
/// assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
/// assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
/// assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
/// assert_eq!(parse_duration("1h 2m").unwrap(), Duration::from_secs(3720));
/// assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
/// assert!(parse_duration("soon").is_err());
/// assert!(parse_duration("99999999999d").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if let Ok(n) = t.parse::<f64>() {
        return seconds(n).map_err(|reason| format!("{text:?}: {reason}"));
    }
    let d = humantime::parse_duration(t).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => {
            format!("{text:?} is too long (at most 36500d)")
        }
        e => format!("{text:?} is not a duration: {e} (examples: 250ms, 30s, 1m30s, 2h, 7d)"),
    })?;
    if d > FAR {
        return Err(format!("{text:?} is too long (at most 36500d)"));
    }
    Ok(d)
}

/// A duration given as a bare number of seconds (a TOML number, or a flag without a unit):
/// non-negative, at most [`FAR`].
pub(crate) fn seconds(s: f64) -> Result<Duration, String> {
    if !(s >= 0.0 && s.is_finite()) {
        return Err(format!(
            "a duration must be a non-negative number of seconds, got {s}"
        ));
    }
    if s > FAR.as_secs_f64() {
        return Err(format!("{s} seconds is too long (at most 36500d)"));
    }
    Duration::try_from_secs_f64(s).map_err(|_| format!("{s} seconds is too long"))
}

/// Formats a duration the way [`parse_duration`] reads it: whole seconds as `"90s"`, anything
/// else in milliseconds (`"1500ms"`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || ms == 0 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Serde helpers for `Option<Duration>` written as a humane string (`"250ms"`, `"1m30s"`,
/// `"2h"`) or a number of seconds: `#[serde(with = "...::duration_opt")]`.
pub mod duration_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Serializes as a string like `"30s"` or `"250ms"`.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    /// Accepts a duration string or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<super::HumaneDuration>::deserialize(d).map(|o| o.map(|h| h.0))
    }
}

/// Serde helpers for a `Duration` written as a humane string or a number of seconds:
/// `#[serde(with = "...::duration_serde")]`.
pub mod duration_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Serializes as a string like `"30s"` or `"250ms"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    /// Accepts a duration string or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::HumaneDuration::deserialize(d).map(|h| h.0)
    }
}

/// A duration read from a string ([`parse_duration`]) or a number of seconds.
pub(crate) struct HumaneDuration(pub(crate) Duration);

impl<'de> serde::Deserialize<'de> for HumaneDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => seconds(s),
            Raw::Text(t) => parse_duration(&t),
        }
        .map(HumaneDuration)
        .map_err(serde::de::Error::custom)
    }
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
    fn durations_combine_units_and_read_bare_seconds() {
        for (text, want) in [
            ("1m30s", Duration::from_secs(90)),
            ("90s", Duration::from_secs(90)),
            ("1h 2m", Duration::from_secs(3720)),
            ("250ms", Duration::from_millis(250)),
            ("7d", Duration::from_secs(7 * 86_400)),
            ("0s", Duration::ZERO),
            (" 30 ", Duration::from_secs(30)),
            ("0.25", Duration::from_millis(250)),
            ("36500d", FAR),
        ] {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
        for bad in ["soon", "", "-5s", "-1", "5 parsecs", "NaN", "inf", "1e300"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        let e = parse_duration("36501d").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        let e = parse_duration("99999999999999999999d").unwrap_err();
        assert!(e.contains("too long"), "{e}");
        let e = parse_duration("soon").unwrap_err();
        assert!(e.contains("1m30s"), "{e}");
    }

    #[test]
    fn formatted_durations_read_back() {
        for d in [
            Duration::ZERO,
            Duration::from_millis(1500),
            Duration::from_secs(90),
            FAR,
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }

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
