//! The wire side of an outcome: how a handled message goes out on NATS, as
//! an outcome event (subject, headers, body) or as a reply, and how an
//! arriving NATS message becomes an [`Envelope`]. The rules (the rotator
//! and the store) know nothing of NATS; this module is where their results
//! meet it, for the worker and for `dlq replay` alike.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use opentelemetry::Context;
use tracing::Instrument;

use crate::config::Ingest;
use crate::event::{
    Decoded, Envelope, HEADER_AUTHORIZATION, HEADER_EVENT_ID, HEADER_MSG_ID, HEADER_OPERATION,
    HEADER_SERVICE_ERROR, HEADER_SERVICE_ERROR_CODE, HEADER_TRACEPARENT, HEADER_TRACESTATE,
    SUBJECT_COMPLETED, SUBJECT_FAILED,
};
use crate::rotator::Handled;
use crate::telemetry;

/// Where outcome events go: the results stream (waiting for its PubAck),
/// or plain core NATS when ingest is `core`; and the server they go to,
/// for the spans.
#[derive(Debug, Clone)]
pub struct Publisher {
    via: Via,
    server: Arc<ServerAddress>,
}

#[derive(Debug, Clone)]
enum Via {
    /// Publish through JetStream and wait for the PubAck.
    JetStream(jetstream::Context),
    /// Publish on core NATS.
    Core(Client),
}

impl Publisher {
    /// Publishes through `js` when ingest is `jetstream`, on core NATS when
    /// it is `core`.
    pub fn new(ingest: Ingest, client: &Client, js: &jetstream::Context) -> Self {
        let via = match ingest {
            Ingest::Jetstream => Via::JetStream(js.clone()),
            Ingest::Core => Via::Core(client.clone()),
        };
        Self {
            via,
            server: Arc::new(ServerAddress::new(client.clone())),
        }
    }

    /// The server the client is connected to, for spans.
    pub fn server(&self) -> &ServerAddress {
        &self.server
    }

    /// Publishes and, on JetStream, waits until the stream has stored it.
    pub async fn publish(
        &self,
        subject: &'static str,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), async_nats::Error> {
        match &self.via {
            Via::JetStream(js) => {
                js.publish_with_headers(subject, headers, body)
                    .await?
                    .await?;
            }
            Via::Core(client) => client.publish_with_headers(subject, headers, body).await?,
        }
        Ok(())
    }

    /// Publishes the outcome event of a handled message, in its PRODUCER
    /// span.
    pub async fn outcome(&self, handled: &Handled) -> Result<(), async_nats::Error> {
        let (span, headers) = self.outcome_span(handled);
        self.publish(subject(handled), headers, handled.body())
            .instrument(span)
            .await
    }

    /// The PRODUCER span of a handled message's outcome event, and the
    /// event's headers, which carry the span's context. Without span export
    /// the event carries the current (CONSUMER) span's context: a span of
    /// its own would only give it another id.
    pub fn outcome_span(&self, handled: &Handled) -> (tracing::Span, HeaderMap) {
        if !telemetry::exporting_spans() {
            let span = tracing::Span::current();
            let headers = outcome_headers(handled, &span);
            return (span, headers);
        }
        let subject = subject(handled);
        let (address, port) = self.server.get();
        let span = tracing::info_span!(
            "send",
            otel.name = &*span_name("send", subject),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = subject,
            messaging.message.id = handled.outcome_msg_id(),
            server.address = &*address,
            server.port = port,
        );
        let headers = outcome_headers(handled, &span);
        (span, headers)
    }
}

/// The subject of the outcome event.
pub fn subject(handled: &Handled) -> &'static str {
    if handled.result.is_ok() {
        SUBJECT_COMPLETED
    } else {
        SUBJECT_FAILED
    }
}

/// The headers of a handled message's outcome event, carrying the context
/// of its PRODUCER `span`.
pub fn outcome_headers(handled: &Handled, span: &tracing::Span) -> HeaderMap {
    let mut headers = event_headers(handled);
    telemetry::inject(span, |name, value| headers.insert(name, value));
    headers
}

/// Headers of the outcome event: `Rotation-Operation`, `Rotation-Event-Id` when the event had a
/// valid id, and a `Nats-Msg-Id` stable for the event and its status (so
/// the results stream drops repeats of one outcome but keeps a success
/// after a failure; scoped by owner, as event ids are). The trace context
/// comes with [`Publisher::outcome_span`].
fn event_headers(handled: &Handled) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(HEADER_OPERATION, handled.operation.name());
    if let Some(id) = &handled.event_id {
        headers.insert(HEADER_EVENT_ID, id.as_str());
    }
    if let Some(id) = handled.outcome_msg_id() {
        headers.insert(HEADER_MSG_ID, id.as_str());
    }
    headers
}

/// Reply headers and body: the record, or the failure JSON with the
/// micro-protocol error headers; the trace context of the current span.
pub fn reply_parts(handled: &Handled) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    telemetry::inject(&tracing::Span::current(), |name, value| {
        headers.insert(name, value)
    });
    if let Err(failure) = &handled.result {
        headers.insert(
            HEADER_SERVICE_ERROR_CODE,
            failure.status.code().to_string().as_str(),
        );
        headers.insert(HEADER_SERVICE_ERROR, failure.message.as_str());
    }
    (headers, handled.body())
}

