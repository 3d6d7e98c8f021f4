//! The integration store: one small interface, [`Store`], over the
//! database that holds integrations, API keys and the record of processed
//! events.
//!
//! The store owns encryption at rest: callers hand it plaintext
//! [`SecretId`]s and get back records that have no secret field; only
//! [`Store::reveal_secret`] (for operators and tests) returns a plaintext.
//! The rotation rules that do not depend on SQL live here, in [`decide`]
//! and [`plan_batch`], so that every backend applies them the same way; so
//! does the key check ([`verify_keys`]) that keeps a wrong key from sealing
//! anything beside rows it cannot read.

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
mod postgres;
mod sql;
mod sqlite;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::auth::ApiKeyHash;
use crate::config::DatabaseSettings;
use crate::crypto::{CryptoError, KeyRing, Sealed};
use crate::domain::{
    AUTH_APPROLE, Integration, KIND_HASHICORP, NewIntegration, Owner, RoleTarget, SecretId,
    WrappingToken, whole_seconds,
};

pub use postgres::PgStore;
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

/// What [`verify_keys`] checks a key ring against.
#[derive(Debug, Default)]
pub struct KeyUsage {
    /// One integration per key id its secret is sealed under.
    pub samples: Vec<(Uuid, Sealed)>,
    /// Recorded `(key id, check value)` pairs.
    pub checks: Vec<(String, Vec<u8>)>,
}

impl KeyUsage {
    /// No secret is stored and no key has been recorded: any key will do.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty() && self.checks.is_empty()
    }
}

/// Why a key ring does not fit the store. Every message names the key id
/// and what to do, and never a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyCheckError {
    /// Stored secrets are sealed under a key the ring lacks.
    #[error(
        "stored secrets are sealed under encryption key `{0}`, which is not configured: add it to \
         encryption.keys (or restore the key file it came from) and start again; nothing was written"
    )]
    Missing(String),
    /// A configured key is not the one that sealed the stored rows.
    #[error(
        "encryption key `{0}` is not the key this store's secrets were sealed under (its check \
         value differs): configure the original key `{0}` and start again; nothing was written"
    )]
    Mismatch(String),
}

/// Checks a key ring against what the store holds: every key id that
/// stored secrets use must be in the ring, and every key of the ring with a
/// recorded check value must give that value (or, where none is recorded
/// yet, open a stored secret). Returns the check values to record: those of
/// keys proven here and of the active key, where none is recorded.
pub fn verify_keys(
    usage: &KeyUsage,
    keys: &KeyRing,
) -> Result<Vec<(String, Vec<u8>)>, KeyCheckError> {
    let recorded = |id: &str| usage.checks.iter().find(|(k, _)| k == id).map(|(_, v)| v);
    for (key_id, value) in &usage.checks {
        if keys.check_value(key_id).is_some_and(|mine| &mine != value) {
            return Err(KeyCheckError::Mismatch(key_id.clone()));
        }
    }
    let mut proven = Vec::new();
    for (id, sealed) in &usage.samples {
        if !keys.has_key(&sealed.key_id) {
            return Err(KeyCheckError::Missing(sealed.key_id.clone()));
        }
        if recorded(&sealed.key_id).is_some() {
            // The check value proved the key; a row that does not open
            // under it was damaged, and is reported when it is read.
            continue;
        }
        if keys.open(*id, sealed).is_err() {
            return Err(KeyCheckError::Mismatch(sealed.key_id.clone()));
        }
        proven.push(sealed.key_id.clone());
    }
    proven.push(keys.active_key_id().to_owned());
    proven.sort();
    proven.dedup();
    Ok(proven
        .into_iter()
        .filter(|id| recorded(id).is_none())
        .filter_map(|id| Some((id.clone(), keys.check_value(&id)?)))
        .collect())
}

/// Which database the settings name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file: the default, for one worker.
    Sqlite(PathBuf),
    /// PostgreSQL at `database.url`: for several workers and production.
    Postgres,
}

impl Backend {
    /// The store as it may be logged: the SQLite file's absolute path, or
    /// the PostgreSQL URL with its password replaced.
    pub fn describe(&self, settings: &DatabaseSettings) -> String {
        match self {
            Self::Sqlite(path) => {
                let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                format!("sqlite:{}", path.display())
            }
            Self::Postgres => match url::Url::parse(settings.url.expose_secret().trim()) {
                Ok(mut url) => {
                    if url.password().is_some() {
                        let _ = url.set_password(Some("***"));
                    }
                    url.set_query(None);
                    url.to_string()
                }
                Err(_) => "PostgreSQL".into(),
            },
        }
    }

