//! One step of the worker, free of any transport: a batch of decoded
//! messages in, one [`Handled`] per message out. Authentication, the
//! contract's checks and the store's transaction all happen here; the
//! transports (JetStream, core NATS, request-reply, DLQ replay) only decide
//! what to do with the result, and the `wire` module puts it on NATS.
//! Before the transaction, [`resolve`] finds the secret each rotation
//! stores (unwrapping a `wrappedSecretId` in the integration's Vault).

mod renew;
mod resolve;
mod status;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use backon::ExponentialBuilder;
use bytes::Bytes;
use uuid::Uuid;

use crate::auth::{ApiKeyHash, AuthError};
use crate::config::Verify;
use crate::domain::{Integration, Owner, SecretId, now_micros};
use crate::event::{Decoded, Failure, FailureBody, Operation, RotationEvent, Status, Submitted};
use crate::store::{Change, Outcome, Rotation, RotationResult, Store, StoreError};

/// Beyond the store's own bound on an attempt, how long the rotator waits
/// for an answer before it stops waiting (see `handle_with_retry`).
const UNANSWERED_SLACK: Duration = Duration::from_secs(1);

/// How long a replaced secret is kept for a rollback unless told
/// otherwise (`worker.previous_secret_retention_hours`).
const PREVIOUS_RETENTION: Duration = Duration::from_secs(24 * 3600);
use crate::vault::Vault;
use resolve::VaultAccess;
pub use status::StatusReport;

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
    /// What the message asked for.
    pub operation: Operation,
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
    /// The record as JSON, if the store has it serialised already.
    pub record_json: Option<Bytes>,
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

    /// A 503 for a stream message delivered more than `worker.max_deliver`
    /// times without an answer: it is set aside unprocessed.
    pub fn overdelivered(decoded: &Decoded) -> Self {
        Self::from_decoded(
            decoded,
            None,
            Err(Failure {
                status: Status::Unavailable,
                message: "delivered more than worker.max_deliver times without an answer; \
                          set aside unprocessed"
                    .into(),
            }),
        )
    }

    fn from_decoded(
        decoded: &Decoded,
        owner: Option<Owner>,
        result: Result<Completed, Failure>,
    ) -> Self {
        Self::for_integration(decoded, decoded.integration_id(), owner, result)
    }

    /// What became of `decoded`, which is for `integration` (named, or
    /// found by its role).
    fn for_integration(
        decoded: &Decoded,
        integration: Option<Uuid>,
        owner: Option<Owner>,
        result: Result<Completed, Failure>,
    ) -> Self {
        let unauthorized = matches!(&result, Err(f) if f.status == Status::Unauthorized);
        Self {
            event_id: decoded.event_id().map(str::to_owned),
            dedupe_id: decoded.dedupe_id().map(str::to_owned),
            // A caller without a valid key cannot put anyone's integration
            // id into the outcome events.
            integration_id: integration.filter(|_| !unauthorized),
            owner,
            result,
            rotated_at: decoded.body.as_ref().ok().and_then(|b| b.rotated_at),
            operation: decoded.envelope.operation,
        }
    }

    /// The body of the outcome event and of the reply: the record, or the
    /// failure JSON.
    pub fn body(&self) -> Bytes {
        let json = match &self.result {
            Ok(Completed {
                record_json: Some(json),
                ..
            }) => return json.clone(),
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

    /// The `Nats-Msg-Id` of the outcome event, if the event has an
    /// identity: `<owner length>:<owner>:<status>:<event id>`. The length
    /// prefix keeps owners apart whatever they hold (`a:b` + `c` and `a` +
    /// `b:c` differ); a refused caller has the empty owner.
    pub fn outcome_msg_id(&self) -> Option<String> {
        let owner = self.owner.as_ref().map_or("", Owner::as_str);
        let status = self.status().code();
        self.dedupe_id
            .as_ref()
            .map(|id| format!("{}:{owner}:{status}:{id}", owner.len()))
    }
}

/// Bounds on retrying transient store failures within one delivery: the
/// settings themselves (`worker.retry_*`), not a copy of them.
pub use crate::config::RetrySettings as RetryPolicy;

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
    /// How far ahead of this worker's clock a `rotatedAt` may lie.
    max_clock_skew: time::Duration,
    /// The integrations' Vaults; `None`: a wrapped secret is a 503.
    vault: Option<VaultAccess>,
    /// How long a replaced secret is kept for a rollback.
    previous_retention: time::Duration,
    /// Renewals: the wrapping TTL of what they mint, the schedule.
    renewal: crate::config::RenewalSettings,
    /// The longest one store attempt runs once under way (the store's own
    /// timeouts): another is started only if it can end by the deadline.
    attempt_bound: Duration,
}

