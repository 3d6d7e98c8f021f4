//! The SQL store, written once for both backends.
//!
//! [`SqlStore`] implements [`Store`] over a sqlx pool of either database.
//! Statements that read the same on both are here, with the column codecs
//! ([`Id`], [`Time`]) deciding how ids and times travel. What differs is
//! each backend's [`Dialect`], kept beside its connection code so its SQL
//! stays visible: how a write transaction begins, and the set-based
//! statements of a rotation batch (`unnest` and `FOR UPDATE` on
//! PostgreSQL, `json_each` under `BEGIN IMMEDIATE` on SQLite).
//!
//! A rotation batch is one transaction in four steps: the callers' keys
//! and the rows of their owners (locked), what their event ids were used
//! for, then [`plan_batch`] decides, and the plan is written.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Type};
use time::OffsetDateTime;
use uuid::Uuid;

use super::codec::{Id, Time};
use super::group::GroupCommit;
use super::{
    ApiKeyInfo, ApiKeySelector, DIGEST_PURPOSE, IntegrationUpdate, KeyUsage, OneRotation, Outcome,
    OwnedIntegration, Plan, PoolState, ProcessedEvent, ProcessedRow, REENCRYPT_BATCH,
    ReencryptReport, RenewalCandidate, RenewalRecord, RenewalState, Rotation, RotationResult,
    Store, StoreError, StoredApiKey, StoredIntegration, UnwrapSlot, blob_sha256, key_digests,
    known_outcomes, owners_by_key, plan_batch, previous_key_id, previous_key_of, unwrapped_purpose,
};
use crate::auth::ApiKeyHash;
use crate::crypto::{KeyRing, Sealed};
use crate::domain::{Integration, NewIntegration, Owner, RoleTarget, SecretId, now_micros};

/// A [`Store`] on a SQL database: [`super::PgStore`] or
/// [`super::SqliteStore`].
#[derive(Debug)]
pub struct SqlStore<D: Database> {
    /// Where writes go (SQLite: its single connection).
    pub(super) writer: Pool<D>,
    /// Where plain reads go (SQLite: beside the writer, thanks to WAL;
    /// PostgreSQL: the same pool).
    pub(super) reader: Pool<D>,
    pub(super) keys: Arc<KeyRing>,
    /// Where rotation batches go to be applied in groups (SQLite), if not
    /// applied by the caller.
    pub(super) group: Option<GroupCommit>,
    /// The ciphertexts this process opened or wrote, by row: what the
    /// single-statement path may overwrite without opening.
    pub(super) vouched: Arc<Vouched>,
}

/// Rows whose stored ciphertext this process knows to be theirs, by the
/// SHA-256 of that ciphertext: it wrote it (sealed with the row's id bound
/// in), or opened it. The single-statement path overwrites only such a
/// ciphertext; any other (a first rotation since start, a row another
/// worker rotated, a ciphertext copied from another row) goes through the
/// batch path, which opens it first. Bounded: an entry forgotten costs one
/// batch-path rotation.
#[derive(Debug, Default)]
pub(super) struct Vouched(std::sync::Mutex<Generations>);

/// Rows remembered at most (about 100 bytes each).
const VOUCHED_ROWS: usize = 16_384;

/// The rows vouched for in two generations: new entries go to the young
/// one; when it holds half the bound, it becomes the old one and the old
/// one is forgotten. So a row vouched for is kept through at least half
/// the bound of other rows vouched for after it, at a constant cost per
/// entry. (Forgetting whichever entry a full map yields first would
/// forget the newest about half the time: the slots emptied by the
/// evictions before are where new entries land.)
#[derive(Debug, Default)]
pub(super) struct Generations {
    young: HashMap<Uuid, Vec<u8>>,
    old: HashMap<Uuid, Vec<u8>>,
}

impl Generations {
    fn get(&self, id: &Uuid) -> Option<&Vec<u8>> {
        self.young.get(id).or_else(|| self.old.get(id))
    }