    /// An empty `database.url` means the SQLite file at
    /// `database.sqlite_path`; `sqlite:PATH` (or `sqlite://PATH`) names
    /// another file; `postgres://` and `postgresql://` name PostgreSQL.
    /// Errors never echo the URL, which may hold a password.
    pub fn of(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let url = settings.url.expose_secret().trim();
        if url.is_empty() {
            return Ok(Self::Sqlite(settings.sqlite_path.clone()));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() || path.contains('?') || path == ":memory:" {
                return Err(StoreError::Url(
                    "an sqlite: URL names a file and takes no parameters".into(),
                ));
            }
            return Ok(Self::Sqlite(path.into()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres);
        }
        Err(StoreError::Url(
            "expected postgres://, postgresql:// or sqlite:, or nothing for the SQLite default"
                .into(),
        ))
    }
}

/// Whether opening a store may create its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Create the database (and the SQLite file's directory) if missing.
    IfMissing,
    /// Fail with [`StoreError::Missing`] instead: commands that only read
    /// must not leave a database behind a typo.
    Never,
}

/// A connection idle at least this long is pinged before it is lent out.
const PING_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Pool options that ping a connection before lending it only when it has
/// been idle a while (sqlx's default pings every time: one more round trip
/// per transaction). A connection that broke while busy fails its
/// statement with an I/O error, which is transient: the attempt is retried
/// on another connection.
pub(crate) fn ping_when_idle<DB: sqlx::Database>(
    options: sqlx::pool::PoolOptions<DB>,
) -> sqlx::pool::PoolOptions<DB> {
    use sqlx::Connection;
    options
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// Opens (and migrates) the store the settings name, and says once which
/// one: the SQLite file's absolute path, or the PostgreSQL URL without its
/// password.
pub async fn open(
    settings: &DatabaseSettings,
    keys: Arc<KeyRing>,
    create: Create,
) -> Result<Arc<dyn Store>, StoreError> {
    let backend = Backend::of(settings)?;
    let shown = backend.describe(settings);
    let store: Arc<dyn Store> = match backend {
        Backend::Sqlite(path) => {
            if create == Create::Never && !path.exists() {
                return Err(StoreError::Missing(shown));
            }
            Arc::new(SqliteStore::open(&path, settings, keys).await?)
        }
        Backend::Postgres => Arc::new(
            PgStore::connect_with(settings, keys, create)
                .await
                .map_err(|e| match e {
                    StoreError::Missing(_) => StoreError::Missing(shown.clone()),
                    e => e,
                })?,
        ),
    };
    tracing::info!(store = %shown, "store opened");
    Ok(store)
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
        Integration {
            id: self.id,
            name: self.name.clone(),
            kind: KIND_HASHICORP.to_owned(),
            address: self.address.clone(),
            namespace: self.namespace.clone(),
            auth_method: AUTH_APPROLE.to_owned(),
            role_id: self.role_id.clone(),
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
        let blob = self.previous_ciphertext.clone()?;
        let key_id = self.previous_key_id.clone()?;
        let until = self.previous_expires_at?;
        Some((Sealed { key_id, blob }, until.into()))
    }

    pub(crate) fn into_current(self) -> Current {
        Current {
            record: self.record(),
            sealed: self.sealed(),
            previous: self.previous(),
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

/// Domain separation of the secret digests kept with processed events.
pub(crate) const DIGEST_PURPOSE: &[u8] = b"rotation-worker/event-secret/v1:";

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

/// What an event id was first used for, and what it came to.
#[derive(Debug, Clone)]
pub(crate) struct Prior {
    pub(crate) integration_id: Uuid,
    /// `(key id, digest)` of the secret; `None` for rows older than digests.
    digest: Option<(String, Vec<u8>)>,
    pub(crate) outcome: Outcome,
}

impl Prior {
    /// Whether `rotation` is the very rotation this event id was used for.
    fn is_repeat_of(&self, rotation: &Rotation, keys: &KeyRing) -> bool {
        if self.integration_id != rotation.integration_id {
            return false;
        }
        let Some((key_id, digest)) = &self.digest else {
            return true;
        };
        let (purpose, data) = rotation.change.digest_input();
        match keys.digest_matches(key_id, purpose, data, digest) {
            Some(same) => same,
            None => {
                // Without the key the secrets cannot be compared; refusing
                // is the answer that cannot drop a rotation.
                tracing::warn!(key_id = %key_id, integration_id = %rotation.integration_id,
                    "repeated event id recorded under a key that is no longer configured; refused as reused");
                false
            }
        }
    }
}

/// Rebuilds the recorded outcomes of rows read from `processed_events`,
/// keyed by `(owner, event_id)`.
pub(crate) fn known_outcomes(
    rows: Vec<ProcessedEvent>,
) -> Result<HashMap<(String, String), Prior>, StoreError> {
    let mut known = HashMap::with_capacity(rows.len());
    for row in rows {
        let outcome =
            Outcome::from_stored(&row.outcome, row.record.as_deref()).ok_or_else(|| {
                StoreError::Database(sqlx::Error::Decode(
                    format!(
                        "unreadable processed_events row for event {:?}",
                        row.event_id
                    )
                    .into(),
                ))
            })?;
        let prior = Prior {
            integration_id: row.integration_id,
            digest: row.digest_key_id.zip(row.secret_digest),
            outcome,
        };
        known.insert((row.owner, row.event_id), prior);
    }
    Ok(known)
}

/// The state of an integration that a rotation is checked against.
#[derive(Debug)]
pub(crate) struct Current {
    pub(crate) owner: String,
    pub(crate) role_id: String,
    pub(crate) last_rotated_at: Option<OffsetDateTime>,
    pub(crate) sealed: Sealed,
    /// The previous secret and until when it is kept.
    pub(crate) previous: Option<(Sealed, OffsetDateTime)>,
    pub(crate) record: Integration,
}

/// What a backend must do for one rotation.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Write nothing but the outcome.
    Keep(Outcome),
    /// Store the new sealed secret and the new record, keeping the
    /// replaced secret as the previous one.
    Apply(Applied),
}

/// A change to apply: the new secret, the one it replaces, the record.
#[derive(Debug)]
pub(crate) struct Applied {
    pub(crate) sealed: Sealed,
    pub(crate) replaced: Sealed,
    pub(crate) record: Integration,
    pub(crate) rotated_at: OffsetDateTime,
}

impl Decision {
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Self::Keep(o) => o.clone(),
            Self::Apply(applied) => Outcome::Applied(applied.record.clone()),
        }
    }
}

/// The rotation rules, in the contract's order: owner (404), role (400),
/// staleness (409), then apply unless the secret is already the stored one.
/// A stored secret that does not open is never overwritten: it may be the
/// only copy of a good secret under a key this process lacks. A rollback
/// has rules of its own ([`decide_rollback`]).
pub(crate) fn decide(
    current: Option<&Current>,
    owner: &Owner,
    rotation: &Rotation,
    keys: &KeyRing,
    now: OffsetDateTime,
) -> Decision {
    let Some(current) = current.filter(|c| c.owner == owner.as_str()) else {
        return Decision::Keep(Outcome::NotFound);
    };
    let secret = match &rotation.change {
        Change::Secret(secret) => secret,
        Change::Rollback { verified } => {
            return decide_rollback(current, verified.as_ref(), rotation, keys, now);
        }
    };
    if rotation
        .role_id
        .as_deref()
        .is_some_and(|r| r != current.role_id)
    {
        return Decision::Keep(Outcome::RoleMismatch);
    }
    if current
        .last_rotated_at
        .is_some_and(|last| rotation.rotated_at < last)
    {
        return Decision::Keep(Outcome::Stale);
    }
    match keys.open(current.record.id, &current.sealed) {
        Ok(stored) if constant_time_eq(stored.expose_secret(), secret.expose()) => {
            return Decision::Keep(Outcome::Unchanged(current.record.clone()));
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(integration_id = %current.record.id, error = %e,
                "stored secret does not decrypt; the row is left unchanged");
            return Decision::Keep(Outcome::Unreadable);
        }
    }
    let sealed = keys.seal(current.record.id, secret.expose());
    applied(current, sealed, rotation, now)
}

/// A rollback: the previous secret, if one is kept and opens (and is the
/// one verified, if it was), becomes the current one, and the current one
/// the previous. An operator's command, not a Vault event: it is never
/// stale; its time still moves the stale fence forward.
fn decide_rollback(
    current: &Current,
    verified: Option<&SecretId>,
    rotation: &Rotation,
    keys: &KeyRing,
    now: OffsetDateTime,
) -> Decision {
    let Some((previous, _)) = current.previous.as_ref().filter(|(_, until)| *until > now) else {
        return Decision::Keep(Outcome::NoPrevious);
    };
    match keys.open(current.record.id, previous) {
        Ok(kept) if verified.is_none_or(|v| constant_time_eq(kept.expose_secret(), v.expose())) => {
            applied(current, previous.clone(), rotation, now)
        }
        Ok(_) => Decision::Keep(Outcome::PreviousChanged),
        Err(e) => {
            tracing::error!(integration_id = %current.record.id, error = %e,
                "previous secret does not decrypt; the rollback is not applied");
            Decision::Keep(Outcome::Unreadable)
        }
    }
}

fn applied(
    current: &Current,
    sealed: Sealed,
    rotation: &Rotation,
    now: OffsetDateTime,
) -> Decision {
    let mut record = current.record.clone();
    record.updated_at = crate::domain::whole_seconds(now);
    Decision::Apply(Applied {
        sealed,
        replaced: current.sealed.clone(),
        record,
        rotated_at: rotation.rotated_at,
    })
}

/// A row for `processed_events`.
#[derive(Debug)]
pub(crate) struct ProcessedRow {
    pub(crate) owner: String,
    pub(crate) event_id: String,
    pub(crate) integration_id: Uuid,
    pub(crate) outcome: &'static str,
    pub(crate) record: Option<String>,
    pub(crate) digest_key_id: String,
    pub(crate) secret_digest: Vec<u8>,
}

/// The final write to one integration after a batch.
#[derive(Debug)]
pub(crate) struct IntegrationUpdate {
    pub(crate) id: Uuid,
    pub(crate) sealed: Sealed,
    /// The secret the last change replaced, and until when it is kept;
    /// `None` erases the previous secret (a retention of zero).
    pub(crate) previous: Option<(Sealed, OffsetDateTime)>,
    pub(crate) updated_at: OffsetDateTime,
    pub(crate) last_rotated_at: OffsetDateTime,
    /// Rotations and rollbacks in the batch that changed the secret.
    pub(crate) applied: i64,
    /// The last applied change's own event id.
    pub(crate) last_event_id: Option<String>,
    /// When the batch applied it.
    pub(crate) applied_at: OffsetDateTime,
    /// `(key id, digest)` of the new secret under [`DIGEST_PURPOSE`];
    /// `None` when unknown (a rollback), which the fast path then skips.
    pub(crate) digest: Option<(String, Vec<u8>)>,
}

/// SHA-256 of a sealed secret's bytes, kept beside them: whoever finds the
/// two matching knows the bytes are as this code wrote them.
pub(crate) fn blob_sha256(sealed: &Sealed) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(&sealed.blob).to_vec()
}

