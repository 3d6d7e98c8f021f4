//! The PostgreSQL store: the choice for production and for several workers
//! sharing one consumer. Its [`Dialect`] reads and writes a batch's sets
//! as arrays (`unnest`), one statement per step, and locks rows with
//! `FOR UPDATE` in id order, so two workers' batches cannot deadlock.
//! Queries are plain `query`/`query_as` (not the compile-time macros), so a
//! checkout builds without a database.

use std::sync::Arc;

use async_trait::async_trait;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, FromRow, Postgres, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::sql::{Dialect, KeysAndRows, SqlStore};
use super::{
    Create, IntegrationUpdate, OneRotation, ProcessedEvent, ProcessedRow, StoreError,
    StoredIntegration,
};
use crate::config::DatabaseSettings;
use crate::crypto::KeyRing;

/// The [`Store`] on PostgreSQL.
pub type PgStore = SqlStore<Postgres>;

/// One rotation of a new secret, in one statement: the key (share-locked),
/// the row (locked, the caller's owner's), the rules of a plain success
/// (the role, not stale, stored under a key held here with its bytes
/// intact, a secret other than
/// the stored one by digest, an event id not used yet), the event id
/// recorded, the row written, the row returned. The write happens only
/// when the event id was recorded by this statement (`ins`): a concurrent
/// use of the same id leaves everything as it was, and the batch path sees
/// it. Parameters: $1 key hash, $2 id, $3 role id, $4 rotation time, $5
/// held key ids, $6 active key id (of the digest), $7 digest, $8 event id,
/// $9 now, $10 sealed secret, $11 its key id, $12 previous kept until, $13
/// new `updatedAt` as RFC 3339, $14 own event id, $15 the SHA-256 of the
/// ciphertext this process vouches for (it opened or wrote it): a
/// ciphertext copied from another row, its stored hash with it, does not
/// match, and the batch path (which opens it) answers.
const ROTATE_AT_ONCE: &str = concat!(
    "WITH k AS (SELECT owner FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL FOR SHARE), \
     cur AS (SELECT i.* FROM integrations i JOIN k ON i.owner = k.owner WHERE i.id = $2 FOR UPDATE OF i), \
     ok AS (SELECT cur.* FROM cur \
       WHERE ($3::text IS NULL OR cur.role_id = $3) \
         AND (cur.last_rotated_at IS NULL OR cur.last_rotated_at <= $4) \
         AND cur.secret_key_id = ANY($5::text[]) \
         AND sha256(cur.secret_ciphertext) = $15 \
         AND cur.secret_digest_key_id = $6 AND cur.secret_digest <> $7 \
         AND NOT EXISTS (SELECT 1 FROM processed_events p WHERE p.owner = cur.owner AND p.event_id = $8)), \
     ins AS (INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, \
         digest_key_id, secret_digest, processed_at) \
       SELECT ok.owner, $8, ok.id, 'applied', json_build_object('id', ok.id, 'name', ok.name, \
         'type', 'hashicorp', 'address', ok.address, 'namespace', ok.namespace, \
         'authMethod', 'approle', 'roleId', ok.role_id, \
         'createdAt', to_char(ok.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
         'updatedAt', $13::text)::text, $6, $7, $9 \
       FROM ok WHERE $8::text IS NOT NULL ON CONFLICT DO NOTHING RETURNING 1), \
     upd AS (UPDATE integrations i SET secret_ciphertext = $10, secret_key_id = $11, \
         secret_digest = $7, secret_digest_key_id = $6, secret_ciphertext_sha256 = sha256($10), \
         previous_ciphertext = CASE WHEN $12 > $9 THEN ok.secret_ciphertext END, \
         previous_key_id = CASE WHEN $12 > $9 AND ok.secret_key_id <> $11 THEN ok.secret_key_id END, \
         previous_expires_at = CASE WHEN $12 > $9 THEN $12::timestamptz END, \
         updated_at = $9, last_rotated_at = GREATEST(ok.last_rotated_at, $4), \
         rotation_count = ok.rotation_count + 1, last_event_id = $14, last_applied_at = $9 \
       FROM ok WHERE i.id = ok.id AND ($8::text IS NULL OR EXISTS (SELECT 1 FROM ins)) \
       RETURNING i.*) \
     SELECT ",
    integration_columns!(),
    " FROM upd"
);

