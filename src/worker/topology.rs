//! The JetStream streams and consumer the worker relies on, created on
//! start when missing. Everything works on nats-server 2.9: one filter
//! subject, NAK with delay and no consumer BackOff (the two combine wrongly
//! on 2.9), no consumer create actions. What later servers do better is
//! used when the server the worker connects to has it ([`ServerFeatures`]).
//!
//! Every stream is bounded (a largest message and a byte limit), and the
//! settings that protect data are enforced on an existing stream too: the
//! inbound and dead-letter streams refuse new messages when full rather
//! than drop waiting ones, and the inbound stream's duplicate window is the
//! shortest nats-server allows. Anyone who may publish the subject shares
//! that window, so a long one would let a message without a valid key
//! suppress the real one that follows with the same `Nats-Msg-Id`; the
//! worker's own record, per owner and vouched for by a key, deduplicates.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::config::WorkerSettings;
use crate::dlq::SUBJECT_DEAD_LETTER;
use crate::event::{SUBJECT_COMPLETED, SUBJECT_FAILED, SUBJECT_ROTATED};

/// Largest inbound message: a 64 KiB body is the contract's limit, and
/// headers (a long `Authorization`, trace context) need room beside it.
const INBOUND_MAX_MESSAGE: i32 = 256 * 1024;
/// Largest outcome event: a record or a failure body, and a few headers.
const RESULTS_MAX_MESSAGE: i32 = 64 * 1024;
/// Largest dead-letter entry: an inbound message, sealed and base64-encoded
/// twice.
const DLQ_MAX_MESSAGE: i32 = 1024 * 1024;
/// The byte limit's share per message that sets the inbound stream's
/// message limit, on a server without [`ServerFeatures::exact_byte_limit`]. nats-server 2.9 checks a discard-new byte limit without
/// each message's record overhead (about 50 bytes), so a stream within that
/// margin of its byte limit takes a new message and drops its oldest; the
/// message limit is checked exactly. With one message per KiB of the byte
/// limit, the message limit is reached first for every message under
/// about 970 bytes (a rotation event is a few hundred), so a full stream
/// refuses instead of dropping. Later nats-server releases count the
/// stored size, and the byte limit alone is exact.
const INBOUND_BYTES_PER_MESSAGE: i64 = 1024;
/// The same for dead-letter entries, which are about twice and a half the
/// size of the message they keep.
const DLQ_BYTES_PER_MESSAGE: i64 = 4096;

/// What a nats-server later than 2.9 does better, read from the version of
/// the server the worker is connected to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerFeatures {
    /// `+TERM` with a reason (2.10): the server removes the message from a
    /// work-queue stream and publishes an advisory that names the reason
    /// (`$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED`). 2.9 keeps a
    /// terminated message in a work-queue stream, so there a dead-lettered
    /// message is acknowledged instead.
    pub term_with_reason: bool,
    /// A discard-new byte limit that counts each message's stored size
    /// (2.10.5, nats-server#4772): a full stream refuses and never drops,
    /// so no message limit is needed beside it.
    pub exact_byte_limit: bool,
}

impl ServerFeatures {
    /// The features of a server version (`2.10.5`, `2.11.0-RC.1`); none
    /// for one that cannot be read.
    pub fn of(version: &str) -> Self {
        let mut parts = version
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let v = (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        );
        Self {
            term_with_reason: v >= (2, 10, 0),
            exact_byte_limit: v >= (2, 10, 5),
        }
    }

    /// The features of the server a context's client is connected to.
    pub fn of_server(js: &jetstream::Context) -> Self {
        Self::of(&js.client().server_info().version)
    }
}

/// The message limit that goes with a byte limit: none for none, and none
/// where the server enforces the byte limit exactly.
fn message_limit(features: ServerFeatures, max_bytes: i64, per_message: i64) -> i64 {
    if max_bytes > 0 && !features.exact_byte_limit {
        (max_bytes / per_message).max(1)
    } else {
        -1
    }
}

/// The shortest duplicate window nats-server accepts (it refuses less
/// than 100 ms, and takes zero to mean two minutes).
const INBOUND_DUPLICATE_WINDOW: Duration = Duration::from_millis(100);