    /// A row's older entry, if the old generation has one, is shadowed by
    /// the young one's and goes with its generation.
    fn insert(&mut self, id: Uuid, sha: Vec<u8>) {
        self.young.insert(id, sha);
        if self.young.len() >= VOUCHED_ROWS / 2 {
            self.old = std::mem::take(&mut self.young);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

impl Vouched {
    fn get(&self, id: Uuid) -> Option<Vec<u8>> {
        self.lock().get(&id).cloned()
    }

    pub(super) fn vouch(&self, id: Uuid, sealed: &Sealed) {
        self.vouch_all([(id, sealed)]);
    }

    /// Vouches for several rows under one lock.
    pub(super) fn vouch_all<'a>(&self, rows: impl IntoIterator<Item = (Uuid, &'a Sealed)>) {
        let hashed: Vec<(Uuid, Vec<u8>)> = rows
            .into_iter()
            .map(|(id, sealed)| (id, blob_sha256(sealed)))
            .collect();
        let mut vouched = self.lock();
        for (id, sha) in hashed {
            vouched.insert(id, sha);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<D: Database> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        Self {
            writer: self.writer.clone(),
            reader: self.reader.clone(),
            keys: self.keys.clone(),
            group: self.group.clone(),
            vouched: self.vouched.clone(),
        }
    }
}

impl<D: Database> SqlStore<D> {
    /// The write pool, for tests and tools that inspect the tables directly.
    pub fn pool(&self) -> &Pool<D> {
        &self.writer
    }
}

/// One integration row, by id.
async fn integration<D>(pool: &Pool<D>, id: Uuid) -> Result<Option<StoredIntegration>, StoreError>
where
    D: Database,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
    for<'r> StoredIntegration: FromRow<'r, D::Row>,
{
    let row = sqlx::query_as(concat!(
        "SELECT ",
        integration_columns!(),
        " FROM integrations WHERE id = $1"
    ))
    .bind(Id(id))
    .fetch_optional(pool)
    .await?;
    Ok(row)
}

/// The recorded `(key id, check value)` pairs.
async fn key_checks<'e, D, E>(executor: E) -> Result<Vec<(String, Vec<u8>)>, StoreError>
where
    D: Database,
    E: Executor<'e, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'r> (String, Vec<u8>): FromRow<'r, D::Row>,
{
    let checks = sqlx::query_as("SELECT key_id, check_value FROM key_checks ORDER BY key_id")
        .fetch_all(executor)
        .await?;
    Ok(checks)
}

/// `(id, secret_ciphertext, secret_key_id, previous_ciphertext,
/// previous_key_id)` of an integration row.
type SealedRow = (Id, Vec<u8>, String, Option<Vec<u8>>, Option<String>);

/// The valid keys of a batch (`(key_hash, owner)`) and its rows, locked.
pub(crate) type KeysAndRows = (Vec<(Vec<u8>, String)>, Vec<StoredIntegration>);

/// One `(id, ciphertext, key id)` per key id in use, for current and for
/// previous secrets (a previous one under its own key only when it is not
/// the current one's, see [`previous_key_id`]), found by the key id indexes: each step of the
/// recursion reads the next key id from an index, and each key id's first
/// row is read from one, so the cost follows the number of key ids and not
/// of rows (PostgreSQL and SQLite alike).
const ONE_SECRET_PER_KEY: &str = "WITH RECURSIVE \
    cur(key_id) AS (SELECT min(secret_key_id) FROM integrations \
        UNION ALL SELECT (SELECT secret_key_id FROM integrations WHERE secret_key_id > cur.key_id \
            ORDER BY secret_key_id LIMIT 1) FROM cur WHERE cur.key_id IS NOT NULL), \
    prev(key_id) AS (SELECT min(previous_key_id) FROM integrations \
            WHERE previous_key_id IS NOT NULL \
        UNION ALL SELECT (SELECT previous_key_id FROM integrations WHERE previous_key_id > prev.key_id \
            ORDER BY previous_key_id LIMIT 1) FROM prev WHERE prev.key_id IS NOT NULL) \
    SELECT (SELECT id FROM integrations WHERE secret_key_id = cur.key_id \
                ORDER BY id LIMIT 1), \
           (SELECT secret_ciphertext FROM integrations WHERE secret_key_id = cur.key_id \
                ORDER BY id LIMIT 1), \
           cur.key_id \
        FROM cur WHERE cur.key_id IS NOT NULL \
    UNION ALL \
    SELECT (SELECT id FROM integrations WHERE previous_key_id = prev.key_id \
                ORDER BY id LIMIT 1), \
           (SELECT previous_ciphertext FROM integrations WHERE previous_key_id = prev.key_id \
                ORDER BY id LIMIT 1), \
           prev.key_id \
        FROM prev WHERE prev.key_id IS NOT NULL";

/// Inserts an integration, its secret sealed under the current key.
async fn insert_integration<D: Dialect>(
    conn: &mut D::Connection,
    keys: &KeyRing,
    new: &NewIntegration,
) -> Result<StoredIntegration, sqlx::Error>
where
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
    for<'q> Time: Encode<'q, D> + Type<D>,
    for<'q> String: Encode<'q, D> + Type<D>,
    for<'q> Vec<u8>: Encode<'q, D> + Type<D>,
    for<'q> Option<String>: Encode<'q, D>,
    for<'r> StoredIntegration: FromRow<'r, D::Row>,
{
    let id = Uuid::new_v4();
    let sealed = keys.seal(id, new.secret_id.expose());
    let sha256 = blob_sha256(&sealed);
    let (digest_key_id, digest) = keys.digest(DIGEST_PURPOSE, new.secret_id.expose().as_bytes());
    sqlx::query_as(concat!(
        "INSERT INTO integrations (id, owner, name, address, namespace, role_id, \
         secret_ciphertext, secret_key_id, created_at, updated_at, secret_digest, \
         secret_digest_key_id, secret_ciphertext_sha256) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $12) RETURNING ",
        integration_columns!()
    ))
    .bind(Id(id))
    .bind(new.owner.as_str().to_owned())
    .bind(new.name.as_str().to_owned())
    .bind(new.address.as_str().to_owned())
    .bind(new.namespace.as_ref().map(|n| n.as_str().to_owned()))
    .bind(new.role_id.as_str().to_owned())
    .bind(sealed.blob)
    .bind(sealed.key_id)
    .bind(Time(now_micros()))
    .bind(digest)
    .bind(digest_key_id)
    .bind(sha256)
    .fetch_one(conn)
    .await
}

/// What one backend does its own way. The statements take a transaction's
/// connection and sets as slices; each implementation binds them as its
/// database reads sets best, in one statement per step.
#[async_trait]
pub(crate) trait Dialect: Database {
    /// The backend's name, for logs.
    const BACKEND: &'static str;
    /// Begins a transaction that will write: on SQLite the write lock is
    /// taken up front, so a transaction never fails half-way on a lock
    /// upgrade.
    const BEGIN_WRITE: &'static str;
    /// A [`SealedRow`] of up to `$2` rows with a secret (current or
    /// previous) whose key id is not `$1`, in id order, held until commit.
    const SEALED_UNDER_OTHER_KEYS: &'static str;

    /// How many rows a statement changed.
    fn rows_affected(result: &Self::QueryResult) -> u64;

    /// The unrevoked keys among `digests` as `(key_hash, owner)`, held so
    /// that a revocation waits for this transaction; and the integrations
    /// among `targets` (`(id, key_hash)` pairs) that the key's owner owns,
    /// locked in id order. Another owner's integration is not locked: it
    /// is a 404, and must not be held up.
    async fn keys_and_rows(
        tx: &mut Self::Connection,
        digests: &[&[u8]],
        targets: &[(Uuid, &[u8])],
    ) -> Result<KeysAndRows, sqlx::Error>;

    /// What is recorded for `(owner, event_id)` pairs.
    async fn processed_events(
        tx: &mut Self::Connection,
        events: &[(&str, &str)],
    ) -> Result<Vec<ProcessedEvent>, sqlx::Error>;

    /// Writes a batch's plan: records its processed events, skipping ids
    /// already recorded, and writes each integration's new secret, times
    /// and count. Returns how many events were recorded.
    async fn write_plan(
        tx: &mut Self::Connection,
        processed: &[ProcessedRow],
        updates: &[IntegrationUpdate],
        now: OffsetDateTime,
    ) -> Result<u64, sqlx::Error>;

    /// Whether [`Dialect::rotate_at_once`] has a statement (else the work
    /// of preparing one is skipped).
    const AT_ONCE: bool = false;

    /// Applies one rotation of a new secret in a single statement (one
    /// round trip, its own transaction) when nothing but a plain success
    /// can come of it, and returns the row as it now is; `None` when it
    /// changed nothing (any other outcome, or a backend without such a
    /// statement): the batch path then decides.
    async fn rotate_at_once(
        _pool: &Pool<Self>,
        _one: &OneRotation,
    ) -> Result<Option<StoredIntegration>, sqlx::Error> {
        Ok(None)
    }

    /// Refreshes the planner's statistics of the worker's tables where
    /// the database does not keep them fresh itself; true when it did.
    async fn refresh_statistics(_pool: &Pool<Self>) -> Result<bool, sqlx::Error> {
        Ok(false)
    }
}

/// One new secret as a single statement, if the backend has one and the
/// rotation is a plain success; `None`: nothing changed.
async fn rotate_at_once<D: Dialect>(
    store: &SqlStore<D>,
    rotation: &Rotation,
    now: OffsetDateTime,
) -> Result<Option<RotationResult>, StoreError> {
    if !D::AT_ONCE {
        return Ok(None);
    }
    let Some(vouched) = store.vouched.get(rotation.integration_id) else {
        return Ok(None);
    };
    let Some(one) = OneRotation::of(rotation, &store.keys, now, vouched) else {
        return Ok(None);
    };
    let row = D::rotate_at_once(&store.writer, &one).await?;
    if row.is_some() {
        store.vouched.vouch(one.id, &one.sealed);
    }
    Ok(row.map(|row| RotationResult {
        outcome: Outcome::Applied(row.record()),
        owner: Some(Owner::from_trusted(row.owner)),
        duplicate: false,
        record_json: None,
    }))
}

#[async_trait]
impl<D> Store for SqlStore<D>
where
    D: Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
    for<'q> Time: Encode<'q, D> + Type<D>,
    for<'q> i64: Encode<'q, D> + Type<D>,
    for<'q> String: Encode<'q, D> + Type<D>,
    for<'q> Vec<u8>: Encode<'q, D> + Type<D>,
    for<'q> Option<String>: Encode<'q, D>,
    for<'q> Option<Vec<u8>>: Encode<'q, D>,
    for<'q> Option<Id>: Encode<'q, D>,
    for<'q> Option<Time>: Encode<'q, D>,
    for<'q> bool: Encode<'q, D> + Type<D>,
    for<'r> StoredIntegration: FromRow<'r, D::Row>,
    for<'r> super::renewal::StateRow: FromRow<'r, D::Row>,
    for<'r> StoredApiKey: FromRow<'r, D::Row>,
    for<'r> (String,): FromRow<'r, D::Row>,
    for<'r> (String, Vec<u8>): FromRow<'r, D::Row>,
    for<'r> (Id, Vec<u8>, String): FromRow<'r, D::Row>,
    for<'r> (Option<Id>, Option<Vec<u8>>, String): FromRow<'r, D::Row>,
    for<'r> SealedRow: FromRow<'r, D::Row>,
    for<'r> ProcessedEvent: FromRow<'r, D::Row>,
    for<'r> (Id,): FromRow<'r, D::Row>,
    for<'r> (i64,): FromRow<'r, D::Row>,
{
    fn backend(&self) -> &'static str {
        D::BACKEND
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    fn pool_state(&self) -> PoolState {
        let state = |pool: &Pool<D>| {
            let size = pool.size();
            let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX);
            PoolState {
                in_use: size.saturating_sub(idle),
                size,
                max: pool.options().get_max_connections(),
            }
        };
        let writer = state(&self.writer);
        // PostgreSQL's reader is a clone of the writer (sqlx has no pool
        // identity to compare; the options live in the shared pool, so
        // their address tells).
        if std::ptr::eq(self.writer.options(), self.reader.options()) {
            return writer;
        }
        let reader = state(&self.reader);
        PoolState {
            in_use: writer.in_use + reader.in_use,
            size: writer.size + reader.size,
            max: writer.max + reader.max,
        }
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
        .bind(Id(Uuid::now_v7()))
        .bind(owner.as_str().to_owned())
        .bind(hash.0.to_vec())
        .bind(Time(now_micros()))
        .fetch_one(&self.writer)
        .await?;
        Ok(row.into())
    }

    async fn list_api_keys(&self, owner: Option<&Owner>) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let rows: Vec<StoredApiKey> = sqlx::query_as(
            "SELECT id, owner, created_at, revoked_at FROM api_keys \
             WHERE CAST($1 AS TEXT) IS NULL OR owner = $1 ORDER BY created_at, id",
        )
        .bind(owner.map(|o| o.as_str().to_owned()))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn revoke_api_key(&self, key: &ApiKeySelector) -> Result<Option<ApiKeyInfo>, StoreError> {
        let (id, hash) = match key {
            ApiKeySelector::Id(id) => (Some(Id(*id)), None),
            ApiKeySelector::Hash(h) => (None, Some(h.0.to_vec())),
        };
        // COALESCE keeps the first revocation time when revoked twice.
        let row: Option<StoredApiKey> = sqlx::query_as(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $3) \
             WHERE id = $1 OR key_hash = $2 RETURNING id, owner, created_at, revoked_at",
        )
        .bind(id)
        .bind(hash)
        .bind(Time(now_micros()))
        .fetch_optional(&self.writer)
        .await?;
        Ok(row.map(Into::into))
    }

