//! The renewal schedule: every `renewal.check_interval_secs` the worker
//! looks for integrations whose renewal is due ([`due_at`]: before their
//! secret expires, or past its maximum age), claims each in the store (so
//! that with several workers on one PostgreSQL each due renewal runs once)
//! and hands it to the integration's lane as a renewal, in order with its
//! rotations. What it comes to is recorded by the rotator: the schedule
//! reads it at its next look.
//!
//! A scheduled renewal acts for the integration's owner with a key the
//! worker derives from its key ring and registers for the owner once: an
//! operator who revokes it stops that owner's scheduled renewals. Its
//! `Nats-Msg-Id` names the integration and the due time, so that two
//! workers that both took the same due renewal apply it once.

use std::collections::HashMap;

use bytes::Bytes;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::lanes::Dispatcher;
use super::{Shared, Source};
use crate::auth::ApiKey;
use crate::domain::{Owner, now_micros};
use crate::event::{Decoded, Envelope, Operation};
use crate::store::due_at;
use crate::telemetry::Metrics;

/// Runs the schedule until `shutdown`; nothing when no renewal is
/// scheduled (`renewal.before_expiry_secs` and `max_age_secs` both 0) and
/// no expiry is to be discovered.
pub(super) async fn schedule(dispatcher: Dispatcher, shutdown: CancellationToken) {
    let shared = dispatcher.shared.clone();
    let settings = *shared.rotator.renewal();
    if !settings.scheduled() && !settings.discover_expiry {
        return;
    }
    let mut keys = HashMap::new();
    let mut ticks = tokio::time::interval(settings.check_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        if let Err(e) = look(&dispatcher, &shared, &mut keys).await {
            tracing::warn!(error = %e, "the renewal schedule could not read the store; \
                it looks again at its next check");
        }
    }
}

/// One look: counts the secrets expiring soon, and dispatches the due
/// renewals this worker claims.
async fn look(
    dispatcher: &Dispatcher,
    shared: &Shared,
    keys: &mut HashMap<Owner, Option<ApiKey>>,
) -> Result<(), crate::store::StoreError> {
    let store = shared.rotator.store();
    let settings = shared.rotator.renewal();
    let now = now_micros();
    let candidates = store.renewal_candidates().await?;
    count_expiring(&candidates, now + settings.before_expiry);
    // A claim outlives the renewal's own bound (its retry budget), and is
    // ended as soon as its outcome is recorded.
    let lease = settings.check_interval + shared.settings.retry.budget * 2;
    let unknown: Vec<uuid::Uuid> = candidates
        .iter()
        .filter(|c| c.state.expires_at.is_none() && !c.state.stopped)
        .map(|c| c.id)
        .collect();
    for candidate in candidates {
        let Some(due) = due_at(
            &candidate.state,
            candidate.changed_at,
            settings.before_expiry,
            settings.max_age,
            settings.check_interval,
        ) else {
            continue;
        };
        if due > now
            || candidate
                .state
                .claimed_until
                .is_some_and(|until| until > now)
        {
            continue;
        }
        let Some(key) = key_of(shared, keys, &candidate.owner).await else {
            continue;
        };
        let msg_id = format!("renewal-{}-{}", candidate.id, due.unix_timestamp());
        let holder = Some(msg_id.as_str());
        if !store
            .claim_renewal(candidate.id, holder, now, now + lease)
            .await?
        {
            continue;
        }
        let mut decoded = renewal_message(candidate.id, &key, msg_id, now);
        decoded.claimed = true;
        dispatcher.dispatch(decoded, Source::Schedule).await;
    }
    if settings.discover_expiry {
        discover(shared, &unknown).await;
    }
    tracing::info!(unknown = unknown.len(), "the renewal schedule looked");
    Ok(())
}

/// Shows how many secrets expire by `by`.
fn count_expiring(candidates: &[crate::store::RenewalCandidate], by: OffsetDateTime) {
    let expiring = candidates
        .iter()
        .filter(|c| c.state.expires_at.flatten().is_some_and(|at| at <= by))
        .count();
    Metrics::get()
        .secrets_expiring
        .record(u64::try_from(expiring).unwrap_or(u64::MAX), &[]);
}

/// Looks up the expiry of secrets the schedule does not know, at most
/// `renewal.max_lookups_per_sec`, as many as fit in one check interval.
async fn discover(shared: &Shared, unknown: &[uuid::Uuid]) {
    let settings = shared.rotator.renewal();
    let rate = settings.max_lookups_per_sec.max(1);
    let budget = u64::from(rate).saturating_mul(settings.check_interval.as_secs().max(1));
    let mut pace = tokio::time::interval(std::time::Duration::from_secs(1) / rate);
    for &id in unknown
        .iter()
        .take(usize::try_from(budget).unwrap_or(usize::MAX))
    {
        pace.tick().await;
        let deadline = std::time::Instant::now() + shared.settings.retry.budget;
        match shared.rotator.discover_expiry(id, deadline).await {
            Ok(_) => {}
            Err(failure) => tracing::info!(integration = %id, status = failure.status.code(),
                error = %failure.message, "the expiry of a secret could not be looked up"),
        }
    }
}

/// The schedule's key for `owner`, registered with the store the first
/// time; `None` (and a warning, once) when it cannot be: revoked by an
/// operator, which stops the owner's scheduled renewals.
async fn key_of(
    shared: &Shared,
    keys: &mut HashMap<Owner, Option<ApiKey>>,
    owner: &Owner,
) -> Option<ApiKey> {
    if let Some(known) = keys.get(owner) {
        return known.clone();
    }
    // Asked again at the next look when the store does not answer.
    let key = registered_key(shared.rotator.store().as_ref(), &shared.keys, owner)
        .await
        .ok()?;
    keys.insert(owner.clone(), key.clone());
    key
}

/// The schedule's key for `owner` ([`ApiKey::for_schedule`]), registered
/// with the store if it is not yet; `None` when it is revoked (or cannot
/// be registered), with a warning.
pub(crate) async fn registered_key(
    store: &dyn crate::store::Store,
    ring: &crate::crypto::KeyRing,
    owner: &Owner,
) -> Result<Option<ApiKey>, crate::store::StoreError> {
    let key = ApiKey::for_schedule(ring, owner);
    let hash = key.hash();
    let usable = match store.authenticate(&hash).await? {
        Some(found) => found == *owner,
        None => match store.create_api_key(owner, &hash).await {
            Ok(info) => {
                tracing::info!(owner = %owner, key = %info.id,
                    "registered the renewal schedule's API key for this owner");
                true
            }
            Err(e) => {
                tracing::warn!(owner = %owner, error = %e,
                    "the renewal schedule's API key for this owner is revoked or cannot be \
                     registered: its integrations are not renewed by the schedule");
                false
            }
        },
    };
    Ok(usable.then_some(key))
}

/// The message of a renewal of integration `id` acting with `key`, with
/// `msg_id` as its identity.
pub(crate) fn renewal_message(
    id: uuid::Uuid,
    key: &ApiKey,
    msg_id: String,
    now: OffsetDateTime,
) -> Decoded {
    let body = serde_json::json!({ "integrationId": id });
    Decoded::new(Envelope {
        authorization: Some(format!("Bearer {}", key.expose())),
        msg_id: Some(msg_id),
        payload: Bytes::from(body.to_string()),
        received_at: Some(now),
        operation: Operation::Renew,
        ..Envelope::default()
    })
}