/// Creates a stream, or brings an existing one's limits and policies to
/// what `wanted` says.
async fn ensure_stream(
    js: &jetstream::Context,
    wanted: stream::Config,
) -> anyhow::Result<stream::Stream> {
    let mut stream = js.get_or_create_stream(wanted.clone()).await?;
    let current = stream.info().await?.config.clone();
    let mut updated = current.clone();
    updated.max_bytes = wanted.max_bytes;
    updated.max_messages = wanted.max_messages;
    updated.max_message_size = wanted.max_message_size;
    updated.discard = wanted.discard;
    // Replicas follow `worker.replicas`; nats-server moves the stream's
    // data to the new peer set itself (a clustered server is required for
    // more than one).
    updated.num_replicas = wanted.num_replicas;
    // Zero leaves the window to the server (two minutes).
    if !wanted.duplicate_window.is_zero() {
        updated.duplicate_window = wanted.duplicate_window;
    }
    if updated != current {
        // The cause stays in the chain: a cluster that cannot place the
        // new replicas yet is waited for ([`passes`]).
        js.update_stream(&updated).await.map_err(|e| {
            let shown = format!(
                "stream {} exists with other limits or replicas ({} wanted, {} now) and cannot be \
                 updated: {e}",
                wanted.name, wanted.num_replicas, current.num_replicas
            );
            anyhow::Error::new(e).context(shown)
        })?;
        tracing::info!(stream = %wanted.name, "stream limits updated");
        stream = js.get_stream(&wanted.name).await?;
    }
    Ok(stream)
}

/// Whether setting up the streams failed for a reason that passes by
/// itself: JetStream not answering yet (a server starting, a meta leader
/// being elected), or a cluster that cannot place the replicas yet (a node
/// still joining, or down: "no suitable peers for placement"). Anything
/// else (limits that cannot be changed, a stream without work-queue
/// retention, no rights) needs someone to fix it.
pub(super) fn passes(error: &anyhow::Error) -> bool {
    use jetstream::ErrorCode;
    use jetstream::context::{
        CreateStreamError, CreateStreamErrorKind, RequestError, RequestErrorKind,
    };
    use jetstream::stream::{ConsumerError, ConsumerErrorKind};
    let not_yet = |e: &jetstream::Error| {
        [
            ErrorCode::CLUSTER_NO_PEERS,
            ErrorCode::CLUSTER_NOT_AVAILABLE,
            ErrorCode::INSUFFICIENT_RESOURCES,
        ]
        .contains(&e.error_code())
    };
    error.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<CreateStreamError>() {
            return match e.kind() {
                CreateStreamErrorKind::JetStreamUnavailable | CreateStreamErrorKind::TimedOut => {
                    true
                }
                CreateStreamErrorKind::JetStream(e) => not_yet(&e),
                _ => false,
            };
        }
        if let Some(e) = cause.downcast_ref::<RequestError>() {
            return matches!(
                e.kind(),
                RequestErrorKind::NoResponders | RequestErrorKind::TimedOut
            );
        }
        if let Some(e) = cause.downcast_ref::<ConsumerError>() {
            return match e.kind() {
                ConsumerErrorKind::TimedOut => true,
                ConsumerErrorKind::JetStream(e) => not_yet(&e),
                _ => false,
            };
        }
        false
    })
}

/// The durable consumer, and the prefix of the fallback identity of its
/// messages (stream name and creation time, so that a recreated stream,
/// whose positions start again at 1, cannot collide with the old one).
pub struct Topology {
    /// The pull consumer.
    pub consumer: consumer::Consumer<consumer::pull::Config>,
    /// `js:<stream>:<created, unix ns>`.
    pub fallback_prefix: String,
    /// The inbound stream and the consumer's settings, to create the
    /// consumer again when the server has lost it.
    inbound: stream::Stream,
    config: consumer::pull::Config,
}

impl Topology {
    /// Whether the server no longer has the consumer (deleted, or lost
    /// with its state by a cluster that restarted); false when it cannot
    /// tell (an outage, a leader election).
    pub(super) async fn consumer_lost(&self) -> bool {
        matches!(
            self.consumer.get_info().await,
            Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound
        )
    }

    /// Creates the consumer again with the settings it was made with; its
    /// unacknowledged messages are still in the work-queue stream, so the
    /// new consumer delivers them.
    pub(super) async fn recreate_consumer(&mut self) -> anyhow::Result<()> {
        let name = self.config.durable_name.clone().unwrap_or_default();
        self.consumer = self
            .inbound
            .get_or_create_consumer(&name, self.config.clone())
            .await?;
        Ok(())
    }
}

