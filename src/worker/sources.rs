//! The three ways messages arrive: the JetStream consumer, a core queue
//! subscription, and the request-reply service endpoints (one per request
//! of the table, [`INBOUND`]). Each turns a NATS message into a [`Decoded`]
//! envelope and hands it to the dispatcher, until shutdown.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::service::{self, ServiceExt};
use async_nats::{Client, HeaderMap, Subscriber};
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::topology::Topology;
use super::{Dispatcher, ReplyTo, Source};
use crate::config::WorkerSettings;
use crate::endpoints::{Action, INBOUND, Inbound};
use crate::event::{
    Decoded, FailureBody, HEADER_SERVICE_ERROR, HEADER_SERVICE_ERROR_CODE, SUBJECT_ROTATED, Status,
    decode_integration_id,
};
use crate::rotator::Rotator;

/// Name of the service in the micro protocol (`$SRV.PING` and friends).
pub const SERVICE_NAME: &str = "rotation-worker";

/// Pulls from the durable consumer until shutdown, re-opening the pull
/// stream when it fails (server restart, consumer recreated) and creating
/// the consumer again when the server has lost it.
///
/// `caught_up` is told (and dropped) once the backlog waiting at the
/// start has been delivered: the consumer had nothing pending, or a
/// message arrived with nothing pending after it.
pub(super) async fn jetstream(
    mut topology: Topology,
    dispatcher: Dispatcher,
    caught_up: watch::Sender<bool>,
    w: WorkerSettings,
    shutdown: CancellationToken,
) {
    let batch = w.max_in_flight.clamp(1, 256);
    let mut caught_up = Some(caught_up);
    if topology.consumer.cached_info().num_pending == 0 {
        tell(&mut caught_up);
    }
    // Whether the server has lost the consumer, when already known: just
    // made or found at the start.
    let mut lost = Some(false);
    while let Some(mut messages) = open_pull(&mut topology, batch, lost, &shutdown).await {
        lost = None;
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    dispatch_stored(&topology, &dispatcher, &mut caught_up, message).await
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pull stream error");
                    if e.kind() == MessagesErrorKind::ConsumerDeleted
                        || (out_of_touch(&e) && topology.consumer_lost().await)
                    {
                        lost = Some(true);
                        break;
                    }
                    if e.kind() == MessagesErrorKind::RequestLimitExceeded {
                        break;
                    }
                }
                None => break,
            }
        }
    }
}

