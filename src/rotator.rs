//! One step of the worker, free of any transport: a batch of decoded
//! messages in, one [`Handled`] per message out. Authentication, the
//! contract's checks and the store's transaction all happen here; the
//! transports (JetStream, core NATS, request-reply, DLQ replay) only decide
//! what to do with the result.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use uuid::Uuid;

use crate::auth::AuthError;
use crate::domain::{Integration, Owner};
use crate::event::{
    Decoded, Failure, FailureBody, HEADER_EVENT_ID, HEADER_MSG_ID, SUBJECT_COMPLETED,
    SUBJECT_FAILED, Status,
};
use crate::store::{Outcome, Rotation, Store, StoreError};

/// What became of one message.
#[derive(Debug, Clone)]
pub struct Handled {
    /// The event's own id, if it had one.
    pub event_id: Option<String>,
    /// The identity used for idempotency.
    pub dedupe_id: Option<String>,
    /// The integration the message named, if valid.
    pub integration_id: Option<Uuid>,
    /// The caller's owner, once authenticated.
    pub owner: Option<Owner>,
    /// The record, or why not.
    pub result: Result<Completed, Failure>,
    /// The rotation time the message gave, for the lag metric.
    pub rotated_at: Option<time::OffsetDateTime>,
}

/// A successful rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The record after the rotation.
    pub record: Integration,
    /// Whether this message changed the stored secret.
    pub changed: bool,
    /// Whether the event had been processed before.
    pub duplicate: bool,
}

impl Handled {
    /// The outcome's status.
    pub fn status(&self) -> Status {
        match &self.result {
            Ok(_) => Status::Ok,
            Err(f) => f.status,
        }
    }

    /// A 503 for a message the store could not be reached for in time.
    pub fn unavailable(decoded: &Decoded) -> Self {
        Self::from_decoded(
            decoded,
            None,
            Err(Failure {
                status: Status::Unavailable,
                message: "the integration store is unavailable; the rotation was not applied"
                    .into(),
            }),
        )
    }

    fn from_decoded(
        decoded: &Decoded,
        owner: Option<Owner>,
        result: Result<Completed, Failure>,
    ) -> Self {
        Self {
            event_id: decoded.event_id().map(str::to_owned),
            dedupe_id: decoded.dedupe_id().map(str::to_owned),
            integration_id: decoded.integration_id(),
            owner,
            result,
            rotated_at: decoded.body.as_ref().ok().and_then(|b| b.rotated_at),
        }
    }

    /// The subject of the outcome event.
    pub fn subject(&self) -> &'static str {
        if self.result.is_ok() {
            SUBJECT_COMPLETED
        } else {
            SUBJECT_FAILED
        }
    }

    /// The body of the outcome event and of the reply: the record, or the
    /// failure JSON.
    pub fn body(&self) -> Bytes {
        let json = match &self.result {
            Ok(done) => serde_json::to_vec(&done.record),
            Err(failure) => serde_json::to_vec(&FailureBody {
                integration_id: self.integration_id,
                event_id: self.event_id.clone(),
                status: failure.status.code(),
                error: failure.message.clone(),
            }),
        };
        // Serialising these plain structs cannot fail.
        Bytes::from(json.unwrap_or_default())
    }

    /// Headers of the outcome event: `Rotation-Event-Id` when the event
    /// had an id, and a `Nats-Msg-Id` stable for the event (so the results
    /// stream drops repeats; scoped by owner, as event ids are). The
    /// transport adds the trace context.
    pub fn event_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(id) = &self.event_id {
            headers.insert(HEADER_EVENT_ID, id.as_str());
        }
        if let Some(id) = self.outcome_msg_id() {
            headers.insert(HEADER_MSG_ID, id.as_str());
        }
        headers
    }

    /// The `Nats-Msg-Id` of the outcome event, if the event has an identity.
    pub fn outcome_msg_id(&self) -> Option<String> {
        let owner = self.owner.as_ref().map_or("-", Owner::as_str);
        self.dedupe_id.as_ref().map(|id| format!("{owner}:{id}"))
    }
}

/// Bounds on retrying transient store failures within one delivery.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First delay.
    pub min_delay: Duration,
    /// Largest delay.
    pub max_delay: Duration,
    /// Total time spent waiting between attempts.
    pub budget: Duration,
}

impl RetryPolicy {
    /// The backoff these bounds describe.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_jitter()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_total_delay(Some(self.budget))
            .without_max_times()
    }
}

/// Applies rotations: authenticates, checks, and runs the store's
/// transaction.
#[derive(Debug, Clone)]
pub struct Rotator {
    store: Arc<dyn Store>,
    retry: RetryPolicy,
}

