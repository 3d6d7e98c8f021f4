//! The NATS side of a drained event done by a bare async-nats client, with
//! nothing else: a delivery from a pull consumer, an outcome published to
//! a stream and its PubAck awaited, an ack; as many at once as the
//! worker's window. Its CPU per event is what the client library alone
//! costs of the worker's CPU per drained event (the database's client and
//! the worker's own work come on top).

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;

use super::*;

const IN: &str = "BENCH_RELAY_IN";
const OUT: &str = "BENCH_RELAY_OUT";

/// One event as the backlog holds it, and one outcome as the worker
/// publishes it: both taken from the run, so that sizes and headers match.
pub(super) struct Shapes {
    pub(super) event: (HeaderMap, Bytes),
    pub(super) outcome: (HeaderMap, Bytes),
}

/// Relays `events` events with `window` in flight and pulls of `batch`;
/// returns this process's CPU time per event, in µs, from the first pull to
/// the last ack.
pub(super) async fn cpu_us_per_event(
    js: &jetstream::Context,
    shapes: &Shapes,
    events: usize,
    window: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    for name in [IN, OUT] {
        let _ = js.delete_stream(name).await;
    }
    js.create_stream(stream::Config {
        name: IN.into(),
        subjects: vec!["bench.relay.in".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await?;
    js.create_stream(stream::Config {
        name: OUT.into(),
        subjects: vec!["bench.relay.out".into()],
        ..Default::default()
    })
    .await?;
    let (headers, payload) = &shapes.event;
    super::queue(js, "bench.relay.in", events, |_| {
        (headers.clone(), payload.clone())
    })
    .await?;
    let consumer = js
        .get_stream(IN)
        .await?
        .create_consumer(pull::Config {
            durable_name: Some("relay".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: window as i64,
            ..Default::default()
        })
        .await?;
    let started = cpu_seconds_of("self");
    let messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await?;
    let (headers, payload) = &shapes.outcome;
    let relayed = messages
        .take(events)
        .enumerate()
        .map(|(n, message)| async move {
            let message = message.map_err(|e| anyhow::anyhow!(e))?;
            // Each outcome its own id, as the worker's are.
            let mut headers = headers.clone();
            headers.insert("Nats-Msg-Id", format!("relay-{n}").as_str());
            js.publish_with_headers("bench.relay.out", headers, payload.clone())
                .await?
                .await?;
            message.ack().await.map_err(|e| anyhow::anyhow!(e))
        })
        .buffer_unordered(window)
        .collect::<Vec<_>>()
        .await;
    let cpu = cpu_seconds_of("self") - started;
    relayed.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    for name in [IN, OUT] {
        let _ = js.delete_stream(name).await;
    }
    Ok(cpu * 1e6 / events.max(1) as f64)
}
