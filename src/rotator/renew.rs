//! Renewal: the worker mints the integration's next secret_id itself, in
//! the steps AWS Secrets Manager takes for its own secrets, each safe to
//! repeat:
//!
//! 1. *login* with the stored role_id and secret (the session's token is
//!    the role's own; its policy decides what the renewal may do);
//! 2. *create* the next secret_id, wrapped, tagged with the integration it
//!    renews, after destroying any secret_id an interrupted renewal of it
//!    minted and never finished;
//! 3. *set*: the wrapping token checked and unwrapped, the new secret
//!    sealed into the store before anything else happens to it (a
//!    redelivery takes it from there);
//! 4. *test*: a login with the new secret (its token revoked);
//! 5. *finish*: the rotation's own transaction makes it current and the
//!    old one previous; then (`retire`) the old one is destroyed in Vault
//!    when no previous secret is kept, and the session ends.

use std::sync::atomic::Ordering;
use std::time::Instant;

use secrecy::ExposeSecret;
use time::OffsetDateTime;
use uuid::Uuid;

use super::resolve::VaultAccess;
use super::{Handled, Job, Rotator, State};
use crate::crashpoint::crashpoint;
use crate::domain::{SecretId, now_micros};
use crate::event::{Failure, Status};
use crate::store::{OwnedIntegration, RenewalRecord, UnwrapKey, UnwrapSlot};
use crate::vault::{SecretIdInfo, Session, Target, Vault, VaultError};

/// What a renewal holds between its test and its end: the session, and
/// the secret_ids to destroy once the store has answered.
#[derive(Debug)]
pub(super) struct Renewal {
    integration: Uuid,
    address: String,
    namespace: Option<String>,
    session: Session,
    /// The accessor of the secret it replaces, if Vault knows it.
    replaced: Option<String>,
    /// The accessor of the secret it minted.
    minted: Option<String>,
    /// When that secret expires, as Vault said (`None`: never, or unknown).
    expires_at: Option<OffsetDateTime>,
}

impl Renewal {
    /// A renewal of `integration` with `session`, nothing minted yet.
    fn new(integration: &crate::domain::Integration, session: Session) -> Self {
        Self {
            integration: integration.id,
            address: integration.address.to_string(),
            namespace: integration.namespace.as_ref().map(ToString::to_string),
            session,
            replaced: None,
            minted: None,
            expires_at: None,
        }
    }

    fn target(&self) -> Target<'_> {
        Target {
            address: &self.address,
            namespace: self.namespace.as_deref(),
        }
    }

    /// Ends the session: its token is revoked.
    async fn end(self, vault: &Vault) {
        let Self {
            address,
            namespace,
            session,
            ..
        } = self;
        let target = Target {
            address: &address,
            namespace: namespace.as_deref(),
        };
        vault.end(target, session).await;
    }
}

fn refused(message: &str) -> Failure {
    Failure {
        status: Status::Unprocessable,
        message: message.to_owned(),
    }
}

/// The failure of a call made with the role's own token: a 403 is the
/// role's policy refusing the renewal.
fn failure(error: VaultError, integration: Uuid) -> Failure {
    match error {
        VaultError::Refused(403) => refused("the role may not renew its own secret_id"),
        e => super::resolve::vault_failure(e, integration),
    }
}

impl Rotator {
    /// Steps 1 to 4 of a renewal of `owned`: the new secret, tested, and
    /// the renewal to finish. Every refusal ends the session.
    pub(super) async fn renewed(
        &self,
        access: &VaultAccess,
        job: &Job<'_>,
        owned: &OwnedIntegration,
        deadline: Instant,
    ) -> Result<(SecretId, Renewal), Failure> {
        let integration = &owned.integration;
        let target = Target {
            address: &integration.address,
            namespace: integration.namespace.as_deref(),
        };
        let vault = &access.vault;
        let failed = |e| super::resolve::vault_failure(e, integration.id);
        self.claim(job, integration.id, vault, deadline).await?;
        let stored = self.current_secret(integration.id, deadline).await?;
        let session = match self
            .retrying(deadline, || {
                vault.open(target, &integration.role_id, &stored, deadline)
            })
            .await
        {
            Ok(session) => session,
            Err(VaultError::Rejected) => {
                return Err(refused("Vault rejected the stored secret_id"));
            }
            Err(e) => return Err(failed(e)),
        };
        let mut renewal = Renewal::new(integration, session);
        match self
            .mint_and_test(access, job, owned, &stored, &mut renewal, deadline)
            .await
        {
            Ok(secret) => Ok((secret, renewal)),
            Err(failure) => {
                renewal.end(vault).await;
                Err(failure)
            }
        }
    }