    async fn authenticate(&self, hash: &ApiKeyHash) -> Result<Option<Owner>, StoreError> {
        let owner: Option<(String,)> =
            sqlx::query_as("SELECT owner FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
                .bind(hash.0.to_vec())
                .fetch_optional(&self.reader)
                .await?;
        Ok(owner.map(|(owner,)| Owner::from_trusted(owner)))
    }

    async fn create_integration(&self, new: &NewIntegration) -> Result<Integration, StoreError> {
        let mut conn = self.writer.acquire().await?;
        Ok(insert_integration(&mut conn, &self.keys, new)
            .await?
            .record())
    }

    async fn create_integrations(&self, new: &[NewIntegration]) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.writer.begin_with(D::BEGIN_WRITE).await?;
        let mut ids = Vec::with_capacity(new.len());
        for one in new {
            ids.push(insert_integration(&mut tx, &self.keys, one).await?.id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    async fn get_integration(&self, id: Uuid) -> Result<Option<OwnedIntegration>, StoreError> {
        let row = integration(&self.reader, id).await?;
        Ok(row.map(StoredIntegration::into_owned))
    }

    async fn list_integrations(
        &self,
        owner: Option<&Owner>,
    ) -> Result<Vec<Integration>, StoreError> {
        let rows: Vec<StoredIntegration> = sqlx::query_as(concat!(
            "SELECT ",
            integration_columns!(),
            " FROM integrations WHERE CAST($1 AS TEXT) IS NULL OR owner = $1 \
             ORDER BY created_at, id"
        ))
        .bind(owner.map(|o| o.as_str().to_owned()))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.iter().map(StoredIntegration::record).collect())
    }

    async fn delete_integration(&self, id: Uuid) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM integrations WHERE id = $1")
            .bind(Id(id))
            .execute(&self.writer)
            .await?;
        Ok(D::rows_affected(&deleted) == 1)
    }

    async fn reveal_secret(&self, id: Uuid) -> Result<Option<SecretString>, StoreError> {
        let Some(row) = integration(&self.reader, id).await? else {
            return Ok(None);
        };
        Ok(Some(self.keys.open(id, &row.sealed())?))
    }

    async fn reencrypt(&self) -> Result<ReencryptReport, StoreError> {
        let active = self.keys.active_key_id().to_owned();
        let mut reencrypted = 0;
        loop {
            let mut tx = self.writer.begin_with(D::BEGIN_WRITE).await?;
            let rows: Vec<SealedRow> = sqlx::query_as(D::SEALED_UNDER_OTHER_KEYS)
                .bind(active.clone())
                .bind(REENCRYPT_BATCH)
                .fetch_all(&mut *tx)
                .await?;
            if rows.is_empty() {
                return Ok(ReencryptReport {
                    reencrypted,
                    active_key: active,
                });
            }
            for (Id(id), blob, key_id, previous_blob, previous_key) in rows {
                // Each secret of the row, the current and the previous one,
                // moves to the active key; one already under it stays.
                let moved = |sealed: Sealed| -> Result<Sealed, StoreError> {
                    if sealed.key_id == active {
                        return Ok(sealed);
                    }
                    let secret = self.keys.open(id, &sealed)?;
                    Ok(self.keys.seal(id, secret.expose_secret()))
                };
                let current = moved(Sealed {
                    key_id: key_id.clone(),
                    blob,
                })?;
                let sha256 = blob_sha256(&current);
                let previous = previous_blob
                    .map(|blob| {
                        let key_id = previous_key_of(previous_key.as_deref(), &key_id);
                        moved(Sealed { key_id, blob })
                    })
                    .transpose()?;
                let (previous_blob, previous_key) = match previous {
                    Some(p) => {
                        let key_id = previous_key_id(&p.key_id, &current.key_id);
                        (Some(p.blob), key_id.map(str::to_owned))
                    }
                    None => (None, None),
                };
                sqlx::query(
                    "UPDATE integrations SET secret_ciphertext = $2, secret_key_id = $3, \
                     previous_ciphertext = $4, previous_key_id = $5, secret_ciphertext_sha256 = $6 \
                     WHERE id = $1",
                )
                .bind(Id(id))
                .bind(current.blob)
                .bind(current.key_id)
                .bind(previous_blob)
                .bind(previous_key)
                .bind(sha256)
                .execute(&mut *tx)
                .await?;
                reencrypted += 1;
            }
            tx.commit().await?;
        }
    }

    async fn integrations_of_role(
        &self,
        key: &ApiKeyHash,
        target: &RoleTarget,
    ) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<(Id,)> = sqlx::query_as(
            "SELECT i.id FROM api_keys k JOIN integrations i ON i.owner = k.owner \
             WHERE k.key_hash = $1 AND k.revoked_at IS NULL AND i.role_id = $2 \
             AND (CAST($3 AS TEXT) IS NULL OR i.address = $3) \
             AND (CAST($4 AS TEXT) IS NULL OR i.namespace = $4) ORDER BY i.id LIMIT 2",
        )
        .bind(key.0.to_vec())
        .bind(target.role_id.clone())
        .bind(target.address.clone())
        .bind(target.namespace.clone())
        .fetch_all(&self.reader)
        .await?;
        Ok(ids.into_iter().map(|(Id(id),)| id).collect())
    }

