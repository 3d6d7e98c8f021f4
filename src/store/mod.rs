//! The integration store: one small interface, [`Store`], over the
//! database that holds integrations, API keys and the record of processed
//! events.
//!
//! The store owns encryption at rest: callers hand it plaintext
//! [`SecretId`]s and get back records that have no secret field; only
//! [`Store::reveal_secret`] (for operators and tests) returns a plaintext.
//!
//! This file holds the trait and the row types; the rotation rules that do
//! not depend on SQL are in `rules.rs`, so that every backend applies them
//! the same way; choosing and opening a backend, and the key check
//! ([`verify_keys`]) that keeps a wrong key from sealing anything beside
//! rows it cannot read, are in `open.rs`.

/// The integration columns every backend selects, as a macro so that
/// queries stay `&'static str` (built with `concat!`).
macro_rules! integration_columns {
    () => {
        "id, owner, name, address, namespace, role_id, secret_ciphertext, secret_key_id, \
         created_at, updated_at, last_rotated_at, rotation_count, previous_ciphertext, \
         previous_key_id, previous_expires_at, last_event_id, last_applied_at"
    };
}

mod codec;
mod group;
mod open;
mod postgres;
mod renewal;
mod rules;
mod sql;
mod sqlite;

use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;
use secrecy::SecretString;
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::ApiKeyHash;
use crate::crypto::{CryptoError, KeyRing, Sealed};
use crate::domain::{
    AUTH_APPROLE, Integration, KIND_HASHICORP, NewIntegration, Owner, RoleTarget, SecretId,
    WrappingToken, whole_seconds,
};

pub(crate) use open::ping_when_idle;
pub use open::{Backend, Create, KeyCheckError, KeyUsage, open, verify_keys};
pub use postgres::PgStore;
pub use renewal::{RenewalCandidate, RenewalRecord, RenewalState, due_at};
pub(crate) use rules::{
    Current, DIGEST_PURPOSE, IntegrationUpdate, OneRotation, Plan, ProcessedRow, blob_sha256,
    key_digests, known_outcomes, owners_by_key, plan_batch, previous_key_id, previous_key_of,
};
pub use sql::SqlStore;
pub use sqlite::SqliteStore;

/// How many rows `reencrypt` moves per transaction.
const REENCRYPT_BATCH: i64 = 200;

/// What can go wrong in the store. Messages are for operators' logs; the
/// worker maps them to a bare 503 for callers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with a transient
    /// failure (connection loss, pool timeout, serialization failure,
    /// deadlock, shutdown): worth retrying.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The store did not answer before the deadline of the messages at
    /// hand (a lock held elsewhere, no free connection, a slow server).
    #[error("the store did not answer in time")]
    TimedOut,
    /// Any other database error: retrying will not help.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored secret could not be opened.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The configured database URL is not usable.
    #[error("invalid database URL: {0}")]
    Url(String),
    /// The store does not exist, and was not to be created.
    #[error(
        "no store at {0}: it is created by `rotation-worker migrate` or the worker's first start; \
         check database.url / database.sqlite_path"
    )]
    Missing(String),
    /// The SQLite file or its directory cannot be created.
    #[error("cannot create the SQLite file {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::TimedOut)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_transient(&e) {
            Self::Unavailable(e)
        } else {
            Self::Database(e)
        }
    }
}

/// The retry decision for database errors, kept pure so it can be tested.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            if let Some(sqlite) = db.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                // The primary result code (the low byte of an extended
                // one): SQLITE_BUSY, SQLITE_LOCKED, SQLITE_IOERR,
                // SQLITE_FULL, SQLITE_CANTOPEN. A lock held elsewhere, a
                // full or failing disk: worth retrying, and never a reason
                // to refuse a rotation for good.
                let code =
                    sqlx::error::DatabaseError::code(sqlite).and_then(|c| c.parse::<i32>().ok());
                return code.is_some_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14));
            }
            matches!(
                db.code().as_deref(),
                // serialization_failure, deadlock_detected, admin_shutdown,
                // crash_shutdown, cannot_connect_now, too_many_connections,
                // lock_not_available and query_canceled (the lock and
                // statement timeouts), and a database that refuses
                // connections for now (55000, object_not_in_prerequisite_state).
                Some(
                    "40001"
                        | "40P01"
                        | "57P01"
                        | "57P02"
                        | "57P03"
                        | "53300"
                        | "55P03"
                        | "57014"
                        | "55000"
                )
            )
        }
        _ => false,
    }
}