    /// Takes integration `id`'s renewal claim for `job`, unless the
    /// schedule took it for it: two renewals of one integration at once
    /// (another worker's, the schedule's) would each sweep up what the
    /// other minted. Held, in the name of the job's event id, until the
    /// renewal's outcome is recorded, or, should this worker die, until
    /// the renewal could no longer be running; the same event asked again
    /// takes it back at once.
    async fn claim(
        &self,
        job: &Job<'_>,
        id: Uuid,
        vault: &Vault,
        deadline: Instant,
    ) -> Result<(), Failure> {
        if job.claimed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let now = now_micros();
        let lease = deadline.saturating_duration_since(Instant::now())
            + self.retry.budget
            + vault.timeout() * 2;
        let claimed = self
            .retrying(deadline, || {
                let holder = job.decoded.dedupe_id();
                self.store.claim_renewal(id, holder, now, now + lease)
            })
            .await
            .map_err(super::resolve::store_down)?;
        if !claimed {
            return Err(super::resolve::unavailable(
                "a renewal of this integration is under way",
            ));
        }
        job.claimed.store(true, Ordering::Relaxed);
        Ok(())
    }

    async fn mint_and_test(
        &self,
        access: &VaultAccess,
        job: &Job<'_>,
        owned: &OwnedIntegration,
        stored: &SecretId,
        renewal: &mut Renewal,
        deadline: Instant,
    ) -> Result<SecretId, Failure> {
        let (vault, id) = (&access.vault, owned.integration.id);
        let target = Target {
            address: &owned.integration.address,
            namespace: owned.integration.namespace.as_deref(),
        };
        let session = &renewal.session;
        renewal.replaced = self
            .accessor_of(vault, target, session, stored, id, deadline)
            .await?
            .map(|(accessor, _)| accessor);
        let event = job.decoded.dedupe_id();
        let sealed = match event {
            Some(event) => self
                .retrying(deadline, || {
                    self.store.get_unwrapped(UnwrapSlot {
                        owner: &owned.owner,
                        key: UnwrapKey::Event(event),
                        integration: id,
                    })
                })
                .await
                .map_err(super::resolve::store_down)?,
            None => None,
        };
        let secret = match sealed {
            Some(secret) => {
                tracing::info!(integration = %id, "secret_id minted by an earlier delivery");
                let found = self
                    .accessor_of(vault, target, session, &secret, id, deadline)
                    .await?;
                renewal.expires_at = found.as_ref().and_then(|(_, info)| info.expires_at);
                renewal.minted = found.map(|(accessor, _)| accessor);
                secret
            }
            None => self.mint(vault, owned, renewal, event, deadline).await?,
        };
        self.test_minted(vault, owned, renewal, secret, deadline)
            .await
    }

    /// Steps 2 and 3: what interrupted renewals left destroyed, the next
    /// secret_id minted, checked, unwrapped and sealed (for a retry of the
    /// same request, by its `event` id: a renewal without one is never
    /// retried as itself).
    async fn mint(
        &self,
        vault: &Vault,
        owned: &OwnedIntegration,
        renewal: &mut Renewal,
        event: Option<&str>,
        deadline: Instant,
    ) -> Result<SecretId, Failure> {
        let id = owned.integration.id;
        let failed = |e| failure(e, id);
        let target = Target {
            address: &owned.integration.address,
            namespace: owned.integration.namespace.as_deref(),
        };
        // Marked before the mint: a renewal interrupted from here on leaves
        // the next one a sweep to do.
        let due = self
            .retrying(deadline, || self.store.mark_renewal_sweep_due(id))
            .await
            .map_err(super::resolve::store_down)?;
        if due {
            self.sweep(vault, target, renewal, id, deadline).await?;
        }
        let session = &renewal.session;
        let (ttl, tag) = (self.renewal.wrap_ttl, id.to_string());
        let replaces = renewal.replaced.as_deref();
        let token = self
            .retrying(deadline, || {
                vault.mint(target, session, &tag, replaces, ttl, deadline)
            })
            .await
            .map_err(failed)?;
        crashpoint("after-mint-before-unwrap");
        self.retrying(deadline, || vault.lookup(target, &token, deadline))
            .await
            .map_err(failed)?;
        let minted = self
            .retrying(deadline, || vault.unwrap_minted(target, &token, deadline))
            .await
            .map_err(failed)?;
        let info = self
            .retrying(deadline, || {
                vault.secret_id_info(target, session, &minted.accessor, deadline)
            })
            .await
            .map_err(failed)?;
        renewal.expires_at = info.and_then(|info| info.expires_at);
        renewal.minted = Some(minted.accessor);
        if let Some(event) = event {
            let slot = UnwrapSlot {
                owner: &owned.owner,
                key: UnwrapKey::Event(event),
                integration: id,
            };
            if let Err(e) = self
                .retrying(deadline, || self.store.put_unwrapped(slot, &minted.secret))
                .await
            {
                tracing::error!(error = %e, integration = %id,
                    "the minted secret_id could not be sealed into the store");
            }
        }
        crashpoint("after-mint-sealed");
        Ok(minted.secret)
    }

