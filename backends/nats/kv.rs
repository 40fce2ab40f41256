//! A thin key-value layer over a JetStream KV bucket's stream.
//!
//! The bucket is an ordinary JetStream KV bucket (stream `KV_<bucket>`, subjects
//! `$KV.<bucket>.<key>`, history 1), so `nats kv` tools can read it. We write to it with raw
//! publishes because we need our own headers on each revision (the registry's index fields)
//! and compare-and-set on every write (`Nats-Expected-Last-Subject-Sequence`); reads are direct
//! gets of the last message of the key's subject.

use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream;
use async_nats::HeaderMap;

use super::errors::{is_wrong_last_sequence, nats_err};
use super::names::encode_key;
use super::streams;
use super::Shared;
use crate::error::Result;

/// `KV-Operation` header, as written by every KV client.
const OPERATION: &str = "KV-Operation";

/// The latest revision of a key.
#[derive(Debug)]
pub(crate) struct Entry {
    message: StreamMessage,
    /// False for a delete or purge marker.
    pub(crate) live: bool,
}

impl Entry {
    /// The key's revision (the stream sequence of this write).
    pub(crate) fn revision(&self) -> u64 {
        self.message.sequence
    }

    /// The stored value.
    pub(crate) fn value(&self) -> &[u8] {
        &self.message.payload
    }

    /// The headers of this write.
    pub(crate) fn headers(&self) -> &HeaderMap {
        &self.message.headers
    }
}

/// True if a KV message is a delete or purge marker.
pub(crate) fn is_marker(headers: Option<&HeaderMap>) -> bool {
    headers
        .and_then(|h| h.get(OPERATION))
        .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE")
}

/// Outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    /// Written; the new revision.
    Done(u64),
    /// The key was not at the expected revision.
    Stale,
}

/// One bucket.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    shared: Shared,
    pub(crate) bucket: String,
    stream: stream::Stream,
    subject_prefix: String,
}

impl Bucket {
    /// Opens the bucket, creating it (history 1, file storage, `max_age` if given) if missing.
    pub(crate) async fn open(
        shared: Shared,
        bucket: String,
        max_age: Option<Duration>,
    ) -> Result<Bucket> {
        let stream_name = format!("KV_{bucket}");
        // The usual KV bucket conventions, set by hand: the client's own bucket creation sends
        // fields a 2.9 server answers in a form it cannot parse.
        let max_age = max_age.unwrap_or_default();
        let config = stream::Config {
            name: stream_name,
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            storage: stream::StorageType::File,
            max_age,
            duplicate_window: if max_age.is_zero() {
                Duration::from_secs(120)
            } else {
                max_age.min(Duration::from_secs(120))
            },
            ..Default::default()
        };
        let stream = streams::open(&shared, config, &format!("bucket {bucket}")).await?;
        Ok(Bucket {
            subject_prefix: format!("$KV.{bucket}."),
            shared,
            bucket,
            stream,
        })
    }

    /// The bucket's stream.
    pub(crate) fn stream(&self) -> &stream::Stream {
        &self.stream
    }

    /// The subject of a (not yet encoded) key.
    pub(crate) fn subject(&self, key: &str) -> String {
        format!("{}{}", self.subject_prefix, encode_key(key))
    }

    /// The (encoded) key of a subject of this bucket.
    pub(crate) fn key_of<'a>(&self, subject: &'a str) -> Option<&'a str> {
        subject.strip_prefix(&self.subject_prefix)
    }

    /// The subject filter covering every key.
    pub(crate) fn all_keys(&self) -> String {
        format!("{}>", self.subject_prefix)
    }

    /// The latest revision of `key` (a marker counts, with `live == false`), or `None`.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Entry>> {
        match self
            .stream
            .direct_get_last_for_subject(self.subject(key))
            .await
        {
            Ok(message) => {
                let live = !is_marker(Some(&message.headers));
                Ok(Some(Entry { message, live }))
            }
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(nats_err(
                &format!("cannot read {key} from {}", self.bucket),
                e,
            )),
        }
    }

    /// Sends a write of `key` expecting it at `expected` (0: no message at all), without
    /// waiting for the server's answer.
    pub(crate) async fn send(
        &self,
        key: &str,
        headers: HeaderMap,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<PublishAckFuture> {
        let publish = Publish::build()
            .headers(headers)
            .payload(value.into())
            .expected_last_subject_sequence(expected);
        self.shared
            .js
            .send_publish(self.subject(key), publish)
            .await
            .map_err(|e| nats_err(&format!("cannot write {key} to {}", self.bucket), e))
    }

    /// Waits for the answer to [`Bucket::send`].
    pub(crate) async fn settle(&self, key: &str, ack: PublishAckFuture) -> Result<Write> {
        match ack.await {
            Ok(a) => Ok(Write::Done(a.sequence)),
            Err(e) if is_wrong_last_sequence(&e) => Ok(Write::Stale),
            Err(e) => Err(nats_err(
                &format!("cannot write {key} to {}", self.bucket),
                e,
            )),
        }
    }

    /// Writes `key` if it is at revision `expected` (0: absent).
    pub(crate) async fn put(
        &self,
        key: &str,
        headers: HeaderMap,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<Write> {
        let ack = self.send(key, headers, value, expected).await?;
        self.settle(key, ack).await
    }

    /// Writes `key` if it does not exist (absent, deleted or purged).
    pub(crate) async fn create(
        &self,
        key: &str,
        headers: HeaderMap,
        value: Vec<u8>,
    ) -> Result<Write> {
        match self.put(key, headers.clone(), value.clone(), 0).await? {
            Write::Done(r) => Ok(Write::Done(r)),
            Write::Stale => match self.get(key).await? {
                Some(e) if !e.live => self.put(key, headers, value, e.revision()).await,
                _ => Ok(Write::Stale),
            },
        }
    }

    /// Sends a delete of `key` (a `DEL` marker; with history 1 it replaces the value) if it is
    /// at revision `expected`. No `Nats-Rollup` purge: on a 2.9 server a subject purge can make
    /// a running consumer skip the messages published right after it.
    pub(crate) async fn send_delete(&self, key: &str, expected: u64) -> Result<PublishAckFuture> {
        let mut headers = HeaderMap::new();
        headers.insert(OPERATION, "DEL");
        self.send(key, headers, Vec::new(), expected).await
    }

    /// Deletes `key` (a delete marker) if it is at revision `expected`.
    pub(crate) async fn delete(&self, key: &str, expected: u64) -> Result<Write> {
        let mut headers = HeaderMap::new();
        headers.insert(OPERATION, "DEL");
        self.put(key, headers, Vec::new(), expected).await
    }

    /// The stream's last sequence (one round trip).
    pub(crate) async fn last_sequence(&self) -> Result<u64> {
        let mut s = self.stream.clone();
        let info = s
            .info()
            .await
            .map_err(|e| nats_err(&format!("cannot read the state of {}", self.bucket), e))?;
        Ok(info.state.last_sequence)
    }
}
