//! The dead-letter stream: messages that kept failing with 503 are set
//! aside here, so an operator can apply them once the store is healthy.
//!
//! An entry shows what an operator needs to decide (ids, status, error,
//! deliveries, time) in clear, and keeps the original message (API key,
//! headers and body with its `secretId`) only sealed under the worker's
//! key ring, bound to the entry's id: NATS never holds a plaintext secret
//! for longer than a message takes to handle.

use async_nats::{HeaderMap, jetstream};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use tracing::Instrument;

use crate::crypto::{KeyRing, Sealed};
use crate::event::{Decoded, Envelope, HEADER_TRACEPARENT, HEADER_TRACESTATE};
use crate::rotator::{Handled, Rotator};
use crate::store::ReencryptReport;
use crate::telemetry;
use crate::wire::{self, Publisher};

/// Subject of dead-letter entries.
pub const SUBJECT_DEAD_LETTER: &str = "rotation-worker.dlq";
/// Domain separation for sealed entries.
const AAD_PURPOSE: &[u8] = b"rotation-worker/dead-letter/v1:";

/// What an operator sees of a dead-letter entry: everything but the
/// sealed message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Entry id (also the associated data of the sealed message).
    pub id: Uuid,
    /// The event's id, if it had one.
    pub event_id: Option<String>,
    /// The integration, if the body named a valid one.
    pub integration_id: Option<Uuid>,
    /// Always 503 today.
    pub status: u16,
    /// What went wrong.
    pub error: String,
    /// How many deliveries were tried.
    pub deliveries: i64,
    /// When it was set aside.
    #[serde(with = "time::serde::rfc3339")]
    pub failed_at: OffsetDateTime,
}

/// One dead-letter entry as stored in the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetter {
    /// What the operator sees.
    #[serde(flatten)]
    pub summary: Summary,
    /// The key the message is sealed under.
    pub key_id: String,
    /// The original message, sealed (base64 of nonce, ciphertext and tag).
    pub sealed: String,
}

/// A listed entry: its stream position and summary.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Listed {
    /// Position in the dead-letter stream, for `dlq replay --seq`.
    pub seq: u64,
    /// The entry.
    #[serde(flatten)]
    pub summary: Summary,
}

/// The result of replaying one entry.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Replayed {
    /// Position in the dead-letter stream.
    pub seq: u64,
    /// The event's id.
    pub event_id: Option<String>,
    /// The integration.
    pub integration_id: Option<Uuid>,
    /// The outcome's status now (503: still failing, the entry stays).
    pub status: u16,
    /// Whether the entry was removed.
    pub removed: bool,
}

impl DeadLetter {
    /// Seals a message that failed.
    pub fn new(keys: &KeyRing, envelope: &Envelope, handled: &Handled, deliveries: i64) -> Self {
        // Serialising a plain struct cannot fail.
        let plain = serde_json::to_vec(envelope).unwrap_or_default();
        let summary = Summary {
            id: Uuid::new_v4(),
            event_id: handled.event_id.clone(),
            integration_id: handled.integration_id,
            status: handled.status().code(),
            error: match &handled.result {
                Err(failure) => failure.message.clone(),
                Ok(_) => String::new(),
            },
            deliveries,
            failed_at: OffsetDateTime::now_utc(),
        };
        Self::seal(keys, summary, &plain)
    }

    /// Seals `plain` under the active key, bound to the entry's id.
    fn seal(keys: &KeyRing, summary: Summary, plain: &[u8]) -> Self {
        let sealed = keys.seal_bytes(AAD_PURPOSE, summary.id, plain);
        Self {
            summary,
            key_id: sealed.key_id,
            sealed: BASE64.encode(&sealed.blob),
        }
    }

    /// The original message's bytes.
    fn plain(&self, keys: &KeyRing) -> anyhow::Result<Vec<u8>> {
        let blob = BASE64.decode(&self.sealed)?;
        let plain = keys.open_bytes(
            AAD_PURPOSE,
            self.summary.id,
            &Sealed {
                key_id: self.key_id.clone(),
                blob,
            },
        )?;
        Ok(plain)
    }

    /// Opens the original message.
    pub fn open(&self, keys: &KeyRing) -> anyhow::Result<Envelope> {
        Ok(serde_json::from_slice(&self.plain(keys)?)?)
    }
}

/// An entry as the stream holds it.
struct Stored {
    /// Its position in the stream.
    seq: u64,
    entry: DeadLetter,
    /// Its headers: the trace context of the delivery that set it aside.
    headers: HeaderMap,
}

impl Stored {
    /// The trace a replay continues: the delivery that set the message
    /// aside, or (an entry without one) the message's own.
    fn trace_parent(&self, envelope: &Envelope) -> opentelemetry::Context {
        let header = |name: &str| self.headers.get(name).map(|v| v.as_str());
        match header(HEADER_TRACEPARENT) {
            Some(traceparent) => {
                telemetry::remote_context(Some(traceparent), header(HEADER_TRACESTATE))
            }
            None => telemetry::remote_context(
                envelope.traceparent.as_deref(),
                envelope.tracestate.as_deref(),
            ),
        }
    }
}

