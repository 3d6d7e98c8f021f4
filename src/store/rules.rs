//! The rotation rules, free of SQL: what one rotation comes to against
//! the row it rotates ([`decide`]), and what a batch comes to, in order,
//! with the event ids it repeats ([`plan_batch`]). Every backend applies
//! them the same way; the backends only read the rows and write the plan.

use std::collections::HashMap;

use bytes::Bytes;
use secrecy::ExposeSecret;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Change, Outcome, ProcessedEvent, Rotation, RotationResult, StoreError};
use crate::crypto::{KeyRing, Sealed};
use crate::domain::{Integration, Owner, SecretId};

/// Domain separation of the secret digests kept with processed events.
pub(crate) const DIGEST_PURPOSE: &[u8] = b"rotation-worker/event-secret/v1:";
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

#[cfg(test)]
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

impl IntegrationUpdate {
    /// The `previous_key_id` column: the previous secret's key id when it
    /// is not the current one's, else `NULL` (see [`previous_key_id`]).
    pub(crate) fn previous_key_id(&self) -> Option<&str> {
        let (previous, _) = self.previous.as_ref()?;
        previous_key_id(&previous.key_id, &self.sealed.key_id)
    }
}

/// The `previous_key_id` column of a row whose previous secret is under
/// `previous` and current one under `current`: `NULL` when they are the
/// same key, the usual case. A rotation under an unchanged key then
/// changes no indexed column, so PostgreSQL updates the row in place (a
/// HOT update) instead of adding an entry to each of its indexes, and the
/// column's index holds only the rows whose two secrets are under
/// different keys (after a key change), which the start-up key check
/// samples. Read back by [`previous_key_of`].
pub(crate) fn previous_key_id<'a>(previous: &'a str, current: &str) -> Option<&'a str> {
    (previous != current).then_some(previous)
}

/// The previous secret's key id, read back from the `previous_key_id`
/// column (`column`) of a row whose current secret is under `current`:
/// the inverse of [`previous_key_id`].
pub(crate) fn previous_key_of(column: Option<&str>, current: &str) -> String {
    column.unwrap_or(current).to_owned()
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
        let outcome = match decision {
            Decision::Keep(outcome) => outcome,
            Decision::Apply(applied) => {
                let digest = matches!(rotation.change, Change::Secret(_)).then(digest);
                Outcome::Applied(self.apply(applied, rotation, digest))
            }
        };
        // Only successes are recorded: a refusal changes nothing, not even
        // the idempotency table, and is decided the same way on a repeat
        // (staleness only grows).
        let record_json = match (key, outcome.record()) {
            (Some(key), Some(record)) => self.remember(key, rotation, &outcome, record, digest()),
            _ => None,
        };
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
    /// Returns the new record, for the outcome: the row keeps its own and
    /// takes only the new `updatedAt`, so the record is not copied again.
    fn apply(
        &mut self,
        applied: Applied,
        rotation: &Rotation,
        digest: Option<(String, Vec<u8>)>,
    ) -> Integration {
        let Applied {
            sealed,
            replaced,
            record,
            rotated_at,
        } = applied;
        let (id, updated_at) = (record.id, record.updated_at);
        let previous =
            Some((replaced, rotation.keep_previous_until)).filter(|(_, until)| *until > self.now);
        if let Some(row) = self.current.get_mut(&id) {
            row.last_rotated_at = Some(
                row.last_rotated_at
                    .map_or(rotated_at, |t| t.max(rotated_at)),
            );
            row.sealed = sealed.clone();
            row.previous = previous.clone();
            row.record.updated_at = updated_at;
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
        record
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

pub(crate) fn constant_time_eq(a: &str, b: &str) -> bool {
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