    async fn reveal_previous(
        &self,
        id: Uuid,
        now: OffsetDateTime,
    ) -> Result<Option<SecretString>, StoreError> {
        let Some(row) = integration(&self.reader, id).await? else {
            return Ok(None);
        };
        match row.previous() {
            Some((sealed, until)) if until > now => Ok(Some(self.keys.open(id, &sealed)?)),
            _ => Ok(None),
        }
    }

    async fn erase_expired_previous(&self, now: OffsetDateTime) -> Result<u64, StoreError> {
        let erased = sqlx::query(
            "UPDATE integrations SET previous_ciphertext = NULL, previous_key_id = NULL, \
             previous_expires_at = NULL WHERE previous_expires_at <= $1",
        )
        .bind(Time(now))
        .execute(&self.writer)
        .await?;
        Ok(D::rows_affected(&erased))
    }

    async fn rotate(&self, batch: &[Rotation]) -> Result<Vec<RotationResult>, StoreError> {
        if let Some(group) = &self.group {
            return group.rotate(batch).await;
        }
        let now = now_micros();
        // A single new secret (a request, a quiet stream) is tried as one
        // statement first.
        if let [one] = batch
            && let Some(done) = rotate_at_once(self, one, now).await?
        {
            return Ok(vec![done]);
        }
        // The write transaction first: a revocation committed before this
        // point is seen, and one that comes later waits for the commit.
        let mut tx = self.writer.begin_with(D::BEGIN_WRITE).await?;
        let targets: Vec<(Uuid, &[u8])> = batch
            .iter()
            .map(|r| (r.integration_id, &r.key.0[..]))
            .collect();
        let (keys, rows) = D::keys_and_rows(&mut tx, &key_digests(batch), &targets).await?;
        let owners = owners_by_key(keys);
        // Read after the locks: a concurrent transaction on these rows has
        // committed, and its event ids are visible.
        let events: Vec<(&str, &str)> = batch
            .iter()
            .filter_map(|r| Some((owners.get(&r.key.0)?.as_str(), r.event_id.as_deref()?)))
            .collect();
        let prior = if events.is_empty() {
            Vec::new()
        } else {
            D::processed_events(&mut tx, &events).await?
        };
        let current = rows
            .into_iter()
            .map(|row| (row.id, row.into_current()))
            .collect();
        let plan = plan_batch(
            batch,
            &owners,
            current,
            known_outcomes(prior)?,
            &self.keys,
            now,
        );

        write_plan::<D>(&mut tx, &plan, now).await?;
        tx.commit().await?;
        self.vouched
            .vouch_all(plan.updates.iter().map(|u| (u.id, &u.sealed)));
        Ok(plan.results)
    }

