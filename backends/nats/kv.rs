//! A thin key-value layer over a JetStream KV bucket's stream.
//!
//! The bucket is an ordinary JetStream KV bucket (stream `KV_<bucket>`, subjects
//! `$KV.<bucket>.<key>`, history 1), so `nats kv` tools can read it. We write to it with raw
//! publishes because we need our own headers on each revision (the registry's index fields)
//! and compare-and-set on every write (`Nats-Expected-Last-Subject-Sequence`), each with a
//! `Nats-Msg-Id` of its own so that a retried write is never stored twice; reads are direct
//! gets of the last message of the key's subject (from the stream's leader when the bucket
//! has several replicas, see [`Bucket::get`]).

use std::time::Duration;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream;
use async_nats::HeaderMap;

use super::errors::{is_wrong_last_sequence, js_code, nats_err};
use super::names::encode_key;
use super::Shared;
use super::{retry, streams};
use crate::error::{Error, Result};

/// `KV-Operation` header, as written by every KV client.
const OPERATION: &str = "KV-Operation";

/// The header carrying a write's id, which JetStream keeps with the message.
const MSG_ID: &str = "Nats-Msg-Id";

/// `stream not found` (JSStreamNotFoundErr).
const STREAM_NOT_FOUND: u64 = 10059;

/// Reads of a key that decide whether a write answered "duplicate" was stored.
const CONFIRM_READS: usize = 3;

/// A write sent, its answer not awaited yet.
pub(crate) struct Sent {
    ack: PublishAckFuture,
    id: String,
}

