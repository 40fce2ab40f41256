//! Configuration shared by the CLI and embedding services.

/// Serde helpers for `Option<Duration>` written as humane strings (`"250ms"`, `"30s"`, `"5m"`,
/// `"2h"`) or a number of seconds.
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
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(f64),
            Text(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Secs(s)) if s >= 0.0 && s.is_finite() => Ok(Some(Duration::from_secs_f64(s))),
            Some(Raw::Secs(s)) => Err(serde::de::Error::custom(format!(
                "duration must be a non-negative number of seconds, got {s}"
            ))),
            Some(Raw::Text(t)) => super::parse_duration(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"2h"` or a bare number of seconds.
///
/// ```
/// use agent_orchestra::config::parse_duration;
/// use std::time::Duration;
/// assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
/// assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
/// assert!(parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (examples: 250ms, 30s, 5m, 2h)"))?;
    if !(n >= 0.0 && n.is_finite()) {
        return Err(format!("{text:?}: a duration must be non-negative"));
    }
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{text:?} has unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) || ms == 0 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

/// Serde helpers for a `Duration` written as a humane string or a number of seconds.
pub mod duration_serde {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    /// Serializes as a string like `"30s"` or `"250ms"`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    /// Accepts a duration string or a number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        super::duration_opt::deserialize(d)?
            .ok_or_else(|| serde::de::Error::custom("a duration is required"))
    }
}