    async fn refresh_statistics(&self) -> Result<bool, StoreError> {
        Ok(D::refresh_statistics(&self.writer).await?)
    }

    async fn prune_processed(&self, before: OffsetDateTime) -> Result<u64, StoreError> {
        let deleted = sqlx::query("DELETE FROM processed_events WHERE processed_at < $1")
            .bind(Time(before))
            .execute(&self.writer)
            .await?;
        sqlx::query("DELETE FROM unwrapped_secrets WHERE created_at < $1")
            .bind(Time(before))
            .execute(&self.writer)
            .await?;
        Ok(D::rows_affected(&deleted))
    }

    async fn put_unwrapped(
        &self,
        slot: UnwrapSlot<'_>,
        secret: &SecretId,
    ) -> Result<(), StoreError> {
        let event_id = slot.key.row_id(&self.keys);
        let purpose = unwrapped_purpose(slot.owner, &event_id);
        let sealed = self
            .keys
            .seal_bytes(&purpose, slot.integration, secret.expose().as_bytes());
        sqlx::query(
            "INSERT INTO unwrapped_secrets (owner, event_id, integration_id, secret_ciphertext, \
             secret_key_id, created_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (owner, event_id, integration_id) DO NOTHING",
        )
        .bind(slot.owner.as_str().to_owned())
        .bind(event_id)
        .bind(Id(slot.integration))
        .bind(sealed.blob)
        .bind(sealed.key_id)
        .bind(Time(now_micros()))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn get_unwrapped(&self, slot: UnwrapSlot<'_>) -> Result<Option<SecretId>, StoreError> {
        let (owner, integration) = (slot.owner, slot.integration);
        let event_id = slot.key.row_id(&self.keys);
        let row: Option<(Id, Vec<u8>, String)> = sqlx::query_as(
            "SELECT integration_id, secret_ciphertext, secret_key_id FROM unwrapped_secrets \
             WHERE owner = $1 AND event_id = $2 AND integration_id = $3",
        )
        .bind(owner.as_str().to_owned())
        .bind(event_id.clone())
        .bind(Id(integration))
        .fetch_optional(&self.reader)
        .await?;
        let Some((Id(id), blob, key_id)) = row else {
            return Ok(None);
        };
        let purpose = unwrapped_purpose(owner, &event_id);
        // A secret sealed under a key since removed cannot be used: the
        // message is then handled as if nothing had been unwrapped.
        let opened = self
            .keys
            .open_bytes(&purpose, id, &Sealed { key_id, blob })
            .map_err(|e| tracing::warn!(error = %e, "an unwrapped secret_id cannot be opened"))
            .ok()
            .and_then(|plain| String::from_utf8(plain).ok())
            .and_then(|plain| SecretId::parse(plain).ok());
        Ok(opened)
    }

    async fn forget_unwrapped(&self, slot: UnwrapSlot<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM unwrapped_secrets \
             WHERE owner = $1 AND event_id = $2 AND integration_id = $3",
        )
        .bind(slot.owner.as_str().to_owned())
        .bind(slot.key.row_id(&self.keys))
        .bind(Id(slot.integration))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn prior_event(
        &self,
        owner: &Owner,
        event_id: &str,
    ) -> Result<Option<(Uuid, Outcome)>, StoreError> {
        let row: Option<ProcessedEvent> = sqlx::query_as(
            "SELECT owner, event_id, integration_id, outcome, record, secret_digest, \
             digest_key_id FROM processed_events WHERE owner = $1 AND event_id = $2",
        )
        .bind(owner.as_str().to_owned())
        .bind(event_id.to_owned())
        .fetch_optional(&self.reader)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let id = row.integration_id;
        let known = known_outcomes(vec![row])?;
        Ok(known.into_values().next().map(|prior| (id, prior.outcome)))
    }

    async fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        let found: Vec<(Option<Id>, Option<Vec<u8>>, String)> = sqlx::query_as(ONE_SECRET_PER_KEY)
            .fetch_all(&self.reader)
            .await?;
        let mut samples: Vec<(Uuid, Sealed)> = Vec::with_capacity(found.len());
        for (id, blob, key_id) in found {
            let (Some(Id(id)), Some(blob)) = (id, blob) else {
                continue;
            };
            // A key id in use for current and previous secrets alike is
            // sampled once.
            if samples.iter().all(|(_, s)| s.key_id != key_id) {
                samples.push((id, Sealed { key_id, blob }));
            }
        }
        Ok(KeyUsage {
            samples,
            checks: key_checks(&self.reader).await?,
        })
    }

