//! The embedded SQLite store: the default, so that one worker needs nothing
//! but a NATS server. One file in WAL mode; every write goes through a
//! single connection that takes the write lock up front (`BEGIN
//! IMMEDIATE`), so transactions never deadlock or fail half-way on a lock
//! upgrade, while reads run on a pool of their own.
//!
//! Ids are stored as hyphenated text and times as microseconds since the
//! epoch (see the migration); the rows convert to the same
//! [`StoredIntegration`] the PostgreSQL store reads, and rotations go
//! through the same [`plan_batch`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use time::OffsetDateTime;
use uuid::Uuid;
use uuid::fmt::Hyphenated;

use super::{
    ApiKeyInfo, ApiKeySelector, KeyUsage, OwnedIntegration, ProcessedEvent, ReencryptReport,
    Rotation, RotationResult, Store, StoreError, StoredApiKey, StoredIntegration, key_digests,
    known_outcomes, owners_by_key, plan_batch,
};
use crate::auth::ApiKeyHash;
use crate::config::DatabaseSettings;
use crate::crypto::{KeyRing, Sealed};
use crate::domain::{Integration, NewIntegration, Owner, now_micros};

/// SQLite-backed [`Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// One connection: SQLite has one writer at a time anyway.
    writer: SqlitePool,
    /// Readers, which WAL mode lets run beside the writer.
    reader: SqlitePool,
    keys: Arc<KeyRing>,
}

/// Microseconds since the epoch, as stored.
fn micros(t: OffsetDateTime) -> i64 {
    // i64 microseconds reach the year 294,247: no truncation in practice.
    (t.unix_timestamp_nanos() / 1_000) as i64
}

fn from_micros(us: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000)
        .map_err(|e| StoreError::Database(sqlx::Error::Decode(e.into())))
}

fn optional_time(us: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    us.map(from_micros).transpose()
}

#[derive(Debug, sqlx::FromRow)]
struct IntegrationRow {
    id: Hyphenated,
    owner: String,
    name: String,
    address: String,
    namespace: Option<String>,
    role_id: String,
    secret_ciphertext: Vec<u8>,
    secret_key_id: String,
    created_at: i64,
    updated_at: i64,
    last_rotated_at: Option<i64>,
    rotation_count: i64,
}

impl TryFrom<IntegrationRow> for StoredIntegration {
    type Error = StoreError;