fn outcome_result(
    outcome: Outcome,
    duplicate: bool,
    record_json: Option<Bytes>,
) -> Result<Completed, Failure> {
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
            record_json,
        }),
        Outcome::Unchanged(record) => Ok(Completed {
            record,
            changed: false,
            duplicate,
            record_json,
        }),
        Outcome::RoleMismatch => fail(
            Status::BadRequest,
            "roleId does not match the integration; address, namespace and roleId cannot be changed by a rotation",
        ),
        Outcome::NotFound => fail(Status::NotFound, "integration not found"),
        Outcome::Stale => fail(
            Status::Conflict,
            "the rotation is older than the rotation already applied to this integration",
        ),
        Outcome::Unauthorized => fail(Status::Unauthorized, &AuthError::Unknown.to_string()),
        Outcome::EventReused => fail(
            Status::Unprocessable,
            "event id already used for a different rotation",
        ),
        Outcome::Unreadable => fail(
            Status::Unavailable,
            "the stored secret_id cannot be read with the configured keys; the rotation was not applied",
        ),
        Outcome::NoPrevious => fail(Status::Conflict, "no previous secret"),
        Outcome::PreviousChanged => fail(
            Status::Unavailable,
            "the previous secret_id changed while it was verified; the rollback was not applied",
        ),
    }
}

/// A `rotatedAt` beyond this worker's clock plus the allowed skew: it
/// would move the stale fence into the future and refuse every later
/// rotation.
fn check_clock(
    event: &RotationEvent,
    now: time::OffsetDateTime,
    skew: time::Duration,
) -> Result<(), Failure> {
    match event.rotated_at {
        Some(at) if at > now + skew => Err(Failure::bad_request("rotatedAt is in the future")),
        _ => Ok(()),
    }
}

/// One message of a batch on its way through the rotator: checked once on
/// arrival (the credential's form, the body, the clock bound, its target),
/// then given its secret where Vault is asked; the store's answer turns it
/// into a [`Handled`].
pub(super) struct Job<'a> {
    decoded: &'a Decoded,
    /// The integration it is for, once known (named, or found by its role).
    integration: Option<Uuid>,
    state: State<'a>,
    /// A renewal's session and what it minted, to end once the store has
    /// answered.
    renewal: Option<renew::Renewal>,
    /// The expiry of its secret, when a verifying login learnt it.
    expiry: Option<Option<time::OffsetDateTime>>,
    /// Whether it holds its integration's renewal claim: taken by the
    /// schedule before dispatching it, or by the renewal itself before it
    /// asks Vault anything. Only a holder records an outcome, which ends
    /// the claim.
    claimed: AtomicBool,
}

/// Where a [`Job`] stands.
enum State<'a> {
    /// Refused for its credential's form: no store is asked.
    Refused(AuthError),
    /// Refused for its body, its target or Vault's answer (400, 404, 409,
    /// 422, 503), unless its key is unknown (401).
    Invalid(ApiKeyHash, Failure),
    /// Applied before, answered with its first outcome (unless its key is
    /// unknown now: 401).
    Repeat(ApiKeyHash, Box<Outcome>),
    /// The store's to apply. `secret` is what Vault gave or verified;
    /// `None`: the body's `secretId`, or a rollback not verified (a
    /// `wrappedSecretId` always has one before the store is asked).
    Rotate {
        key: ApiKeyHash,
        event: &'a RotationEvent,
        rotated_at: time::OffsetDateTime,
        secret: Option<SecretId>,
    },
}

