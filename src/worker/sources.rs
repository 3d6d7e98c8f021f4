//! The three ways messages arrive: the JetStream consumer, a core queue
//! subscription, and the request-reply service endpoint. Each turns a NATS
//! message into a [`Decoded`] envelope and hands it to the dispatcher, until
//! shutdown.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::service::{self, ServiceExt};
use async_nats::{Client, Subscriber};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::topology::Topology;
use super::{Dispatcher, Source};
use crate::config::WorkerSettings;
use crate::event::{Decoded, SUBJECT_ROTATE};

/// Name of the service in the micro protocol (`$SRV.PING` and friends).
pub const SERVICE_NAME: &str = "rotation-worker";

/// Pulls from the durable consumer until shutdown, re-opening the pull
/// stream when it fails (server restart, consumer recreated).
pub(super) async fn jetstream(
    topology: Topology,
    dispatcher: Dispatcher,
    w: WorkerSettings,
    shutdown: CancellationToken,
) {
    let batch = w.max_in_flight.clamp(1, 256);
    while let Some(mut messages) = open_pull(&topology, batch, &shutdown).await {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => dispatch_stored(&topology, &dispatcher, message).await,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull stream error");
                    if pull_is_over(&e) {
                        break;
                    }
                }
                None => break,
            }
        }
    }
}

/// Opens a pull stream on the consumer, retrying with a growing pause
/// until it opens; `None` at shutdown.
async fn open_pull(
    topology: &Topology,
    batch: usize,
    shutdown: &CancellationToken,
) -> Option<pull::Stream> {
    let mut pause = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let messages = topology
            .consumer
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .messages()
            .await;
        match messages {
            Ok(messages) => return Some(messages),
            Err(e) => {
                tracing::warn!(error = %e, "cannot pull from the consumer; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return None,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
    None
}

/// Whether a pull stream error ends the stream (it is opened again).
fn pull_is_over(e: &pull::MessagesError) -> bool {
    matches!(
        e.kind(),
        MessagesErrorKind::ConsumerDeleted | MessagesErrorKind::RequestLimitExceeded
    )
}

/// Hands a stored message to the dispatcher, with its stream position as
/// the fallback identity and its stream timestamp as its arrival.
async fn dispatch_stored(
    topology: &Topology,
    dispatcher: &Dispatcher,
    message: async_nats::jetstream::Message,
) {
    let (seq, delivered, published) = match message.info() {
        Ok(info) => (info.stream_sequence, info.delivered, info.published),
        Err(e) => {
            tracing::warn!(error = %e, "message without JetStream metadata skipped");
            return;
        }
    };
    let mut envelope = crate::wire::envelope(message.headers.as_ref(), message.payload.clone());
    envelope.fallback_id = Some(format!("{}:{seq}", topology.fallback_prefix));
    // The stream's timestamp, not the time it is handled: a late
    // redelivery of an older message is then stale.
    envelope.received_at = Some(published);
    dispatcher
        .dispatch(Decoded::new(envelope), Source::Stream(message, delivered))
        .await;
}

/// Reads a core queue subscription until shutdown.
pub(super) async fn core(
    mut subscriber: Subscriber,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = subscriber.next() => message,
        };
        let Some(message) = message else { break };
        let mut envelope = crate::wire::envelope(message.headers.as_ref(), message.payload);
        envelope.received_at = Some(time::OffsetDateTime::now_utc());
        dispatcher
            .dispatch(Decoded::new(envelope), Source::Core(message.reply))
            .await;
    }
    let _ = subscriber.unsubscribe().await;
}

/// Starts the micro-protocol service with its one endpoint.
pub(super) async fn start_service(
    client: &Client,
    w: &WorkerSettings,
) -> anyhow::Result<(service::Service, service::endpoint::Endpoint)> {
    let service = client
        .service_builder()
        .description("Rotates the stored AppRole secret_id of a vault integration")
        .queue_group(&w.queue_group)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the NATS service: {e}"))?;
    let endpoint = service
        .endpoint_builder()
        .name("rotate")
        .queue_group(&w.queue_group)
        .add(SUBJECT_ROTATE)
        .await
        .map_err(|e| anyhow::anyhow!("cannot add the service endpoint: {e}"))?;
    Ok((service, endpoint))
}

/// Serves requests until shutdown, then stops the service.
pub(super) async fn requests(
    (service, mut endpoint): (service::Service, service::endpoint::Endpoint),
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = endpoint.next() => request,
        };
        let Some(request) = request else { break };
        let mut envelope = crate::wire::envelope(
            request.message.headers.as_ref(),
            request.message.payload.clone(),
        );
        envelope.received_at = Some(time::OffsetDateTime::now_utc());
        dispatcher
            .dispatch(Decoded::new(envelope), Source::Request(request))
            .await;
    }
    let _ = endpoint.stop().await;
    let _ = service.stop().await;
}