/// One rotation of a new secret as a single statement takes it: every
/// value the rules need, computed beforehand (the sealed secret, its
/// digest, the record's new `updatedAt`). The statement applies it only
/// when nothing but a plain success can come of it; else it changes
/// nothing and the batch path decides.
#[derive(Debug)]
pub(crate) struct OneRotation {
    pub(crate) key_hash: Vec<u8>,
    pub(crate) id: Uuid,
    pub(crate) role_id: Option<String>,
    pub(crate) rotated_at: OffsetDateTime,
    /// The key ids this process holds: a stored secret under another key
    /// is never overwritten here.
    pub(crate) held_keys: Vec<String>,
    /// The new secret, sealed under the active key.
    pub(crate) sealed: Sealed,
    /// Its digest, under the active key's MAC key.
    pub(crate) digest: (String, Vec<u8>),
    pub(crate) event_id: Option<String>,
    pub(crate) own_event_id: Option<String>,
    pub(crate) now: OffsetDateTime,
    /// The record's new `updatedAt` (whole seconds), as RFC 3339.
    pub(crate) updated_at: String,
    /// Until when the replaced secret is kept; not kept when not after `now`.
    pub(crate) keep_previous_until: OffsetDateTime,
    /// The SHA-256 of the stored ciphertext this process vouches for.
    pub(crate) vouched: Vec<u8>,
}

