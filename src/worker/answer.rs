//! Carrying out what the delivery policy ([`super::settle`]) decides of a
//! handled message: the reply, the outcome event and its PubAck, the ack,
//! the NAK, the dead letter, and the log line and metrics of each message.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, Subject, service};
use backon::Retryable;
use bytes::Bytes;
use opentelemetry::KeyValue;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::lanes::Rest;
use super::settle::{self, Action};
use super::{Shared, Source};
use crate::crashpoint::crashpoint;
use crate::dlq::{DeadLetter, SUBJECT_DEAD_LETTER};
use crate::event::{Decoded, Envelope, Failure, Status};
use crate::rotator::Handled;
use crate::telemetry::{self, Metrics};
use crate::wire;

/// Answers the requests among a handled batch at once, from the lane that
/// applied it: the caller waits for the reply, and handing it to the
/// settling task first would add a wake-up of another task (often on the
/// other thread) to every request's latency. Each answered request becomes
/// [`Source::Answered`]; its log line and outcome event follow in
/// [`finish`]. Usually the batch holds no request and nothing is moved.
/// (Measured with `rotation-bench`; see docs/performance.md.)
pub(super) async fn reply_first(handled: &[Handled], rest: &mut [Rest]) {
    for (handled, (source, span, received, _)) in handled.iter().zip(rest) {
        let Source::Request(request, row) = source else {
            continue;
        };
        // The transaction has committed; nothing is published or acked yet.
        crashpoint("after-commit");
        let line = span.in_scope(|| observe(handled, "request", 1, *received));
        respond(request, handled).instrument(span.clone()).await;
        *source = Source::Answered(row, line);
    }
}

/// Settles each item with its outcome (event, reply, ack, dead letter),
/// in the background: the lane goes on to its next batch meanwhile.
///
/// Each message's future owns what settling it needs (only the envelope of
/// its decoded form: the key and the body are dropped here), and the steps
/// below borrow it: a step that took it by value would keep a copy of its
/// own in the future, and thousands of these wait for PubAcks at once.
pub(super) fn finish(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    handled: Vec<Handled>,
    decoded: Vec<Decoded>,
    rest: Vec<Rest>,
) {
    let shared = shared.clone();
    tracker.spawn(async move {
        let shared = &shared;
        let finishing = handled.into_iter().zip(decoded).zip(rest).map(
            |((handled, decoded), (source, span, received, held))| {
                let envelope = decoded.envelope;
                async move {
                    settle(shared, &handled, &envelope, &source, received).await;
                    drop(held);
                }
                .instrument(span)
            },
        );
        futures::future::join_all(finishing).await;
    });
}

/// Records the outcome on the current (process) span and in the metrics,
/// and returns the one log line per handled message, to be written once
/// the outcome has left (a reply first: the caller waits for it).
fn observe(handled: &Handled, path: &'static str, attempt: i64, received: Instant) -> LogLine {
    let status = handled.status();
    let elapsed = received.elapsed();
    let metrics = Metrics::get();
    metrics
        .rotations
        .add(1, &Metrics::rotation_labels(status.code(), path));
    metrics
        .duration
        .record(elapsed.as_secs_f64(), &[KeyValue::new("path", path)]);
    wire::record_outcome(&tracing::Span::current(), handled);
    match &handled.result {
        Ok(done) => {
            if done.duplicate {
                metrics.dedupe_hits.add(1, &[]);
            }
            if let (true, Some(at)) = (done.changed, handled.rotated_at) {
                let lag = time::OffsetDateTime::now_utc() - at;
                metrics.lag.record(lag.as_seconds_f64().max(0.0), &[]);
            }
        }
        Err(_) if status == Status::Conflict => metrics.stale.add(1, &[]),
        Err(_) => {}
    }
    LogLine {
        path,
        attempt,
        // To the microsecond: the clock says no more, and the shortest
        // form of such a number is quicker to write and to read.
        duration_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
    }
}

/// What the log line of a handled message says beside the outcome.
#[derive(Clone, Copy)]
pub(super) struct LogLine {
    path: &'static str,
    attempt: i64,
    duration_ms: f64,
}

impl LogLine {
    /// Writes the line: `rotation handled` or `rotation refused`.
    fn write(self, handled: &Handled) {
        let LogLine {
            path,
            attempt,
            duration_ms,
        } = self;
        // Signed: the OpenTelemetry layer exports unsigned fields as strings.
        let code = i64::from(handled.status().code());
        let event_id = handled.event_id.as_deref().unwrap_or("-");
        let id = handled.integration_id;
        let integration_id: &dyn std::fmt::Display = match &id {
            Some(id) => id,
            None => &"-",
        };
        match &handled.result {
            Ok(done) => tracing::info!(
                path, event_id, %integration_id, status = code, attempt, duration_ms,
                changed = done.changed, duplicate = done.duplicate,
                "rotation handled"
            ),
            Err(failure) => tracing::info!(
                path, event_id, %integration_id, status = code, attempt, duration_ms,
                error = %failure.message,
                "rotation refused"
            ),
        }
    }
}