fn outcome_result(outcome: Outcome, duplicate: bool) -> Result<Completed, Failure> {
    let fail = |status, message: &str| {
        Err(Failure {
            status,
            message: message.to_owned(),
        })
    };
    match outcome {
        Outcome::Applied(record) => Ok(Completed {
            record,
            changed: !duplicate,
            duplicate,
        }),
        Outcome::Unchanged(record) => Ok(Completed {
            record,
            changed: false,
            duplicate,
        }),
        Outcome::RoleMismatch => fail(
            Status::BadRequest,
            "roleId does not match the integration; address, namespace and roleId cannot be changed by a rotation",
        ),
        Outcome::NotFound => fail(Status::NotFound, "integration not found"),
        Outcome::Stale => fail(
            Status::Conflict,
            "rotatedAt is older than the rotation already applied to this integration",
        ),
    }
}

impl Rotator {
    /// A rotator over a store.
    pub fn new(store: Arc<dyn Store>, retry: RetryPolicy) -> Self {
        Self { store, retry }
    }

    /// The retry policy.
    pub fn retry(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Handles a batch, retrying transient store failures within the
    /// policy's budget. A non-transient failure of a batch is retried one
    /// message at a time, so that one bad message cannot fail its
    /// neighbours. `Err` means nothing in the batch was applied and the
    /// store is still failing: the caller retries later or gives up (503).
    pub async fn handle(&self, batch: &[Decoded]) -> Result<Vec<Handled>, StoreError> {
        match self.handle_with_retry(batch).await {
            Err(e) if !e.is_transient() && batch.len() > 1 => {
                tracing::warn!(error = %e, size = batch.len(), "batch failed; retrying its messages one by one");
                let mut handled = Vec::with_capacity(batch.len());
                for one in batch.chunks(1) {
                    handled.extend(self.handle_with_retry(one).await?);
                }
                Ok(handled)
            }
            other => other,
        }
    }

    async fn handle_with_retry(&self, batch: &[Decoded]) -> Result<Vec<Handled>, StoreError> {
        (|| self.handle_once(batch))
            .retry(self.retry.backoff())
            .when(StoreError::is_transient)
            .notify(|e, delay| {
                crate::telemetry::Metrics::get().retries.add(1, &[]);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "store unavailable; retrying");
            })
            .await
    }

    /// One attempt, in one transaction.
    pub async fn handle_once(&self, batch: &[Decoded]) -> Result<Vec<Handled>, StoreError> {
        // One lookup per distinct key: a batch usually comes from a few
        // publishers.
        let mut owners: HashMap<[u8; 32], Option<Owner>> = HashMap::new();
        for decoded in batch {
            if let Ok(key) = &decoded.key {
                let hash = key.hash();
                if let std::collections::hash_map::Entry::Vacant(slot) = owners.entry(hash.0) {
                    slot.insert(self.store.authenticate(&hash).await?);
                }
            }
        }

        let mut rotations = Vec::new();
        let mut pending: Vec<Result<(Owner, usize), Handled>> = Vec::with_capacity(batch.len());
        for decoded in batch {
            let owner = match &decoded.key {
                Err(e) => Err(e.clone()),
                Ok(key) => owners
                    .get(&key.hash().0)
                    .cloned()
                    .flatten()
                    .ok_or(AuthError::Unknown),
            };
            let owner = match owner {
                Ok(owner) => owner,
                Err(e) => {
                    pending.push(Err(Handled::from_decoded(decoded, None, Err(e.into()))));
                    continue;
                }
            };
            match &decoded.body {
                Err(failure) => pending.push(Err(Handled::from_decoded(
                    decoded,
                    Some(owner),
                    Err(failure.clone()),
                ))),
                Ok(event) => {
                    rotations.push(Rotation {
                        owner: owner.clone(),
                        integration_id: event.integration_id,
                        secret_id: event.secret_id.clone(),
                        role_id: event.role_id.clone(),
                        rotated_at: event.rotated_at,
                        event_id: decoded.dedupe_id().map(str::to_owned),
                    });
                    pending.push(Ok((owner, rotations.len() - 1)));
                }
            }
        }

        let mut results = if rotations.is_empty() {
            Vec::new()
        } else {
            self.store.rotate(&rotations).await?
        }
        .into_iter()
        .map(Some)
        .collect::<Vec<_>>();

        Ok(pending
            .into_iter()
            .zip(batch)
            .map(|(item, decoded)| match item {
                Err(handled) => handled,
                Ok((owner, index)) => {
                    let result = results[index]
                        .take()
                        .map(|r| outcome_result(r.outcome, r.duplicate))
                        .unwrap_or_else(|| {
                            Err(Failure {
                                status: Status::Unavailable,
                                message: "the rotation produced no result".into(),
                            })
                        });
                    Handled::from_decoded(decoded, Some(owner), result)
                }
            })
            .collect())
    }
}