impl OneRotation {
    /// The single-statement form of `rotation`, if it has one (a new
    /// secret, not a rollback).
    pub(crate) fn of(
        rotation: &Rotation,
        keys: &KeyRing,
        now: OffsetDateTime,
        vouched: Vec<u8>,
    ) -> Option<Self> {
        let Change::Secret(secret) = &rotation.change else {
            return None;
        };
        Some(Self {
            key_hash: rotation.key.0.to_vec(),
            id: rotation.integration_id,
            role_id: rotation.role_id.clone(),
            rotated_at: rotation.rotated_at,
            held_keys: keys.key_ids().map(str::to_owned).collect(),
            sealed: keys.seal(rotation.integration_id, secret.expose()),
            digest: keys.digest(DIGEST_PURPOSE, secret.expose().as_bytes()),
            event_id: rotation.event_id.clone(),
            own_event_id: rotation.own_event_id.clone(),
            now,
            updated_at: crate::domain::format_utc_seconds(now),
            keep_previous_until: rotation.keep_previous_until,
            vouched,
        })
    }
}

/// What a batch comes to: one result per rotation, and the writes that
/// make it so.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) results: Vec<RotationResult>,
    pub(crate) processed: Vec<ProcessedRow>,
    pub(crate) updates: Vec<IntegrationUpdate>,
}

/// Decides a whole batch against the callers' owners (`owners`, by API
/// key digest, holding only keys valid inside the transaction), the locked
/// rows (`current`) and what was recorded for its event ids (`prior`), in
/// arrival order within each integration. Backends read, call this, and
/// write the plan: a few set-based statements per batch instead of several
/// per rotation. It returns exactly one result per rotation, in order.
pub(crate) fn plan_batch(
    batch: &[Rotation],
    owners: &HashMap<[u8; 32], Owner>,
    current: HashMap<Uuid, Current>,
    prior: HashMap<(String, String), Prior>,
    keys: &KeyRing,
    now: OffsetDateTime,
) -> Plan {
    let mut planner = Planner {
        keys,
        now,
        current,
        prior,
        processed: Vec::new(),
        updates: HashMap::new(),
    };
    let mut results: Vec<Option<RotationResult>> = vec![None; batch.len()];
    for index in lock_order(batch) {
        let rotation = &batch[index];
        results[index] = Some(planner.plan(rotation, owners.get(&rotation.key.0)));
    }
    Plan {
        // `lock_order` is a permutation of the batch, so every slot is
        // filled; an empty one would be a bug, answered as a 503 rather
        // than shifting the results of the others.
        results: results
            .into_iter()
            .map(|r| {
                r.unwrap_or(RotationResult {
                    owner: None,
                    outcome: Outcome::Unreadable,
                    duplicate: false,
                    record_json: None,
                })
            })
            .collect(),
        processed: planner.processed,
        updates: planner.updates.into_values().collect(),
    }
}