    fn try_from(row: IntegrationRow) -> Result<Self, StoreError> {
        Ok(Self {
            id: row.id.into_uuid(),
            owner: row.owner,
            name: row.name,
            address: row.address,
            namespace: row.namespace,
            role_id: row.role_id,
            secret_ciphertext: row.secret_ciphertext,
            secret_key_id: row.secret_key_id,
            created_at: from_micros(row.created_at)?,
            updated_at: from_micros(row.updated_at)?,
            last_rotated_at: optional_time(row.last_rotated_at)?,
            rotation_count: row.rotation_count,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
struct ApiKeyRow {
    id: Hyphenated,
    owner: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKeyInfo {
    type Error = StoreError;

    fn try_from(row: ApiKeyRow) -> Result<Self, StoreError> {
        Ok(StoredApiKey {
            id: row.id.into_uuid(),
            owner: row.owner,
            created_at: from_micros(row.created_at)?,
            revoked_at: optional_time(row.revoked_at)?,
        }
        .into())
    }
}

#[derive(Debug, sqlx::FromRow)]
struct ProcessedRow {
    owner: String,
    event_id: String,
    integration_id: Hyphenated,
    outcome: String,
    record: Option<String>,
    secret_digest: Option<Vec<u8>>,
    digest_key_id: Option<String>,
}

impl From<ProcessedRow> for ProcessedEvent {
    fn from(row: ProcessedRow) -> Self {
        Self {
            owner: row.owner,
            event_id: row.event_id,
            integration_id: row.integration_id.into_uuid(),
            outcome: row.outcome,
            record: row.record,
            secret_digest: row.secret_digest,
            digest_key_id: row.digest_key_id,
        }
    }
}

fn integrations(rows: Vec<IntegrationRow>) -> Result<Vec<StoredIntegration>, StoreError> {
    rows.into_iter().map(TryInto::try_into).collect()
}

/// Creates the file with mode 0600 (and its directory) if it is missing:
/// SQLite gives its `-wal` and `-shm` files the same mode.
fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::File {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop).map_err(io)
}

impl SqliteStore {
    /// Opens the file, creating it if it is missing, and migrates it.
    pub async fn open(
        path: &Path,
        settings: &DatabaseSettings,
        keys: Arc<KeyRing>,
    ) -> Result<Self, StoreError> {
        create_private_file(path)?;
        let wait = Duration::from_millis(settings.acquire_timeout_ms);
        let options = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before the worker acks the event,
            // even across a power loss.
            .synchronous(SqliteSynchronous::Full)
            // Another process (the CLI beside a running worker) may hold
            // the write lock for a moment.
            .busy_timeout(wait);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(wait)
            .connect_with(options.clone())
            .await?;
        // Under the write lock, so that processes starting together on a
        // new file (a worker and an admin command) migrate it once: the
        // others wait, then find the migrations applied.
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::migrate!("./migrations/sqlite").run(&mut *tx).await?;
        tx.commit().await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(wait)
            .connect_with(options)
            .await?;
        Ok(Self {
            writer,
            reader,
            keys,
        })
    }

    /// The write pool, for tests and tools that inspect the tables directly.
    pub fn pool(&self) -> &SqlitePool {
        &self.writer
    }

    async fn integration(&self, id: Uuid) -> Result<Option<StoredIntegration>, StoreError> {
        let row: Option<IntegrationRow> = sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE id = $1"
        ))
        .bind(id.hyphenated())
        .fetch_optional(&self.reader)
        .await?;
        row.map(TryInto::try_into).transpose()
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn create_api_key(
        &self,
        owner: &Owner,
        hash: &ApiKeyHash,
    ) -> Result<ApiKeyInfo, StoreError> {
        let row: ApiKeyRow = sqlx::query_as(
            "INSERT INTO api_keys (id, owner, key_hash, created_at) VALUES ($1, $2, $3, $4) \
             RETURNING id, owner, created_at, revoked_at",
        )
        .bind(Uuid::now_v7().hyphenated())
        .bind(owner.as_str())
        .bind(&hash.0[..])
        .bind(micros(now_micros()))
        .fetch_one(&self.writer)
        .await?;
        row.try_into()
    }

    async fn list_api_keys(&self, owner: Option<&Owner>) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let rows: Vec<ApiKeyRow> = sqlx::query_as(
            "SELECT id, owner, created_at, revoked_at FROM api_keys \
             WHERE $1 IS NULL OR owner = $1 ORDER BY created_at, id",
        )
        .bind(owner.map(Owner::as_str))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn revoke_api_key(&self, key: &ApiKeySelector) -> Result<Option<ApiKeyInfo>, StoreError> {
        let (id, hash) = match key {
            ApiKeySelector::Id(id) => (Some(id.hyphenated()), None),
            ApiKeySelector::Hash(h) => (None, Some(&h.0[..])),
        };
        // COALESCE keeps the first revocation time when revoked twice.
        let row: Option<ApiKeyRow> = sqlx::query_as(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) \
             WHERE id = $1 OR key_hash = $2 RETURNING id, owner, created_at, revoked_at",
        )
        .bind(id)
        .bind(hash)
        .bind(micros(now_micros()))
        .fetch_optional(&self.writer)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn authenticate(&self, hash: &ApiKeyHash) -> Result<Option<Owner>, StoreError> {
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT owner FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash.0[..])
        .fetch_optional(&self.reader)
        .await?;
        Ok(owner.map(Owner::from_trusted))
    }

    async fn create_integration(&self, new: &NewIntegration) -> Result<Integration, StoreError> {
        let id = Uuid::new_v4();
        let now = micros(now_micros());
        let sealed = self.keys.seal(id, new.secret_id.expose());
        let row: IntegrationRow = sqlx::query_as(concat!(
            "INSERT INTO integrations (id, owner, name, address, namespace, role_id, \
             secret_ciphertext, secret_key_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) RETURNING ",
            integration_columns!()
        ))
        .bind(id.hyphenated())
        .bind(new.owner.as_str())
        .bind(new.name.as_str())
        .bind(new.address.as_str())
        .bind(new.namespace.as_ref().map(|n| n.as_str()))
        .bind(new.role_id.as_str())
        .bind(&sealed.blob)
        .bind(&sealed.key_id)
        .bind(now)
        .fetch_one(&self.writer)
        .await?;
        Ok(StoredIntegration::try_from(row)?.record())
    }

    async fn get_integration(&self, id: Uuid) -> Result<Option<OwnedIntegration>, StoreError> {
        Ok(self
            .integration(id)
            .await?
            .map(StoredIntegration::into_owned))
    }

    async fn list_integrations(
        &self,
        owner: Option<&Owner>,
    ) -> Result<Vec<Integration>, StoreError> {
        let rows: Vec<IntegrationRow> = sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE $1 IS NULL OR owner = $1 ORDER BY created_at, id"
        ))
        .bind(owner.map(Owner::as_str))
        .fetch_all(&self.reader)
        .await?;
        Ok(integrations(rows)?
            .iter()
            .map(StoredIntegration::record)
            .collect())
    }