/// An API key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyInfo {
    /// Key id, for `api-key revoke --id`.
    pub id: Uuid,
    /// The owner the key acts for.
    pub owner: Owner,
    /// When the key was created.
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When it was revoked, if it was.
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

/// Which API key to revoke.
#[derive(Debug, Clone)]
pub enum ApiKeySelector {
    /// By its id.
    Id(Uuid),
    /// By the key itself.
    Hash(ApiKeyHash),
}

/// An integration together with the owner it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedIntegration {
    /// The owner.
    pub owner: Owner,
    /// The record.
    pub integration: Integration,
    /// How many rotations changed its secret.
    pub rotation_count: i64,
    /// The rotation time last applied.
    pub last_rotated_at: Option<OffsetDateTime>,
    /// The event id of the last applied rotation or rollback, if it had one.
    pub last_event_id: Option<String>,
    /// When the worker applied the last rotation or rollback.
    pub last_applied_at: Option<OffsetDateTime>,
    /// Until when the secret the last change replaced is kept for a
    /// rollback; `None` when none is kept.
    pub previous_expires_at: Option<OffsetDateTime>,
}

impl OwnedIntegration {
    /// Whether a previous secret is kept at `now`, for a rollback.
    pub fn previous_kept(&self, now: OffsetDateTime) -> bool {
        self.previous_expires_at.is_some_and(|until| until > now)
    }
}

/// What a rotation changes the secret to.
#[derive(Debug, Clone)]
pub enum Change {
    /// A new secret.
    Secret(SecretId),
    /// The previous secret, put back; the current one becomes the
    /// previous. With `vault.verify = "login"`, the previous secret as it
    /// was verified: the rollback applies only if it is still the one kept.
    Rollback {
        /// The previous secret as verified, if it was.
        verified: Option<SecretId>,
    },
}

/// The MAC purpose of a rollback's digest in `processed_events`: an event
/// id used for a rollback is told apart from one used for a rotation.
const ROLLBACK_DIGEST_PURPOSE: &[u8] = b"rotation-worker/rollback/v1:";

impl Change {
    /// What `processed_events` keeps of the change, as `(purpose, data)`
    /// for a keyed digest: the secret, or the rollback marker.
    fn digest_input(&self) -> (&'static [u8], &[u8]) {
        match self {
            Self::Secret(secret) => (DIGEST_PURPOSE, secret.expose().as_bytes()),
            Self::Rollback { .. } => (ROLLBACK_DIGEST_PURPOSE, b"rollback"),
        }
    }
}

/// One requested rotation: the documented update, parsed. The caller's
/// API key is checked inside the rotation's transaction, so that a key
/// revoked before the transaction cannot let it through.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The digest of the caller's API key.
    pub key: ApiKeyHash,
    /// The integration to rotate.
    pub integration_id: Uuid,
    /// The new secret, or a rollback.
    pub change: Change,
    /// The role id the caller believes the integration has, if it said.
    pub role_id: Option<String>,
    /// When the rotation happened: the event's `rotatedAt`, else when the
    /// message reached NATS (a stream message) or the worker (a request).
    /// An older rotation than the last applied one is stale.
    pub rotated_at: OffsetDateTime,
    /// The event's identity, for idempotency; `None` for no deduplication.
    pub event_id: Option<String>,
    /// The event's own id (not a stream position), reported by the status
    /// operation once applied.
    pub own_event_id: Option<String>,
    /// Until when the secret this rotation replaces is kept for a rollback
    /// (now plus `worker.previous_secret_retention_hours`).
    pub keep_previous_until: OffsetDateTime,
}