/// A batch's keys and rows, in one statement: the unrevoked keys among
/// $1 (share-locked, so a revocation waits for the transaction), and the
/// integrations among the `($2 id, $3 key hash)` pairs that belong to the
/// key's owner, locked in id order. Both come back as integration rows: a
/// key as a row with its `key_hash` and its `owner`, the rest NULL; an
/// integration with a NULL `key_hash`.
const KEYS_AND_ROWS: &str = concat!(
    "WITH k AS (SELECT key_hash, owner FROM api_keys \
       WHERE key_hash = ANY($1) AND revoked_at IS NULL FOR SHARE), \
     l AS (SELECT ",
    integration_columns!(),
    " FROM integrations WHERE (id, owner) IN \
       (SELECT t.id, k.owner FROM unnest($2::uuid[], $3::bytea[]) AS t(id, key_hash) \
        JOIN k ON k.key_hash = t.key_hash) \
       ORDER BY id FOR UPDATE) \
     SELECT NULL::bytea AS key_hash, l.* FROM l \
     UNION ALL SELECT key_hash, NULL, owner, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
       NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM k"
);

/// A row of [`KEYS_AND_ROWS`].
enum Found {
    Key(Vec<u8>, String),
    Row(Box<StoredIntegration>),
}

impl<'r> FromRow<'r, PgRow> for Found {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        match row.try_get::<Option<Vec<u8>>, _>("key_hash")? {
            Some(hash) => Ok(Self::Key(hash, row.try_get("owner")?)),
            None => StoredIntegration::from_row(row).map(|row| Self::Row(Box::new(row))),
        }
    }
}

/// A batch's plan, in one statement: the processed events recorded
/// ($1–$8: owner, event id, integration id, outcome, record, digest key
/// id, digest, and the time; ids already recorded are skipped), and each
/// integration's new secret, times and count ($9–$21). Returns how many
/// events were recorded. The two tables are apart, so the one snapshot
/// both parts see changes nothing.
const WRITE_PLAN: &str = "WITH ins AS (INSERT INTO processed_events (owner, event_id, \
       integration_id, outcome, record, digest_key_id, secret_digest, processed_at) \
     SELECT owner, event_id, integration_id, outcome, record, digest_key_id, secret_digest, $8 \
     FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::bytea[]) \
       AS t(owner, event_id, integration_id, outcome, record, digest_key_id, secret_digest) \
     ON CONFLICT DO NOTHING RETURNING 1), \
   upd AS (UPDATE integrations AS i SET secret_ciphertext = u.blob, secret_key_id = u.key_id, \
     previous_ciphertext = u.previous_blob, previous_key_id = u.previous_key_id, \
     previous_expires_at = u.previous_until, updated_at = u.updated_at, \
     last_rotated_at = GREATEST(i.last_rotated_at, u.rotated_at), \
     rotation_count = i.rotation_count + u.applied, \
     last_event_id = u.event_id, last_applied_at = u.applied_at, \
     secret_digest = u.digest, secret_digest_key_id = u.digest_key_id, \
     secret_ciphertext_sha256 = sha256(u.blob) \
     FROM unnest($9::uuid[], $10::bytea[], $11::text[], $12::timestamptz[], $13::timestamptz[], \
       $14::bigint[], $15::bytea[], $16::text[], $17::timestamptz[], $18::text[], $19::timestamptz[], \
       $20::bytea[], $21::text[]) \
       AS u(id, blob, key_id, updated_at, rotated_at, applied, previous_blob, previous_key_id, \
       previous_until, event_id, applied_at, digest, digest_key_id) \
     WHERE i.id = u.id) \
   SELECT count(*) FROM ins";

/// `3D000`: the database named in the URL does not exist.
fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

