//! The wire contract of a rotation: what arrives (headers and JSON body),
//! how it is decoded, and the statuses and failure bodies that go back.
//!
//! Decoding is total: any bytes and any headers map either to a
//! [`RotationEvent`] or to a [`Failure`] with a 4xx status, and never panic.
//! Failure messages name the field and the rule, never a submitted value,
//! so a secret sent in the wrong field cannot be echoed back.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::auth::{ApiKey, AuthError};
use crate::domain::{RoleTarget, SecretId, WrappingToken};

/// Subject on which rotations are announced.
pub const SUBJECT_ROTATED: &str = "vault.approle.rotated";
/// Subject of the request-reply endpoint.
pub const SUBJECT_ROTATE: &str = "vault.approle.rotate";
/// Subject of the status endpoint.
pub const SUBJECT_STATUS: &str = "vault.approle.status";
/// Subject of the rollback endpoint.
pub const SUBJECT_ROLLBACK: &str = "vault.approle.rollback";
/// Subject of the renewal endpoint.
pub const SUBJECT_RENEW: &str = "vault.approle.renew";
/// Subject of completion events.
pub const SUBJECT_COMPLETED: &str = "vault.approle.rotation.completed";
/// Subject of failure events.
pub const SUBJECT_FAILED: &str = "vault.approle.rotation.failed";

/// `Authorization: Bearer <apiKey>`.
pub const HEADER_AUTHORIZATION: &str = "Authorization";
/// The event's identity, and JetStream's de-duplication id.
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";
/// The id of the event an outcome event reports on.
pub const HEADER_EVENT_ID: &str = "Rotation-Event-Id";
/// What an outcome event's message asked for: `rotate`, `rollback` or
/// `renew`.
pub const HEADER_OPERATION: &str = "Rotation-Operation";
/// W3C trace context; the NATS header map is case-sensitive, and the W3C
/// names are lowercase.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// W3C trace state.
pub const HEADER_TRACESTATE: &str = "tracestate";
/// Micro-protocol error headers on a failed request's reply.
pub const HEADER_SERVICE_ERROR: &str = "Nats-Service-Error";
/// See [`HEADER_SERVICE_ERROR`].
pub const HEADER_SERVICE_ERROR_CODE: &str = "Nats-Service-Error-Code";

/// Largest accepted body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest accepted event id.
pub const MAX_EVENT_ID_BYTES: usize = 256;

/// The outcome statuses of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "u16")]
pub enum Status {
    /// Applied (or already applied).
    Ok,
    /// Invalid body.
    BadRequest,
    /// Missing, malformed, unknown or revoked API key.
    Unauthorized,
    /// No such integration for this owner.
    NotFound,
    /// Older than the rotation already applied.
    Conflict,
    /// The event id was already used for a different rotation.
    Unprocessable,
    /// The store could not be reached in time.
    Unavailable,
}

impl Status {
    /// Every status, so that metrics can show each one before it occurs.
    pub const ALL: [Status; 7] = [
        Self::Ok,
        Self::BadRequest,
        Self::Unauthorized,
        Self::NotFound,
        Self::Conflict,
        Self::Unprocessable,
        Self::Unavailable,
    ];

    /// The numeric status.
    pub fn code(self) -> u16 {
        match self {
            Self::Ok => 200,
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::Unprocessable => 422,
            Self::Unavailable => 503,
        }
    }
}

impl Status {
    /// The low-cardinality `error.type` of a failed outcome.
    pub fn error_type(self) -> &'static str {
        match self {
            Self::Ok => "",
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Unprocessable => "unprocessable",
            Self::Unavailable => "unavailable",
        }
    }
}

impl From<Status> for u16 {
    fn from(s: Status) -> u16 {
        s.code()
    }
}

/// A refused or failed rotation: a status and a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The status.
    pub status: Status,
    /// What went wrong, safe to show to the caller.
    pub message: String,
}

impl Failure {
    /// A 400 with the given message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: Status::BadRequest,
            message: message.into(),
        }
    }
}

impl From<AuthError> for Failure {
    fn from(e: AuthError) -> Self {
        Self {
            status: Status::Unauthorized,
            message: e.to_string(),
        }
    }
}