/// A batch's running state while it is planned: the rows as the rotations
/// before leave them, the event ids used so far, and the writes to make.
struct Planner<'a> {
    keys: &'a KeyRing,
    now: OffsetDateTime,
    current: HashMap<Uuid, Current>,
    prior: HashMap<(String, String), Prior>,
    processed: Vec<ProcessedRow>,
    updates: HashMap<Uuid, IntegrationUpdate>,
}

impl Planner<'_> {
    /// What one rotation comes to: a 401 for a key refused inside the
    /// transaction; the first outcome for an exact repeat and a 422 for a
    /// reused event id; else the rules of [`decide`].
    fn plan(&mut self, rotation: &Rotation, owner: Option<&Owner>) -> RotationResult {
        let Some(owner) = owner else {
            return RotationResult {
                owner: None,
                outcome: Outcome::Unauthorized,
                duplicate: false,
                record_json: None,
            };
        };
        let result = |outcome, duplicate, record_json| RotationResult {
            owner: Some(owner.clone()),
            outcome,
            duplicate,
            record_json,
        };
        let key = rotation
            .event_id
            .as_ref()
            .map(|id| (owner.as_str().to_owned(), id.clone()));
        if let Some(first) = key.as_ref().and_then(|k| self.prior.get(k)) {
            return if first.is_repeat_of(rotation, self.keys) {
                result(first.outcome.clone(), true, None)
            } else {
                result(Outcome::EventReused, false, None)
            };
        }
        let current = self.current.get(&rotation.integration_id);
        let decision = decide(current, owner, rotation, self.keys, self.now);
        let outcome = decision.outcome();
        // Only successes are recorded: a refusal changes nothing, not even
        // the idempotency table, and is decided the same way on a repeat
        // (staleness only grows).
        // The digest of a new secret is both what its event id applied and
        // the row's new digest: worked out once, when first needed.
        let keys = self.keys;
        let digest = std::cell::OnceCell::new();
        let digest = || {
            digest
                .get_or_init(|| {
                    let (purpose, data) = rotation.change.digest_input();
                    keys.digest(purpose, data)
                })
                .clone()
        };
        let record_json = match (key, outcome.record()) {
            (Some(key), Some(record)) => self.remember(key, rotation, &outcome, record, digest()),
            _ => None,
        };
        if let Decision::Apply(applied) = decision {
            let digest = matches!(rotation.change, Change::Secret(_)).then(digest);
            self.apply(applied, rotation, digest);
        }
        result(outcome, false, record_json)
    }

    /// Records the event id of a success, with what it applied (`digest`,
    /// of [`Change::digest_input`]); returns the record as JSON.
    fn remember(
        &mut self,
        (owner, event_id): (String, String),
        rotation: &Rotation,
        outcome: &Outcome,
        record: &Integration,
        (digest_key_id, secret_digest): (String, Vec<u8>),
    ) -> Option<Bytes> {
        let json = serde_json::to_string(record).ok();
        self.processed.push(ProcessedRow {
            owner: owner.clone(),
            event_id: event_id.clone(),
            integration_id: rotation.integration_id,
            outcome: outcome.code(),
            record: json.clone(),
            digest_key_id: digest_key_id.clone(),
            secret_digest: secret_digest.clone(),
        });
        let first = Prior {
            integration_id: rotation.integration_id,
            digest: Some((digest_key_id, secret_digest)),
            outcome: outcome.clone(),
        };
        self.prior.insert((owner, event_id), first);
        json.map(Bytes::from)
    }

    /// Applies a change to the batch's view of its row and to the write
    /// the batch ends with; `digest` is the new secret's, if it is one.
    fn apply(&mut self, applied: Applied, rotation: &Rotation, digest: Option<(String, Vec<u8>)>) {
        let Applied {
            sealed,
            replaced,
            record,
            rotated_at,
        } = applied;
        let previous =
            Some((replaced, rotation.keep_previous_until)).filter(|(_, until)| *until > self.now);
        let (id, updated_at) = (record.id, record.updated_at);
        if let Some(row) = self.current.get_mut(&id) {
            row.last_rotated_at = Some(
                row.last_rotated_at
                    .map_or(rotated_at, |t| t.max(rotated_at)),
            );
            row.sealed = sealed.clone();
            row.previous = previous.clone();
            row.record = record;
        }
        let update = self.updates.entry(id).or_insert(IntegrationUpdate {
            id,
            sealed: sealed.clone(),
            previous: None,
            updated_at: self.now,
            last_rotated_at: rotated_at,
            applied: 0,
            last_event_id: None,
            applied_at: self.now,
            digest: None,
        });
        update.sealed = sealed;
        update.previous = previous;
        update.updated_at = updated_at;
        update.last_rotated_at = update.last_rotated_at.max(rotated_at);
        update.applied += 1;
        update.last_event_id = rotation.own_event_id.clone();
        update.digest = digest;
    }
}