impl PgStore {
    /// Connects, creating the database if it is missing, and migrates it.
    pub async fn connect(
        settings: &DatabaseSettings,
        keys: Arc<KeyRing>,
    ) -> Result<Self, StoreError> {
        Self::connect_with(settings, keys, Create::IfMissing).await
    }

    /// Connects and migrates; a missing database is created, or an error.
    pub async fn connect_with(
        settings: &DatabaseSettings,
        keys: Arc<KeyRing>,
        create: Create,
    ) -> Result<Self, StoreError> {
        let options: PgConnectOptions = settings
            .url
            .expose_secret()
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Url(e.to_string()))?;
        // A statement waits for a lock, or runs, this long at most: the
        // server gives up too when the worker stops waiting for an answer.
        let limit = settings.lock_timeout.as_millis().to_string();
        // No JIT compilation: the worker's statements are short, and a
        // plan costed high on missing statistics (a table just loaded,
        // before its first `ANALYZE`) would spend a third of a second
        // compiling what runs in a millisecond.
        let options = options.options([
            ("lock_timeout", limit.as_str()),
            ("statement_timeout", limit.as_str()),
            ("jit", "off"),
        ]);
        let pool = super::ping_when_idle(PgPoolOptions::new())
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(settings.acquire_timeout);
        let pool = match pool.clone().connect_with(options.clone()).await {
            Ok(pool) => pool,
            Err(e) if is_missing_database(&e) && create == Create::Never => {
                return Err(StoreError::Missing(String::new()));
            }
            Err(e) if is_missing_database(&e) => {
                create_database(&options).await?;
                pool.connect_with(options).await?
            }
            Err(e) => return Err(e.into()),
        };
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self {
            writer: pool.clone(),
            reader: pool,
            keys,
            group: None,
            vouched: Default::default(),
        })
    }
}

