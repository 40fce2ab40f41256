//! Payloads larger than one NATS message (the server's `max_payload`, 1 MiB by default).
//!
//! A large payload is cut into chunks stored in the `{prefix}ORCH_BLOBS` stream under
//! `{prefix}orch.blob.<id>.<index>`; the message that refers to it carries an `Orch-Blob:
//! <id>;<len>;<chunks>` header and an empty body. Chunks are written before the referring
//! message (all publishes in flight at once) and read back with concurrent direct gets. They are
//! purged when the referring message is acked or the task is purged.

use std::sync::Arc;

use async_nats::jetstream::stream;
use async_nats::HeaderMap;
use futures::future::try_join_all;
use tokio::sync::OnceCell;

use super::errors::nats_err;
use super::{Shared, BACKEND};
use crate::error::{Error, Result};

/// The header naming a blob.
pub(crate) const BLOB_HEADER: &str = "Orch-Blob";
/// Chunks of one blob read at once.
const READ_AHEAD: usize = 16;
/// Room left for headers when deciding whether a payload fits in one message.
const HEADER_ROOM: usize = 16 * 1024;

/// A reference to a stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlobRef {
    pub(crate) id: String,
    pub(crate) len: usize,
    pub(crate) chunks: usize,
}

impl BlobRef {
    pub(crate) fn header_value(&self) -> String {
        format!("{};{};{}", self.id, self.len, self.chunks)
    }

    pub(crate) fn parse(v: &str) -> Result<BlobRef> {
        let bad = || {
            Error::permanent(
                BACKEND,
                format!("malformed {BLOB_HEADER} header {v:?}"),
                None,
            )
        };
        let mut it = v.split(';');
        let id = it.next().filter(|s| !s.is_empty()).ok_or_else(bad)?;
        let len = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let chunks = it.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        Ok(BlobRef {
            id: id.to_string(),
            len,
            chunks,
        })
    }

    /// The blob named in `headers`, if any.
    pub(crate) fn from_headers(headers: Option<&HeaderMap>) -> Result<Option<BlobRef>> {
        match headers.and_then(|h| h.get(BLOB_HEADER)) {
            Some(v) => BlobRef::parse(v.as_str()).map(Some),
            None => Ok(None),
        }
    }
}

/// The blob store of one prefix.
#[derive(Debug)]
pub(crate) struct Blobs {
    shared: Shared,
    stream: OnceCell<stream::Stream>,
}

impl Blobs {
    pub(crate) fn new(shared: Shared) -> Arc<Self> {
        Arc::new(Blobs {
            shared,
            stream: OnceCell::new(),
        })
    }

    /// True if `len` bytes (plus headers) need a blob.
    pub(crate) fn too_large(&self, len: usize) -> bool {
        len + HEADER_ROOM > self.shared.max_payload
    }

    fn chunk_size(&self) -> usize {
        (self.shared.max_payload - HEADER_ROOM).max(1024)
    }

    async fn stream(&self) -> Result<&stream::Stream> {
        self.stream
            .get_or_try_init(|| async {
                let names = &self.shared.names;
                let config = stream::Config {
                    name: names.blob_stream(),
                    subjects: vec![format!("{}.>", names.blob_subject_base())],
                    retention: stream::RetentionPolicy::Limits,
                    storage: stream::StorageType::File,
                    allow_direct: true,
                    discard: stream::DiscardPolicy::Old,
                    ..Default::default()
                };
                super::streams::open(&self.shared, config, "the blob stream").await
            })
            .await
    }

    fn subject(&self, id: &str, index: usize) -> String {
        format!("{}.{id}.{index}", self.shared.names.blob_subject_base())
    }

    /// Stores `data`, all chunks in flight at once.
    pub(crate) async fn put(&self, data: &[u8]) -> Result<BlobRef> {
        self.stream().await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        let size = self.chunk_size();
        let chunks = data.chunks(size).count();
        // All chunks sent again when an answer is missing (a stream just created whose
        // subjects a node does not route yet, a leader lost): a chunk is read as the last
        // message of its own subject, so a second copy changes nothing.
        super::retry::within_budget("store a payload", || async {
            let mut acks = Vec::with_capacity(chunks);
            for (i, chunk) in data.chunks(size).enumerate() {
                let ack = self
                    .shared
                    .js
                    .publish(self.subject(&id, i), chunk.to_vec().into())
                    .await
                    .map_err(|e| nats_err("cannot store a payload chunk", e))?;
                acks.push(ack);
            }
            try_join_all(acks.into_iter().map(|a| async move {
                a.await
                    .map_err(|e| nats_err("cannot store a payload chunk", e))
            }))
            .await
            .map(drop)
        })
        .await?;
        Ok(BlobRef {
            id,
            len: data.len(),
            chunks,
        })
    }

    /// Reads a blob back, [`READ_AHEAD`] chunks at a time. The header's counts come from
    /// whoever wrote the message: nothing is allocated or requested on their word alone (a
    /// header claiming a billion chunks or bytes fails at its first missing chunk, or as soon
    /// as the chunks read exceed the length it claims).
    pub(crate) async fn get(&self, r: &BlobRef) -> Result<Vec<u8>> {
        let stream = self.stream().await?;
        let mut out = Vec::new();
        let mut next = 0;
        while next < r.chunks {
            let end = r.chunks.min(next.saturating_add(READ_AHEAD));
            let parts = try_join_all((next..end).map(|i| {
                let subject = self.subject(&r.id, i);
                async move {
                    stream
                        .direct_get_last_for_subject(subject)
                        .await
                        .map(|m| m.payload.to_vec())
                        .map_err(|e| nats_err("cannot read a payload chunk", e))
                }
            }))
            .await?;
            for p in parts {
                out.extend_from_slice(&p);
            }
            if out.len() > r.len {
                break;
            }
            next = end;
        }
        if out.len() != r.len {
            return Err(Error::permanent(
                BACKEND,
                format!(
                    "payload {} is {} bytes, expected {}",
                    r.id,
                    out.len(),
                    r.len
                ),
                None,
            ));
        }
        Ok(out)
    }

    /// Deletes a blob's chunks (one purge request).
    pub(crate) async fn delete(&self, r: &BlobRef) -> Result<()> {
        let stream = self.stream().await?;
        stream
            .purge()
            .filter(format!(
                "{}.{}.>",
                self.shared.names.blob_subject_base(),
                r.id
            ))
            .await
            .map_err(|e| nats_err("cannot delete a payload's chunks", e))?;
        Ok(())
    }
}

/// Puts `payload` inline or as a blob; returns the body to publish and the header to add.
pub(crate) async fn store_payload(
    blobs: &Blobs,
    payload: Vec<u8>,
) -> Result<(Vec<u8>, Option<BlobRef>)> {
    if blobs.too_large(payload.len()) {
        let r = blobs.put(&payload).await?;
        Ok((Vec::new(), Some(r)))
    } else {
        Ok((payload, None))
    }
}

/// Reads a message body back, following a blob reference when there is one.
pub(crate) async fn load_payload(
    blobs: &Blobs,
    headers: Option<&HeaderMap>,
    body: &[u8],
) -> Result<Vec<u8>> {
    match BlobRef::from_headers(headers)? {
        Some(r) => blobs.get(&r).await,
        None => Ok(body.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_refs_round_trip_through_their_header() {
        let r = BlobRef {
            id: "abc".into(),
            len: 10,
            chunks: 2,
        };
        assert_eq!(BlobRef::parse(&r.header_value()).unwrap(), r);
        assert!(BlobRef::parse("x;y").is_err());
    }
}