/// The distinct API key digests of a batch, for the in-transaction check.
pub(crate) fn key_digests(batch: &[Rotation]) -> Vec<&[u8]> {
    let mut keys: Vec<&[u8]> = batch.iter().map(|r| &r.key.0[..]).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// The owners of the valid keys, read inside the transaction.
pub(crate) fn owners_by_key(rows: Vec<(Vec<u8>, String)>) -> HashMap<[u8; 32], Owner> {
    rows.into_iter()
        .filter_map(|(hash, owner)| Some((hash.try_into().ok()?, Owner::from_trusted(owner))))
        .collect()
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Processing order for a batch: grouped by integration, arrival order kept
/// within each group. Every transaction then takes row locks in id order,
/// so two workers' batches cannot deadlock on each other.
pub(crate) fn lock_order(batch: &[Rotation]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| batch[i].integration_id);
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ApiKeyHash;
    use crate::domain::{AUTH_APPROLE, KIND_HASHICORP};
    use time::macros::datetime;

    fn ring() -> KeyRing {
        let k = crate::crypto::generate_key();
        KeyRing::new([("k1", &k)], None).expect("ring")
    }

    fn current(keys: &KeyRing, secret: &str, last: Option<OffsetDateTime>) -> Current {
        let id = Uuid::new_v4();
        let t = datetime!(2026-01-01 0:00 UTC);
        Current {
            owner: "acme".into(),
            role_id: "role-1".into(),
            last_rotated_at: last,
            sealed: keys.seal(id, secret),
            previous: None,
            record: Integration {
                id,
                name: "prod".into(),
                kind: KIND_HASHICORP.into(),
                address: "https://vault:8200".into(),
                namespace: None,
                auth_method: AUTH_APPROLE.into(),
                role_id: "role-1".into(),
                created_at: t,
                updated_at: t,
            },
        }
    }

    fn rotation(c: &Current, secret: &str) -> Rotation {
        Rotation {
            key: ApiKeyHash([7; 32]),
            integration_id: c.record.id,
            change: Change::Secret(SecretId::parse(secret.into()).expect("secret")),
            role_id: None,
            rotated_at: datetime!(2026-01-20 0:00 UTC),
            event_id: None,
            own_event_id: None,
            keep_previous_until: datetime!(2026-03-01 0:00 UTC),
        }
    }

    fn owner(name: &str) -> Owner {
        Owner::parse(name).expect("owner")
    }

    #[test]
    fn rules_apply_in_contract_order() {
        let keys = ring();
        let now = datetime!(2026-02-01 0:00 UTC);
        let c = current(&keys, "old", Some(datetime!(2026-01-15 0:00 UTC)));

        let (acme, evil) = (owner("acme"), owner("evil"));
        let new = rotation(&c, "new");
        assert_eq!(
            decide(Some(&c), &evil, &new, &keys, now).outcome(),
            Outcome::NotFound
        );
        assert_eq!(
            decide(None, &acme, &new, &keys, now).outcome(),
            Outcome::NotFound
        );

        let mut wrong_role = rotation(&c, "new");
        wrong_role.role_id = Some("role-2".into());
        wrong_role.rotated_at = datetime!(2025-01-01 0:00 UTC);
        assert_eq!(
            decide(Some(&c), &acme, &wrong_role, &keys, now).outcome(),
            Outcome::RoleMismatch
        );

        let mut stale = rotation(&c, "old");
        stale.rotated_at = datetime!(2026-01-14 0:00 UTC);
        assert_eq!(
            decide(Some(&c), &acme, &stale, &keys, now).outcome(),
            Outcome::Stale
        );

        let same = rotation(&c, "old");
        assert_eq!(
            decide(Some(&c), &acme, &same, &keys, now).outcome(),
            Outcome::Unchanged(c.record.clone())
        );

        let mut fresh = rotation(&c, "new");
        fresh.role_id = Some("role-1".into());
        match decide(Some(&c), &acme, &fresh, &keys, now) {
            Decision::Apply(Applied {
                sealed,
                replaced,
                record,
                rotated_at,
            }) => {
                assert_eq!(replaced, c.sealed, "the replaced secret is kept");
                assert_eq!(record.updated_at, crate::domain::whole_seconds(now));
                assert_eq!(rotated_at, fresh.rotated_at);
                assert_eq!(
                    keys.open(c.record.id, &sealed)
                        .expect("opens")
                        .expose_secret(),
                    "new"
                );
            }
            other => panic!("expected Apply, got {other:?}"),
        }
    }

    #[test]
    fn an_unreadable_stored_secret_is_never_overwritten() {
        let keys = ring();
        let mut c = current(&keys, "old", None);
        c.sealed.blob[20] ^= 1;
        let decision = decide(Some(&c), &owner("acme"), &rotation(&c, "new"), &keys, now());
        assert_eq!(decision.outcome(), Outcome::Unreadable);
    }

    fn now() -> OffsetDateTime {
        datetime!(2026-02-01 0:00 UTC)
    }

    /// Two integrations of one owner, the one with the smaller id first
    /// (a batch plans them in id order).
    fn two_in_id_order(keys: &KeyRing) -> (Current, Current) {
        let (a, b) = (current(keys, "old", None), current(keys, "old", None));
        if a.record.id < b.record.id {
            (a, b)
        } else {
            (b, a)
        }
    }

    fn with_event_id(c: &Current, secret: &str) -> Rotation {
        Rotation {
            event_id: Some("ev-1".into()),
            ..rotation(c, secret)
        }
    }

    fn codes(plan: &Plan) -> Vec<(&'static str, bool)> {
        plan.results
            .iter()
            .map(|r| (r.outcome.code(), r.duplicate))
            .collect()
    }

    fn rows(currents: &[&Current]) -> HashMap<Uuid, Current> {
        currents
            .iter()
            .map(|c| (c.record.id, clone_current(c)))
            .collect()
    }

    #[test]
    fn a_reused_event_id_is_refused_and_an_exact_repeat_is_not() {
        let keys = ring();
        let (a, b) = two_in_id_order(&keys);
        let owners = HashMap::from([([7; 32], owner("acme"))]);
        // In one batch: the first use applies, an exact repeat is the first
        // outcome, another secret or another integration is a 422.
        let batch = [
            with_event_id(&a, "new"),
            with_event_id(&a, "new"),
            with_event_id(&a, "other"),
            with_event_id(&b, "new"),
        ];
        let plan = plan_batch(
            &batch,
            &owners,
            rows(&[&a, &b]),
            HashMap::new(),
            &keys,
            now(),
        );
        assert_eq!(
            codes(&plan),
            [
                ("applied", false),
                ("applied", true),
                ("event_reused", false),
                ("event_reused", false)
            ]
        );
        assert_eq!(plan.processed.len(), 1);
        assert_eq!(plan.updates.len(), 1);
        let row = &plan.processed[0];
        assert_eq!(row.digest_key_id, "k1");
        assert!(!row.secret_digest.windows(3).any(|w| w == b"new"));
        // The first use carries its record as the JSON it recorded, which
        // is the record's own; the others are serialised when answered.
        let first = &plan.results[0];
        let Outcome::Applied(record) = &first.outcome else {
            panic!("{first:?}");
        };
        let json = serde_json::to_string(record).unwrap();
        assert_eq!(row.record.as_deref(), Some(json.as_str()));
        assert_eq!(first.record_json.as_deref(), Some(json.as_bytes()));
        assert!(plan.results[1..].iter().all(|r| r.record_json.is_none()));
    }

    #[test]
    fn a_later_batch_compares_with_what_was_recorded() {
        let keys = ring();
        let (a, b) = two_in_id_order(&keys);
        let owners = HashMap::from([([7; 32], owner("acme"))]);
        let (digest_key_id, digest) = keys.digest(DIGEST_PURPOSE, b"new");
        let prior = HashMap::from([(
            ("acme".to_owned(), "ev-1".to_owned()),
            Prior {
                integration_id: a.record.id,
                digest: Some((digest_key_id, digest)),
                outcome: Outcome::Applied(a.record.clone()),
            },
        )]);
        let later = [
            with_event_id(&a, "new"),
            with_event_id(&a, "other"),
            with_event_id(&b, "new"),
        ];
        let plan = plan_batch(&later, &owners, rows(&[&a, &b]), prior, &keys, now());
        assert_eq!(
            codes(&plan),
            [
                ("applied", true),
                ("event_reused", false),
                ("event_reused", false)
            ]
        );
        assert!(plan.processed.is_empty() && plan.updates.is_empty());
    }

    #[test]
    fn a_key_refused_inside_the_transaction_is_a_401_for_its_rotations_only() {
        let keys = ring();
        let a = current(&keys, "old", None);
        let owners = HashMap::from([([7; 32], owner("acme"))]);
        let revoked = Rotation {
            key: ApiKeyHash([9; 32]),
            ..rotation(&a, "evil")
        };
        let batch = [revoked, rotation(&a, "new")];
        let current = HashMap::from([(a.record.id, clone_current(&a))]);
        let plan = plan_batch(&batch, &owners, current, HashMap::new(), &keys, now());
        assert_eq!(plan.results[0].outcome, Outcome::Unauthorized);
        assert_eq!(plan.results[0].owner, None);
        assert_eq!(plan.results[1].outcome.code(), "applied");
        assert_eq!(plan.results[1].owner, Some(owner("acme")));
    }

    fn clone_current(c: &Current) -> Current {
        Current {
            owner: c.owner.clone(),
            role_id: c.role_id.clone(),
            last_rotated_at: c.last_rotated_at,
            sealed: c.sealed.clone(),
            previous: c.previous.clone(),
            record: c.record.clone(),
        }
    }

    #[test]
    fn the_key_check_refuses_a_missing_or_wrong_key_and_records_the_rest() {
        let keys = ring();
        let other = {
            let k = crate::crypto::generate_key();
            KeyRing::new([("k1", &k)], None).expect("ring")
        };
        let c = current(&keys, "s", None);
        let sample = vec![(c.record.id, c.sealed.clone())];
        // An empty store: the active key's check value is to be recorded.
        let checks = verify_keys(&KeyUsage::default(), &keys).expect("empty store");
        assert_eq!(
            checks,
            vec![("k1".to_owned(), keys.check_value("k1").unwrap())]
        );
        // Rows but no check value yet: a stored secret proves the key.
        let usage = KeyUsage {
            samples: sample.clone(),
            checks: vec![],
        };
        assert_eq!(verify_keys(&usage, &keys).expect("right key"), checks);
        assert_eq!(
            verify_keys(&usage, &other),
            Err(KeyCheckError::Mismatch("k1".into()))
        );
        // A recorded check value decides, and nothing more is to record.
        let usage = KeyUsage {
            samples: sample.clone(),
            checks: checks.clone(),
        };
        assert_eq!(verify_keys(&usage, &keys), Ok(vec![]));
        let usage = KeyUsage {
            samples: vec![],
            checks: checks.clone(),
        };
        let err = verify_keys(&usage, &other).expect_err("wrong key");
        assert_eq!(err, KeyCheckError::Mismatch("k1".into()));
        assert!(err.to_string().contains("configure the original key `k1`"));
        // Rows under a key the ring lacks.
        let mut elsewhere = c.sealed.clone();
        elsewhere.key_id = "k0".into();
        let usage = KeyUsage {
            samples: vec![(c.record.id, elsewhere)],
            checks: vec![],
        };
        assert_eq!(
            verify_keys(&usage, &keys),
            Err(KeyCheckError::Missing("k0".into()))
        );
    }

    #[test]
    fn the_url_picks_the_backend() {
        let of = |url: &str| {
            Backend::of(&DatabaseSettings {
                url: SecretString::from(url.to_owned()),
                sqlite_path: "data/default.db".into(),
                max_connections: 1,
                acquire_timeout: std::time::Duration::from_millis(1),
                lock_timeout: std::time::Duration::from_secs(2),
            })
        };
        assert_eq!(of("").unwrap(), Backend::Sqlite("data/default.db".into()));
        assert_eq!(of("  ").unwrap(), Backend::Sqlite("data/default.db".into()));
        assert_eq!(
            of("sqlite:/var/lib/rw.db").unwrap(),
            Backend::Sqlite("/var/lib/rw.db".into())
        );
        assert_eq!(
            of("sqlite://rw.db").unwrap(),
            Backend::Sqlite("rw.db".into())
        );
        assert_eq!(of("postgres://u:p@h/db").unwrap(), Backend::Postgres);
        assert_eq!(of("postgresql://h/db").unwrap(), Backend::Postgres);
        for bad in [
            "mysql://u:hunter2@h/db",
            "sqlite:",
            "sqlite::memory:",
            "sqlite:x.db?mode=ro",
        ] {
            let err = of(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid database URL"), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "the URL was echoed: {err}");
        }
    }

    #[test]
    fn transient_errors_are_retried_and_others_not() {
        assert!(is_transient(&sqlx::Error::PoolTimedOut));
        assert!(is_transient(&sqlx::Error::Io(std::io::Error::other(
            "reset"
        ))));
        assert!(!is_transient(&sqlx::Error::RowNotFound));
        assert!(!is_transient(&sqlx::Error::ColumnNotFound("x".into())));
    }

    #[test]
    fn lock_order_groups_by_integration_and_keeps_arrival_order() {
        let keys = ring();
        let a = current(&keys, "s", None);
        let b = current(&keys, "s", None);
        let batch = vec![
            rotation(&b, "1"),
            rotation(&a, "2"),
            rotation(&b, "3"),
            rotation(&a, "4"),
        ];
        let order = lock_order(&batch);
        let (first, second) = if a.record.id < b.record.id {
            ([1, 3], [0, 2])
        } else {
            ([0, 2], [1, 3])
        };
        assert_eq!(order, [first, second].concat());
    }
}