/// What a rotation came to. Stored with the event id, so that a repeat
/// of the event yields exactly the same outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200: the new secret was stored.
    Applied(Integration),
    /// 200: the secret was already the stored one; nothing changed.
    Unchanged(Integration),
    /// 400: the event's `roleId` is not the integration's.
    RoleMismatch,
    /// 404: no such integration for this owner.
    NotFound,
    /// 409: older than the rotation already applied.
    Stale,
    /// 401: the API key was unknown or revoked when the transaction ran.
    Unauthorized,
    /// 422: the owner already applied this event id to another integration
    /// or with another secret.
    EventReused,
    /// 503: the stored secret does not open with the configured keys; the
    /// row is left as it is for an operator to repair.
    Unreadable,
    /// 409: a rollback, and no previous secret is kept.
    NoPrevious,
    /// 503: a rollback whose previous secret changed after it was verified.
    PreviousChanged,
}

impl Outcome {
    pub(crate) fn code(&self) -> &'static str {
        match self {
            Self::Applied(_) => "applied",
            Self::Unchanged(_) => "unchanged",
            Self::RoleMismatch => "role_mismatch",
            Self::NotFound => "not_found",
            Self::Stale => "stale",
            Self::Unauthorized => "unauthorized",
            Self::EventReused => "event_reused",
            Self::Unreadable => "unreadable",
            Self::NoPrevious => "no_previous",
            Self::PreviousChanged => "previous_changed",
        }
    }

    pub(crate) fn record(&self) -> Option<&Integration> {
        match self {
            Self::Applied(r) | Self::Unchanged(r) => Some(r),
            _ => None,
        }
    }

    /// Rebuilds a stored outcome; `None` if the row is not one this code wrote.
    pub(crate) fn from_stored(code: &str, record: Option<&str>) -> Option<Self> {
        let record = || record.and_then(|r| serde_json::from_str(r).ok());
        Some(match code {
            "applied" => Self::Applied(record()?),
            "unchanged" => Self::Unchanged(record()?),
            "role_mismatch" => Self::RoleMismatch,
            "not_found" => Self::NotFound,
            "stale" => Self::Stale,
            _ => return None,
        })
    }
}

/// The outcome of one [`Rotation`], and whether it was a repeat of an
/// event already processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationResult {
    /// The owner of the caller's key; `None` when the key was refused.
    pub owner: Option<Owner>,
    /// The outcome (for a repeat, the first one).
    pub outcome: Outcome,
    /// True when the event id had been processed before.
    pub duplicate: bool,
    /// The record of a success as JSON, when this batch recorded it for
    /// the event id: the outcome's body, so that it is serialised once.
    pub record_json: Option<Bytes>,
}

/// Counts from `reencrypt` and `dlq reencrypt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReencryptReport {
    /// Secrets (or dead-letter entries) moved to the active key.
    pub reencrypted: u64,
    /// The active key id.
    pub active_key: String,
}

/// Which message an unwrapped secret belongs to, within its owner.
#[derive(Debug, Clone, Copy)]
pub enum UnwrapKey<'a> {
    /// The message's identity for idempotency: its event id, or its
    /// JetStream stream position.
    Event(&'a str),
    /// A message without one (a request or core message without an event
    /// id): its wrapping token, which is only ever kept as a keyed digest.
    Token(&'a WrappingToken),
}

/// Where an unwrapped secret is kept: one message of one owner, a rotation
/// of one integration.
#[derive(Debug, Clone, Copy)]
pub struct UnwrapSlot<'a> {
    /// The caller's owner.
    pub owner: &'a Owner,
    /// The message.
    pub key: UnwrapKey<'a>,
    /// The integration it rotates.
    pub integration: Uuid,
}

/// The MAC purpose of a wrapping token's digest.
const TOKEN_DIGEST_PURPOSE: &[u8] = b"rotation-worker/wrapping-token/v1:";
/// The sealing purpose of an unwrapped secret, before its owner and key.
const UNWRAPPED_PURPOSE: &[u8] = b"rotation-worker/unwrapped-secret-id/v1:";

impl UnwrapKey<'_> {
    /// The row's `event_id`: the event id as it is, or `wrapped:` and the
    /// hex HMAC-SHA256 of the token under the active key's MAC key (a
    /// digest an event id cannot forge without the key).
    pub(crate) fn row_id(&self, keys: &KeyRing) -> String {
        match self {
            Self::Event(id) => (*id).to_owned(),
            Self::Token(token) => {
                let (_, mac) = keys.digest(TOKEN_DIGEST_PURPOSE, token.expose().as_bytes());
                let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
                format!("wrapped:{hex}")
            }
        }
    }
}