/// The body of a failure event, and of a failed request's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailureBody {
    /// The integration, when the body named a valid one.
    pub integration_id: Option<Uuid>,
    /// The event's id, when it had one.
    pub event_id: Option<String>,
    /// 400, 401, 404, 409, 422 or 503.
    pub status: u16,
    /// What went wrong.
    pub error: String,
}

/// A message as it arrived, on any path: the headers that matter and the
/// raw body. This is also what a dead-letter entry keeps (encrypted).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
    /// The `traceparent` header.
    pub traceparent: Option<String>,
    /// The `tracestate` header.
    pub tracestate: Option<String>,
    /// The body.
    #[serde(with = "base64_bytes")]
    pub payload: Bytes,
    /// The identity of the stored message when the event has no id of its
    /// own (a JetStream stream position), so a redelivery is recognised.
    pub fallback_id: Option<String>,
    /// When the message reached NATS (a stream message's timestamp) or the
    /// worker (a request): the rotation time of an event without
    /// `rotatedAt`. A dead letter keeps it, so a late replay is stale.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub received_at: Option<OffsetDateTime>,
    /// What the message asks for: a rotation, or a rollback (from the
    /// rollback endpoint). A dead letter keeps it, so a replay does the same.
    #[serde(default, skip_serializing_if = "Operation::is_rotate")]
    pub operation: Operation,
}

/// What a message asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Store a new secret (`vault.approle.rotated`, `vault.approle.rotate`).
    #[default]
    Rotate,
    /// Put the previous secret back (`vault.approle.rollback`).
    Rollback,
    /// Mint, test and store the next secret_id (`vault.approle.renew`).
    Renew,
}

impl Operation {
    fn is_rotate(&self) -> bool {
        *self == Self::Rotate
    }

    /// Its name in the `Rotation-Operation` header of outcome events.
    pub fn name(self) -> &'static str {
        match self {
            Self::Rotate => "rotate",
            Self::Rollback => "rollback",
            Self::Renew => "renew",
        }
    }
}

mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        STANDARD
            .decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// A decoded, valid rotation event (not yet authorised against the store).
#[derive(Debug, Clone)]
pub struct RotationEvent {
    /// The integration to rotate.
    pub target: Target,
    /// The new secret, the token that wraps it, or a rollback.
    pub secret: Submitted,
    /// The event id from the body.
    pub event_id: Option<String>,
    /// When the rotation happened in Vault.
    pub rotated_at: Option<OffsetDateTime>,
    /// The role id the sender believes the integration has.
    pub role_id: Option<String>,
}

/// Which integration a message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `integrationId`.
    Id(Uuid),
    /// `roleId` (with `address` and `namespace`, if given) without
    /// `integrationId`: the caller's one integration with that role.
    Role(RoleTarget),
}

impl Target {
    /// The integration id, when the message names one.
    pub fn id(&self) -> Option<Uuid> {
        match self {
            Self::Id(id) => Some(*id),
            Self::Role(_) => None,
        }
    }
}

/// The new secret as a body carries it: exactly one of `secretId` and
/// `wrappedSecretId`; or, for a rollback, the previous secret.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// `secretId`: the secret itself.
    Plain(SecretId),
    /// `wrappedSecretId`: a Vault response-wrapping token to unwrap.
    Wrapped(WrappingToken),
    /// A rollback: the previous secret the store keeps.
    Previous,
    /// A renewal: the secret the worker mints in the integration's Vault.
    Minted,
}

impl Submitted {
    /// Whether the secret comes from the integration's Vault (unwrapped,
    /// or minted), so that the message cannot be handled without it.
    pub fn from_vault(&self) -> bool {
        matches!(self, Self::Wrapped(_) | Self::Minted)
    }

    /// The plain secret, if the body carried it.
    pub fn plain(&self) -> Option<&SecretId> {
        match self {
            Self::Plain(secret) => Some(secret),
            Self::Wrapped(_) | Self::Previous | Self::Minted => None,
        }
    }
}

/// Message of a body with neither or both of the secret fields.
const ONE_SECRET: &str =
    "exactly one of secretId (a non-empty string) and wrappedSecretId is required";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBody {
    #[serde(default)]
    integration_id: Option<Value>,
    #[serde(default)]
    secret_id: Option<Value>,
    #[serde(default)]
    wrapped_secret_id: Option<Value>,
    #[serde(default)]
    event_id: Option<Value>,
    #[serde(default)]
    rotated_at: Option<Value>,
    #[serde(default)]
    role_id: Option<Value>,
    #[serde(default)]
    address: Option<Value>,
    #[serde(default)]
    namespace: Option<Value>,
}