impl<'a> Job<'a> {
    fn refused(decoded: &'a Decoded, state: State<'a>) -> Self {
        Self {
            decoded,
            integration: None,
            state,
            renewal: None,
            expiry: None,
            claimed: AtomicBool::new(decoded.claimed),
        }
    }

    /// The change this job asks of the store, if it is the store's to
    /// apply.
    fn change(&self) -> Option<Change> {
        let State::Rotate { event, secret, .. } = &self.state else {
            return None;
        };
        Some(match (secret, &event.secret) {
            (Some(secret), Submitted::Previous) => Change::Rollback {
                verified: Some(secret.clone()),
            },
            (Some(secret), _) => Change::Secret(secret.clone()),
            (None, Submitted::Previous) => Change::Rollback { verified: None },
            (None, Submitted::Plain(secret)) => Change::Secret(secret.clone()),
            (None, Submitted::Wrapped(_) | Submitted::Minted) => return None,
        })
    }

    /// The rotation the store is to apply for this job, if any.
    fn rotation(&self, now: time::OffsetDateTime, retention: time::Duration) -> Option<Rotation> {
        if !self.rotation_pending() {
            return None;
        }
        let (
            State::Rotate {
                key,
                event,
                rotated_at,
                ..
            },
            Some(integration_id),
        ) = (&self.state, self.integration)
        else {
            return None;
        };
        Some(Rotation {
            key: key.clone(),
            integration_id,
            change: self.change()?,
            role_id: event.role_id.clone(),
            rotated_at: *rotated_at,
            event_id: self.decoded.dedupe_id().map(str::to_owned),
            own_event_id: self.decoded.event_id().map(str::to_owned),
            keep_previous_until: now.saturating_add(retention),
        })
    }

    /// What became of this job, given the owners of the keys of refused
    /// jobs and the store's results, one per rotation, in order (a
    /// missing one is answered as a 503, never taken from another).
    fn handled(
        &self,
        owners: &HashMap<[u8; 32], Option<Owner>>,
        results: &mut impl Iterator<Item = RotationResult>,
    ) -> Handled {
        let decoded = self.decoded;
        let owner_of = |key: &ApiKeyHash| owners.get(&key.0).cloned().flatten();
        match &self.state {
            State::Refused(e) => Handled::from_decoded(decoded, None, Err(e.clone().into())),
            State::Invalid(key, failure) => match owner_of(key) {
                Some(owner) => Handled::from_decoded(decoded, Some(owner), Err(failure.clone())),
                None => Handled::from_decoded(decoded, None, Err(AuthError::Unknown.into())),
            },
            State::Repeat(key, outcome) => match owner_of(key) {
                Some(owner) => Handled::for_integration(
                    decoded,
                    self.integration,
                    Some(owner),
                    outcome_result((**outcome).clone(), true, None),
                ),
                None => Handled::from_decoded(decoded, None, Err(AuthError::Unknown.into())),
            },
            State::Rotate { .. } if self.rotation_pending() => match results.next() {
                Some(RotationResult {
                    owner,
                    outcome,
                    duplicate,
                    record_json,
                }) => Handled::for_integration(
                    decoded,
                    self.integration,
                    owner,
                    outcome_result(outcome, duplicate, record_json),
                ),
                None => Handled::unavailable(decoded),
            },
            State::Rotate { .. } => Handled::unavailable(decoded),
        }
    }

    /// Whether [`Job::rotation`] gives a rotation, without building it.
    fn rotation_pending(&self) -> bool {
        match &self.state {
            State::Rotate { event, secret, .. } => {
                self.integration.is_some() && (secret.is_some() || !event.secret.from_vault())
            }
            _ => false,
        }
    }