    /// Step 4: a login with the new secret; a refusal destroys it.
    async fn test_minted(
        &self,
        vault: &Vault,
        owned: &OwnedIntegration,
        renewal: &mut Renewal,
        secret: SecretId,
        deadline: Instant,
    ) -> Result<SecretId, Failure> {
        let target = Target {
            address: &owned.integration.address,
            namespace: owned.integration.namespace.as_deref(),
        };
        let role_id = &owned.integration.role_id;
        match self
            .retrying(deadline, || vault.login(target, role_id, &secret, deadline))
            .await
        {
            Ok(()) => Ok(secret),
            Err(e) => {
                if let Some(minted) = renewal.minted.take() {
                    destroy(vault, renewal, &minted).await;
                }
                Err(match e {
                    VaultError::Rejected => refused("Vault rejected the minted secret_id"),
                    e => failure(e, owned.integration.id),
                })
            }
        }
    }

    /// Counts what each renewal of a batch came to and records it for the
    /// schedule and the status: a refusal (the schedule stops for the
    /// current secret), a transient failure (tried again later); a success
    /// is recorded, with its new secret's expiry, once it is retired.
    pub(super) async fn record_renewals(&self, jobs: &[Job<'_>], handled: Result<&[Handled], ()>) {
        let now = now_micros();
        for (i, job) in jobs.iter().enumerate() {
            let (Some(id), Ok(event)) = (job.integration, &job.decoded.body) else {
                continue;
            };
            let done = handled.ok().and_then(|h| h.get(i));
            let status = done.map_or(Status::Unavailable, Handled::status);
            let changed = done.is_some_and(|h| h.result.as_ref().is_ok_and(|c| c.changed));
            let claimed = job.claimed.load(Ordering::Relaxed);
            if !matches!(event.secret, crate::event::Submitted::Minted) {
                // A secret a verifying login learnt the expiry of.
                if let (
                    true,
                    Some(expires_at),
                    State::Rotate {
                        secret: Some(secret),
                        ..
                    },
                ) = (changed, job.expiry, &job.state)
                    && let Err(e) = self.store.record_expiry(id, secret, expires_at).await
                {
                    tracing::warn!(error = %e, integration = %id, "a secret's expiry could not be recorded");
                }
                continue;
            }
            // A renewal that did not hold the claim records nothing: the
            // claim is another's.
            if !claimed {
                continue;
            }
            let (record, result) = match status {
                // A renewal applied is recorded once it is retired, with
                // its sweep mark, in one statement ([`Rotator::retire`]).
                Status::Ok if changed => (None, Some("renewed")),
                Status::Unprocessable => (Some(RenewalRecord::Refused), Some("refused")),
                Status::Unavailable => (Some(RenewalRecord::Failed(now)), Some("unavailable")),
                // A repeat, or a refusal before Vault: only the claim ends.
                _ => (Some(RenewalRecord::Released), None),
            };
            if let Some(result) = result {
                crate::telemetry::Metrics::get()
                    .renewals
                    .add(1, &[opentelemetry::KeyValue::new("result", result)]);
            }
            if let Some(record) = record {
                self.record(id, record).await;
            }
        }
    }

    async fn record(&self, id: Uuid, record: RenewalRecord) {
        if let Err(e) = self.store.record_renewal(id, record).await {
            tracing::warn!(error = %e, integration = %id, "the renewal's outcome could not be recorded");
        }
    }

    /// Step 5's end, once the store has answered: with no previous secret
    /// kept, the replaced one is destroyed, and the renewal applied is
    /// recorded for the schedule; a renewal refused for good destroys
    /// what it minted (a 503 keeps it sealed for a redelivery); the
    /// session ends. Once every secret_id the renewal minted or replaced
    /// is stored or destroyed, the next renewal need not sweep: an
    /// applied renewal's record says so in the same statement.
    pub(super) async fn retire(&self, renewal: Renewal, status: Status, changed: bool) {
        let Some(access) = &self.vault else {
            return;
        };
        let vault = &access.vault;
        if status == Status::Ok && changed {
            let swept = match &renewal.replaced {
                Some(replaced) if self.previous_retention.is_zero() => {
                    destroy(vault, &renewal, replaced).await
                }
                // Kept as the previous secret, or not Vault's to destroy.
                _ => true,
            };
            let record = RenewalRecord::Renewed {
                expires_at: renewal.expires_at,
                at: now_micros(),
                swept,
            };
            self.record(renewal.integration, record).await;
        } else if !matches!(status, Status::Ok | Status::Unavailable)
            && let Some(minted) = &renewal.minted
            && destroy(vault, &renewal, minted).await
        {
            self.set_sweep_due(renewal.integration, false).await;
        }
        renewal.end(vault).await;
    }

    /// Records whether integration `id`'s next renewal must sweep first; a
    /// failure is logged (a mark left set costs one sweep, never a miss).
    async fn set_sweep_due(&self, id: Uuid, due: bool) {
        if let Err(e) = self.store.set_renewal_sweep_due(id, due).await {
            tracing::warn!(error = %e, integration = %id, "the renewal's sweep mark could not be recorded");
        }
    }

    /// Looks the expiry of integration `id`'s stored secret up (a login
    /// with it, then its lookup) and records it; whether it was recorded.
    /// For the schedule's `renewal.discover_expiry`.
    pub async fn discover_expiry(&self, id: Uuid, deadline: Instant) -> Result<bool, Failure> {
        let Some(access) = &self.vault else {
            return Ok(false);
        };
        let owned = self
            .retrying(deadline, || self.store.get_integration(id))
            .await
            .map_err(super::resolve::store_down)?
            .ok_or_else(|| super::resolve::refusal(crate::store::Outcome::NotFound))?;
        let integration = &owned.integration;
        let target = Target {
            address: &integration.address,
            namespace: integration.namespace.as_deref(),
        };
        let vault = &access.vault;
        let stored = self.current_secret(id, deadline).await?;
        let session = vault
            .open(target, &integration.role_id, &stored, deadline)
            .await
            .map_err(|e| failure(e, id))?;
        let found = vault
            .look_up_secret(target, &session, &stored, deadline)
            .await;
        vault.end(target, session).await;
        let Some((_, info)) = found.map_err(|e| failure(e, id))? else {
            return Ok(false);
        };
        self.store
            .record_expiry(id, &stored, info.expires_at)
            .await
            .map_err(super::resolve::store_down)
    }

    /// The end of the previous secrets' retention, before the store erases
    /// them: a secret a renewal replaced is destroyed in Vault (the
    /// current secret's metadata names it). Best effort: a failure is
    /// logged, and the store erases it anyway.
    pub async fn retire_expired_previous(&self, now: OffsetDateTime) {
        let Some(access) = &self.vault else {
            return;
        };
        let ids = match self.store.expired_previous(now).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "the previous secrets whose retention ended could not be read");
                return;
            }
        };
        for id in ids {
            let deadline = Instant::now() + self.retry.budget;
            if let Ok(Some(owned)) = self.store.get_integration(id).await {
                self.finish_replaced(access, &owned, deadline).await;
            }
        }
    }

    /// A renewal answered as a repeat, with no previous secret kept: the
    /// secret it replaced is destroyed, should a crash between its commit
    /// and its end have left it (the stored secret's metadata names it).
    /// Best effort: a failure is logged.
    pub(super) async fn finish_replaced(
        &self,
        access: &VaultAccess,
        owned: &OwnedIntegration,
        deadline: Instant,
    ) {
        let integration = &owned.integration;
        let target = Target {
            address: &integration.address,
            namespace: integration.namespace.as_deref(),
        };
        let vault = &access.vault;
        let Ok(stored) = self.current_secret(integration.id, deadline).await else {
            return;
        };
        let Ok(session) = vault
            .open(target, &integration.role_id, &stored, deadline)
            .await
        else {
            // What it replaced may be left in Vault: the next renewal
            // looks for it.
            self.set_sweep_due(integration.id, true).await;
            return;
        };
        let replaces = match vault
            .look_up_secret(target, &session, &stored, deadline)
            .await
        {
            Ok(Some((_, info))) => info.replaces,
            _ => None,
        };
        let renewal = Renewal::new(integration, session);
        if let Some(replaced) = replaces {
            if destroy(vault, &renewal, &replaced).await {
                tracing::info!(integration = %integration.id, "destroyed the secret_id a renewal replaced");
            } else {
                self.set_sweep_due(integration.id, true).await;
            }
        }
        renewal.end(vault).await;
    }

    /// The stored current secret of `id`, to log in with.
    async fn current_secret(&self, id: Uuid, deadline: Instant) -> Result<SecretId, Failure> {
        let stored = self
            .retrying(deadline, || self.store.reveal_secret(id))
            .await
            .map_err(super::resolve::store_down)?
            .ok_or_else(|| super::resolve::refusal(crate::store::Outcome::NotFound))?;
        SecretId::parse(stored.expose_secret().to_owned())
            .map_err(|_| super::resolve::refusal(crate::store::Outcome::Unreadable))
    }

    /// The accessor of `secret`, a secret_id of integration `id`'s role,
    /// and what Vault says of it.
    async fn accessor_of(
        &self,
        vault: &Vault,
        target: Target<'_>,
        session: &Session,
        secret: &SecretId,
        id: Uuid,
        deadline: Instant,
    ) -> Result<Option<(String, SecretIdInfo)>, Failure> {
        self.retrying(deadline, || {
            vault.look_up_secret(target, session, secret, deadline)
        })
        .await
        .map_err(|e| failure(e, id))
    }

    /// Destroys the secret_ids of the role tagged as minted for
    /// integration `id` that are neither its current secret nor its kept
    /// previous one: what renewals interrupted before their end left.
    async fn sweep(
        &self,
        vault: &Vault,
        target: Target<'_>,
        renewal: &Renewal,
        id: Uuid,
        deadline: Instant,
    ) -> Result<(), Failure> {
        let session = &renewal.session;
        let failed = |e| failure(e, id);
        let previous = match self
            .retrying(deadline, || self.store.reveal_previous(id, now_micros()))
            .await
            .map_err(super::resolve::store_down)?
            .and_then(|p| SecretId::parse(p.expose_secret().to_owned()).ok())
        {
            Some(previous) => self
                .accessor_of(vault, target, session, &previous, id, deadline)
                .await?
                .map(|(accessor, _)| accessor),
            None => None,
        };
        let accessors = self
            .retrying(deadline, || vault.accessors(target, session, deadline))
            .await
            .map_err(failed)?;
        let tag = id.to_string();
        for accessor in accessors {
            if Some(&accessor) == renewal.replaced.as_ref() || Some(&accessor) == previous.as_ref()
            {
                continue;
            }
            let info = self
                .retrying(deadline, || {
                    vault.secret_id_info(target, session, &accessor, deadline)
                })
                .await
                .map_err(failed)?;
            if info.is_some_and(|i| i.renewal.as_deref() == Some(tag.as_str())) {
                tracing::info!(integration = %id, "destroying a secret_id an interrupted renewal minted");
                self.retrying(deadline, || {
                    vault.destroy(target, session, &accessor, deadline)
                })
                .await
                .map_err(failed)?;
            }
        }
        Ok(())
    }
}

/// Destroys the secret_id behind `accessor` with the renewal's session,
/// in time of its own; whether it is gone. A failure is logged (the next
/// renewal's sweep finds a minted one again).
async fn destroy(vault: &Vault, renewal: &Renewal, accessor: &str) -> bool {
    let by = Instant::now() + vault.timeout();
    match vault
        .destroy(renewal.target(), &renewal.session, accessor, by)
        .await
    {
        Ok(()) => {
            crate::telemetry::Metrics::get()
                .secret_ids_destroyed
                .add(1, &[]);
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "destroying a secret_id failed");
            false
        }
    }
}
