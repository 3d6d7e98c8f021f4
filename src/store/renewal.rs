//! What the store keeps of renewals (`renewal_state`, one row per
//! integration that has any): the expiry of its secret, tied to that
//! secret by the SHA-256 of its ciphertext, so that any later change of
//! the secret makes it unknown again; the last renewal; a renewal refused
//! for good for the current secret, which stops the schedule until the
//! secret changes; transient failures in a row; and the claim of the
//! worker renewing it now. [`due_at`] is the schedule, a pure function of
//! that state and the settings.

use std::time::Duration;

use sqlx::{Database, Encode, Executor, FromRow, IntoArguments, Pool, Type};
use time::OffsetDateTime;
use uuid::Uuid;

use super::codec::{self, Id, Time};
use super::{Owner, StoreError};

/// What the store knows of an integration's renewals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenewalState {
    /// When the current secret expires, if known: `Some(None)`, never.
    pub expires_at: Option<Option<OffsetDateTime>>,
    /// When a renewal last succeeded.
    pub last_renewed_at: Option<OffsetDateTime>,
    /// A renewal was refused for good (422) for the current secret.
    pub stopped: bool,
    /// Transient failures since the last success or refusal.
    pub failures: u32,
    /// When the last of them was.
    pub failed_at: Option<OffsetDateTime>,
    /// Until when a worker holds the renewal.
    pub claimed_until: Option<OffsetDateTime>,
}

/// An integration the schedule looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewalCandidate {
    /// The integration.
    pub id: Uuid,
    /// Its owner.
    pub owner: Owner,
    /// When its secret was last changed (or the integration created).
    pub changed_at: OffsetDateTime,
    /// Its renewal state.
    pub state: RenewalState,
}

/// What a renewal came to, to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalRecord {
    /// Applied: the new secret's expiry (`None`: never), when, and
    /// whether everything it minted and replaced is stored or destroyed
    /// (the next renewal then need not sweep).
    Renewed {
        /// When the new secret expires.
        expires_at: Option<OffsetDateTime>,
        /// When it was renewed.
        at: OffsetDateTime,
        /// Nothing it minted or replaced is left in Vault unaccounted for.
        swept: bool,
    },
    /// Refused for good (422): the schedule stops for the current secret.
    Refused,
    /// Not applied for now (503), at this time.
    Failed(OffsetDateTime),
    /// Nothing to record (a repeat, or refused before Vault was asked):
    /// only the claim ends.
    Released,
}

/// When the schedule is to renew: `before_expiry` ahead of a known
/// expiry, `max_age` after the secret last changed, whichever comes first
/// (zero turns either off); never for a secret a renewal was refused for;
/// after transient failures, not before `check_interval` doubled per
/// failure (at most an hour) has passed since the last one.
pub fn due_at(
    state: &RenewalState,
    changed_at: OffsetDateTime,
    before_expiry: Duration,
    max_age: Duration,
    check_interval: Duration,
) -> Option<OffsetDateTime> {
    if state.stopped {
        return None;
    }
    let by_expiry = state
        .expires_at
        .flatten()
        .filter(|_| !before_expiry.is_zero())
        .map(|at| at - before_expiry);
    let by_age = (!max_age.is_zero()).then(|| changed_at + max_age);
    let due = match (by_expiry, by_age) {
        (Some(a), Some(b)) => a.min(b),
        (a, b) => a.or(b)?,
    };
    let backoff = state.failed_at.map(|failed| {
        let doublings = state.failures.saturating_sub(1).min(12);
        failed
            + check_interval
                .saturating_mul(1 << doublings)
                .min(Duration::from_secs(3600))
    });
    Some(backoff.map_or(due, |b| due.max(b)))
}

/// A row of the state, joined to its integration.
#[derive(FromRow)]
pub(crate) struct StateRow {
    #[sqlx(try_from = "codec::Id")]
    id: Uuid,
    owner: String,
    #[sqlx(try_from = "codec::Time")]
    changed_at: OffsetDateTime,
    expiry_current: i64,
    secret_expires_at: Option<codec::Time>,
    last_renewed_at: Option<codec::Time>,
    stopped: i64,
    failures: i64,
    failed_at: Option<codec::Time>,
    claimed_until: Option<codec::Time>,
}