/// Creates the database named in `options` through the `postgres`
/// maintenance database. Losing a race with another process is fine.
async fn create_database(options: &PgConnectOptions) -> Result<(), StoreError> {
    let name = options
        .get_database()
        .ok_or_else(|| StoreError::Url("no database name".into()))?
        .to_owned();
    let mut conn = options.clone().database("postgres").connect().await?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    let created = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    match created {
        Ok(_) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        // 42P04: duplicate_database; 23505: the catalog's unique index,
        // which is what a CREATE DATABASE racing another one hits.
        Err(sqlx::Error::Database(db))
            if matches!(db.code().as_deref(), Some("42P04" | "23505")) =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

#[async_trait]
impl Dialect for Postgres {
    const BACKEND: &'static str = "postgres";
    const BEGIN_WRITE: &'static str = "BEGIN";
    const AT_ONCE: bool = true;
    const SEALED_UNDER_OTHER_KEYS: &'static str = "SELECT id, secret_ciphertext, secret_key_id, \
        previous_ciphertext, previous_key_id FROM integrations \
        WHERE secret_key_id <> $1 OR previous_key_id <> $1 ORDER BY id LIMIT $2 FOR UPDATE";

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn refresh_statistics(pool: &PgPool) -> Result<bool, sqlx::Error> {
        let autovacuum: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
            .fetch_one(pool)
            .await?;
        if autovacuum == "on" {
            return Ok(false);
        }
        // A new statistic invalidates the cached plans that read the table.
        sqlx::query(
            "ANALYZE integrations, processed_events, unwrapped_secrets, renewal_state, \
             api_keys, key_checks",
        )
        .execute(pool)
        .await?;
        Ok(true)
    }

    async fn keys_and_rows(
        tx: &mut PgConnection,
        digests: &[&[u8]],
        targets: &[(Uuid, &[u8])],
    ) -> Result<KeysAndRows, sqlx::Error> {
        let (ids, keys): (Vec<Uuid>, Vec<&[u8]>) = targets.iter().copied().unzip();
        let found: Vec<Found> = sqlx::query_as(KEYS_AND_ROWS)
            .bind(digests)
            .bind(ids)
            .bind(keys)
            .fetch_all(tx)
            .await?;
        let (mut keys, mut rows) = (Vec::new(), Vec::with_capacity(found.len()));
        for found in found {
            match found {
                Found::Key(hash, owner) => keys.push((hash, owner)),
                Found::Row(row) => rows.push(*row),
            }
        }
        Ok((keys, rows))
    }

    async fn processed_events(
        tx: &mut PgConnection,
        events: &[(&str, &str)],
    ) -> Result<Vec<ProcessedEvent>, sqlx::Error> {
        let (owners, event_ids): (Vec<&str>, Vec<&str>) = events.iter().copied().unzip();
        sqlx::query_as(
            "SELECT p.owner, p.event_id, p.integration_id, p.outcome, p.record, \
             p.secret_digest, p.digest_key_id FROM processed_events p \
             JOIN unnest($1::text[], $2::text[]) AS k(owner, event_id) \
             ON p.owner = k.owner AND p.event_id = k.event_id",
        )
        .bind(owners)
        .bind(event_ids)
        .fetch_all(tx)
        .await
    }

    async fn write_plan(
        tx: &mut PgConnection,
        processed: &[ProcessedRow],
        updates: &[IntegrationUpdate],
        now: OffsetDateTime,
    ) -> Result<u64, sqlx::Error> {
        // Each parameter is one column of the plan, as an array.
        fn col<'a, T, U>(rows: &'a [T], f: impl Fn(&'a T) -> U) -> Vec<U> {
            rows.iter().map(f).collect()
        }
        let (p, u) = (processed, updates);
        let (inserted,): (i64,) = sqlx::query_as(WRITE_PLAN)
            .bind(col(p, |r| r.owner.as_str()))
            .bind(col(p, |r| r.event_id.as_str()))
            .bind(col(p, |r| r.integration_id))
            .bind(col(p, |r| r.outcome))
            .bind(col(p, |r| r.record.as_deref()))
            .bind(col(p, |r| r.digest_key_id.as_str()))
            .bind(col(p, |r| r.secret_digest.as_slice()))
            .bind(now)
            .bind(col(u, |x| x.id))
            .bind(col(u, |x| x.sealed.blob.as_slice()))
            .bind(col(u, |x| x.sealed.key_id.as_str()))
            .bind(col(u, |x| x.updated_at))
            .bind(col(u, |x| x.last_rotated_at))
            .bind(col(u, |x| x.applied))
            .bind(col(u, |x| {
                x.previous.as_ref().map(|(p, _)| p.blob.as_slice())
            }))
            .bind(col(u, IntegrationUpdate::previous_key_id))
            .bind(col(u, |x| x.previous.as_ref().map(|(_, t)| *t)))
            .bind(col(u, |x| x.last_event_id.as_deref()))
            .bind(col(u, |x| x.applied_at))
            .bind(col(u, |x| x.digest.as_ref().map(|(_, d)| d.as_slice())))
            .bind(col(u, |x| x.digest.as_ref().map(|(k, _)| k.as_str())))
            .fetch_one(tx)
            .await?;
        Ok(u64::try_from(inserted).unwrap_or(0))
    }

    async fn rotate_at_once(
        pool: &PgPool,
        one: &OneRotation,
    ) -> Result<Option<StoredIntegration>, sqlx::Error> {
        let (digest_key_id, digest) = &one.digest;
        sqlx::query_as(ROTATE_AT_ONCE)
            .bind(one.key_hash.as_slice())
            .bind(one.id)
            .bind(one.role_id.as_deref())
            .bind(one.rotated_at)
            .bind(&one.held_keys)
            .bind(digest_key_id.as_str())
            .bind(digest.as_slice())
            .bind(one.event_id.as_deref())
            .bind(one.now)
            .bind(one.sealed.blob.as_slice())
            .bind(one.sealed.key_id.as_str())
            .bind(one.keep_previous_until)
            .bind(one.updated_at.as_str())
            .bind(one.own_event_id.as_deref())
            .bind(one.vouched.as_slice())
            .fetch_optional(pool)
            .await
    }
}
