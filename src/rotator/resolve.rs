//! The step before the store's transaction: what secret each rotation
//! stores. A `secretId` is stored as it came; a `wrappedSecretId` is
//! looked up and unwrapped in the integration's Vault; with `vault.verify
//! = "login"` the new secret is tried with a login first.
//!
//! These calls happen outside the transaction (no row lock is held across
//! HTTP), after the checks that need no Vault: the key must be valid, the
//! integration the caller's, the `roleId` its own and the rotation not
//! stale, so that a message refused anyway never spends a wrapping token.
//! Messages of one integration are resolved one after the other, in batch
//! order; different integrations at once.
//!
//! An unwrap cannot be repeated, so what it gives is sealed into the store
//! (keyed by owner and event id) before anything else happens to it, and a
//! redelivery of the message takes it from there instead of asking Vault:
//! a worker that dies right after unwrapping still completes the rotation.

use std::collections::HashMap;
use std::future::Future;
use std::time::Instant;

use secrecy::ExposeSecret;
use uuid::Uuid;

use super::renew::Renewal;
use super::{Job, Rotator, State, outcome_result};
use crate::auth::{ApiKeyHash, AuthError};
use crate::config::Verify;
use crate::crashpoint::crashpoint;
use crate::domain::{RoleTarget, SecretId, WrappingToken, now_micros};
use crate::event::{Failure, Status, Submitted};
use crate::store::{Outcome, OwnedIntegration, UnwrapKey, UnwrapSlot};
use crate::telemetry::Metrics;
use crate::vault::{Target, Vault, VaultError};

/// What the store's record of the event and Vault made of one job's
/// secret.
#[derive(Debug)]
enum Resolved {
    /// Nothing to resolve: the body's `secretId` is stored, or the store
    /// recognises a repeat by its secret.
    AsSent,
    /// The secret to store (unwrapped, or verified).
    Secret(SecretId),
    /// An event already applied to this integration whose unwrapped
    /// secret is no longer kept: answered with its first outcome, and
    /// nothing is asked of Vault (the token is spent).
    Repeat(Outcome),
    /// A secret a renewal minted and tested, and the renewal to end.
    Minted(SecretId, Box<Renewal>),
    /// A secret a login verified, and its expiry if Vault told it
    /// (`Some(None)`: never).
    Verified(SecretId, Option<Option<time::OffsetDateTime>>),
}

impl Job<'_> {
    /// Takes what resolving its secret came to: a failure refuses it.
    fn take(&mut self, resolved: Result<Resolved, Failure>) {
        let State::Rotate { key, secret, .. } = &mut self.state else {
            return;
        };
        match resolved {
            Ok(Resolved::AsSent) => {}
            Ok(Resolved::Secret(found)) => *secret = Some(found),
            Ok(Resolved::Verified(found, expiry)) => {
                *secret = Some(found);
                self.expiry = expiry;
            }
            Ok(Resolved::Minted(found, renewal)) => {
                *secret = Some(found);
                self.renewal = Some(*renewal);
            }
            Ok(Resolved::Repeat(outcome)) => {
                self.state = State::Repeat(key.clone(), Box::new(outcome));
            }
            Err(failure) => self.state = State::Invalid(key.clone(), failure),
        }
    }
}

/// How the rotator reaches Vault.
#[derive(Debug, Clone)]
pub(super) struct VaultAccess {
    pub(super) vault: Vault,
    pub(super) verify: Verify,
}

pub(super) fn unavailable(message: &str) -> Failure {
    Failure {
        status: Status::Unavailable,
        message: format!("{message}; the rotation was not applied"),
    }
}

/// The failure of a store that did not answer in time.
pub(super) fn store_down(_: crate::store::StoreError) -> Failure {
    unavailable("the integration store is unavailable")
}

/// The failure a store outcome stands for (the same message the store's
/// own decision would give).
pub(super) fn refusal(outcome: Outcome) -> Failure {
    outcome_result(outcome, false, None)
        .err()
        .unwrap_or_else(|| unavailable("unexpected outcome"))
}