/// Publishes the outcome event (retrying within the budget) in a PRODUCER
/// span whose context the event carries.
async fn publish_outcome(shared: &Shared, handled: &Handled) -> Result<(), async_nats::Error> {
    let subject = wire::subject(handled);
    let (span, headers) = shared.publisher.outcome_span(handled);
    let body = handled.body();
    // The first attempt takes the headers; a retry builds them again.
    let mut first = Some(headers);
    let attempt = || {
        let headers = first
            .take()
            .unwrap_or_else(|| wire::outcome_headers(handled, &span));
        shared.publisher.publish(subject, headers, body.clone())
    };
    let span = span.clone();
    attempt
        .retry(shared.rotator.retry().backoff())
        .instrument(span)
        .await
}

/// Carries out what the delivery policy ([`settle::decide`]) says of a
/// handled message.
async fn settle(
    shared: &Shared,
    handled: &Handled,
    envelope: &Envelope,
    source: &Source,
    received: Instant,
) {
    let delivered = source.attempt();
    match settle::decide(source.kind(), handled.status(), delivered, &shared.policy) {
        Action::Answer => answer(shared, handled, envelope, source, received).await,
        Action::Retry(delay) => {
            tracing::info!(delivered, "store unavailable; NAK for redelivery");
            if let Source::Stream(message, _) = source {
                ack(message, AckKind::Nak(Some(delay))).await;
            }
        }
        Action::SetAside => {
            let line = observe(handled, source.path(), delivered, received);
            // Boxed, as every rare path: its future would otherwise size
            // every message's.
            Box::pin(set_aside(shared, handled, envelope, source)).await;
            line.write(handled);
        }
    }
}

/// Answers a message. A stream message: outcome event first (stored,
/// PubAck), then the ack; an event that cannot be stored is retried, then
/// set aside ([`settle::unpublished`]). A request (or core message with a
/// reply subject): the reply first, as the caller waits for it, then the
/// outcome event.
async fn answer(
    shared: &Shared,
    handled: &Handled,
    envelope: &Envelope,
    source: &Source,
    received: Instant,
) {
    let line = match source {
        // Replied to, and observed, by its lane.
        Source::Answered(_, line) => *line,
        _ => {
            // The transaction has committed; nothing is published or acked
            // yet.
            crashpoint("after-commit");
            // Recorded before anything leaves, so that whoever sees the
            // outcome also finds it in the metrics; the log line of a
            // request follows its reply.
            observe(handled, source.path(), source.attempt(), received)
        }
    };
    let published = match source {
        Source::Answered(..) => {
            line.write(handled);
            publish_outcome(shared, handled).await
        }
        Source::Stream(message, delivered) => {
            line.write(handled);
            return answer_stream(shared, handled, envelope, message, *delivered).await;
        }
        Source::Core(reply) => {
            reply_core(shared, reply.as_ref(), handled).await;
            line.write(handled);
            publish_outcome(shared, handled).await
        }
        Source::Schedule => {
            line.write(handled);
            publish_outcome(shared, handled).await
        }
        Source::Request(request, _) => {
            respond(request, handled).await;
            line.write(handled);
            publish_outcome(shared, handled).await
        }
    };
    if let Err(e) = &published {
        tracing::warn!(error = %e, "publishing the outcome event failed");
    }
}

/// Answers a stream message: the outcome event (stored, PubAck), then the
/// ack; an event that cannot be stored is retried, then set aside.
async fn answer_stream(
    shared: &Shared,
    handled: &Handled,
    envelope: &Envelope,
    message: &jetstream::Message,
    delivered: i64,
) {
    let published = publish_outcome(shared, handled).await;
    // The outcome is stored in the results stream; no ack yet.
    crashpoint("after-outcome");
    let Err(e) = published else {
        ack(message, AckKind::Ack).await;
        return;
    };
    tracing::warn!(error = %e, delivered, "publishing the outcome event failed");
    match settle::unpublished(delivered, &shared.policy) {
        // Redelivered later: the store recognises the event and the
        // outcome is published again.
        Action::Retry(delay) => ack(message, AckKind::Nak(Some(delay))).await,
        _ => {
            Box::pin(set_aside_unpublished(
                shared, handled, envelope, message, delivered,
            ))
            .await
        }
    }
}

