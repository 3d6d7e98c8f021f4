//! The embedded SQLite store: the default, so that one worker needs nothing
//! but a NATS server. One file in WAL mode; every write goes through a
//! single connection that takes the write lock up front (`BEGIN
//! IMMEDIATE`), so transactions never deadlock or fail half-way on a lock
//! upgrade, while reads run on a pool of their own.
//!
//! Ids are stored as hyphenated text and times as microseconds since the
//! epoch (see the migration and [`super::codec`]). Its [`Dialect`] passes
//! a batch's sets as JSON arrays read with `json_each`: one statement per
//! read, however large the batch; the writes are one short statement per
//! row on the connection that holds the lock.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Sqlite;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::codec::{Id, Time};
use super::sql::{Dialect, SqlStore};
use super::{
    IntegrationUpdate, ProcessedEvent, ProcessedRow, StoreError, StoredIntegration, blob_sha256,
};
use crate::config::DatabaseSettings;
use crate::crypto::KeyRing;

/// The [`Store`](super::Store) on an SQLite file.
pub type SqliteStore = SqlStore<Sqlite>;

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
        let wait = settings.acquire_timeout;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a commit is on disk before the worker acks the event,
            // even across a power loss.
            .synchronous(SqliteSynchronous::Full)
            // Another process (the CLI beside a running worker) may hold
            // the write lock for a moment.
            .busy_timeout(wait);
        let writer = super::ping_when_idle(SqlitePoolOptions::new())
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
        let reader = super::ping_when_idle(SqlitePoolOptions::new())
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
}

/// A set as a JSON array, for `json_each`.
fn json<T: serde::Serialize>(set: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(set).map_err(|e| sqlx::Error::Encode(e.into()))
}

#[async_trait]
impl Dialect for Sqlite {
    const BACKEND: &'static str = "sqlite";
    const BEGIN_WRITE: &'static str = "BEGIN IMMEDIATE";
    // The write lock held by `BEGIN IMMEDIATE` is what keeps these rows.
    const SEALED_UNDER_OTHER_KEYS: &'static str = "SELECT id, secret_ciphertext, secret_key_id, \
        previous_ciphertext, previous_key_id FROM integrations \
        WHERE secret_key_id <> $1 OR previous_key_id <> $1 ORDER BY id LIMIT $2";
    // SQLite takes the other columns from the row with the smallest id.
    const ONE_SECRET_PER_KEY: &'static str = "SELECT min(id), blob, key_id FROM \
        (SELECT id, secret_ciphertext AS blob, secret_key_id AS key_id FROM integrations \
         UNION ALL SELECT id, previous_ciphertext, previous_key_id FROM integrations \
         WHERE previous_key_id IS NOT NULL) GROUP BY key_id ORDER BY key_id";

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn valid_keys(
        tx: &mut SqliteConnection,
        digests: &[&[u8]],
    ) -> Result<Vec<(Vec<u8>, String)>, sqlx::Error> {
        // Blobs travel as hex, turned back with unhex so that the key
        // index serves the lookup.
        let hex: Vec<String> = digests
            .iter()
            .map(|d| d.iter().map(|b| format!("{b:02X}")).collect())
            .collect();
        sqlx::query_as(
            "SELECT key_hash, owner FROM api_keys \
             WHERE key_hash IN (SELECT unhex(value) FROM json_each($1)) AND revoked_at IS NULL",
        )
        .bind(json(&hex)?)
        .fetch_all(tx)
        .await
    }

    async fn lock_integrations(
        tx: &mut SqliteConnection,
        rows: &[(Uuid, &str)],
    ) -> Result<Vec<StoredIntegration>, sqlx::Error> {
        sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE (id, owner) IN \
             (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each($1)) \
             ORDER BY id"
        ))
        .bind(json(&rows)?)
        .fetch_all(tx)
        .await
    }

    async fn processed_events(
        tx: &mut SqliteConnection,
        events: &[(&str, &str)],
    ) -> Result<Vec<ProcessedEvent>, sqlx::Error> {
        sqlx::query_as(
            "SELECT p.owner, p.event_id, p.integration_id, p.outcome, p.record, \
             p.secret_digest, p.digest_key_id FROM json_each($1) AS k \
             JOIN processed_events p \
               ON p.owner = json_extract(k.value, '$[0]') \
              AND p.event_id = json_extract(k.value, '$[1]')",
        )
        .bind(json(&events)?)
        .fetch_all(tx)
        .await
    }

    async fn insert_processed(
        tx: &mut SqliteConnection,
        rows: &[ProcessedRow],
        now: OffsetDateTime,
    ) -> Result<u64, sqlx::Error> {
        let mut inserted = 0;
        for row in rows {
            inserted += sqlx::query(
                "INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, \
                 digest_key_id, secret_digest, processed_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&row.owner)
            .bind(&row.event_id)
            .bind(Id(row.integration_id))
            .bind(row.outcome)
            .bind(row.record.as_deref())
            .bind(&row.digest_key_id)
            .bind(&row.secret_digest)
            .bind(Time(now))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        Ok(inserted)
    }

    async fn update_integrations(
        tx: &mut SqliteConnection,
        updates: &[IntegrationUpdate],
    ) -> Result<(), sqlx::Error> {
        for update in updates {
            let previous = update.previous.as_ref();
            sqlx::query(
                "UPDATE integrations SET secret_ciphertext = $2, secret_key_id = $3, \
                 updated_at = $4, last_rotated_at = MAX(COALESCE(last_rotated_at, $5), $5), \
                 rotation_count = rotation_count + $6, previous_ciphertext = $7, \
                 previous_key_id = $8, previous_expires_at = $9, last_event_id = $10, \
                 last_applied_at = $11, secret_digest = $12, secret_digest_key_id = $13, \
                 secret_ciphertext_sha256 = $14 \
                 WHERE id = $1",
            )
            .bind(Id(update.id))
            .bind(&update.sealed.blob)
            .bind(&update.sealed.key_id)
            .bind(Time(update.updated_at))
            .bind(Time(update.last_rotated_at))
            .bind(update.applied)
            .bind(previous.map(|(sealed, _)| &sealed.blob))
            .bind(previous.map(|(sealed, _)| &sealed.key_id))
            .bind(previous.map(|(_, until)| Time(*until)))
            .bind(update.last_event_id.as_deref())
            .bind(Time(update.applied_at))
            .bind(update.digest.as_ref().map(|(_, d)| d))
            .bind(update.digest.as_ref().map(|(k, _)| k))
            .bind(blob_sha256(&update.sealed))
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}
