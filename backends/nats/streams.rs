//! Opening the backend's streams (work, dead-letter, blob, and the key-value buckets' streams)
//! with the replica count the URL asks for (`replicas=N`, default 1).
//!
//! A stream that exists with another replica count is changed with a stream update (a
//! clustered 2.9 server moves a stream between R1 and R3 or R5 in place); when the server
//! refuses, the caller gets [`Error::Config`] for the key `replicas` naming the stream and both
//! counts. More than one replica on a server outside any cluster is that error too, asked
//! before anything is created or updated. A stream is never used silently with a replica count
//! other than the one asked for.

use async_nats::jetstream::stream;

use super::errors::{js_code, nats_err};
use super::Shared;
use crate::error::{Error, Result};

/// `replicas > 1 not supported in non-clustered mode` (JSStreamReplicasNotSupportedErr).
const REPLICAS_NOT_SUPPORTED: u64 = 10074;

/// `no suitable peers for placement` (JSClusterNoPeersErr): fewer servers are up than replicas.
const NO_SUITABLE_PEERS: u64 = 10005;

/// `stream name already in use with a different configuration`.
const STREAM_NAME_IN_USE: u64 = 10058;

/// The replica count a stream's configuration states (0, which a server may report for a
/// stream created without one, means 1).
fn replicas_of(config: &stream::Config) -> usize {
    config.num_replicas.max(1)
}

/// Opens the stream `config` names, creating it with [`Shared::replicas`] replicas if it is
/// missing, and bringing an existing one to that count. `what` says what the stream is for
/// in errors ("the stream of queue q").
pub(crate) async fn open(
    shared: &Shared,
    mut config: stream::Config,
    what: &str,
) -> Result<stream::Stream> {
    let wanted = shared.replicas;
    config.num_replicas = wanted;
    let name = config.name.clone();
    // A 2.9 server outside any cluster refuses to create a stream with replicas but accepts an
    // update to 3 and reports 3 from then on, with one copy: ask the server, not the stream.
    if wanted > 1 && shared.client.server_info().cluster.is_none() {
        return Err(Error::config(
            "replicas",
            format!(
                "{what} ({name}) cannot have {wanted} replicas: the server is not part of a \
                 cluster (use replicas=1, the default)"
            ),
        ));
    }
    let stream = match shared.js.get_or_create_stream(config).await {
        Ok(s) => s,
        // A concurrent opener created it first (with settings the server saw as different).
        Err(e) if js_code(&e.kind()) == Some(STREAM_NAME_IN_USE) => shared
            .js
            .get_stream(&name)
            .await
            .map_err(|e| nats_err(&format!("cannot open {what}"), e))?,
        Err(e) if js_code(&e.kind()) == Some(REPLICAS_NOT_SUPPORTED) => {
            return Err(Error::config(
                "replicas",
                format!(
                    "cannot create {what} ({name}) with {wanted} replicas: the server is not \
                     part of a JetStream cluster ({e})"
                ),
            ))
        }
        Err(e) if js_code(&e.kind()) == Some(NO_SUITABLE_PEERS) => {
            return Err(Error::temporary(
                super::BACKEND,
                format!(
                    "cannot create {what} ({name}) with {wanted} replicas: fewer than {wanted} \
                     servers of the cluster are up with JetStream ({e})"
                ),
                None,
            ))
        }
        Err(e) => return Err(nats_err(&format!("cannot open {what}"), e)),
    };
    let found = replicas_of(&stream.cached_info().config);
    if found == wanted {
        return Ok(stream);
    }
    // Every other setting (an operator's limits) is kept.
    let mut update = stream.cached_info().config.clone();
    update.num_replicas = wanted;
    if let Err(e) = shared.js.update_stream(&update).await {
        let e = nats_err("update", e);
        if e.is_temporary() {
            return Err(Error::temporary(
                super::BACKEND,
                format!(
                    "cannot change the replicas of {what} ({name}) from {found} to {wanted}: {e}"
                ),
                None,
            ));
        }
        return Err(Error::config(
            "replicas",
            format!(
                "{what} ({name}) has {found} replica(s) and the URL asks for {wanted}; the \
                 server refused to change it: {e}"
            ),
        ));
    }
    tracing::info!(stream = %name, from = found, to = wanted, "stream replicas changed");
    let stream = shared
        .js
        .get_stream(&name)
        .await
        .map_err(|e| nats_err(&format!("cannot open {what}"), e))?;
    let now = replicas_of(&stream.cached_info().config);
    if now != wanted {
        return Err(Error::config(
            "replicas",
            format!(
                "{what} ({name}) still has {now} replica(s) after an update to {wanted}: the \
                 server did not apply it"
            ),
        ));
    }
    Ok(stream)
}