async fn entries(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<(jetstream::stream::Stream, Vec<Stored>)> {
    let mut stream = js.get_stream(stream).await?;
    let state = stream.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok((stream, out));
    }
    for seq in state.first_sequence..=state.last_sequence {
        // Deleted positions inside the range are skipped.
        let Ok(message) = stream.get_raw_message(seq).await else {
            continue;
        };
        match serde_json::from_slice::<DeadLetter>(&message.payload) {
            Ok(entry) => out.push(Stored {
                seq,
                entry,
                headers: message.headers,
            }),
            Err(e) => tracing::warn!(seq, error = %e, "unreadable dead-letter entry skipped"),
        }
    }
    Ok((stream, out))
}

/// Lists the entries of the dead-letter stream.
pub async fn list(js: &jetstream::Context, stream: &str) -> anyhow::Result<Vec<Listed>> {
    let (_, entries) = entries(js, stream).await?;
    Ok(entries
        .into_iter()
        .map(|stored| Listed {
            seq: stored.seq,
            summary: stored.entry.summary,
        })
        .collect())
}

/// Applies dead-lettered messages again (all, or the one at `only`): each
/// gets its outcome event like any other message, in a CONSUMER span that
/// continues the trace of the delivery that set it aside; entries that
/// reach an outcome other than 503 are removed from the stream.
pub async fn replay(
    js: &jetstream::Context,
    stream: &str,
    keys: &KeyRing,
    rotator: &Rotator,
    publisher: &Publisher,
    only: Option<u64>,
) -> anyhow::Result<Vec<Replayed>> {
    let (stream, entries) = entries(js, stream).await?;
    let mut out = Vec::new();
    for stored in entries {
        let seq = stored.seq;
        if only.is_some_and(|s| s != seq) {
            continue;
        }
        let decoded = Decoded::new(stored.entry.open(keys)?);
        let from = wire::Consumed {
            subject: SUBJECT_DEAD_LETTER,
            group: None,
            path: "replay",
            attempt: 1,
        };
        let parent = stored.trace_parent(&decoded.envelope);
        let span = wire::process_span(&decoded, &from, publisher.server(), parent);
        let handled = replay_one(rotator, publisher, &decoded, seq)
            .instrument(span)
            .await?;
        let status = handled.status().code();
        let removed = status != 503 && stream.delete_message(seq).await?;
        out.push(Replayed {
            seq,
            event_id: handled.event_id,
            integration_id: handled.integration_id,
            status,
            removed,
        });
    }
    if let Some(seq) = only
        && out.is_empty()
    {
        anyhow::bail!("no dead-letter entry at seq {seq}");
    }
    Ok(out)
}

/// Applies one dead-lettered message and publishes its outcome event.
async fn replay_one(
    rotator: &Rotator,
    publisher: &Publisher,
    decoded: &Decoded,
    seq: u64,
) -> anyhow::Result<Handled> {
    let handled = match rotator.handle(std::slice::from_ref(decoded)).await {
        Ok(mut handled) => handled
            .pop()
            .unwrap_or_else(|| Handled::unavailable(decoded)),
        Err(e) => {
            tracing::warn!(seq, error = %e, "store still unavailable");
            Handled::unavailable(decoded)
        }
    };
    wire::record_outcome(&tracing::Span::current(), &handled);
    publisher
        .outcome(&handled)
        .await
        .map_err(|e| anyhow::anyhow!("cannot publish the outcome event: {e}"))?;
    Ok(handled)
}

/// Re-seals every entry that is not under the active key, so that an old
/// key can leave the ring: the new entry (same id and summary, a new stream
/// position) is stored before the old one is deleted. Interrupted between
/// the two, an entry exists twice until the next run; a replay of both
/// applies it once (the store recognises the event id).
pub async fn reencrypt(
    js: &jetstream::Context,
    stream: &str,
    keys: &KeyRing,
) -> anyhow::Result<ReencryptReport> {
    let (stream, entries) = entries(js, stream).await?;
    let active_key = keys.active_key_id().to_owned();
    let mut reencrypted = 0;
    for Stored {
        seq,
        entry,
        headers,
    } in entries
    {
        if entry.key_id == active_key {
            continue;
        }
        let plain = entry.plain(keys)?;
        let renewed = DeadLetter::seal(keys, entry.summary, &plain);
        // The trace context stays with the entry.
        js.publish_with_headers(
            SUBJECT_DEAD_LETTER,
            headers,
            serde_json::to_vec(&renewed)?.into(),
        )
        .await?
        .await?;
        stream.delete_message(seq).await?;
        reencrypted += 1;
    }
    Ok(ReencryptReport {
        reencrypted,
        active_key,
    })
}