    async fn record_key_checks(
        &self,
        checks: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.writer.begin_with(D::BEGIN_WRITE).await?;
        for (key_id, value) in checks {
            sqlx::query(
                "INSERT INTO key_checks (key_id, check_value, created_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (key_id) DO NOTHING",
            )
            .bind(key_id.clone())
            .bind(value.clone())
            .bind(Time(now_micros()))
            .execute(&mut *tx)
            .await?;
        }
        // What is recorded now, which may be another process's value.
        let mut recorded = key_checks(&mut *tx).await?;
        tx.commit().await?;
        recorded.retain(|(id, _)| checks.iter().any(|(mine, _)| mine == id));
        Ok(recorded)
    }

    async fn expired_previous(&self, now: OffsetDateTime) -> Result<Vec<Uuid>, StoreError> {
        let rows: Vec<(Id,)> =
            sqlx::query_as("SELECT id FROM integrations WHERE previous_expires_at <= $1")
                .bind(Time(now))
                .fetch_all(&self.reader)
                .await?;
        Ok(rows.into_iter().map(|(id,)| id.0).collect())
    }

    async fn renewal_state(&self, id: Uuid) -> Result<RenewalState, StoreError> {
        super::renewal::state(&self.reader, id).await
    }

    async fn renewal_candidates(&self) -> Result<Vec<RenewalCandidate>, StoreError> {
        super::renewal::candidates(&self.reader).await
    }

