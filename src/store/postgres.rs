//! The PostgreSQL store: the choice for production and for several workers
//! sharing one consumer. Queries are plain `query`/`query_as` (not the
//! compile-time macros), so a checkout builds without a database.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    ApiKeyInfo, ApiKeySelector, KeyUsage, OwnedIntegration, ProcessedEvent, ReencryptReport,
    Rotation, RotationResult, Store, StoreError, StoredApiKey, StoredIntegration, key_digests,
    known_outcomes, owners_by_key, plan_batch,
};
use crate::auth::ApiKeyHash;
use crate::config::DatabaseSettings;
use crate::crypto::{KeyRing, Sealed};
use crate::domain::{Integration, NewIntegration, Owner, now_micros};

/// PostgreSQL-backed [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    keys: Arc<KeyRing>,
}

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
        let options: PgConnectOptions = settings
            .url
            .expose_secret()
            .parse()
            .map_err(|e: sqlx::Error| StoreError::Url(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections.max(1))
            .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms));
        let pool = match pool.clone().connect_with(options.clone()).await {
            Ok(pool) => pool,
            Err(e) if is_missing_database(&e) => {
                create_database(&options).await?;
                pool.connect_with(options).await?
            }
            Err(e) => return Err(e.into()),
        };
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Self { pool, keys })
    }

    /// The pool, for tests and tools that inspect the tables directly.
    pub fn pool(&self) -> &PgPool {
        &self.pool
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
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_api_key(
        &self,
        owner: &Owner,
        hash: &ApiKeyHash,
    ) -> Result<ApiKeyInfo, StoreError> {
        let row: StoredApiKey = sqlx::query_as(
            "INSERT INTO api_keys (id, owner, key_hash, created_at) VALUES ($1, $2, $3, $4) \
             RETURNING id, owner, created_at, revoked_at",
        )
        .bind(Uuid::now_v7())
        .bind(owner.as_str())
        .bind(&hash.0[..])
        .bind(now_micros())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.into())
    }

    async fn list_api_keys(&self, owner: Option<&Owner>) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let rows: Vec<StoredApiKey> = sqlx::query_as(
            "SELECT id, owner, created_at, revoked_at FROM api_keys \
             WHERE $1::text IS NULL OR owner = $1 ORDER BY created_at, id",
        )
        .bind(owner.map(Owner::as_str))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn revoke_api_key(&self, key: &ApiKeySelector) -> Result<Option<ApiKeyInfo>, StoreError> {
        let (id, hash) = match key {
            ApiKeySelector::Id(id) => (Some(*id), None),
            ApiKeySelector::Hash(h) => (None, Some(&h.0[..])),
        };
        // COALESCE keeps the first revocation time when revoked twice.
        let row: Option<StoredApiKey> = sqlx::query_as(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) \
             WHERE id = $1 OR key_hash = $2 RETURNING id, owner, created_at, revoked_at",
        )
        .bind(id)
        .bind(hash)
        .bind(now_micros())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(Into::into))
    }

    async fn authenticate(&self, hash: &ApiKeyHash) -> Result<Option<Owner>, StoreError> {
        let owner: Option<String> = sqlx::query_scalar(
            "SELECT owner FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
        )
        .bind(&hash.0[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(owner.map(Owner::from_trusted))
    }

    async fn create_integration(&self, new: &NewIntegration) -> Result<Integration, StoreError> {
        let id = Uuid::new_v4();
        let now = now_micros();
        let sealed = self.keys.seal(id, new.secret_id.expose());
        let row: StoredIntegration = sqlx::query_as(concat!(
            "INSERT INTO integrations (id, owner, name, address, namespace, role_id, \
             secret_ciphertext, secret_key_id, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) RETURNING ",
            integration_columns!()
        ))
        .bind(id)
        .bind(new.owner.as_str())
        .bind(new.name.as_str())
        .bind(new.address.as_str())
        .bind(new.namespace.as_ref().map(|n| n.as_str()))
        .bind(new.role_id.as_str())
        .bind(&sealed.blob)
        .bind(&sealed.key_id)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.record())
    }

    async fn get_integration(&self, id: Uuid) -> Result<Option<OwnedIntegration>, StoreError> {
        let row: Option<StoredIntegration> = sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(StoredIntegration::into_owned))
    }

    async fn list_integrations(
        &self,
        owner: Option<&Owner>,
    ) -> Result<Vec<Integration>, StoreError> {
        let rows: Vec<StoredIntegration> = sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE $1::text IS NULL OR owner = $1 ORDER BY created_at, id"
        ))
        .bind(owner.map(Owner::as_str))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(StoredIntegration::record).collect())
    }

    async fn delete_integration(&self, id: Uuid) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM integrations WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted == 1)
    }

    async fn reveal_secret(&self, id: Uuid) -> Result<Option<SecretString>, StoreError> {
        let row: Option<(Vec<u8>, String)> = sqlx::query_as(
            "SELECT secret_ciphertext, secret_key_id FROM integrations WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((blob, key_id)) = row else {
            return Ok(None);
        };
        Ok(Some(self.keys.open(id, &Sealed { key_id, blob })?))
    }

    async fn reencrypt(&self) -> Result<ReencryptReport, StoreError> {
        let active = self.keys.active_key_id().to_owned();
        let mut reencrypted = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let rows: Vec<(Uuid, Vec<u8>, String)> = sqlx::query_as(
                "SELECT id, secret_ciphertext, secret_key_id FROM integrations \
                 WHERE secret_key_id <> $1 ORDER BY id LIMIT $2 FOR UPDATE",
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
                let secret = self.keys.open(id, &Sealed { key_id, blob })?;
                let sealed = self.keys.seal(id, secret.expose_secret());
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
        let mut tx = self.pool.begin().await?;
        // The keys first, inside the transaction and share-locked: a
        // revocation committed before this point is seen, and one that
        // comes later waits for this commit.
        let keys: Vec<(Vec<u8>, String)> = sqlx::query_as(
            "SELECT key_hash, owner FROM api_keys \
             WHERE key_hash = ANY($1) AND revoked_at IS NULL FOR SHARE",
        )
        .bind(key_digests(batch))
        .fetch_all(&mut *tx)
        .await?;
        let owners = owners_by_key(keys);
        // Only the rows of the callers' own owners are locked (another
        // owner's integration is a 404 and must not be held up), in id
        // order, so two workers' batches cannot deadlock.
        let (ids, row_owners): (Vec<Uuid>, Vec<&str>) = batch
            .iter()
            .filter_map(|r| Some((r.integration_id, owners.get(&r.key.0)?.as_str())))
            .unzip();
        let rows: Vec<StoredIntegration> = sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE (id, owner) IN \
             (SELECT * FROM unnest($1::uuid[], $2::text[])) ORDER BY id FOR UPDATE"
        ))
        .bind(&ids)
        .bind(&row_owners)
        .fetch_all(&mut *tx)
        .await?;
        // Read after the locks: a concurrent transaction on these rows has
        // committed, and its event ids are visible.
        let (owners_of_events, event_ids): (Vec<&str>, Vec<&str>) = batch
            .iter()
            .filter_map(|r| Some((owners.get(&r.key.0)?.as_str(), r.event_id.as_deref()?)))
            .unzip();
        let prior: Vec<ProcessedEvent> = if event_ids.is_empty() {
            Vec::new()
        } else {
            sqlx::query_as(
                "SELECT p.owner, p.event_id, p.integration_id, p.outcome, p.record, \
                 p.secret_digest, p.digest_key_id FROM processed_events p \
                 JOIN unnest($1::text[], $2::text[]) AS k(owner, event_id) \
                 ON p.owner = k.owner AND p.event_id = k.event_id",
            )
            .bind(&owners_of_events)
            .bind(&event_ids)
            .fetch_all(&mut *tx)
            .await?
        };
        let current = rows
            .into_iter()
            .map(|row| (row.id, row.into_current()))
            .collect();
        let known = known_outcomes(prior)?;
        let plan = plan_batch(batch, &owners, current, known, &self.keys, now);

        if !plan.processed.is_empty() {
            let p = &plan.processed;
            let inserted = sqlx::query(
                "INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, \
                 digest_key_id, secret_digest, processed_at) \
                 SELECT owner, event_id, integration_id, outcome, record, digest_key_id, secret_digest, $8 \
                 FROM unnest($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::bytea[]) \
                   AS t(owner, event_id, integration_id, outcome, record, digest_key_id, secret_digest) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(p.iter().map(|r| r.owner.as_str()).collect::<Vec<_>>())
            .bind(p.iter().map(|r| r.event_id.as_str()).collect::<Vec<_>>())
            .bind(p.iter().map(|r| r.integration_id).collect::<Vec<_>>())
            .bind(p.iter().map(|r| r.outcome).collect::<Vec<_>>())
            .bind(p.iter().map(|r| r.record.as_deref()).collect::<Vec<_>>())
            .bind(p.iter().map(|r| r.digest_key_id.as_str()).collect::<Vec<_>>())
            .bind(p.iter().map(|r| r.secret_digest.as_slice()).collect::<Vec<_>>())
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted != p.len() as u64 {
                // Another worker recorded one of these event ids for a row
                // this batch had not locked: start over, and see it.
                return Err(StoreError::Unavailable(sqlx::Error::Protocol(
                    "concurrent processing of the same event id; retrying".into(),
                )));
            }
        }
        if !plan.updates.is_empty() {
            let u = &plan.updates;
            sqlx::query(
                "UPDATE integrations AS i SET secret_ciphertext = u.blob, secret_key_id = u.key_id, \
                 updated_at = u.updated_at, \
                 last_rotated_at = GREATEST(i.last_rotated_at, u.rotated_at), \
                 rotation_count = i.rotation_count + u.applied \
                 FROM unnest($1::uuid[], $2::bytea[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::bigint[]) \
                   AS u(id, blob, key_id, updated_at, rotated_at, applied) \
                 WHERE i.id = u.id",
            )
            .bind(u.iter().map(|x| x.id).collect::<Vec<_>>())
            .bind(u.iter().map(|x| x.sealed.blob.as_slice()).collect::<Vec<_>>())
            .bind(u.iter().map(|x| x.sealed.key_id.as_str()).collect::<Vec<_>>())
            .bind(u.iter().map(|x| x.updated_at).collect::<Vec<_>>())
            .bind(u.iter().map(|x| x.last_rotated_at).collect::<Vec<_>>())
            .bind(u.iter().map(|x| x.applied).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(plan.results)
    }

    async fn prune_processed(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM processed_events WHERE processed_at < $1")
            .bind(before)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted)
    }

    async fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        let samples: Vec<(Uuid, Vec<u8>, String)> = sqlx::query_as(
            "SELECT DISTINCT ON (secret_key_id) id, secret_ciphertext, secret_key_id \
             FROM integrations ORDER BY secret_key_id, id",
        )
        .fetch_all(&self.pool)
        .await?;
        let checks: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT key_id, check_value FROM key_checks ORDER BY key_id")
                .fetch_all(&self.pool)
                .await?;
        Ok(KeyUsage {
            samples: samples
                .into_iter()
                .map(|(id, blob, key_id)| (id, Sealed { key_id, blob }))
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
        let ids: Vec<&str> = checks.iter().map(|(id, _)| id.as_str()).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO key_checks (key_id, check_value, created_at) \
             SELECT key_id, check_value, $3 FROM unnest($1::text[], $2::bytea[]) AS c(key_id, check_value) \
             ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(checks.iter().map(|(_, v)| v.as_slice()).collect::<Vec<_>>())
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
        let recorded = sqlx::query_as(
            "SELECT key_id, check_value FROM key_checks WHERE key_id = ANY($1) ORDER BY key_id",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(recorded)
    }
}