/// Sets aside a stream message whose outcome event could not be stored, as
/// a 503: replaying the dead letter publishes the event.
async fn set_aside_unpublished(
    shared: &Shared,
    handled: &Handled,
    envelope: &Envelope,
    message: &jetstream::Message,
    delivered: i64,
) {
    let unannounced = Handled {
        result: Err(Failure {
            status: Status::Unavailable,
            message:
                "the outcome event could not be published; replay the dead letter to publish it"
                    .into(),
        }),
        ..handled.clone()
    };
    let source = Source::Stream(message.clone(), delivered);
    set_aside(shared, &unannounced, envelope, &source).await;
}

/// Answers a core message that asked for a reply.
async fn reply_core(shared: &Shared, reply: Option<&Subject>, handled: &Handled) {
    let Some(reply) = reply.cloned() else { return };
    let (headers, body) = wire::reply_parts(handled);
    if let Err(e) = shared
        .client
        .publish_with_headers(reply, headers, body)
        .await
    {
        tracing::warn!(error = %e, "reply failed");
    }
}

/// Answers a request. A failure goes out through the service's error path,
/// so that $SRV.STATS counts it; the body is the failure JSON either way.
async fn respond(request: &service::Request, handled: &Handled) {
    let (headers, body) = wire::reply_parts(handled);
    let replied = match &handled.result {
        Ok(_) => request.respond_with_headers(Ok(body), headers).await,
        Err(failure) => {
            let error = async_nats::service::error::Error {
                status: failure.message.clone(),
                code: usize::from(failure.status.code()),
            };
            request.respond_error_with_body(error, headers, body).await
        }
    };
    if let Err(e) = replied {
        tracing::warn!(error = %e, "reply failed");
    }
}

/// Sets a message aside: the dead-letter entry (and its 503 failure
/// event), then the reply for a core message, or the ack of a stream
/// message (a NAK when the entry could not be stored).
async fn set_aside(shared: &Shared, handled: &Handled, envelope: &Envelope, source: &Source) {
    let delivered = source.attempt();
    let stored = dead_letter(shared, envelope, handled, delivered).await;
    let action = settle::after_dead_letter(source.kind(), stored, delivered, &shared.policy);
    match source {
        Source::Stream(message, _) if let Action::Retry(delay) = action => {
            ack(message, AckKind::Nak(Some(delay))).await;
        }
        Source::Stream(message, _) => {
            Box::pin(let_go(shared, message, handled, delivered)).await;
        }
        Source::Core(reply) => reply_core(shared, reply.as_ref(), handled).await,
        Source::Request(request, _) => respond(request, handled).await,
        Source::Answered(..) | Source::Schedule => {}
    }
}

/// Lets go of a dead-lettered stream message, rare and final, so waiting
/// for the server to confirm: terminated with the reason where the server
/// takes one (it removes the message and publishes an advisory that names
/// the reason), else acknowledged.
async fn let_go(shared: &Shared, message: &jetstream::Message, handled: &Handled, delivered: i64) {
    let done = match (&message.reply, shared.features.term_with_reason) {
        (Some(reply), true) => {
            let reason = format!("+TERM dead-lettered: {}", handled.status().code());
            shared
                .client
                .request(reply.clone(), reason.into())
                .await
                .map(drop)
                .map_err(async_nats::Error::from)
        }
        _ => message.double_ack().await,
    };
    match done {
        Ok(()) => tracing::info!(delivered, "dead-lettered message let go"),
        Err(e) => tracing::warn!(error = %e, "letting go of a dead-lettered message failed; \
            a redelivery will be dead-lettered again"),
    }
}

/// Stores the dead-letter entry, then publishes the 503 failure event;
/// true when the entry is stored (the entry is what keeps the message; the
/// event only tells, and may fail for the reason the message is set aside).
async fn dead_letter(
    shared: &Shared,
    envelope: &Envelope,
    handled: &Handled,
    deliveries: i64,
) -> bool {
    let entry = DeadLetter::new(&shared.keys, envelope, handled, deliveries);
    let body = Bytes::from(serde_json::to_vec(&entry).unwrap_or_default());
    let mut headers = HeaderMap::new();
    telemetry::inject(&tracing::Span::current(), |name, value| {
        headers.insert(name, value)
    });
    if let Err(e) = shared
        .publisher
        .publish(SUBJECT_DEAD_LETTER, headers, body)
        .await
    {
        tracing::error!(error = %e, "could not set the message aside");
        return false;
    }
    Metrics::get().dead_lettered.add(1, &[]);
    tracing::warn!(dead_letter_id = %entry.summary.id, event_id = handled.event_id.as_deref().unwrap_or("-"),
        "message set aside in the dead-letter stream");
    if let Err(e) = publish_outcome(shared, handled).await {
        tracing::warn!(error = %e, "publishing the 503 failure event failed");
    }
    true
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(error = %e, "acknowledgement failed; the message will be redelivered");
    }
}
