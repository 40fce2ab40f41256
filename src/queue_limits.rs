//! Per-queue limits that hold across every worker: a [`Rate`] (at most N tasks started per
//! interval) and a concurrency cap (at most N tasks of the queue running at once).
//!
//! The model only: the worker enforces them through the lock manager
//! ([`Worker`](crate::Worker)), the registry stores the ones set at runtime
//! ([`Registry::set_queue_limits`](crate::Registry::set_queue_limits)).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The most tasks a rate or a concurrency cap may count (more slots would make every permit
/// slow to find, and no quota is that fine-grained).
pub const MAX_LIMIT_COUNT: u32 = 10_000;
/// The shortest interval of a [`Rate`].
pub const MIN_RATE_INTERVAL: Duration = Duration::from_millis(10);
/// The longest interval of a [`Rate`] (a slot is a lock held for the interval, and the NATS
/// lock bucket keeps a lock at most 23 h).
pub const MAX_RATE_INTERVAL: Duration = Duration::from_secs(12 * 3600);

/// At most `count` tasks started per `interval`, in any window of that length.
///
/// Written `COUNT/UNIT` or `COUNT/DURATION`: `60/min`, `10/s`, `1000/h`, `5/30s`, `2/500ms`.
///
/// ```
/// use agent_orchestra::queue_limits::Rate;
/// use std::time::Duration;
/// let r: Rate = "60/min".parse().unwrap();
/// assert_eq!((r.count(), r.interval()), (60, Duration::from_secs(60)));
/// assert_eq!("5/30s".parse::<Rate>().unwrap().to_string(), "5/30s");
/// assert!("0/s".parse::<Rate>().is_err());
/// assert!("ten/s".parse::<Rate>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rate {
    count: u32,
    interval: Duration,
}

impl Rate {
    /// `count` per `interval`; errors ([`Error::InvalidInput`]) outside 1..=[`MAX_LIMIT_COUNT`]
    /// and [`MIN_RATE_INTERVAL`]..=[`MAX_RATE_INTERVAL`].
    pub fn new(count: u32, interval: Duration) -> Result<Self> {
        if count == 0 || count > MAX_LIMIT_COUNT {
            return Err(Error::invalid(
                "rate",
                format!("the count must be between 1 and {MAX_LIMIT_COUNT}, got {count}"),
            ));
        }
        if !(MIN_RATE_INTERVAL..=MAX_RATE_INTERVAL).contains(&interval) {
            return Err(Error::invalid(
                "rate",
                format!(
                    "the interval must be between 10ms and 12h, got {}",
                    crate::clock::format_duration(interval)
                ),
            ));
        }
        Ok(Rate { count, interval })
    }

    /// Tasks started at most per interval.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The window's length.
    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// The unit names a rate may use instead of a duration.
fn unit(name: &str) -> Option<Duration> {
    let secs = match name {
        "ms" => return Some(Duration::from_millis(1)),
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hr" | "hour" => 3600,
        _ => return None,
    };
    Some(Duration::from_secs(secs))
}

impl FromStr for Rate {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: String| {
            Error::invalid(
                "rate",
                format!("{why} (write COUNT/UNIT or COUNT/DURATION: 60/min, 10/s, 1000/h, 5/30s)"),
            )
        };
        let (count, per) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| bad(format!("{text:?} has no '/'")))?;
        let count: u32 = count
            .trim()
            .parse()
            .map_err(|_| bad(format!("{:?} is not a whole number", count.trim())))?;
        let per = per.trim();
        let interval = match unit(per) {
            Some(d) => d,
            None => crate::clock::parse_duration(per).map_err(bad)?,
        };
        Rate::new(count, interval)
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per = match self.interval.as_millis() {
            1000 => "s".to_string(),
            60_000 => "min".to_string(),
            3_600_000 => "h".to_string(),
            _ => crate::clock::format_duration(self.interval),
        };
        write!(f, "{}/{per}", self.count)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A queue's limits across every worker; both `None`: unlimited.
///
/// ```
/// use agent_orchestra::queue_limits::QueueLimits;
/// let l = QueueLimits::parse(Some("10/s"), Some(4)).unwrap();
/// assert_eq!(l.to_string(), "rate 10/s, concurrency 4");
/// assert!(QueueLimits::parse(None, Some(0)).is_err());
/// assert!(QueueLimits::default().is_unlimited());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueLimits {
    /// At most this many tasks started per interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// At most this many tasks running at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

impl QueueLimits {
    /// From a rate as written (`"60/min"`) and a concurrency cap; checks both.
    pub fn parse(rate: Option<&str>, concurrency: Option<u32>) -> Result<Self> {
        let limits = QueueLimits {
            rate: rate.map(str::parse).transpose()?,
            concurrency,
        };
        limits.validate()?;
        Ok(limits)
    }