    async fn delete_integration(&self, id: Uuid) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM integrations WHERE id = $1")
            .bind(id.hyphenated())
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(deleted == 1)
    }

    async fn reveal_secret(&self, id: Uuid) -> Result<Option<SecretString>, StoreError> {
        let Some(row) = self.integration(id).await? else {
            return Ok(None);
        };
        Ok(Some(self.keys.open(id, &row.sealed())?))
    }

    async fn reencrypt(&self) -> Result<ReencryptReport, StoreError> {
        let active = self.keys.active_key_id().to_owned();
        let mut reencrypted = 0;
        loop {
            let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
            let rows: Vec<(Hyphenated, Vec<u8>, String)> = sqlx::query_as(
                "SELECT id, secret_ciphertext, secret_key_id FROM integrations \
                 WHERE secret_key_id <> $1 ORDER BY id LIMIT $2",
            )
            .bind(&active)
            .bind(super::REENCRYPT_BATCH)
            .fetch_all(&mut *tx)
            .await?;
            if rows.is_empty() {
                return Ok(ReencryptReport {
                    reencrypted,
                    active_key: active,
                });
            }
            for (id, blob, key_id) in rows {
                let secret = self.keys.open(id.into_uuid(), &Sealed { key_id, blob })?;
                let sealed = self.keys.seal(id.into_uuid(), secret.expose_secret());
                sqlx::query(
                    "UPDATE integrations SET secret_ciphertext = $2, secret_key_id = $3 WHERE id = $1",
                )
                .bind(id)
                .bind(&sealed.blob)
                .bind(&sealed.key_id)
                .execute(&mut *tx)
                .await?;
                reencrypted += 1;
            }
            tx.commit().await?;
        }
    }

    async fn rotate(&self, batch: &[Rotation]) -> Result<Vec<RotationResult>, StoreError> {
        let now = now_micros();
        // Sets travel as JSON arrays (blobs as hex, turned back with
        // unhex so the key index serves the lookup), read with json_each:
        // one statement per read, however large the batch.
        let digests: Vec<String> = key_digests(batch)
            .into_iter()
            .map(|d| d.iter().map(|b| format!("{b:02X}")).collect())
            .collect();
        let digests = serde_json::to_string(&digests).unwrap_or_default();

        // The write lock first: what is read below cannot change before
        // this transaction commits, a revocation included.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let keys: Vec<(Vec<u8>, String)> = sqlx::query_as(
            "SELECT key_hash, owner FROM api_keys \
             WHERE key_hash IN (SELECT unhex(value) FROM json_each($1)) AND revoked_at IS NULL",
        )
        .bind(&digests)
        .fetch_all(&mut *tx)
        .await?;
        let owners = owners_by_key(keys);
        let pairs: Vec<[String; 2]> = batch
            .iter()
            .filter_map(|r| {
                let owner = owners.get(&r.key.0)?;
                Some([
                    r.integration_id.hyphenated().to_string(),
                    owner.as_str().to_owned(),
                ])
            })
            .collect();
        let pairs = serde_json::to_string(&pairs).unwrap_or_default();
        let events: Vec<[&str; 2]> = batch
            .iter()
            .filter_map(|r| Some([owners.get(&r.key.0)?.as_str(), r.event_id.as_deref()?]))
            .collect();
        let events = serde_json::to_string(&events).unwrap_or_default();
        // Only the callers' own owners' rows.
        let rows: Vec<IntegrationRow> = sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE (id, owner) IN \
             (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each($1))"
        ))
        .bind(&pairs)
        .fetch_all(&mut *tx)
        .await?;
        let prior: Vec<ProcessedRow> = sqlx::query_as(
            "SELECT p.owner, p.event_id, p.integration_id, p.outcome, p.record, \
             p.secret_digest, p.digest_key_id FROM json_each($1) AS k \
             JOIN processed_events p \
               ON p.owner = json_extract(k.value, '$[0]') \
              AND p.event_id = json_extract(k.value, '$[1]')",
        )
        .bind(&events)
        .fetch_all(&mut *tx)
        .await?;
        let current = integrations(rows)?
            .into_iter()
            .map(|row| (row.id, row.into_current()))
            .collect();
        let prior = known_outcomes(prior.into_iter().map(Into::into).collect())?;
        let plan = plan_batch(batch, &owners, current, prior, &self.keys, now);

        for row in &plan.processed {
            sqlx::query(
                "INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, \
                 digest_key_id, secret_digest, processed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&row.owner)
            .bind(&row.event_id)
            .bind(row.integration_id.hyphenated())
            .bind(row.outcome)
            .bind(row.record.as_deref())
            .bind(&row.digest_key_id)
            .bind(&row.secret_digest)
            .bind(micros(now))
            .execute(&mut *tx)
            .await?;
        }
        for update in &plan.updates {
            sqlx::query(
                "UPDATE integrations SET secret_ciphertext = $2, secret_key_id = $3, \
                 updated_at = $4, last_rotated_at = MAX(COALESCE(last_rotated_at, $5), $5), \
                 rotation_count = rotation_count + $6 WHERE id = $1",
            )
            .bind(update.id.hyphenated())
            .bind(&update.sealed.blob)
            .bind(&update.sealed.key_id)
            .bind(micros(update.updated_at))
            .bind(micros(update.last_rotated_at))
            .bind(update.applied)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(plan.results)
    }

    async fn prune_processed(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM processed_events WHERE processed_at < $1")
            .bind(micros(before))
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(deleted)
    }

    async fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        // SQLite takes the other columns from the row with the smallest id.
        let samples: Vec<(Hyphenated, Vec<u8>, String)> = sqlx::query_as(
            "SELECT min(id), secret_ciphertext, secret_key_id FROM integrations \
             GROUP BY secret_key_id ORDER BY secret_key_id",
        )
        .fetch_all(&self.reader)
        .await?;
        let checks: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT key_id, check_value FROM key_checks ORDER BY key_id")
                .fetch_all(&self.reader)
                .await?;
        Ok(KeyUsage {
            samples: samples
                .into_iter()
                .map(|(id, blob, key_id)| (id.into_uuid(), Sealed { key_id, blob }))
                .collect(),
            checks,
        })
    }

    async fn record_key_checks(
        &self,
        checks: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let mut recorded = Vec::with_capacity(checks.len());
        for (key_id, value) in checks {
            let row: (String, Vec<u8>) = sqlx::query_as(
                "INSERT INTO key_checks (key_id, check_value, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key_id) DO UPDATE SET key_id = key_id RETURNING key_id, check_value",
            )
            .bind(key_id)
            .bind(value)
            .bind(micros(now_micros()))
            .fetch_one(&mut *tx)
            .await?;
            recorded.push(row);
        }
        tx.commit().await?;
        Ok(recorded)
    }
}
