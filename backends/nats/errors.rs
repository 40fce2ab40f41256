//! Converting async-nats errors into [`crate::Error`], temporary or permanent.

use std::fmt::{Debug, Display};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::ErrorCode;

use super::BACKEND;
use crate::error::Error;

/// Wraps a client error. Connection trouble, timeouts, missing responders (JetStream not up
/// yet after a restart) and server errors with a 5xx status are temporary; everything else is
/// permanent.
pub(crate) fn nats_err<K>(what: &str, e: async_nats::error::Error<K>) -> Error
where
    K: Clone + Debug + Display + PartialEq + Send + Sync + 'static,
{
    let temporary = is_temporary_kind(&format!("{:?}", e.kind()));
    let message = format!("{what}: {e}");
    let source = Some(Box::new(e) as crate::error::BoxError);
    if temporary {
        Error::temporary(BACKEND, message, source)
    } else {
        Error::permanent(BACKEND, message, source)
    }
}

/// Wraps a boxed client error (the type async-nats uses for message streams and acks).
pub(crate) fn boxed_err(what: &str, e: async_nats::Error) -> Error {
    let text = e.to_string();
    let permanent = text.contains("not a JetStream message") || text.contains("Serialize");
    let message = format!("{what}: {text}");
    if permanent {
        Error::permanent(BACKEND, message, Some(e))
    } else {
        Error::temporary(BACKEND, message, Some(e))
    }
}

fn is_temporary_kind(kind: &str) -> bool {
    if let Some(rest) = kind.strip_prefix("JetStream(") {
        // A JetStream API error: temporary only when the server says it is unavailable
        // (5xx, 10008 "JetStream system temporarily unavailable"), or when too few servers are
        // up to place a replicated stream (10005 "no suitable peers for placement": a node of
        // the cluster is down or restarting; retried within the caller's budget).
        return rest.contains("code: 5")
            || rest.contains("ErrorCode(10008)")
            || rest.contains("ErrorCode(10005)");
    }
    const TEMPORARY: [&str; 14] = [
        "TimedOut",
        "NoResponders",
        "Request",
        "JetStreamUnavailable",
        "BrokenPipe",
        "Subscribe",
        "Pull",
        "Flush",
        "Publish",
        "Io",
        "Disconnected",
        "MaxAckPending",
        "StreamNotFound",
        "Other",
    ];
    TEMPORARY.iter().any(|t| kind.starts_with(t))
}

/// The server-side error code of a JetStream API error kind, if it is one.
pub(crate) fn js_code<K: Debug>(kind: &K) -> Option<u64> {
    // `JetStream(Error { code: 400, err_code: ErrorCode(10058), .. })`
    let text = format!("{kind:?}");
    let start = text.find("ErrorCode(")? + "ErrorCode(".len();
    let end = start + text[start..].find(')')?;
    text[start..end].parse().ok()
}

/// True if a publish failed its `Nats-Expected-Last-Subject-Sequence` check.
pub(crate) fn is_wrong_last_sequence(e: &async_nats::jetstream::context::PublishError) -> bool {
    e.kind() == PublishErrorKind::WrongLastSequence
        || e.to_string().contains(&format!(
            "error code {}",
            ErrorCode::STREAM_WRONG_LAST_SEQUENCE.0
        ))
}

#[cfg(test)]
mod tests {
    use super::is_temporary_kind;

    #[test]
    fn placement_without_enough_servers_is_temporary() {
        let kind = |code: u16, err: u64| {
            format!("JetStream(Error {{ code: {code}, err_code: ErrorCode({err}), description: Some(\"x\") }})")
        };
        assert!(is_temporary_kind(&kind(400, 10005)), "no suitable peers");
        assert!(is_temporary_kind(&kind(503, 10008)), "unavailable");
        assert!(is_temporary_kind(&kind(500, 10118)), "a 5xx");
        assert!(
            !is_temporary_kind(&kind(400, 10058)),
            "name in use is permanent"
        );
        assert!(
            !is_temporary_kind(&kind(404, 10059)),
            "stream not found (API) is permanent"
        );
    }
}
