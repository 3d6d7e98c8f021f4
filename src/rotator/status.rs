//! The status operation: what the store knows of one integration's
//! rotations, for its owner. A read; nothing changes and nothing is
//! published.

use serde::Serialize;
use time::OffsetDateTime;

use super::Rotator;
use crate::auth::AuthError;
use crate::config::RenewalSettings;
use crate::domain::{Integration, whole_seconds};
use crate::event::{Envelope, Failure, Status, decode_integration_id};
use crate::store::{OwnedIntegration, RenewalState, due_at};

/// The reply of `vault.approle.status` and of `integration status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// The record, as a rotation returns it.
    pub integration: Integration,
    /// Applied rotations and rollbacks.
    pub rotation_count: i64,
    /// The rotation time of the last applied change (its `rotatedAt`, or
    /// when it arrived), whole seconds like the record's times.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_rotated_at: Option<OffsetDateTime>,
    /// The event id of the last applied change, if it had one.
    pub last_event_id: Option<String>,
    /// When the worker applied the last change.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_applied_at: Option<OffsetDateTime>,
    /// Whether a previous secret is kept, so that a rollback can apply.
    pub previous_secret_kept: bool,
    /// When the current secret expires, as Vault said when the worker last
    /// held a token for it; `null` when unknown or never.
    #[serde(with = "time::serde::rfc3339::option")]
    pub secret_expires_at: Option<OffsetDateTime>,
    /// When a renewal last succeeded.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_renewed_at: Option<OffsetDateTime>,
    /// When the schedule renews it next (`renewal.before_expiry_secs`,
    /// `renewal.max_age_secs`); `null` when it does not.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_renewal_at: Option<OffsetDateTime>,
}

impl StatusReport {
    /// The report of an integration as stored, with what is known of its
    /// renewals and the schedule's settings, at `now`.
    pub fn of(
        owned: OwnedIntegration,
        renewal: &RenewalState,
        schedule: &RenewalSettings,
        now: OffsetDateTime,
    ) -> Self {
        let changed_at = owned
            .last_applied_at
            .unwrap_or(owned.integration.created_at);
        let next = due_at(
            renewal,
            changed_at,
            schedule.before_expiry,
            schedule.max_age,
            schedule.check_interval,
        );
        Self {
            previous_secret_kept: owned.previous_kept(now),
            integration: owned.integration,
            rotation_count: owned.rotation_count,
            last_rotated_at: owned.last_rotated_at.map(whole_seconds),
            last_event_id: owned.last_event_id,
            last_applied_at: owned.last_applied_at.map(whole_seconds),
            secret_expires_at: renewal.expires_at.flatten().map(whole_seconds),
            last_renewed_at: renewal.last_renewed_at.map(whole_seconds),
            next_renewal_at: next.map(whole_seconds),
        }
    }
}

fn unavailable() -> Failure {
    Failure {
        status: Status::Unavailable,
        message: "the integration store is unavailable".into(),
    }
}

impl Rotator {
    /// The status of the integration a status request names, in the
    /// contract's order: 401 (the key), 400 (the body), 404 (none of the
    /// caller's). The store is asked once for each; a failure is a 503.
    pub async fn status(&self, envelope: &Envelope) -> Result<StatusReport, Failure> {
        let key = crate::auth::ApiKey::from_authorization(envelope.authorization.as_deref())?;
        let owner = self
            .store
            .authenticate(&key.hash())
            .await
            .map_err(|_| unavailable())?
            .ok_or(AuthError::Unknown)?;
        let id = decode_integration_id(&envelope.payload)?;
        let owned = self
            .store
            .get_integration(id)
            .await
            .map_err(|_| unavailable())?
            .filter(|o| o.owner == owner)
            .ok_or_else(|| Failure {
                status: Status::NotFound,
                message: "integration not found".into(),
            })?;
        let renewal = self
            .store
            .renewal_state(id)
            .await
            .map_err(|_| unavailable())?;
        let now = OffsetDateTime::now_utc();
        Ok(StatusReport::of(owned, &renewal, &self.renewal, now))
    }
}