/// Reads one header value; more than one value of a header we rely on is
/// ambiguous and treated as malformed (`Err`).
fn single<'a>(headers: Option<&'a HeaderMap>, names: &[&str]) -> Result<Option<&'a str>, ()> {
    let Some(headers) = headers else {
        return Ok(None);
    };
    let mut found = None;
    for name in names {
        for value in headers.get_all(*name) {
            if found.is_some() {
                return Err(());
            }
            found = Some(value.as_str());
        }
    }
    Ok(found)
}

/// Builds an envelope from a NATS message's headers and payload.
/// `Authorization` is also accepted in lowercase, as HTTP-minded clients
/// send it; two values are kept as a marker of ambiguity.
pub fn envelope(headers: Option<&HeaderMap>, payload: Bytes) -> Envelope {
    let authorization = match single(headers, &[HEADER_AUTHORIZATION, "authorization"]) {
        Ok(value) => value.map(str::to_owned),
        // An impossible header value: fails as malformed later.
        Err(()) => Some(String::from("\n")),
    };
    let one = |name: &str| single(headers, &[name]).ok().flatten().map(str::to_owned);
    Envelope {
        authorization,
        msg_id: one(HEADER_MSG_ID).filter(|id| !id.is_empty()),
        traceparent: one(HEADER_TRACEPARENT),
        tracestate: one(HEADER_TRACESTATE),
        payload,
        fallback_id: None,
        received_at: None,
        operation: Default::default(),
    }
}

/// Where a message was taken from, for its CONSUMER span.
#[derive(Debug)]
pub struct Consumed<'a> {
    /// The subject it came on.
    pub subject: &'static str,
    /// The durable consumer or queue group that took it, if any.
    pub group: Option<&'a str>,
    /// The `path` of metrics and logs (`replay` for a dead letter).
    pub path: &'static str,
    /// Which delivery of the message this is.
    pub attempt: i64,
}

/// The NATS server a client is connected to (`server.address` and
/// `server.port` of every message's spans), as the server's INFO announces
/// it. Reading it clones the whole INFO (ids, versions, cluster URLs), so
/// it is read again at most every [`ServerAddress::FRESH`]: after a
/// reconnect to another server, spans name the new one within that time.
#[derive(Debug)]
pub struct ServerAddress {
    client: Client,
    read: Mutex<Option<(Instant, Arc<str>, i64)>>,
}

impl ServerAddress {
    /// How long an address read from the INFO is used.
    pub const FRESH: Duration = Duration::from_secs(1);

    /// The server `client` is connected to.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            read: Mutex::new(None),
        }
    }

    /// The address and port. Numbers recorded on spans are signed: the
    /// OpenTelemetry layer exports unsigned ones as strings.
    pub fn get(&self) -> (Arc<str>, i64) {
        let mut read = self.read.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, address, port)) = &*read
            && at.elapsed() < Self::FRESH
        {
            return (address.clone(), *port);
        }
        let info = self.client.server_info();
        let (address, port): (Arc<str>, _) = (info.host.into(), i64::from(info.port));
        *read = Some((Instant::now(), address.clone(), port));
        (address, port)
    }
}

/// A span's `otel.name`, `{operation} {subject}`: the table's, without
/// formatting it for every message, when the subject is one of the
/// worker's own (see [`crate::endpoints`]).
fn span_name(operation: &'static str, subject: &str) -> Cow<'static, str> {
    crate::endpoints::span_name(operation, subject).map_or_else(
        || Cow::Owned(format!("{operation} {subject}")),
        Cow::Borrowed,
    )
}

/// The CONSUMER span of one message, a child of `parent` (the context its
/// headers carried).
pub fn process_span(
    decoded: &Decoded,
    from: &Consumed<'_>,
    server: &ServerAddress,
    parent: Context,
) -> tracing::Span {
    let (address, port) = server.get();
    let span = tracing::info_span!(
        "process",
        otel.name = &*span_name("process", from.subject),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = from.subject,
        messaging.consumer.group.name = from.group,
        messaging.message.id = decoded.event_id(),
        messaging.nats.delivery_attempt = from.attempt,
        server.address = &*address,
        server.port = port,
        rotation.path = from.path,
        rotation.integration_id = decoded.integration_id().map(tracing::field::display),
        rotation.status = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    telemetry::set_parent(&span, parent);
    span
}

/// Records a handled message's outcome on its CONSUMER span: the status,
/// and on failure the span's status ERROR and `error.type`.
pub fn record_outcome(span: &tracing::Span, handled: &Handled) {
    let status = handled.status();
    span.record("rotation.status", i64::from(status.code()));
    if handled.result.is_err() {
        span.record("otel.status_code", "ERROR");
        span.record("error.type", status.error_type());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{INBOUND, OUTBOUND};

    #[test]
    fn span_names_are_the_operation_and_the_subject() {
        let known = INBOUND
            .iter()
            .map(|row| ("process", row.subject))
            .chain(OUTBOUND.iter().map(|row| ("send", row.subject)));
        for (operation, subject) in known {
            let name = span_name(operation, subject);
            assert!(matches!(name, Cow::Borrowed(_)), "{operation} {subject}");
            assert_eq!(name, format!("{operation} {subject}"));
        }
        assert_eq!(
            span_name("process", "vault.approle.dead-letter"),
            "process vault.approle.dead-letter"
        );
    }
}
