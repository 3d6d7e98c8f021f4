//! The embedded SQLite store: the default, so that one worker needs nothing
//! but a NATS server. One file in WAL mode; every write goes through a
//! single connection that takes the write lock up front (`BEGIN
//! IMMEDIATE`), so transactions never deadlock or fail half-way on a lock
//! upgrade, while reads run on a pool of their own.
//!
//! Ids are stored as hyphenated text and times as microseconds since the
//! epoch (see the migration and [`super::codec`]). Its [`Dialect`] passes
//! a batch's sets as JSON arrays read with `jsonb_each` (blobs as hex):
//! one statement per step, reads and writes, however large the batch.
//! (`jsonb_each` hands each row to `->>` as SQLite's binary JSON, where
//! `json_each` wrote it out as text for `->>` to parse again: 13% of the
//! worker's CPU per event on a drain, see docs/performance.md.) Each statement is a
//! hand-off to the connection's thread and back, so a write per row cost
//! two of them per event, on the one writer all lanes share.
//! Rotation batches go to a thread of their own that commits what the
//! lanes have handed it as one transaction ([`super::group`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Sqlite};
use time::OffsetDateTime;
use uuid::Uuid;

use super::codec::Time;
use super::group::GroupCommit;
use super::sql::{Dialect, KeysAndRows, SqlStore};
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

/// Each connection's page cache, in KiB (negative: a size, not pages).
/// SQLite's default is 2,000 KiB; the pages a write touches are read again
/// from the OS's cache when they are not here. Measured on the 50,000-event
/// drain: 2.2 MB less at the peak, the rate within its noise.
const PAGE_CACHE: &str = "-512";

/// WAL pages after which a commit copies them into the database itself,
/// should the [checkpointer] fall this far behind (SQLite's default is
/// 1,000: at scale, about every other group of a drain).
const WAL_FALLBACK_CHECKPOINT: &str = "10000";

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
            .busy_timeout(wait)
            .pragma("cache_size", PAGE_CACHE)
            .pragma("wal_autocheckpoint", WAL_FALLBACK_CHECKPOINT);
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
            .connect_with(options.clone())
            .await?;
        let store = Self {
            writer,
            reader,
            keys,
            group: None,
            vouched: Default::default(),
        };
        let checkpoint = checkpointer(&options).await?;
        let group = GroupCommit::start(Arc::new(store.clone()), checkpoint)
            .map_err(|e| StoreError::Unavailable(sqlx::Error::Io(e)))?;
        Ok(Self {
            group: Some(group),
            ..store
        })
    }
}

/// Copies what the writer's commits added to the WAL into the database,
/// on a connection of its own, after each group commit (the returned
/// nudge; the task ends with the last nudge). A passive checkpoint runs
/// beside the writer without blocking it: the one writer then only
/// appends, and the pages are read back and written in place on another
/// thread. Where each event changes pages of its own (200,000
/// integrations), reading, writing and syncing pages were 43% of the
/// worker's profile; see `docs/performance.md`.
async fn checkpointer(
    options: &SqliteConnectOptions,
) -> Result<impl Fn() + Send + 'static, StoreError> {
    let mut connection = options.connect().await?;
    let (nudge, mut nudged) = tokio::sync::mpsc::channel::<()>(1);
    tokio::spawn(async move {
        while nudged.recv().await.is_some() {
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut connection)
                .await
            {
                tracing::warn!(error = %e, "copying the WAL into the database failed; \
                    the writer does it past a bound");
            }
        }
    });
    Ok(move || {
        // Full: one is already due, and it takes what is there when it runs.
        let _ = nudge.try_send(());
    })
}

/// A set as a JSON array, for `jsonb_each` (`json_each` for scalars).
fn json<T: serde::Serialize>(set: &T) -> Result<String, sqlx::Error> {
    serde_json::to_string(set).map_err(|e| sqlx::Error::Encode(e.into()))
}

/// A blob as it travels in a JSON set: hex, turned back with `unhex`.
/// Encoded inside the write transaction, a few hundred bytes per row, so
/// by table rather than through the formatter.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        hex.push(char::from(DIGITS[usize::from(b >> 4)]));
        hex.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    hex
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

    fn rows_affected(result: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn keys_and_rows(
        tx: &mut SqliteConnection,
        digests: &[&[u8]],
        targets: &[(Uuid, &[u8])],
    ) -> Result<KeysAndRows, sqlx::Error> {
        let keys = valid_keys(tx, digests).await?;
        let owners: HashMap<&[u8], &str> = keys
            .iter()
            .map(|(hash, owner)| (hash.as_slice(), owner.as_str()))
            .collect();
        let rows: Vec<(Uuid, &str)> = targets
            .iter()
            .filter_map(|(id, hash)| Some((*id, *owners.get(hash)?)))
            .collect();
        let rows = lock_integrations(tx, &rows).await?;
        Ok((keys, rows))
    }

    async fn processed_events(
        tx: &mut SqliteConnection,
        events: &[(&str, &str)],
    ) -> Result<Vec<ProcessedEvent>, sqlx::Error> {
        sqlx::query_as(
            "SELECT p.owner, p.event_id, p.integration_id, p.outcome, p.record, \
             p.secret_digest, p.digest_key_id FROM jsonb_each($1) AS k \
             JOIN processed_events p \
               ON p.owner = json_extract(k.value, '$[0]') \
              AND p.event_id = json_extract(k.value, '$[1]')",
        )
        .bind(json(&events)?)
        .fetch_all(tx)
        .await
    }

    async fn write_plan(
        tx: &mut SqliteConnection,
        processed: &[ProcessedRow],
        updates: &[IntegrationUpdate],
        now: OffsetDateTime,
    ) -> Result<u64, sqlx::Error> {
        let inserted = if processed.is_empty() {
            0
        } else {
            insert_processed(tx, processed, now).await?
        };
        if !updates.is_empty() {
            update_integrations(tx, updates).await?;
        }
        Ok(inserted)
    }
}

