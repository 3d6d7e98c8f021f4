//! The JetStream streams and consumer the worker relies on, created on
//! start when missing. Only features of nats-server 2.9 are used: one filter
//! subject, NAK with delay and no consumer BackOff (the two combine wrongly
//! on 2.9), no consumer create actions.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

use crate::config::WorkerSettings;
use crate::dlq::SUBJECT_DEAD_LETTER;
use crate::event::{SUBJECT_COMPLETED, SUBJECT_FAILED, SUBJECT_ROTATED};

/// The durable consumer, and the prefix of the fallback identity of its
/// messages (stream name and creation time, so that a recreated stream,
/// whose positions start again at 1, cannot collide with the old one).
pub struct Topology {
    /// The pull consumer.
    pub consumer: consumer::Consumer<consumer::pull::Config>,
    /// `js:<stream>:<created, unix ns>`.
    pub fallback_prefix: String,
}

/// Makes sure the inbound, results and dead-letter streams and the durable
/// consumer exist.
pub async fn ensure_topology(
    js: &jetstream::Context,
    w: &WorkerSettings,
) -> anyhow::Result<Topology> {
    let mut inbound = js
        .get_or_create_stream(stream::Config {
            name: w.stream.clone(),
            subjects: vec![SUBJECT_ROTATED.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let info = inbound.info().await?;
    if info.config.retention != stream::RetentionPolicy::WorkQueue {
        anyhow::bail!(
            "stream {} exists without work-queue retention; handled messages (with their secrets) would stay in NATS",
            w.stream
        );
    }
    let fallback_prefix = format!("js:{}:{}", w.stream, info.created.unix_timestamp_nanos());

    js.get_or_create_stream(stream::Config {
        name: w.results_stream.clone(),
        subjects: vec![SUBJECT_COMPLETED.into(), SUBJECT_FAILED.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(w.results_duplicate_window_secs),
        max_age: Duration::from_secs(w.results_max_age_hours * 3600),
        ..Default::default()
    })
    .await?;
    js.get_or_create_stream(stream::Config {
        name: w.dlq_stream.clone(),
        subjects: vec![SUBJECT_DEAD_LETTER.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;

    let consumer = inbound
        .get_or_create_consumer(
            &w.consumer,
            consumer::pull::Config {
                durable_name: Some(w.consumer.clone()),
                filter_subject: SUBJECT_ROTATED.into(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(w.ack_wait_secs),
                // Unlimited: the worker counts deliveries itself and
                // dead-letters at max_deliver, so no message is left
                // unacknowledged in the stream.
                max_deliver: -1,
                max_ack_pending: (w.max_in_flight * 16).max(1024) as i64,
                ..Default::default()
            },
        )
        .await?;
    Ok(Topology {
        consumer,
        fallback_prefix,
    })
}