impl StateRow {
    fn state(&self) -> RenewalState {
        let at = |t: &Option<codec::Time>| t.map(OffsetDateTime::from);
        RenewalState {
            expires_at: (self.expiry_current == 1).then(|| at(&self.secret_expires_at)),
            last_renewed_at: at(&self.last_renewed_at),
            stopped: self.stopped == 1,
            failures: u32::try_from(self.failures).unwrap_or(u32::MAX),
            failed_at: at(&self.failed_at),
            claimed_until: at(&self.claimed_until),
        }
    }
}

/// The state of every integration, joined to its row.
macro_rules! state_select {
    () => {
        "SELECT i.id, i.owner, COALESCE(i.last_applied_at, i.created_at) AS changed_at, \
     CAST(CASE WHEN r.expiry_known AND r.expiry_sha = i.secret_ciphertext_sha256 \
       THEN 1 ELSE 0 END AS BIGINT) AS expiry_current, \
     r.secret_expires_at, r.last_renewed_at, \
     CAST(CASE WHEN r.stopped_sha = i.secret_ciphertext_sha256 THEN 1 ELSE 0 END AS BIGINT) \
       AS stopped, \
     CAST(COALESCE(r.failures, 0) AS BIGINT) AS failures, r.failed_at, r.claimed_until \
     FROM integrations i LEFT JOIN renewal_state r ON r.integration_id = i.id"
    };
}

/// The renewal state of integration `id` (the default for none).
pub(crate) async fn state<D>(pool: &Pool<D>, id: Uuid) -> Result<RenewalState, StoreError>
where
    D: Database,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
    for<'r> StateRow: FromRow<'r, D::Row>,
{
    let row: Option<StateRow> = sqlx::query_as(concat!(state_select!(), " WHERE i.id = $1"))
        .bind(Id(id))
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|r| r.state()).unwrap_or_default())
}

/// Every integration with its renewal state.
pub(crate) async fn candidates<D>(pool: &Pool<D>) -> Result<Vec<RenewalCandidate>, StoreError>
where
    D: Database,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'r> StateRow: FromRow<'r, D::Row>,
{
    let rows: Vec<StateRow> = sqlx::query_as(state_select!()).fetch_all(pool).await?;
    rows.into_iter()
        .map(|row| {
            let owner = Owner::parse(&row.owner).map_err(|e| {
                StoreError::Database(sqlx::Error::Decode(format!("owner: {}", e.0).into()))
            })?;
            Ok(RenewalCandidate {
                id: row.id,
                owner,
                changed_at: row.changed_at,
                state: row.state(),
            })
        })
        .collect()
}