    async fn claim_renewal(
        &self,
        id: Uuid,
        holder: Option<&str>,
        now: OffsetDateTime,
        until: OffsetDateTime,
    ) -> Result<bool, StoreError> {
        super::renewal::claim(&self.writer, id, holder, now, until).await
    }

    async fn record_renewal(&self, id: Uuid, record: RenewalRecord) -> Result<(), StoreError> {
        super::renewal::record(&self.writer, id, record).await
    }

    async fn mark_renewal_sweep_due(&self, id: Uuid) -> Result<bool, StoreError> {
        super::renewal::mark_sweep_due(&self.writer, id).await
    }

    async fn set_renewal_sweep_due(&self, id: Uuid, due: bool) -> Result<(), StoreError> {
        super::renewal::set_sweep_due(&self.writer, id, due).await
    }

    async fn record_expiry(
        &self,
        id: Uuid,
        secret: &SecretId,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<bool, StoreError> {
        use super::renewal::{SecretHeld, record_expiry};
        // Every rotation writes the new secret's keyed digest: the secret
        // is told by it in the one statement, nothing read or opened.
        let (key_id, digest) = self.keys.digest(DIGEST_PURPOSE, secret.expose().as_bytes());
        let held = SecretHeld::Digest(key_id, digest);
        if record_expiry(&self.writer, id, held, expires_at).await? {
            return Ok(true);
        }
        // A row without a digest, or with one under another key, or
        // holding another secret: the secret is opened and compared.
        let Some(row) = integration(&self.reader, id).await? else {
            return Ok(false);
        };
        let sealed = row.sealed();
        let stored = self.keys.open(id, &sealed)?;
        if !super::rules::constant_time_eq(stored.expose_secret(), secret.expose()) {
            return Ok(false);
        }
        let held = SecretHeld::Sealed(blob_sha256(&sealed));
        record_expiry(&self.writer, id, held, expires_at).await
    }
}

/// Writes a batch's plan, if it changes anything. The processed event ids
/// must all be new: another worker that recorded one of them for a row
/// this batch had not locked makes the attempt start over (the
/// transaction is rolled back), and see it.
async fn write_plan<D: Dialect>(
    tx: &mut D::Connection,
    plan: &Plan,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    if plan.processed.is_empty() && plan.updates.is_empty() {
        return Ok(());
    }
    let inserted = D::write_plan(tx, &plan.processed, &plan.updates, now).await?;
    if inserted != plan.processed.len() as u64 {
        return Err(StoreError::Unavailable(sqlx::Error::Protocol(
            "concurrent processing of the same event id; retrying".into(),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vouched_row_is_kept_through_half_the_bound_of_later_ones() {
        let mut vouched = Generations::default();
        let ids: Vec<Uuid> = (1..=3 * VOUCHED_ROWS as u128)
            .map(Uuid::from_u128)
            .collect();
        for (n, &id) in ids.iter().enumerate() {
            vouched.insert(id, n.to_be_bytes().to_vec());
            assert!(vouched.len() <= VOUCHED_ROWS, "{} rows", vouched.len());
        }
        let recent = &ids[ids.len() - VOUCHED_ROWS / 2..];
        let forgotten = recent.iter().filter(|id| vouched.get(id).is_none()).count();
        assert_eq!(
            forgotten,
            0,
            "of the last {} rows vouched for",
            recent.len()
        );
        // Vouched for again: the new digest, kept as a new entry.
        let first_recent = recent[0];
        vouched.insert(first_recent, b"again".to_vec());
        for n in 0..VOUCHED_ROWS / 2 - 1 {
            vouched.insert(Uuid::from_u128(u128::MAX - n as u128), Vec::new());
        }
        assert_eq!(vouched.get(&first_recent), Some(&b"again".to_vec()));
        assert_eq!(vouched.get(&ids[0]), None);
    }
}