    /// The key of a job refused after its credential was read.
    fn refused_key(&self) -> Option<&ApiKeyHash> {
        match &self.state {
            State::Invalid(key, _) | State::Repeat(key, _) => Some(key),
            State::Refused(_) | State::Rotate { .. } => None,
        }
    }
}

impl Rotator {
    /// A rotator over a store; a `rotatedAt` later than now plus
    /// `max_clock_skew` is refused.
    pub fn new(store: Arc<dyn Store>, retry: RetryPolicy, max_clock_skew: Duration) -> Self {
        Self {
            store,
            retry,
            max_clock_skew: time::Duration::try_from(max_clock_skew).unwrap_or(time::Duration::MAX),
            vault: None,
            previous_retention: time::Duration::try_from(PREVIOUS_RETENTION)
                .unwrap_or(time::Duration::MAX),
            attempt_bound: Duration::ZERO,
            renewal: crate::config::RenewalSettings::default(),
        }
    }

    /// The same rotator, renewing as `renewal` says.
    pub fn with_renewal(self, renewal: crate::config::RenewalSettings) -> Self {
        Self { renewal, ..self }
    }

    /// The renewal settings.
    pub fn renewal(&self) -> &crate::config::RenewalSettings {
        &self.renewal
    }

    /// The same rotator, for a store whose attempts run at most `bound`
    /// once under way (`database.lock_timeout_ms`).
    pub fn with_attempt_bound(self, bound: Duration) -> Self {
        Self {
            attempt_bound: bound,
            ..self
        }
    }

    /// The same rotator, keeping a replaced secret for a rollback this
    /// long (zero: none is kept).
    pub fn with_previous_retention(self, retention: Duration) -> Self {
        Self {
            previous_retention: time::Duration::try_from(retention).unwrap_or(time::Duration::MAX),
            ..self
        }
    }

    /// The same rotator, unwrapping `wrappedSecretId`s with `vault` and
    /// verifying new secrets as `verify` says.
    pub fn with_vault(self, vault: Vault, verify: Verify) -> Self {
        Self {
            vault: Some(VaultAccess { vault, verify }),
            ..self
        }
    }

    /// Whether handling `decoded` calls the integration's Vault: a
    /// `wrappedSecretId`, or any change with `vault.verify = "login"`. A
    /// message without a well-formed key or body never gets that far.
    pub fn needs_vault(&self, decoded: &Decoded) -> bool {
        let (Some(access), Ok(_), Ok(event)) = (&self.vault, &decoded.key, &decoded.body) else {
            return false;
        };
        event.secret.from_vault() || access.verify == Verify::Login
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
        self.handle_until(batch, Instant::now() + self.retry.budget)
            .await
    }

    /// [`Rotator::handle`], answered by `deadline`: Vault's calls end by
    /// it, and no store attempt starts that could not end by it; an attempt
    /// under way is never abandoned (its statement could still commit), so
    /// the answer can come later by at most the store's own bound on an
    /// attempt (`database.lock_timeout_ms`), and a 503 always means the
    /// rotation was not applied.
    pub async fn handle_until(
        &self,
        batch: &[Decoded],
        deadline: Instant,
    ) -> Result<Vec<Handled>, StoreError> {
        // Each message is checked once; the role of a message naming no
        // integration is looked up; then Vault is asked once per message,
        // before (and outside) the transaction's attempts: an unwrap cannot
        // be repeated (what it gave is sealed into the store at once, for a
        // redelivery).
        let now = now_micros();
        let mut jobs = Vec::with_capacity(batch.len());
        for decoded in batch {
            jobs.push(self.job(decoded, now, deadline).await);
        }
        self.resolve(&mut jobs, deadline).await;
        let handled = self.handle_jobs(&jobs, deadline).await;
        if let Ok(handled) = &handled
            && self.previous_retention.is_zero()
        {
            self.forget_unwrapped(&jobs, handled).await;
        }
        self.record_renewals(&jobs, handled.as_deref().map_err(|_| ()))
            .await;
        for (i, job) in jobs.iter_mut().enumerate() {
            let Some(renewal) = job.renewal.take() else {
                continue;
            };
            let (status, changed) = match handled.as_ref().ok().and_then(|h| h.get(i)) {
                Some(h) => (h.status(), h.result.as_ref().is_ok_and(|c| c.changed)),
                None => (Status::Unavailable, false),
            };
            crate::crashpoint::crashpoint("before-retire");
            self.retire(renewal, status, changed).await;
        }
        handled
    }