/// Claims integration `id`'s renewal for `holder` until `until`, unless
/// another holder has it past `now`; whether this one has it. The same
/// holder takes its own claim back at once; one without an identity
/// (`None`) never matches another.
pub(crate) async fn claim<D>(
    pool: &Pool<D>,
    id: Uuid,
    holder: Option<&str>,
    now: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<bool, StoreError>
where
    D: super::sql::Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
    for<'q> Time: Encode<'q, D> + Type<D>,
    for<'q> Option<String>: Encode<'q, D> + Type<D>,
{
    let done = sqlx::query(
        "INSERT INTO renewal_state (integration_id, claimed_until, claimed_by) \
         VALUES ($1, $2, $4) \
         ON CONFLICT (integration_id) DO UPDATE SET claimed_until = excluded.claimed_until, \
           claimed_by = excluded.claimed_by \
         WHERE renewal_state.claimed_until IS NULL OR renewal_state.claimed_until < $3 \
           OR renewal_state.claimed_by = $4",
    )
    .bind(Id(id))
    .bind(Time(until))
    .bind(Time(now))
    .bind(holder.map(str::to_owned))
    .execute(pool)
    .await?;
    Ok(D::rows_affected(&done) == 1)
}

/// Marks integration `id`'s next renewal as due to sweep for what an
/// interrupted renewal minted, as a renewal does before it mints, and says
/// whether it was due already: yes unless a renewal had cleared it. One
/// statement: it sets only a cleared mark, and one it set was cleared.
pub(crate) async fn mark_sweep_due<D>(pool: &Pool<D>, id: Uuid) -> Result<bool, StoreError>
where
    D: super::sql::Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
{
    let done = sqlx::query(
        "UPDATE renewal_state SET sweep_due = true WHERE integration_id = $1 AND NOT sweep_due",
    )
    .bind(Id(id))
    .execute(pool)
    .await?;
    Ok(D::rows_affected(&done) == 0)
}

/// Sets whether integration `id`'s next renewal must first sweep.
pub(crate) async fn set_sweep_due<D>(pool: &Pool<D>, id: Uuid, due: bool) -> Result<(), StoreError>
where
    D: Database,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
    for<'q> bool: Encode<'q, D> + Type<D>,
{
    sqlx::query(
        "INSERT INTO renewal_state (integration_id, sweep_due) VALUES ($1, $2) \
         ON CONFLICT (integration_id) DO UPDATE SET sweep_due = excluded.sweep_due",
    )
    .bind(Id(id))
    .bind(due)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records what a renewal of `id` came to; its claim ends.
pub(crate) async fn record<D>(
    pool: &Pool<D>,
    id: Uuid,
    record: RenewalRecord,
) -> Result<(), StoreError>
where
    D: Database,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
    for<'q> Time: Encode<'q, D> + Type<D>,
    for<'q> Option<Time>: Encode<'q, D>,
    for<'q> bool: Encode<'q, D> + Type<D>,
{
    let query = match record {
        RenewalRecord::Renewed {
            expires_at,
            at,
            swept,
        } => sqlx::query(
            "INSERT INTO renewal_state (integration_id, expiry_sha, expiry_known, \
               secret_expires_at, last_renewed_at, sweep_due) \
             SELECT id, secret_ciphertext_sha256, $2, $3, $4, $5 FROM integrations WHERE id = $1 \
             ON CONFLICT (integration_id) DO UPDATE SET expiry_sha = excluded.expiry_sha, \
               expiry_known = excluded.expiry_known, \
               secret_expires_at = excluded.secret_expires_at, \
               last_renewed_at = excluded.last_renewed_at, stopped_sha = NULL, failures = 0, \
               failed_at = NULL, claimed_until = NULL, sweep_due = excluded.sweep_due",
        )
        .bind(Id(id))
        .bind(true)
        .bind(expires_at.map(Time))
        .bind(Time(at))
        .bind(!swept),
        RenewalRecord::Refused => sqlx::query(
            "INSERT INTO renewal_state (integration_id, stopped_sha) \
             SELECT id, secret_ciphertext_sha256 FROM integrations WHERE id = $1 \
             ON CONFLICT (integration_id) DO UPDATE SET stopped_sha = excluded.stopped_sha, \
               failures = 0, failed_at = NULL, claimed_until = NULL",
        )
        .bind(Id(id)),
        RenewalRecord::Failed(at) => sqlx::query(
            "INSERT INTO renewal_state (integration_id, failures, failed_at) \
             SELECT id, 1, $2 FROM integrations WHERE id = $1 \
             ON CONFLICT (integration_id) DO UPDATE SET \
               failures = renewal_state.failures + 1, failed_at = excluded.failed_at, \
               claimed_until = NULL",
        )
        .bind(Id(id))
        .bind(Time(at)),
        RenewalRecord::Released => {
            sqlx::query("UPDATE renewal_state SET claimed_until = NULL WHERE integration_id = $1")
                .bind(Id(id))
        }
    };
    query.execute(pool).await?;
    Ok(())
}

/// Which secret of an integration an expiry is of.
pub(crate) enum SecretHeld {
    /// The one whose ciphertext's SHA-256 this is.
    Sealed(Vec<u8>),
    /// The one whose keyed digest (`secret_digest`) under this key is this.
    Digest(String, Vec<u8>),
}

/// Records `expires_at` as the expiry of the secret `held` names, if
/// integration `id` still holds it; whether it did.
pub(crate) async fn record_expiry<D>(
    pool: &Pool<D>,
    id: Uuid,
    held: SecretHeld,
    expires_at: Option<OffsetDateTime>,
) -> Result<bool, StoreError>
where
    D: super::sql::Dialect,
    for<'c> &'c mut D::Connection: Executor<'c, Database = D>,
    D::Arguments: IntoArguments<D>,
    for<'q> Id: Encode<'q, D> + Type<D>,
    for<'q> Time: Encode<'q, D> + Type<D>,
    for<'q> Option<Time>: Encode<'q, D>,
    for<'q> bool: Encode<'q, D> + Type<D>,
    for<'q> Vec<u8>: Encode<'q, D> + Type<D>,
    for<'q> String: Encode<'q, D> + Type<D>,
{
    macro_rules! record_where {
        ($held:literal) => {
            concat!(
                "INSERT INTO renewal_state \
                   (integration_id, expiry_sha, expiry_known, secret_expires_at) \
                 SELECT id, secret_ciphertext_sha256, $2, $3 FROM integrations \
                 WHERE id = $1 AND ",
                $held,
                " ON CONFLICT (integration_id) DO UPDATE SET expiry_sha = excluded.expiry_sha, \
                   expiry_known = excluded.expiry_known, \
                   secret_expires_at = excluded.secret_expires_at"
            )
        };
    }
    let sql = match held {
        SecretHeld::Sealed(_) => record_where!("secret_ciphertext_sha256 = $4"),
        SecretHeld::Digest(..) => record_where!("secret_digest_key_id = $4 AND secret_digest = $5"),
    };
    let query = sqlx::query(sql)
        .bind(Id(id))
        .bind(true)
        .bind(expires_at.map(Time));
    let done = match held {
        SecretHeld::Sealed(sha) => query.bind(sha),
        SecretHeld::Digest(key_id, digest) => query.bind(key_id).bind(digest),
    }
    .execute(pool)
    .await?;
    Ok(D::rows_affected(&done) == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-07 12:00 UTC);
    const MIN: Duration = Duration::from_secs(60);

    fn expiring_at(at: OffsetDateTime) -> RenewalState {
        RenewalState {
            expires_at: Some(Some(at)),
            ..RenewalState::default()
        }
    }

    #[test]
    fn the_schedule_takes_the_earlier_of_expiry_and_age() {
        let state = expiring_at(NOW + time::Duration::hours(1));
        let due = |before, age| due_at(&state, NOW, before, age, MIN);
        assert_eq!(due(Duration::ZERO, Duration::ZERO), None, "both off");
        assert_eq!(
            due(10 * MIN, Duration::ZERO),
            Some(NOW + time::Duration::minutes(50))
        );
        assert_eq!(
            due(10 * MIN, 20 * MIN),
            Some(NOW + time::Duration::minutes(20))
        );
        assert_eq!(
            due(Duration::ZERO, 2 * 60 * MIN),
            Some(NOW + time::Duration::hours(2))
        );
        // Unknown or no expiry: by age only.
        for expires_at in [None, Some(None)] {
            let state = RenewalState {
                expires_at,
                ..RenewalState::default()
            };
            assert_eq!(due_at(&state, NOW, 10 * MIN, Duration::ZERO, MIN), None);
        }
    }

    #[test]
    fn a_refusal_stops_and_failures_back_off() {
        let stopped = RenewalState {
            stopped: true,
            ..expiring_at(NOW)
        };
        assert_eq!(due_at(&stopped, NOW, MIN, MIN, MIN), None);
        let failing = |failures| RenewalState {
            failures,
            failed_at: Some(NOW),
            ..expiring_at(NOW)
        };
        let due = |failures| due_at(&failing(failures), NOW, MIN, Duration::ZERO, MIN);
        assert_eq!(due(1), Some(NOW + time::Duration::minutes(1)));
        assert_eq!(due(2), Some(NOW + time::Duration::minutes(2)));
        assert_eq!(due(3), Some(NOW + time::Duration::minutes(4)));
        assert_eq!(
            due(30),
            Some(NOW + time::Duration::hours(1)),
            "at most an hour"
        );
    }
}