/// Whether `prefix` can start a subject: dot-separated tokens, none
/// empty, no wildcard, no blank.
pub fn is_subject_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && !token
                    .chars()
                    .any(|c| c == '*' || c == '>' || c.is_whitespace() || c.is_control())
        })
}

/// Whether `reply` starts with one of `prefixes` (as text: `_INBOX`
/// admits `_INBOX.abc` and a tenant's `_INBOX_acme.abc`) and not with
/// `own`, the worker's own inbox prefix, where its JetStream acknowledgements
/// arrive.
pub fn reply_allowed(reply: &str, prefixes: &[String], own: &str) -> bool {
    let own_inbox = reply == own || reply.starts_with(&format!("{own}."));
    !(reply.is_empty() || own_inbox)
        && prefixes
            .iter()
            .any(|prefix| reply.starts_with(prefix.as_str()))
}

/// Checks an event id, from the header or the body.
pub fn check_event_id(id: &str) -> Result<(), Failure> {
    if id.is_empty() || id.len() > MAX_EVENT_ID_BYTES || id.chars().any(char::is_control) {
        return Err(Failure::bad_request(format!(
            "event id must be 1 to {MAX_EVENT_ID_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// Reads a body's JSON object, as the contract's 400 row says.
fn raw_body(payload: &[u8]) -> Result<RawBody, Failure> {
    if payload.len() > MAX_BODY_BYTES {
        return Err(Failure::bad_request("body is larger than 64 KiB"));
    }
    // serde would read a JSON array into a struct, so check the shape first.
    if payload.trim_ascii_start().first() != Some(&b'{') {
        return Err(Failure::bad_request("body must be a JSON object"));
    }
    // serde_json's messages carry positions and field names, never input.
    serde_json::from_slice(payload)
        .map_err(|e| Failure::bad_request(format!("body is not a valid JSON object: {e}")))
}

/// An optional string field, or a 400 naming it.
fn optional_string(value: Option<Value>, field: &str) -> Result<Option<String>, Failure> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Failure::bad_request(format!("{field} must be a string"))),
    }
}

/// The `integrationId` of a body, if it is a UUID string.
fn uuid_field(value: Option<&Value>) -> Option<Uuid> {
    match value {
        Some(Value::String(s)) if s.len() == 36 => Uuid::parse_str(s).ok(),
        _ => None,
    }
}

/// Which integration a rotation is for: `integrationId`, or without it a
/// non-empty `roleId` (with `address` and `namespace` when given).
fn target(raw: &mut RawBody) -> Result<Target, Failure> {
    if raw.integration_id.is_some() {
        return uuid_field(raw.integration_id.as_ref())
            .map(Target::Id)
            .ok_or_else(|| Failure::bad_request("integrationId must be a UUID string"));
    }
    let missing = || Failure::bad_request("integrationId (a UUID string) or roleId is required");
    let role_id = optional_string(raw.role_id.take(), "roleId")?
        .filter(|r| !r.is_empty())
        .ok_or_else(missing)?;
    Ok(Target::Role(RoleTarget {
        role_id,
        address: optional_string(raw.address.take(), "address")?,
        namespace: optional_string(raw.namespace.take(), "namespace")?,
    }))
}

/// Decodes a rotation body. The checks follow the contract's 400 row.
pub fn decode_body(payload: &[u8]) -> Result<RotationEvent, Failure> {
    let mut raw = raw_body(payload)?;
    let target = target(&mut raw)?;
    let secret = submitted(raw.secret_id, raw.wrapped_secret_id)?;

    let event_id = match raw.event_id {
        None => None,
        Some(Value::String(s)) => {
            check_event_id(&s)?;
            Some(s)
        }
        Some(_) => return Err(Failure::bad_request("eventId must be a string")),
    };

    let rotated_at = raw.rotated_at.map(rotated_at).transpose()?;
    let role_id = optional_string(raw.role_id, "roleId")?;

    Ok(RotationEvent {
        target,
        secret,
        event_id,
        rotated_at,
        role_id,
    })
}

/// Decodes a body that only names an integration (status, rollback):
/// `{"integrationId": "<uuid>"}`; other fields are ignored.
pub fn decode_integration_id(payload: &[u8]) -> Result<Uuid, Failure> {
    let raw = raw_body(payload)?;
    uuid_field(raw.integration_id.as_ref())
        .ok_or_else(|| Failure::bad_request("integrationId must be a UUID string"))
}

/// Decodes a rollback body, `{"integrationId": "<uuid>"}`. Its identity
/// is the `Nats-Msg-Id` header.
pub fn decode_rollback_body(payload: &[u8]) -> Result<RotationEvent, Failure> {
    let id = decode_integration_id(payload)?;
    Ok(RotationEvent {
        target: Target::Id(id),
        secret: Submitted::Previous,
        event_id: None,
        rotated_at: None,
        role_id: None,
    })
}

/// Decodes a renewal body: `{"integrationId": "<uuid>"}`, or the roleId
/// targeting of a rotation (`roleId`, optional `address`, `namespace`).
/// Its identity is the `Nats-Msg-Id` header.
pub fn decode_renew_body(payload: &[u8]) -> Result<RotationEvent, Failure> {
    let mut raw = raw_body(payload)?;
    let target = target(&mut raw)?;
    let role_id = optional_string(raw.role_id, "roleId")?;
    Ok(RotationEvent {
        target,
        secret: Submitted::Minted,
        event_id: None,
        rotated_at: None,
        role_id,
    })
}

/// The secret fields: exactly one of them, each valid. A `null` is
/// absent, as serde reads it.
fn submitted(plain: Option<Value>, wrapped: Option<Value>) -> Result<Submitted, Failure> {
    match (plain, wrapped) {
        (Some(_), Some(_)) | (None, None) => Err(Failure::bad_request(ONE_SECRET)),
        (Some(Value::String(s)), None) => SecretId::parse(s)
            .map(Submitted::Plain)
            .map_err(|e| Failure::bad_request(e.0)),
        (Some(_), None) => Err(Failure::bad_request("secretId must be a non-empty string")),
        (None, Some(Value::String(s))) => WrappingToken::parse(s)
            .map(Submitted::Wrapped)
            .map_err(|e| Failure::bad_request(e.0)),
        (None, Some(_)) => Err(Failure::bad_request(
            "wrappedSecretId must be a non-empty string",
        )),
    }
}

/// A body's `rotatedAt`: an RFC 3339 time, in UTC and to the microsecond
/// (both stores keep microseconds; compare like with like).
fn rotated_at(value: Value) -> Result<OffsetDateTime, Failure> {
    let invalid = || Failure::bad_request("rotatedAt must be an RFC 3339 time");
    let Value::String(text) = value else {
        return Err(invalid());
    };
    let t = OffsetDateTime::parse(&text, &Rfc3339)
        .map_err(|_| invalid())?
        .to_offset(time::UtcOffset::UTC);
    Ok(t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t))
}

/// An envelope decoded as far as it can be without the store: the API key
/// (or why there is none) and the body (or why it is invalid).
#[derive(Debug)]
pub struct Decoded {
    /// The envelope.
    pub envelope: Envelope,
    /// The API key from `Authorization`.
    pub key: Result<ApiKey, AuthError>,
    /// The decoded body.
    pub body: Result<RotationEvent, Failure>,
    /// The integration a `roleId` names, once found (see
    /// [`Decoded::resolve_to`]).
    pub resolved: Option<Uuid>,
    /// A renewal whose claim the schedule took before dispatching it
    /// (never set from the wire): any other renewal takes it itself.
    pub claimed: bool,
}

impl Decoded {
    /// Decodes an envelope.
    pub fn new(envelope: Envelope) -> Self {
        let key = ApiKey::from_authorization(envelope.authorization.as_deref());
        let mut body = match envelope.operation {
            Operation::Rotate => decode_body(&envelope.payload),
            Operation::Rollback => decode_rollback_body(&envelope.payload),
            Operation::Renew => decode_renew_body(&envelope.payload),
        };
        if let Some(id) = envelope.msg_id.as_deref()
            && let Err(e) = check_event_id(id)
        {
            body = Err(e);
        }
        Self {
            envelope,
            key,
            body,
            resolved: None,
            claimed: false,
        }
    }

    /// Records the integration the message's `roleId` names.
    pub fn resolve_to(&mut self, id: Uuid) {
        self.resolved = Some(id);
    }

    /// The role a message names instead of an integration, if it is valid
    /// and not yet resolved.
    pub fn role_target(&self) -> Option<&RoleTarget> {
        match &self.body {
            Ok(RotationEvent {
                target: Target::Role(role),
                ..
            }) if self.resolved.is_none() => Some(role),
            _ => None,
        }
    }

    /// The event's own id: `Nats-Msg-Id`, else the body's `eventId`. An id
    /// that fails validation is no id at all: it is never echoed (in an
    /// outcome, a header, a log line or a span), and the message is refused
    /// with a 400.
    pub fn event_id(&self) -> Option<&str> {
        match self.envelope.msg_id.as_deref() {
            Some(id) => check_event_id(id).is_ok().then_some(id),
            None => self.body.as_ref().ok()?.event_id.as_deref(),
        }
    }

    /// The identity used for idempotency: the event id, else the stored
    /// message's position.
    pub fn dedupe_id(&self) -> Option<&str> {
        self.event_id().or(self.envelope.fallback_id.as_deref())
    }

    /// The integration the body names, if it names a valid one, or the
    /// one its `roleId` was resolved to.
    pub fn integration_id(&self) -> Option<Uuid> {
        match &self.body {
            Ok(event) => event.target.id().or(self.resolved),
            // A body refused for another field may still name an integration.
            Err(_) => peek_integration_id(&self.envelope.payload),
        }
    }
}

/// The `integrationId` of an otherwise invalid body, for failure events.
fn peek_integration_id(payload: &[u8]) -> Option<Uuid> {
    if payload.len() > MAX_BODY_BYTES {
        return None;
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Peek {
        integration_id: Option<Value>,
    }
    let peek: Peek = serde_json::from_slice(payload).ok()?;
    uuid_field(peek.integration_id.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(body: &str) -> Result<(), String> {
        decode_body(body.as_bytes())
            .map(|_| ())
            .map_err(|f| f.message)
    }

    const ID: &str = "5f8c6a74-5f2e-4f5a-9e58-5b9c3c7d2a11";

    #[test]
    fn valid_bodies_decode() {
        let event = decode_body(
            format!(
                r#"{{"integrationId":"{ID}","secretId":"s.new","eventId":"e-1",
                "rotatedAt":"2026-04-24T09:18:11.123456789+02:00","roleId":"r","extra":1}}"#
            )
            .as_bytes(),
        )
        .expect("valid");
        assert_eq!(
            event.target.id().map(|id| id.to_string()).as_deref(),
            Some(ID)
        );
        assert_eq!(event.secret.plain().map(SecretId::expose), Some("s.new"));
        assert_eq!(event.event_id.as_deref(), Some("e-1"));
        assert_eq!(
            event.rotated_at,
            Some(time::macros::datetime!(2026-04-24 07:18:11.123456 UTC))
        );
        assert_eq!(event.role_id.as_deref(), Some("r"));
    }

    #[test]
    fn every_invalid_shape_is_a_bad_request_without_echo() {
        let cases = [
            "".to_owned(),
            "[]".to_owned(),
            "null".to_owned(),
            "\"s\"".to_owned(),
            "{".to_owned(),
            r#"{"integrationId":"not-a-uuid","secretId":"s"}"#.to_owned(),
            r#"{"integrationId":7,"secretId":"s"}"#.to_owned(),
            r#"{"secretId":"s"}"#.to_owned(),
            format!(r#"{{"integrationId":"{ID}"}}"#),
            format!(r#"{{"integrationId":"{ID}","secretId":null}}"#),
            format!(r#"{{"integrationId":"{ID}","secretId":42}}"#),
            format!(r#"{{"integrationId":"{ID}","secretId":""}}"#),
            format!(r#"{{"integrationId":"{ID}","secretId":" \t "}}"#),
            format!(
                r#"{{"integrationId":"{ID}","secretId":"{}"}}"#,
                "x".repeat(4097)
            ),
            format!(r#"{{"integrationId":"{ID}","secretId":"s","rotatedAt":"yesterday"}}"#),
            format!(r#"{{"integrationId":"{ID}","secretId":"s","rotatedAt":1}}"#),
            format!(r#"{{"integrationId":"{ID}","secretId":"s","roleId":1}}"#),
            format!(r#"{{"integrationId":"{ID}","secretId":"s","eventId":""}}"#),
            format!(r#"{{"integrationId":"{ID}","secretId":"s","secretId":"t"}}"#),
            format!(
                r#"{{"integrationId":"{ID}","secretId":"s", "pad":"{}"}}"#,
                "x".repeat(MAX_BODY_BYTES)
            ),
        ];
        for case in &cases {
            let message = status(case).expect_err(case);
            assert!(!message.contains("x".repeat(20).as_str()));
            assert!(!message.contains("not-a-uuid") && !message.contains("yesterday"));
        }
    }

    #[test]
    fn msg_id_header_wins_and_stream_position_is_the_fallback() {
        let body = Bytes::from(format!(
            r#"{{"integrationId":"{ID}","secretId":"s","eventId":"body"}}"#
        ));
        let mut envelope = Envelope {
            payload: body,
            ..Envelope::default()
        };
        assert_eq!(Decoded::new(envelope.clone()).event_id(), Some("body"));
        envelope.msg_id = Some("header".into());
        assert_eq!(Decoded::new(envelope.clone()).event_id(), Some("header"));

        let plain = Bytes::from(format!(r#"{{"integrationId":"{ID}","secretId":"s"}}"#));
        let envelope = Envelope {
            payload: plain,
            fallback_id: Some("js:S:1:7".into()),
            ..Envelope::default()
        };
        let decoded = Decoded::new(envelope);
        assert_eq!(decoded.event_id(), None);
        assert_eq!(decoded.dedupe_id(), Some("js:S:1:7"));
    }

    #[test]
    fn an_invalid_event_id_is_never_the_event_id() {
        let body = format!(r#"{{"integrationId":"{ID}","secretId":"s","eventId":"body"}}"#);
        for bad in ["m".repeat(MAX_EVENT_ID_BYTES + 1), "a\u{7}b".to_owned()] {
            let decoded = Decoded::new(Envelope {
                msg_id: Some(bad.clone()),
                payload: Bytes::from(body.clone()),
                fallback_id: Some("js:S:1:8".into()),
                ..Envelope::default()
            });
            assert!(decoded.body.is_err(), "an invalid Nats-Msg-Id is a 400");
            assert_eq!(decoded.event_id(), None);
            assert_eq!(decoded.dedupe_id(), Some("js:S:1:8"));
        }
        let long_body = format!(
            r#"{{"integrationId":"{ID}","secretId":"s","eventId":"{}"}}"#,
            "e".repeat(MAX_EVENT_ID_BYTES + 1)
        );
        let decoded = Decoded::new(Envelope {
            payload: Bytes::from(long_body),
            ..Envelope::default()
        });
        assert_eq!(decoded.event_id(), None);
    }

    #[test]
    fn failures_of_other_fields_still_name_the_integration() {
        let envelope = Envelope {
            payload: Bytes::from(format!(r#"{{"integrationId":"{ID}","secretId":""}}"#)),
            ..Envelope::default()
        };
        assert_eq!(
            Decoded::new(envelope)
                .integration_id()
                .map(|u| u.to_string())
                .as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn a_reply_subject_is_allowed_under_a_listed_prefix_only() {
        let prefixes = ["_INBOX".to_owned(), "app.replies".to_owned()];
        let own = "_INBOX_rotation_worker";
        for ok in ["_INBOX.abc.1", "_INBOX_acme.x", "app.replies.x"] {
            assert!(reply_allowed(ok, &prefixes, own), "{ok}");
        }
        for refused in [
            "rotation-worker.dlq",
            "vault.approle.rotation.completed",
            "app.x",
            "_INBOX_rotation_worker.abc",
            "_INBOX_rotation_worker",
            "",
        ] {
            assert!(!reply_allowed(refused, &prefixes, own), "{refused}");
        }
        assert!(is_subject_prefix("_INBOX") && is_subject_prefix("a.b"));
        for bad in ["", "a..b", "a.*", ">", "a b", ".a"] {
            assert!(!is_subject_prefix(bad), "{bad}");
        }
    }

    #[test]
    fn the_status_label_values_are_the_contracts_statuses() {
        let codes: Vec<u16> = Status::ALL.iter().map(|s| s.code()).collect();
        assert_eq!(codes, crate::telemetry::STATUS_LABELS);
    }
}