/// Makes sure the inbound, results and dead-letter streams and the durable
/// consumer exist.
pub async fn ensure_topology(
    js: &jetstream::Context,
    w: &WorkerSettings,
) -> anyhow::Result<Topology> {
    let features = ServerFeatures::of_server(js);
    let mut inbound = ensure_stream(js, inbound_config(w, features)).await?;
    let info = inbound.info().await?;
    if info.config.retention != stream::RetentionPolicy::WorkQueue {
        anyhow::bail!(
            "stream {} exists without work-queue retention; handled messages (with their secrets) would stay in NATS",
            w.stream
        );
    }
    let fallback_prefix = format!("js:{}:{}", w.stream, info.created.unix_timestamp_nanos());
    ensure_stream(js, results_config(w)).await?;
    ensure_dlq_stream(js, w).await?;

    let config = consumer_config(w);
    let consumer = inbound
        .get_or_create_consumer(&w.consumer, config.clone())
        .await?;
    Ok(Topology {
        consumer,
        fallback_prefix,
        inbound,
        config,
    })
}

/// The durable pull consumer of the inbound stream.
fn consumer_config(w: &WorkerSettings) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(w.consumer.clone()),
        filter_subject: SUBJECT_ROTATED.into(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: w.ack_wait,
        // Unlimited: the worker counts deliveries itself and dead-letters
        // at max_deliver, so no message is left unacknowledged in the
        // stream.
        max_deliver: -1,
        max_ack_pending: (w.max_in_flight * 16).max(1024) as i64,
        // Zero: as many replicas as its stream.
        num_replicas: 0,
        ..Default::default()
    }
}

/// The inbound stream: work-queue retention (a message, plaintext secret
/// and all, leaves NATS once handled), bounded, refusing when full.
fn inbound_config(w: &WorkerSettings, features: ServerFeatures) -> stream::Config {
    stream::Config {
        name: w.stream.clone(),
        subjects: vec![SUBJECT_ROTATED.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_bytes: w.stream_max_bytes,
        max_messages: message_limit(features, w.stream_max_bytes, INBOUND_BYTES_PER_MESSAGE),
        max_message_size: INBOUND_MAX_MESSAGE,
        discard: stream::DiscardPolicy::New,
        duplicate_window: INBOUND_DUPLICATE_WINDOW,
        num_replicas: w.replicas,
        ..Default::default()
    }
}

/// The results stream: an event log of outcomes, bounded by age and size.
fn results_config(w: &WorkerSettings) -> stream::Config {
    stream::Config {
        name: w.results_stream.clone(),
        subjects: vec![SUBJECT_COMPLETED.into(), SUBJECT_FAILED.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: w.results_duplicate_window,
        max_age: w.results_max_age,
        max_bytes: w.results_max_bytes,
        max_messages: -1,
        max_message_size: RESULTS_MAX_MESSAGE,
        // An event log: the oldest outcomes make room for new ones.
        discard: stream::DiscardPolicy::Old,
        num_replicas: w.replicas,
        ..Default::default()
    }
}

/// Makes sure the dead-letter stream exists; core ingest, which has no
/// other stream, needs it as much as JetStream ingest.
pub(super) async fn ensure_dlq_stream(
    js: &jetstream::Context,
    w: &WorkerSettings,
) -> anyhow::Result<()> {
    ensure_stream(
        js,
        stream::Config {
            name: w.dlq_stream.clone(),
            subjects: vec![SUBJECT_DEAD_LETTER.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_bytes: w.dlq_max_bytes,
            max_messages: message_limit(
                ServerFeatures::of_server(js),
                w.dlq_max_bytes,
                DLQ_BYTES_PER_MESSAGE,
            ),
            max_message_size: DLQ_MAX_MESSAGE,
            // Entries are messages no one has applied: never dropped.
            discard: stream::DiscardPolicy::New,
            num_replicas: w.replicas,
            ..Default::default()
        },
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_follow_the_server_version() {
        let none = ServerFeatures::default();
        let term_only = ServerFeatures {
            term_with_reason: true,
            exact_byte_limit: false,
        };
        let both = ServerFeatures {
            term_with_reason: true,
            exact_byte_limit: true,
        };
        for (version, expected) in [
            ("2.9.10", none),
            ("2.9.25", none),
            ("2.10.0", term_only),
            ("2.10.4", term_only),
            ("2.10.5", both),
            ("2.11.0-RC.1", both),
            ("2.15.1", both),
            ("3.0.0", both),
            ("", none),
            ("garbage", none),
        ] {
            assert_eq!(ServerFeatures::of(version), expected, "{version}");
        }
    }

    #[test]
    fn the_message_limit_is_dropped_where_the_byte_limit_is_exact() {
        let old = ServerFeatures::of("2.9.10");
        let new = ServerFeatures::of("2.15.1");
        assert_eq!(message_limit(old, 1 << 20, 1024), 1024);
        assert_eq!(message_limit(old, 0, 1024), -1);
        assert_eq!(message_limit(new, 1 << 20, 1024), -1);
    }
}