/// `(key_hash, owner)` of the unrevoked keys among `digests` (the write
/// lock, taken at `BEGIN IMMEDIATE`, keeps a revocation out).
async fn valid_keys(
    tx: &mut SqliteConnection,
    digests: &[&[u8]],
) -> Result<Vec<(Vec<u8>, String)>, sqlx::Error> {
    // As hex, turned back with unhex so that the key index serves the
    // lookup.
    let hex: Vec<String> = digests.iter().map(|d| hex(d)).collect();
    sqlx::query_as(
        "SELECT key_hash, owner FROM api_keys \
         WHERE key_hash IN (SELECT unhex(value) FROM json_each($1)) AND revoked_at IS NULL",
    )
    .bind(json(&hex)?)
    .fetch_all(tx)
    .await
}

/// The integrations among `(id, owner)` pairs, in id order (the write
/// lock holds them).
async fn lock_integrations(
    tx: &mut SqliteConnection,
    rows: &[(Uuid, &str)],
) -> Result<Vec<StoredIntegration>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        integration_columns!(),
        " FROM integrations WHERE (id, owner) IN \
         (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM jsonb_each($1)) \
         ORDER BY id"
    ))
    .bind(json(&rows)?)
    .fetch_all(tx)
    .await
}

/// Records processed events, skipping ids already recorded; returns how
/// many rows were inserted.
async fn insert_processed(
    tx: &mut SqliteConnection,
    rows: &[ProcessedRow],
    now: OffsetDateTime,
) -> Result<u64, sqlx::Error> {
    let set: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                &r.owner,
                &r.event_id,
                r.integration_id,
                r.outcome,
                r.record.as_deref(),
                &r.digest_key_id,
                hex(&r.secret_digest),
            )
        })
        .collect();
    // `WHERE true`: without it, SQLite would read `ON CONFLICT` as
    // the join constraint of the SELECT.
    let inserted = sqlx::query(
        "INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, \
         digest_key_id, secret_digest, processed_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
         unhex(value ->> 6), $2 FROM jsonb_each($1) WHERE true \
         ON CONFLICT DO NOTHING",
    )
    .bind(json(&set)?)
    .bind(Time(now))
    .execute(&mut *tx)
    .await?;
    Ok(inserted.rows_affected())
}

/// Writes each integration's new secret, times and count.
async fn update_integrations(
    tx: &mut SqliteConnection,
    updates: &[IntegrationUpdate],
) -> Result<(), sqlx::Error> {
    let micros = |t: OffsetDateTime| Time(t).micros();
    let set: Vec<_> = updates
        .iter()
        .map(|u| {
            let previous = u.previous.as_ref();
            (
                u.id,
                hex(&u.sealed.blob),
                &u.sealed.key_id,
                micros(u.updated_at),
                micros(u.last_rotated_at),
                u.applied,
                previous.map(|(sealed, _)| hex(&sealed.blob)),
                u.previous_key_id(),
                previous.map(|(_, until)| micros(*until)),
                u.last_event_id.as_deref(),
                micros(u.applied_at),
                u.digest.as_ref().map(|(_, d)| hex(d)),
                u.digest.as_ref().map(|(k, _)| k),
                hex(&blob_sha256(&u.sealed)),
            )
        })
        .collect();
    sqlx::query(
        "UPDATE integrations SET secret_ciphertext = unhex(u.value ->> 1), \
         secret_key_id = u.value ->> 2, updated_at = u.value ->> 3, \
         last_rotated_at = MAX(COALESCE(last_rotated_at, u.value ->> 4), u.value ->> 4), \
         rotation_count = rotation_count + (u.value ->> 5), \
         previous_ciphertext = unhex(u.value ->> 6), previous_key_id = u.value ->> 7, \
         previous_expires_at = u.value ->> 8, last_event_id = u.value ->> 9, \
         last_applied_at = u.value ->> 10, secret_digest = unhex(u.value ->> 11), \
         secret_digest_key_id = u.value ->> 12, \
         secret_ciphertext_sha256 = unhex(u.value ->> 13) \
         FROM jsonb_each($1) AS u WHERE integrations.id = u.value ->> 0",
    )
    .bind(json(&set)?)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::hex;

    #[test]
    fn hex_is_two_upper_case_digits_per_byte() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xf0, 0xff]), "000FA5F0FF");
    }
}