/// Opens a pull stream on the consumer, creating the consumer again if
/// the server has lost it (`lost`, when the caller already knows, else
/// asked), and retrying with a growing pause until it opens; `None` at
/// shutdown.
async fn open_pull(
    topology: &mut Topology,
    batch: usize,
    mut lost: Option<bool>,
    shutdown: &CancellationToken,
) -> Option<pull::Stream> {
    let mut pause = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let is_lost = match lost.take() {
            Some(known) => known,
            None => topology.consumer_lost().await,
        };
        if is_lost {
            match topology.recreate_consumer().await {
                Ok(()) => tracing::warn!("the consumer was lost by the server; created it again"),
                Err(e) => tracing::warn!(error = %e, "cannot create the lost consumer again"),
            }
        }
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

/// Whether a pull stream error means the server no longer answers the
/// pulls, which a consumer it has lost does not.
fn out_of_touch(e: &pull::MessagesError) -> bool {
    matches!(
        e.kind(),
        MessagesErrorKind::MissingHeartbeat | MessagesErrorKind::NoResponders
    )
}

/// Hands a stored message to the dispatcher, with its stream position as
/// the fallback identity and its stream timestamp as its arrival.
async fn dispatch_stored(
    topology: &Topology,
    dispatcher: &Dispatcher,
    caught_up: &mut Option<watch::Sender<bool>>,
    message: async_nats::jetstream::Message,
) {
    let (seq, delivered, published) = match message.info() {
        Ok(info) => {
            if info.pending == 0 {
                tell(caught_up);
            }
            (info.stream_sequence, info.delivered, info.published)
        }
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

/// Says the start's backlog has been delivered, once: the sender goes
/// with it, so later messages check only that it is gone.
fn tell(caught_up: &mut Option<watch::Sender<bool>>) {
    if let Some(caught_up) = caught_up.take() {
        caught_up.send_replace(true);
    }
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
        if let Some(reply) = &message.reply
            && refused_reply(SUBJECT_ROTATED, Some(reply), &dispatcher.shared.reply_to)
        {
            continue;
        }
        let mut envelope = crate::wire::envelope(message.headers.as_ref(), message.payload);
        envelope.received_at = Some(time::OffsetDateTime::now_utc());
        dispatcher
            .dispatch(Decoded::new(envelope), Source::Core(message.reply))
            .await;
    }
    let _ = subscriber.unsubscribe().await;
}

/// The service and its endpoints, each with its row of the table.
pub(super) struct Service {
    service: service::Service,
    endpoints: Vec<(&'static Inbound, service::endpoint::Endpoint)>,
}

/// Starts the micro-protocol service with an endpoint for each request of
/// the table, in its order: `rotate`, `rollback` and `status`.
pub(super) async fn start_service(client: &Client, w: &WorkerSettings) -> anyhow::Result<Service> {
    let service = client
        .service_builder()
        .description("Rotates the stored AppRole secret_id of a vault integration")
        .queue_group(&w.queue_group)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot start the NATS service: {e}"))?;
    let mut endpoints = Vec::new();
    for row in &INBOUND {
        let Some(name) = row.endpoint() else {
            continue;
        };
        let endpoint = service
            .endpoint_builder()
            .name(name)
            .queue_group(&w.queue_group)
            .add(row.subject)
            .await
            .map_err(|e| anyhow::anyhow!("cannot add the service endpoint {name}: {e}"))?;
        endpoints.push((row, endpoint));
    }
    Ok(Service { service, endpoints })
}

/// Serves requests until shutdown, then stops the service: those that
/// change an integration (rotations, rollbacks) go to the lanes; status
/// requests are answered beside them (a few at once), as they change
/// nothing.
pub(super) async fn requests(
    service: Service,
    dispatcher: Dispatcher,
    shutdown: CancellationToken,
) {
    let Service { service, endpoints } = service;
    let prefixes = &dispatcher.shared.reply_to;
    let (mut reads, mut changes) = (Vec::new(), Vec::new());
    for (row, endpoint) in endpoints {
        match row.action {
            Action::Status => reads.push(endpoint.filter(move |request| {
                let refused = refused_reply(row.subject, request.message.reply.as_ref(), prefixes);
                futures::future::ready(!refused)
            })),
            Action::Change(operation) => {
                changes.push(endpoint.map(move |request| (row, operation, request)));
            }
        }
    }
    let rotator = dispatcher.shared.rotator.clone();
    let statuses = futures::stream::select_all(reads)
        .take_until(shutdown.clone().cancelled_owned())
        .for_each_concurrent(STATUS_CONCURRENCY, |request| {
            answer_status(rotator.clone(), request)
        });
    let changes = async {
        let mut changes = futures::stream::select_all(changes);
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => break,
                request = changes.next() => request,
            };
            let Some((row, operation, request)) = request else {
                break;
            };
            if refused_reply(row.subject, request.message.reply.as_ref(), prefixes) {
                continue;
            }
            let mut envelope = crate::wire::envelope(
                request.message.headers.as_ref(),
                request.message.payload.clone(),
            );
            envelope.received_at = Some(time::OffsetDateTime::now_utc());
            envelope.operation = operation;
            dispatcher
                .dispatch(Decoded::new(envelope), Source::Request(request, row))
                .await;
        }
    };
    tokio::join!(statuses, changes);
    let _ = service.stop().await;
}

/// Whether a message asking for a reply names a reply subject outside
/// `nats.reply_prefixes`: the worker would publish its answer there with
/// its own rights (into the dead-letter or results stream, say), so the
/// message is neither processed nor answered; it is counted and logged
/// (its subject and reply subject, never its payload).
fn refused_reply(subject: &str, reply: Option<&async_nats::Subject>, to: &ReplyTo) -> bool {
    let reply = reply.map_or("", |r| r.as_str());
    if crate::event::reply_allowed(reply, &to.prefixes, &to.own_inbox) {
        return false;
    }
    crate::telemetry::Metrics::get().refused_replies.add(1, &[]);
    let shown: String = reply.chars().take(MAX_SHOWN_REPLY).collect();
    tracing::warn!(
        subject,
        reply = %shown,
        "request refused: its reply subject is under no nats.reply_prefixes entry"
    );
    true
}

/// The longest part of a refused reply subject a log line shows.
const MAX_SHOWN_REPLY: usize = 128;

/// Status requests answered at once, at most.
const STATUS_CONCURRENCY: usize = 16;

/// Answers a status request: the report, or the failure JSON with the
/// micro-protocol's error headers (so that `$SRV.STATS` counts it).
async fn answer_status(rotator: Rotator, request: service::Request) {
    let message = &request.message;
    let envelope = crate::wire::envelope(message.headers.as_ref(), message.payload.clone());
    let result = rotator.status(&envelope).await;
    let mut headers = HeaderMap::new();
    crate::telemetry::inject(&tracing::Span::current(), |name, value| {
        headers.insert(name, value)
    });
    let replied = match &result {
        Ok(report) => {
            let body = Bytes::from(serde_json::to_vec(report).unwrap_or_default());
            request.respond_with_headers(Ok(body), headers).await
        }
        Err(failure) => {
            let code = failure.status.code();
            headers.insert(HEADER_SERVICE_ERROR_CODE, code.to_string().as_str());
            headers.insert(HEADER_SERVICE_ERROR, failure.message.as_str());
            let body = FailureBody {
                // A caller without a valid key learns nothing of any id.
                integration_id: (failure.status != Status::Unauthorized)
                    .then(|| decode_integration_id(&envelope.payload).ok())
                    .flatten(),
                event_id: None,
                status: code,
                error: failure.message.clone(),
            };
            let body = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
            let error = service::error::Error {
                status: failure.message.clone(),
                code: usize::from(code),
            };
            request.respond_error_with_body(error, headers, body).await
        }
    };
    let status = i64::from(result.as_ref().map_or_else(|f| f.status.code(), |_| 200));
    tracing::info!(path = "status", status, "status answered");
    if let Err(e) = replied {
        tracing::warn!(error = %e, "reply failed");
    }
}