/// A fresh id for one write (its `Nats-Msg-Id`).
pub(crate) fn write_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

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

    fn of(message: StreamMessage) -> Entry {
        let live = !is_marker(Some(&message.headers));
        Entry { message, live }
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
    ///
    /// "No such key" is only believed from the stream's leader: a direct get (answered by any
    /// replica, or by a node that is still recovering the stream after a restart) that finds
    /// nothing is asked again of the leader, and with more than one replica every read goes to
    /// the leader. A stream that has no leader, or that a restarting node does not know yet,
    /// is a temporary error, retried within the [`retry::BUDGET`]: a read that races a leader
    /// election never answers "not found" for a key that exists.
    pub(crate) async fn get(&self, key: &str) -> Result<Option<Entry>> {
        let subject = self.subject(key);
        retry::within_budget("read a key", || self.get_once(key, &subject)).await
    }

    async fn get_once(&self, key: &str, subject: &str) -> Result<Option<Entry>> {
        if self.shared.replicas == 1 {
            match self.stream.direct_get_last_for_subject(subject).await {
                Ok(message) => return Ok(Some(Entry::of(message))),
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {}
                Err(e) => return Err(self.read_error(key, e)),
            }
        }
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(Some(Entry::of(message))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.read_error(key, e)),
        }
    }

    /// A failed read: temporary when the server says that it does not know the stream (it
    /// exists: this process opened it; a node that restarts answers so until it has recovered
    /// the stream) or when the client error is a temporary one.
    fn read_error<K>(&self, key: &str, e: async_nats::error::Error<K>) -> Error
    where
        K: Clone + std::fmt::Debug + std::fmt::Display + PartialEq + Send + Sync + 'static,
    {
        let what = format!("cannot read {key} from {}", self.bucket);
        if js_code(&e.kind()) == Some(STREAM_NOT_FOUND) {
            return retry::unsettled(format!("{what}: {e} (during a restart or an election)"));
        }
        nats_err(&what, e)
    }

    /// Sends a write of `key` expecting it at `expected` (0: no message at all), without
    /// waiting for the server's answer. `id` (from [`write_id`]) is its `Nats-Msg-Id`: the
    /// same write sent again with the same id within the duplicate window is not stored twice.
    pub(crate) async fn send(
        &self,
        key: &str,
        headers: HeaderMap,
        value: Vec<u8>,
        expected: u64,
        id: &str,
    ) -> Result<Sent> {
        let publish = Publish::build()
            .headers(headers)
            .payload(value.into())
            .message_id(id)
            .expected_last_subject_sequence(expected);
        let ack = self
            .shared
            .js
            .send_publish(self.subject(key), publish)
            .await
            .map_err(|e| nats_err(&format!("cannot write {key} to {}", self.bucket), e))?;
        Ok(Sent {
            ack,
            id: id.to_string(),
        })
    }

    /// Waits for the answer to [`Bucket::send`].
    ///
    /// An answer "duplicate" is not taken for a success: a clustered 2.9 server gives it to a
    /// resend while the first send of the same id is still being replicated, and that first
    /// send may yet fail its revision check. The write is done only if the key's latest
    /// revision carries its id ([`Bucket::confirm`]).
    pub(crate) async fn settle(&self, key: &str, sent: Sent) -> Result<Write> {
        match sent.ack.await {
            Ok(a) if a.duplicate => self.confirm(key, &sent.id).await,
            Ok(a) => Ok(Write::Done(a.sequence)),
            Err(e) if is_wrong_last_sequence(&e) => Ok(Write::Stale),
            Err(e) => Err(nats_err(
                &format!("cannot write {key} to {}", self.bucket),
                e,
            )),
        }
    }

    /// Whether the write `id` of `key` was stored: `Done` with its revision if the key's latest
    /// revision carries that id, else `Stale`. Read up to three times, 100 ms apart, since a
    /// write still being replicated shows only once it is applied.
    async fn confirm(&self, key: &str, id: &str) -> Result<Write> {
        let subject = self.subject(key);
        for read in 0..CONFIRM_READS {
            if read > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if let Some(e) = self.get_once(key, &subject).await? {
                if e.headers().get(MSG_ID).map(|v| v.as_str()) == Some(id) {
                    return Ok(Write::Done(e.revision()));
                }
            }
        }
        Ok(Write::Stale)
    }

    /// Writes `key` if it is at revision `expected` (0: absent), retrying temporary errors
    /// within the [`retry::BUDGET`].
    pub(crate) async fn put(
        &self,
        key: &str,
        headers: HeaderMap,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<Write> {
        self.put_as(key, headers, value, expected, &write_id(), false)
            .await
    }

    /// [`Bucket::put`] with the write's id given: `maybe_written` says that an earlier send
    /// of this very write (same `id`) got no answer, so that it may be stored already.
    ///
    /// A write that got no answer (a leader lost, a connection moving to another node) is sent
    /// again with the same `Nats-Msg-Id`. If the first one was stored, the server answers the
    /// second as a duplicate, and [`Bucket::settle`] checks that the key's latest revision
    /// carries the write's id; should it answer with a failed revision check instead, the same
    /// check decides: a retried write is never taken for a concurrent one.
    pub(crate) async fn put_as(
        &self,
        key: &str,
        headers: HeaderMap,
        value: Vec<u8>,
        expected: u64,
        id: &str,
        maybe_written: bool,
    ) -> Result<Write> {
        let unanswered = std::sync::atomic::AtomicBool::new(maybe_written);
        retry::within_budget("write a key", || async {
            let sent = async {
                let ack = self
                    .send(key, headers.clone(), value.clone(), expected, id)
                    .await?;
                self.settle(key, ack).await
            }
            .await;
            match sent {
                Ok(Write::Stale) if unanswered.load(std::sync::atomic::Ordering::Relaxed) => {
                    self.confirm(key, id).await
                }
                Err(e) => {
                    unanswered.store(true, std::sync::atomic::Ordering::Relaxed);
                    Err(e)
                }
                done => done,
            }
        })
        .await
    }

    /// Writes `key` if it does not exist (absent, deleted or purged). `id` and
    /// `maybe_written` as for [`Bucket::put_as`].
    pub(crate) async fn create(
        &self,
        key: &str,
        headers: HeaderMap,
        value: Vec<u8>,
        id: &str,
        maybe_written: bool,
    ) -> Result<Write> {
        match self
            .put_as(key, headers.clone(), value.clone(), 0, id, maybe_written)
            .await?
        {
            Write::Done(r) => Ok(Write::Done(r)),
            Write::Stale => match self.get(key).await? {
                Some(e) if !e.live => {
                    self.put_as(key, headers, value, e.revision(), id, maybe_written)
                        .await
                }
                _ => Ok(Write::Stale),
            },
        }
    }

    /// Sends a delete of `key` (a `DEL` marker; with history 1 it replaces the value) if it is
    /// at revision `expected`. No `Nats-Rollup` purge: on a 2.9 server a subject purge can make
    /// a running consumer skip the messages published right after it.
    pub(crate) async fn send_delete(&self, key: &str, expected: u64) -> Result<Sent> {
        let mut headers = HeaderMap::new();
        headers.insert(OPERATION, "DEL");
        self.send(key, headers, Vec::new(), expected, &write_id())
            .await
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