    /// A message checked (the credential's form, the body, the clock
    /// bound) and its integration found: the one it names, the one its
    /// `roleId` was resolved to on arrival, or the one the store finds now.
    async fn job<'a>(
        &self,
        decoded: &'a Decoded,
        now: time::OffsetDateTime,
        deadline: Instant,
    ) -> Job<'a> {
        let key = match &decoded.key {
            Ok(key) => key.hash(),
            Err(e) => return Job::refused(decoded, State::Refused(e.clone())),
        };
        let event = match &decoded.body {
            Ok(event) => event,
            Err(failure) => return Job::refused(decoded, State::Invalid(key, failure.clone())),
        };
        let target = match check_clock(event, now, self.max_clock_skew) {
            Err(failure) => Err(failure),
            Ok(()) => match (decoded.integration_id(), decoded.role_target()) {
                (Some(id), _) => Ok(id),
                (None, Some(role)) => self.integration_of_role(&key, role, deadline).await,
                (None, None) => Err(Failure::bad_request(
                    "integrationId (a UUID string) or roleId is required",
                )),
            },
        };
        match target {
            Err(failure) => Job::refused(decoded, State::Invalid(key, failure)),
            // A wrapped secret without Vault to ask is a 503 before the
            // store.
            Ok(_) if self.vault.is_none() && event.secret.from_vault() => {
                let failure = Failure {
                    status: Status::Unavailable,
                    message: "Vault could not be asked for the secret_id; \
                              the rotation was not applied"
                        .into(),
                };
                Job::refused(decoded, State::Invalid(key, failure))
            }
            Ok(id) => Job {
                decoded,
                integration: Some(id),
                state: State::Rotate {
                    key,
                    event,
                    rotated_at: rotation_time(decoded, event, now),
                    secret: None,
                },
                renewal: None,
                expiry: None,
                claimed: AtomicBool::new(decoded.claimed),
            },
        }
    }

    /// With `previous_secret_retention_hours = 0` no secret is kept beyond
    /// its message: the secret_ids unwrapped or minted for messages
    /// answered for good (anything but a 503) are erased. A redelivery of one applied finds
    /// it recorded and is answered with its first outcome.
    async fn forget_unwrapped(&self, jobs: &[Job<'_>], handled: &[Handled]) {
        for (job, handled) in jobs.iter().zip(handled) {
            let (Some(integration), Some(owner), Ok(event)) =
                (job.integration, &handled.owner, &job.decoded.body)
            else {
                continue;
            };
            let key = match (&event.secret, job.decoded.dedupe_id()) {
                (_, Some(id)) if event.secret.from_vault() => crate::store::UnwrapKey::Event(id),
                (Submitted::Wrapped(token), None) => crate::store::UnwrapKey::Token(token),
                _ => continue,
            };
            if handled.status() == Status::Unavailable {
                continue;
            }
            let slot = crate::store::UnwrapSlot {
                owner,
                key,
                integration,
            };
            if let Err(e) = self.store.forget_unwrapped(slot).await {
                tracing::warn!(error = %e, "an unwrapped secret_id could not be erased; \
                    it is pruned with the processed event ids");
            }
        }
    }

    /// The store's part of [`Rotator::handle_until`], the jobs checked and
    /// their secrets resolved. A batch that fails for good is tried again
    /// one job at a time, so that one bad message cannot fail its
    /// neighbours.
    async fn handle_jobs(
        &self,
        jobs: &[Job<'_>],
        deadline: Instant,
    ) -> Result<Vec<Handled>, StoreError> {
        match self.handle_with_retry(jobs, deadline).await {
            Err(e) if !e.is_transient() && jobs.len() > 1 => {
                tracing::warn!(error = %e, size = jobs.len(), "batch failed; retrying its messages one by one");
                let mut handled = Vec::with_capacity(jobs.len());
                for one in jobs.chunks(1) {
                    match self.handle_with_retry(one, deadline).await {
                        Ok(done) => handled.extend(done),
                        // Its neighbours' outcomes stand: they may be
                        // committed already.
                        Err(e) => {
                            tracing::warn!(error = %e, "message failed on its own; 503");
                            handled.extend(one.iter().map(|job| Handled::unavailable(job.decoded)));
                        }
                    }
                }
                Ok(handled)
            }
            other => other,
        }
    }

    async fn handle_with_retry(
        &self,
        jobs: &[Job<'_>],
        deadline: Instant,
    ) -> Result<Vec<Handled>, StoreError> {
        // The deadline bounds the attempts; the builder's own bound, on the
        // pauses alone, is left to the deadline. An attempt under way is
        // not abandoned at the deadline: a statement the server is running
        // may still commit, and a 503 must mean "not applied". The store
        // bounds it (PostgreSQL's statement and lock timeouts, SQLite's wait
        // for the write lock), so another attempt starts only if one taking
        // as long as the last can end before the deadline.
        let mut delays = backon::BackoffBuilder::build(self.retry.backoff().with_total_delay(None));
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Only a store that stopped answering at all (a network that
            // drops everything) outlives this; then the outcome is unknown
            // until a redelivery finds the event id recorded or not.
            let unanswered = left.max(self.attempt_bound) + self.attempt_bound + UNANSWERED_SLACK;
            let started = Instant::now();
            let error = match tokio::time::timeout(unanswered, self.handle_once(jobs)).await {
                Ok(Ok(handled)) => return Ok(handled),
                Ok(Err(e)) if e.is_transient() => e,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    tracing::error!(
                        "the store did not answer an attempt within its own timeouts; \
                         whether it applied is unknown until a redelivery"
                    );
                    return Err(StoreError::TimedOut);
                }
            };
            let delay = delays.next().unwrap_or(self.retry.max_delay);
            if Instant::now() + delay + started.elapsed() >= deadline {
                return Err(error);
            }
            crate::telemetry::Metrics::get().retries.add(1, &[]);
            tracing::warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "store unavailable; retrying");
            tokio::time::sleep(delay).await;
        }
    }

    /// One attempt, in one transaction. The contract's order holds: 401
    /// (the credential, then the key inside the transaction), 400 (the
    /// body, the clock bound), then the store's 404, 409, 422.
    async fn handle_once(&self, jobs: &[Job<'_>]) -> Result<Vec<Handled>, StoreError> {
        let now = now_micros();
        let rotations: Vec<Rotation> = jobs
            .iter()
            .filter_map(|job| job.rotation(now, self.previous_retention))
            .collect();
        let owners = self.owners_of_refused(jobs).await?;
        let mut results = if rotations.is_empty() {
            Vec::new()
        } else {
            self.store.rotate(&rotations).await?
        }
        .into_iter();
        Ok(jobs
            .iter()
            .map(|job| job.handled(&owners, &mut results))
            .collect())
    }

    /// Whose key each refused job carries (a 400 for a valid key, a 401
    /// otherwise): one lookup per distinct key, and none at all on the
    /// happy path.
    async fn owners_of_refused(
        &self,
        jobs: &[Job<'_>],
    ) -> Result<HashMap<[u8; 32], Option<Owner>>, StoreError> {
        let mut owners = HashMap::new();
        for key in jobs.iter().filter_map(Job::refused_key) {
            if let std::collections::hash_map::Entry::Vacant(slot) = owners.entry(key.0) {
                slot.insert(self.store.authenticate(key).await?);
            }
        }
        Ok(owners)
    }
}

/// A valid message's rotation time: `rotatedAt`, else when it reached
/// NATS or the worker (never later than now, whatever the server's clock
/// says).
fn rotation_time(
    decoded: &Decoded,
    event: &RotationEvent,
    now: time::OffsetDateTime,
) -> time::OffsetDateTime {
    let received = decoded.envelope.received_at.map_or(now, |t| {
        let t = t.min(now);
        t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
            .unwrap_or(t)
    });
    event.rotated_at.unwrap_or(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handled(owner: Option<&str>, id: &str, status: Status) -> Handled {
        Handled {
            event_id: Some(id.to_owned()),
            dedupe_id: Some(id.to_owned()),
            integration_id: None,
            owner: owner.map(|o| Owner::parse(o).expect("owner")),
            result: Err(Failure {
                status,
                message: String::new(),
            }),
            rotated_at: None,
            operation: Operation::Rotate,
        }
    }

    #[test]
    fn outcome_ids_cannot_collide_across_owners_or_statuses() {
        let a = handled(Some("a:b"), "c", Status::NotFound);
        let b = handled(Some("a"), "b:c", Status::NotFound);
        assert_eq!(a.outcome_msg_id().as_deref(), Some("3:a:b:404:c"));
        assert_eq!(b.outcome_msg_id().as_deref(), Some("1:a:404:b:c"));
        let refused = handled(None, "c", Status::Unauthorized);
        assert_eq!(refused.outcome_msg_id().as_deref(), Some("0::401:c"));
        // A success after a failure of the same event is another event.
        let failed = handled(Some("acme"), "ev", Status::BadRequest);
        let mut done = failed.clone();
        done.result = Ok(Completed {
            record: crate::domain::Integration {
                id: Uuid::nil(),
                name: "n".into(),
                kind: "hashicorp".into(),
                address: "https://v".into(),
                namespace: None,
                auth_method: "approle".into(),
                role_id: "r".into(),
                created_at: time::OffsetDateTime::UNIX_EPOCH,
                updated_at: time::OffsetDateTime::UNIX_EPOCH,
            },
            changed: true,
            duplicate: false,
            record_json: None,
        });
        assert_ne!(failed.outcome_msg_id(), done.outcome_msg_id());
    }

    #[test]
    fn a_refused_caller_names_no_integration() {
        let decoded = Decoded::new(crate::event::Envelope {
            payload: Bytes::from(format!(
                r#"{{"integrationId":"{}","secretId":"s"}}"#,
                Uuid::from_u128(7)
            )),
            ..Default::default()
        });
        let refused = Handled::from_decoded(&decoded, None, Err(AuthError::Missing.into()));
        assert_eq!(refused.integration_id, None);
        let other = Handled::from_decoded(&decoded, None, Err(Failure::bad_request("x")));
        assert_eq!(other.integration_id, Some(Uuid::from_u128(7)));
    }

    #[test]
    fn the_clock_bound_allows_the_skew_and_no_more() {
        let now = time::macros::datetime!(2026-06-01 12:00 UTC);
        let skew = time::Duration::seconds(300);
        let at = |offset: i64| RotationEvent {
            target: crate::event::Target::Id(Uuid::nil()),
            secret: crate::event::Submitted::Plain(
                crate::domain::SecretId::parse("s".into()).expect("secret"),
            ),
            event_id: None,
            rotated_at: Some(now + time::Duration::seconds(offset)),
            role_id: None,
        };
        assert!(check_clock(&at(300), now, skew).is_ok());
        assert!(check_clock(&at(-86_400), now, skew).is_ok());
        let err = check_clock(&at(301), now, skew).expect_err("beyond the skew");
        assert_eq!(err.message, "rotatedAt is in the future");
    }
}