/// The failure of a call to Vault that gave up or was refused.
pub(super) fn vault_failure(error: VaultError, integration: Uuid) -> Failure {
    match error {
        VaultError::Unavailable(cause) => {
            tracing::warn!(error = %cause, %integration, "Vault unavailable after retries");
            unavailable("Vault could not be reached in time")
        }
        VaultError::InvalidToken => {
            Metrics::get().wrapping_failures.add(1, &[]);
            tracing::warn!(
                %integration,
                "wrapping token is invalid, expired or already used: it may have been intercepted"
            );
            Failure {
                status: Status::Unprocessable,
                message: error.to_string(),
            }
        }
        VaultError::Shut(why) => {
            tracing::warn!(error = why, %integration, "Vault not called");
            unavailable("Vault could not be reached in time")
        }
        VaultError::WrongPath
        | VaultError::Rejected
        | VaultError::Refused(_)
        | VaultError::Redirected
        | VaultError::TooLarge
        | VaultError::NotAllowed => {
            tracing::warn!(error = %error, %integration, "Vault call refused");
            Failure {
                status: Status::Unprocessable,
                message: error.to_string(),
            }
        }
    }
}

impl Rotator {
    /// Resolves the secret of every job that needs Vault: a
    /// `wrappedSecretId`, or any with `vault.verify = "login"`.
    pub(super) async fn resolve(&self, jobs: &mut [Job<'_>], deadline: Instant) {
        let Some(access) = &self.vault else {
            return;
        };
        let mut lanes: HashMap<Uuid, Vec<&mut Job<'_>>> = HashMap::new();
        for job in jobs.iter_mut() {
            let needs_vault = match &job.state {
                State::Rotate { event, .. } => {
                    event.secret.from_vault() || access.verify == Verify::Login
                }
                _ => false,
            };
            if let (true, Some(id)) = (needs_vault, job.integration) {
                lanes.entry(id).or_default().push(job);
            }
        }
        let lanes = lanes.into_values().map(|lane| async move {
            for job in lane {
                let resolved = self.resolve_one(access, job, deadline).await;
                job.take(resolved);
            }
        });
        futures::future::join_all(lanes).await;
    }

    async fn resolve_one(
        &self,
        access: &VaultAccess,
        job: &Job<'_>,
        deadline: Instant,
    ) -> Result<Resolved, Failure> {
        let (Some(id), State::Rotate { event, .. }) = (job.integration, &job.state) else {
            return Ok(Resolved::AsSent);
        };
        crashpoint("before-vault");
        let owned = self.target_of(job, deadline).await?;
        if let Some(resolved) = self.applied_before(&owned, job, deadline).await? {
            return Ok(resolved);
        }
        let integration = &owned.integration;
        let target = Target {
            address: &integration.address,
            namespace: integration.namespace.as_deref(),
        };
        let vault = &access.vault;
        let failed = |e| vault_failure(e, id);
        let secret = match &event.secret {
            Submitted::Minted => {
                let (secret, renewal) = self.renewed(access, job, &owned, deadline).await?;
                return Ok(Resolved::Minted(secret, Box::new(renewal)));
            }
            Submitted::Plain(secret) => secret.clone(),
            Submitted::Previous => self.previous_of(id, deadline).await?,
            Submitted::Wrapped(token) => {
                let key = job
                    .decoded
                    .dedupe_id()
                    .map_or(UnwrapKey::Token(token), UnwrapKey::Event);
                self.unwrapped(vault, target, &owned, key, token, deadline)
                    .await?
            }
        };
        if access.verify == Verify::Login {
            let session = self
                .retrying(deadline, || {
                    vault.open(target, &integration.role_id, &secret, deadline)
                })
                .await
                .map_err(failed)?;
            // With a token in hand, the secret's expiry is worth a lookup;
            // a role whose policy does not allow it just leaves it unknown.
            let expiry = match vault
                .look_up_secret(target, &session, &secret, deadline)
                .await
            {
                Ok(Some((_, info))) => Some(info.expires_at),
                _ => None,
            };
            vault.end(target, session).await;
            return Ok(Resolved::Verified(secret, expiry));
        }
        Ok(Resolved::Secret(secret))
    }

    /// The check of a message's event id against what the store recorded,
    /// before Vault is asked anything: an id used for another integration
    /// is a 422 without an unwrap (the token stays unspent); one already
    /// applied to this integration needs no Vault (the store recognises a
    /// repeat by its secret, or, for a spent token whose secret is no
    /// longer kept, it is answered with its first outcome). `None`: a new
    /// event, Vault is asked.
    async fn applied_before(
        &self,
        owned: &OwnedIntegration,
        job: &Job<'_>,
        deadline: Instant,
    ) -> Result<Option<Resolved>, Failure> {
        let (Some(event_id), State::Rotate { event, .. }) = (job.decoded.dedupe_id(), &job.state)
        else {
            return Ok(None);
        };
        let prior = self
            .retrying(deadline, || self.store.prior_event(&owned.owner, event_id))
            .await
            .map_err(store_down)?;
        let id = owned.integration.id;
        let outcome = match prior {
            None => return Ok(None),
            Some((first, _)) if first != id => return Err(refusal(Outcome::EventReused)),
            Some((_, outcome)) => outcome,
        };
        if !event.secret.from_vault() {
            return Ok(Some(Resolved::AsSent));
        }
        if let Submitted::Minted = &event.secret {
            // A renewal applied before: answered with its first outcome
            // (its secret is the stored one now, or replaced since);
            // nothing is minted. Its end may not have run.
            if let (true, Some(access)) = (self.previous_retention.is_zero(), &self.vault) {
                self.finish_replaced(access, owned, deadline).await;
            }
            return Ok(Some(Resolved::Repeat(outcome)));
        }
        let slot = UnwrapSlot {
            owner: &owned.owner,
            key: UnwrapKey::Event(event_id),
            integration: id,
        };
        let sealed = self
            .retrying(deadline, || self.store.get_unwrapped(slot))
            .await
            .map_err(store_down)?;
        Ok(Some(match sealed {
            Some(secret) => {
                tracing::info!(integration = %id, "secret_id unwrapped by an earlier delivery");
                Resolved::Secret(secret)
            }
            None => Resolved::Repeat(outcome),
        }))
    }

    /// The previous secret of an integration, to verify before a rollback;
    /// a 409 when none is kept.
    async fn previous_of(&self, id: Uuid, deadline: Instant) -> Result<SecretId, Failure> {
        let previous = self
            .retrying(deadline, || self.store.reveal_previous(id, now_micros()))
            .await
            .map_err(store_down)?
            .ok_or_else(|| refusal(Outcome::NoPrevious))?;
        SecretId::parse(previous.expose_secret().to_owned())
            .map_err(|_| refusal(Outcome::Unreadable))
    }

    /// The one integration of the owner of `key` that `role` names: 404
    /// for none, 400 for several.
    pub(super) async fn integration_of_role(
        &self,
        key: &ApiKeyHash,
        role: &RoleTarget,
        deadline: Instant,
    ) -> Result<Uuid, Failure> {
        let ids = self
            .retrying(deadline, || self.store.integrations_of_role(key, role))
            .await
            .map_err(store_down)?;
        match ids.as_slice() {
            [id] => Ok(*id),
            [] => Err(Failure {
                status: Status::NotFound,
                message: "no integration has this roleId".into(),
            }),
            _ => Err(Failure::bad_request(
                "roleId matches several integrations: add address",
            )),
        }
    }

    /// The secret_id `token` wraps: the one sealed in the store if an
    /// earlier delivery of this message unwrapped it (Vault is not asked
    /// again), else unwrapped now and sealed before anything else happens
    /// to it.
    async fn unwrapped(
        &self,
        vault: &Vault,
        target: Target<'_>,
        owned: &OwnedIntegration,
        key: UnwrapKey<'_>,
        token: &WrappingToken,
        deadline: Instant,
    ) -> Result<SecretId, Failure> {
        let (owner, id) = (&owned.owner, owned.integration.id);
        let slot = UnwrapSlot {
            owner,
            key,
            integration: id,
        };
        let sealed = self
            .retrying(deadline, || self.store.get_unwrapped(slot))
            .await
            .map_err(store_down)?;
        if let Some(secret) = sealed {
            tracing::info!(integration = %id, "secret_id unwrapped by an earlier delivery");
            return Ok(secret);
        }
        let failed = |e| vault_failure(e, id);
        self.retrying(deadline, || vault.lookup(target, token, deadline))
            .await
            .map_err(failed)?;
        let secret = self
            .retrying(deadline, || vault.unwrap(target, token, deadline))
            .await
            .map_err(failed)?;
        // The token is spent: without this row, a crash from here on would
        // lose the secret. Should the store not take it, the rotation is
        // still tried (its transaction needs the same store).
        if let Err(e) = self
            .retrying(deadline, || self.store.put_unwrapped(slot, &secret))
            .await
        {
            tracing::error!(error = %e, integration = %id, "the unwrapped secret_id could not be sealed into the store");
        }
        crashpoint("after-unwrap");
        Ok(secret)
    }

    /// The integration a job rotates, if the store would let the rotation
    /// through: the key valid, the integration its owner's, the `roleId`
    /// its own, the rotation not stale.
    async fn target_of(
        &self,
        job: &Job<'_>,
        deadline: Instant,
    ) -> Result<OwnedIntegration, Failure> {
        let (
            Some(id),
            State::Rotate {
                key,
                event,
                rotated_at,
                ..
            },
        ) = (job.integration, &job.state)
        else {
            return Err(unavailable("the message has no integration to rotate"));
        };
        let owner = self
            .retrying(deadline, || self.store.authenticate(key))
            .await
            .map_err(store_down)?
            .ok_or_else(|| Failure::from(AuthError::Unknown))?;
        let owned = self
            .retrying(deadline, || self.store.get_integration(id))
            .await
            .map_err(store_down)?
            .filter(|o| o.owner == owner)
            .ok_or_else(|| refusal(Outcome::NotFound))?;
        if matches!(event.secret, Submitted::Previous) {
            // A rollback is never stale and names no role.
            return Ok(owned);
        }
        if event
            .role_id
            .as_ref()
            .is_some_and(|role| *role != owned.integration.role_id)
        {
            return Err(refusal(Outcome::RoleMismatch));
        }
        if owned.last_rotated_at.is_some_and(|last| *rotated_at < last) {
            return Err(refusal(Outcome::Stale));
        }
        Ok(owned)
    }

    /// Runs `op` until it succeeds, fails for good, or the next attempt
    /// would end past `deadline`.
    pub(super) async fn retrying<T, E, F, Fut>(&self, deadline: Instant, mut op: F) -> Result<T, E>
    where
        E: Transient,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut delays = backon::BackoffBuilder::build(self.retry.backoff().with_total_delay(None));
        loop {
            let error = match op().await {
                Ok(value) => return Ok(value),
                Err(e) if e.transient() => e,
                Err(e) => return Err(e),
            };
            let delay = delays.next().unwrap_or(self.retry.max_delay);
            if Instant::now() + delay >= deadline {
                return Err(error);
            }
            Metrics::get().retries.add(1, &[]);
            tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "unavailable; retrying");
            tokio::time::sleep(delay).await;
        }
    }
}

/// An error that says whether retrying may help.
pub(super) trait Transient: std::fmt::Display {
    fn transient(&self) -> bool;
}

impl Transient for VaultError {
    fn transient(&self) -> bool {
        self.retry_now()
    }
}

impl Transient for crate::store::StoreError {
    fn transient(&self) -> bool {
        self.is_transient()
    }
}