    /// Checks the concurrency cap (1..=[`MAX_LIMIT_COUNT`]); a [`Rate`] is checked when made.
    pub fn validate(&self) -> Result<()> {
        match self.concurrency {
            Some(n) if n == 0 || n > MAX_LIMIT_COUNT => Err(Error::invalid(
                "concurrency",
                format!("must be between 1 and {MAX_LIMIT_COUNT}, got {n}"),
            )),
            _ => Ok(()),
        }
    }

    /// Whether neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.rate.is_none() && self.concurrency.is_none()
    }
}

impl fmt::Display for QueueLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.rate, self.concurrency) {
            (None, None) => f.write_str("unlimited"),
            (Some(r), None) => write!(f, "rate {r}"),
            (None, Some(c)) => write!(f, "concurrency {c}"),
            (Some(r), Some(c)) => write!(f, "rate {r}, concurrency {c}"),
        }
    }
}

/// Sets `queue`'s limits in `map` (unlimited ones remove its entry); returns whether the map
/// changed. What every backend's [`Registry::set_queue_limits`](crate::Registry::set_queue_limits)
/// does to its stored map.
pub fn apply_limits(
    map: &mut std::collections::BTreeMap<crate::model::QueueName, QueueLimits>,
    queue: &crate::model::QueueName,
    limits: &QueueLimits,
) -> bool {
    if limits.is_unlimited() {
        return map.remove(queue).is_some();
    }
    map.insert(queue.clone(), *limits).as_ref() != Some(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_every_written_form() {
        let cases = [
            ("60/min", 60, 60_000),
            ("10/s", 10, 1000),
            ("10/sec", 10, 1000),
            ("1000/h", 1000, 3_600_000),
            ("5/30s", 5, 30_000),
            ("2/500ms", 2, 500),
            (" 3 / 1m30s ", 3, 90_000),
        ];
        for (text, count, ms) in cases {
            let r: Rate = text.parse().unwrap();
            assert_eq!(r.count(), count, "{text}");
            assert_eq!(r.interval(), Duration::from_millis(ms), "{text}");
            assert_eq!(r.to_string().parse::<Rate>().unwrap(), r, "{text}");
        }
    }

    #[test]
    fn bad_rates_are_invalid_input() {
        for text in [
            "",
            "10",
            "/s",
            "x/s",
            "-1/s",
            "0/s",
            "10/0s",
            "10/fortnight",
            "10/1ms",
            "10/13h",
            "10001/s",
            "1.5/s",
        ] {
            let e = text.parse::<Rate>().unwrap_err();
            assert!(matches!(e, Error::InvalidInput { .. }), "{text}: {e}");
        }
    }

    #[test]
    fn limits_round_trip_through_json() {
        let l = QueueLimits::parse(Some("60/min"), Some(3)).unwrap();
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"rate":"60/min","concurrency":3}"#);
        assert_eq!(serde_json::from_str::<QueueLimits>(&json).unwrap(), l);
        assert!(QueueLimits::parse(None, Some(10_001)).is_err());
    }
}
