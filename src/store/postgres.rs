//! The PostgreSQL store: the choice for production and for several workers
//! sharing one consumer. Its [`Dialect`] reads and writes a batch's sets
//! as arrays (`unnest`), one statement per step, and locks rows with
//! `FOR UPDATE` in id order, so two workers' batches cannot deadlock.
//! Queries are plain `query`/`query_as` (not the compile-time macros), so a
//! checkout builds without a database.

use std::sync::Arc;

use async_trait::async_trait;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Postgres};
use time::OffsetDateTime;
use uuid::Uuid;

use super::sql::{Dialect, SqlStore};
use super::{
    Create, IntegrationUpdate, ProcessedEvent, ProcessedRow, StoreError, StoredIntegration,
};
use crate::config::DatabaseSettings;
use crate::crypto::KeyRing;

/// The [`Store`] on PostgreSQL.
pub type PgStore = SqlStore<Postgres>;

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
        let options = options.options([
            ("lock_timeout", limit.as_str()),
            ("statement_timeout", limit.as_str()),
        ]);
        let pool = PgPoolOptions::new()
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
    const SEALED_UNDER_OTHER_KEYS: &'static str = "SELECT id, secret_ciphertext, secret_key_id, \
        previous_ciphertext, previous_key_id FROM integrations \
        WHERE secret_key_id <> $1 OR previous_key_id <> $1 ORDER BY id LIMIT $2 FOR UPDATE";
    const ONE_SECRET_PER_KEY: &'static str = "SELECT DISTINCT ON (key_id) id, blob, key_id FROM \
        (SELECT id, secret_ciphertext AS blob, secret_key_id AS key_id FROM integrations \
         UNION ALL SELECT id, previous_ciphertext, previous_key_id FROM integrations \
         WHERE previous_key_id IS NOT NULL) AS sealed ORDER BY key_id, id";

    fn rows_affected(result: &sqlx::postgres::PgQueryResult) -> u64 {
        result.rows_affected()
    }

    async fn valid_keys(
        tx: &mut PgConnection,
        digests: &[&[u8]],
    ) -> Result<Vec<(Vec<u8>, String)>, sqlx::Error> {
        sqlx::query_as(
            "SELECT key_hash, owner FROM api_keys \
             WHERE key_hash = ANY($1) AND revoked_at IS NULL FOR SHARE",
        )
        .bind(digests)
        .fetch_all(tx)
        .await
    }

    async fn lock_integrations(
        tx: &mut PgConnection,
        rows: &[(Uuid, &str)],
    ) -> Result<Vec<StoredIntegration>, sqlx::Error> {
        let (ids, owners): (Vec<Uuid>, Vec<&str>) = rows.iter().copied().unzip();
        sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE (id, owner) IN \
             (SELECT * FROM unnest($1::uuid[], $2::text[])) ORDER BY id FOR UPDATE"
        ))
        .bind(ids)
        .bind(owners)
        .fetch_all(tx)
        .await
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

    async fn insert_processed(
        tx: &mut PgConnection,
        rows: &[ProcessedRow],
        now: OffsetDateTime,
    ) -> Result<u64, sqlx::Error> {
        let column = |f: fn(&ProcessedRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
        let inserted = sqlx::query(
            "INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, \
             digest_key_id, secret_digest, processed_at) \
             SELECT owner, event_id, integration_id, outcome, record, digest_key_id, secret_digest, $8 \
             FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::bytea[]) \
               AS t(owner, event_id, integration_id, outcome, record, digest_key_id, secret_digest) \
             ON CONFLICT DO NOTHING",
        )
        .bind(column(|r| &r.owner))
        .bind(column(|r| &r.event_id))
        .bind(rows.iter().map(|r| r.integration_id).collect::<Vec<_>>())
        .bind(column(|r| r.outcome))
        .bind(rows.iter().map(|r| r.record.as_deref()).collect::<Vec<_>>())
        .bind(column(|r| &r.digest_key_id))
        .bind(rows.iter().map(|r| r.secret_digest.as_slice()).collect::<Vec<_>>())
        .bind(now)
        .execute(tx)
        .await?;
        Ok(inserted.rows_affected())
    }

    async fn update_integrations(
        tx: &mut PgConnection,
        updates: &[IntegrationUpdate],
    ) -> Result<(), sqlx::Error> {
        let u = updates;
        fn previous(x: &IntegrationUpdate) -> Option<&crate::crypto::Sealed> {
            x.previous.as_ref().map(|(sealed, _)| sealed)
        }
        sqlx::query(
            "UPDATE integrations AS i SET secret_ciphertext = u.blob, secret_key_id = u.key_id, \
             previous_ciphertext = u.previous_blob, previous_key_id = u.previous_key_id, \
             previous_expires_at = u.previous_until, updated_at = u.updated_at, \
             last_rotated_at = GREATEST(i.last_rotated_at, u.rotated_at), \
             rotation_count = i.rotation_count + u.applied, \
             last_event_id = u.event_id, last_applied_at = u.applied_at \
             FROM unnest($1::uuid[], $2::bytea[], $3::text[], $4::timestamptz[], $5::timestamptz[], \
               $6::bigint[], $7::bytea[], $8::text[], $9::timestamptz[], $10::text[], $11::timestamptz[]) \
               AS u(id, blob, key_id, updated_at, rotated_at, applied, previous_blob, previous_key_id, \
               previous_until, event_id, applied_at) \
             WHERE i.id = u.id",
        )
        .bind(u.iter().map(|x| x.id).collect::<Vec<_>>())
        .bind(u.iter().map(|x| x.sealed.blob.as_slice()).collect::<Vec<_>>())
        .bind(u.iter().map(|x| x.sealed.key_id.as_str()).collect::<Vec<_>>())
        .bind(u.iter().map(|x| x.updated_at).collect::<Vec<_>>())
        .bind(u.iter().map(|x| x.last_rotated_at).collect::<Vec<_>>())
        .bind(u.iter().map(|x| x.applied).collect::<Vec<_>>())
        .bind(u.iter().map(|x| previous(x).map(|p| p.blob.as_slice())).collect::<Vec<_>>())
        .bind(u.iter().map(|x| previous(x).map(|p| p.key_id.as_str())).collect::<Vec<_>>())
        .bind(u.iter().map(|x| x.previous.as_ref().map(|(_, t)| *t)).collect::<Vec<_>>())
        .bind(u.iter().map(|x| x.last_event_id.as_deref()).collect::<Vec<_>>())
        .bind(u.iter().map(|x| x.applied_at).collect::<Vec<_>>())
        .execute(tx)
        .await?;
        Ok(())
    }
}