/// What an unwrapped secret is sealed bound to, besides its integration id:
/// its owner and its row's event id, each with its length.
pub(crate) fn unwrapped_purpose(owner: &Owner, event_id: &str) -> Vec<u8> {
    let mut purpose = UNWRAPPED_PURPOSE.to_vec();
    for part in [owner.as_str(), event_id] {
        purpose.extend_from_slice(&(part.len() as u64).to_be_bytes());
        purpose.extend_from_slice(part.as_bytes());
    }
    purpose
}

/// The store's interface. Every backend implements it; callers hold an
/// `Arc<dyn Store>` and never see SQL.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The backend's name, for logs: "sqlite" or "postgres".
    fn backend(&self) -> &'static str;

    /// Whether the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// How busy the connection pools are, for the metrics.
    fn pool_state(&self) -> PoolState;

    /// Stores a new API key's digest.
    async fn create_api_key(
        &self,
        owner: &Owner,
        hash: &ApiKeyHash,
    ) -> Result<ApiKeyInfo, StoreError>;
    /// Lists API keys, of one owner or all.
    async fn list_api_keys(&self, owner: Option<&Owner>) -> Result<Vec<ApiKeyInfo>, StoreError>;
    /// Revokes a key; `None` if there is no such key.
    async fn revoke_api_key(&self, key: &ApiKeySelector) -> Result<Option<ApiKeyInfo>, StoreError>;
    /// The owner of a valid (known, unrevoked) key.
    async fn authenticate(&self, hash: &ApiKeyHash) -> Result<Option<Owner>, StoreError>;

    /// Creates an integration, encrypting its secret.
    async fn create_integration(&self, new: &NewIntegration) -> Result<Integration, StoreError>;
    /// Creates many integrations in one transaction (all or none), for
    /// seeding; returns their ids in order.
    async fn create_integrations(&self, new: &[NewIntegration]) -> Result<Vec<Uuid>, StoreError>;
    /// One integration, with its owner.
    async fn get_integration(&self, id: Uuid) -> Result<Option<OwnedIntegration>, StoreError>;
    /// Integrations of one owner, or all, oldest first.
    async fn list_integrations(
        &self,
        owner: Option<&Owner>,
    ) -> Result<Vec<Integration>, StoreError>;
    /// Deletes an integration; false if there was none.
    async fn delete_integration(&self, id: Uuid) -> Result<bool, StoreError>;
    /// The decrypted secret of an integration.
    async fn reveal_secret(&self, id: Uuid) -> Result<Option<SecretString>, StoreError>;
    /// Re-encrypts every secret (current or previous) not under the
    /// active key.
    async fn reencrypt(&self) -> Result<ReencryptReport, StoreError>;
    /// The ids (at most two, in id order) of the integrations of the owner
    /// of `key`, if it is valid, that `target` names.
    async fn integrations_of_role(
        &self,
        key: &ApiKeyHash,
        target: &RoleTarget,
    ) -> Result<Vec<Uuid>, StoreError>;
    /// The previous secret of an integration, if one is kept at `now`.
    async fn reveal_previous(
        &self,
        id: Uuid,
        now: OffsetDateTime,
    ) -> Result<Option<SecretString>, StoreError>;
    /// Erases the previous secrets kept until `now` or before; returns how
    /// many.
    async fn erase_expired_previous(&self, now: OffsetDateTime) -> Result<u64, StoreError>;

    /// Applies rotations in one transaction and returns one result per
    /// rotation, in order. Rotations of one integration apply in the order
    /// given; a terminal outcome of one does not affect the others. An error
    /// means nothing was applied.
    async fn rotate(&self, batch: &[Rotation]) -> Result<Vec<RotationResult>, StoreError>;

    /// Refreshes the planner's statistics of the worker's tables where the
    /// database does not (PostgreSQL with `autovacuum` off): plans cached
    /// while a table was small would otherwise be kept as it grows. True
    /// when it did.
    async fn refresh_statistics(&self) -> Result<bool, StoreError>;

    /// Forgets processed event ids recorded before `before`, and the
    /// unwrapped secrets sealed before it; returns how many event ids.
    async fn prune_processed(&self, before: OffsetDateTime) -> Result<u64, StoreError>;

    /// Seals the secret_id just unwrapped into `slot`; a repeat keeps the
    /// first. A wrapping token unwraps once only: this is what a
    /// redelivery finds.
    async fn put_unwrapped(
        &self,
        slot: UnwrapSlot<'_>,
        secret: &SecretId,
    ) -> Result<(), StoreError>;
    /// The secret_id unwrapped earlier into `slot`, if it was for the
    /// slot's integration and opens with the configured keys.
    async fn get_unwrapped(&self, slot: UnwrapSlot<'_>) -> Result<Option<SecretId>, StoreError>;
    /// Erases the secret_id unwrapped into `slot`, if any.
    async fn forget_unwrapped(&self, slot: UnwrapSlot<'_>) -> Result<(), StoreError>;
    /// What `owner`'s event id `event_id` was applied as, if it was: its
    /// integration and first outcome. Read-only: what a message is checked
    /// against before anything irreversible (an unwrap) is done for it.
    async fn prior_event(
        &self,
        owner: &Owner,
        event_id: &str,
    ) -> Result<Option<(Uuid, Outcome)>, StoreError>;

    /// Which keys the stored rows use: one sealed secret per key id, and
    /// the recorded check values. Read-only.
    async fn key_usage(&self) -> Result<KeyUsage, StoreError>;
    /// Records check values of keys that have none yet, and returns the
    /// values now recorded for those key ids: another process may have
    /// recorded a different one first.
    async fn record_key_checks(
        &self,
        checks: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// The integrations whose previous secret's retention has ended by
    /// `now` (and which still hold it).
    async fn expired_previous(&self, now: OffsetDateTime) -> Result<Vec<Uuid>, StoreError>;
    /// What is known of integration `id`'s renewals.
    async fn renewal_state(&self, id: Uuid) -> Result<RenewalState, StoreError>;
    /// Every integration, with what is known of its renewals: what the
    /// schedule looks at.
    async fn renewal_candidates(&self) -> Result<Vec<RenewalCandidate>, StoreError>;
    /// Claims integration `id`'s renewal for `holder` (the renewal's event
    /// id) until `until`, unless another holder has it past `now`; whether
    /// this one has it.
    async fn claim_renewal(
        &self,
        id: Uuid,
        holder: Option<&str>,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError>;
    /// Records what a renewal of `id` came to; its claim ends.
    async fn record_renewal(&self, id: Uuid, record: RenewalRecord) -> Result<(), StoreError>;
    /// Marks integration `id`'s next renewal as due to look for what an
    /// interrupted renewal minted (a renewal marks it before it mints; it
    /// is cleared once one has accounted for what it minted and replaced),
    /// and says whether it was due already: yes unless a renewal had
    /// cleared it, as for an integration never renewed.
    async fn mark_renewal_sweep_due(&self, id: Uuid) -> Result<bool, StoreError>;
    /// Sets or clears that mark.
    async fn set_renewal_sweep_due(&self, id: Uuid, due: bool) -> Result<(), StoreError>;
    /// Records `expires_at` (`None`: never) as the expiry of `secret`, if
    /// it is integration `id`'s current secret; whether it was.
    async fn record_expiry(
        &self,
        id: Uuid,
        secret: &SecretId,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<bool, StoreError>;
}

/// The store's connection pools at one moment (both of SQLite's, the
/// writer's and the readers', together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolState {
    /// Connections lent out right now.
    pub in_use: u32,
    /// Connections open, idle or in use.
    pub size: u32,
    /// The most connections the pools may open.
    pub max: u32,
}

/// An integration row as every backend returns it: ids and times go
/// through the column codecs.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredIntegration {
    #[sqlx(try_from = "codec::Id")]
    pub(crate) id: Uuid,
    pub(crate) owner: String,
    pub(crate) name: String,
    pub(crate) address: String,
    pub(crate) namespace: Option<String>,
    pub(crate) role_id: String,
    pub(crate) secret_ciphertext: Vec<u8>,
    pub(crate) secret_key_id: String,
    #[sqlx(try_from = "codec::Time")]
    pub(crate) created_at: OffsetDateTime,
    #[sqlx(try_from = "codec::Time")]
    pub(crate) updated_at: OffsetDateTime,
    pub(crate) last_rotated_at: Option<codec::Time>,
    pub(crate) rotation_count: i64,
    pub(crate) previous_ciphertext: Option<Vec<u8>>,
    pub(crate) previous_key_id: Option<String>,
    pub(crate) previous_expires_at: Option<codec::Time>,
    pub(crate) last_event_id: Option<String>,
    pub(crate) last_applied_at: Option<codec::Time>,
}

impl StoredIntegration {
    pub(crate) fn record(&self) -> Integration {
        self.record_with(
            self.name.clone(),
            self.address.clone(),
            self.namespace.clone(),
            self.role_id.clone(),
        )
    }

    /// The record of this row, with its strings given (copied or moved).
    fn record_with(
        &self,
        name: String,
        address: String,
        namespace: Option<String>,
        role_id: String,
    ) -> Integration {
        Integration {
            id: self.id,
            name,
            kind: KIND_HASHICORP.to_owned(),
            address,
            namespace,
            auth_method: AUTH_APPROLE.to_owned(),
            role_id,
            created_at: whole_seconds(self.created_at),
            updated_at: whole_seconds(self.updated_at),
        }
    }

    pub(crate) fn sealed(&self) -> Sealed {
        Sealed {
            key_id: self.secret_key_id.clone(),
            blob: self.secret_ciphertext.clone(),
        }
    }

    /// The previous secret and until when it is kept, if one is.
    pub(crate) fn previous(&self) -> Option<(Sealed, OffsetDateTime)> {
        self.previous_with(self.previous_ciphertext.clone())
    }

    /// The previous secret, with its ciphertext given (copied or moved).
    fn previous_with(&self, blob: Option<Vec<u8>>) -> Option<(Sealed, OffsetDateTime)> {
        let blob = blob?;
        let key_id = previous_key_of(self.previous_key_id.as_deref(), &self.secret_key_id);
        let until = self.previous_expires_at?;
        Some((Sealed { key_id, blob }, until.into()))
    }

    /// The row as a batch checks rotations against it; its strings and
    /// ciphertexts move rather than being copied (a batch reads a row per
    /// event).
    pub(crate) fn into_current(mut self) -> Current {
        let blob = self.previous_ciphertext.take();
        let previous = self.previous_with(blob);
        let (name, address) = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.address),
        );
        let namespace = self.namespace.take();
        let record = self.record_with(name, address, namespace, self.role_id.clone());
        Current {
            record,
            sealed: Sealed {
                key_id: self.secret_key_id,
                blob: self.secret_ciphertext,
            },
            previous,
            owner: self.owner,
            role_id: self.role_id,
            last_rotated_at: self.last_rotated_at.map(Into::into),
        }
    }

    pub(crate) fn into_owned(self) -> OwnedIntegration {
        OwnedIntegration {
            integration: self.record(),
            previous_expires_at: self.previous().map(|(_, until)| until),
            owner: Owner::from_trusted(self.owner),
            rotation_count: self.rotation_count,
            last_rotated_at: self.last_rotated_at.map(Into::into),
            last_event_id: self.last_event_id,
            last_applied_at: self.last_applied_at.map(Into::into),
        }
    }
}

/// An API key row as every backend returns it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct StoredApiKey {
    #[sqlx(try_from = "codec::Id")]
    pub(crate) id: Uuid,
    pub(crate) owner: String,
    #[sqlx(try_from = "codec::Time")]
    pub(crate) created_at: OffsetDateTime,
    pub(crate) revoked_at: Option<codec::Time>,
}

impl From<StoredApiKey> for ApiKeyInfo {
    fn from(row: StoredApiKey) -> Self {
        Self {
            id: row.id,
            owner: Owner::from_trusted(row.owner),
            created_at: row.created_at,
            revoked_at: row.revoked_at.map(Into::into),
        }
    }
}

/// A `processed_events` row as every backend reads it back.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ProcessedEvent {
    pub(crate) owner: String,
    pub(crate) event_id: String,
    #[sqlx(try_from = "codec::Id")]
    pub(crate) integration_id: Uuid,
    pub(crate) outcome: String,
    pub(crate) record: Option<String>,
    pub(crate) secret_digest: Option<Vec<u8>>,
    pub(crate) digest_key_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_retried_and_others_not() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::other(
            "reset"
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::ColumnNotFound("x".into())));
    }
}
