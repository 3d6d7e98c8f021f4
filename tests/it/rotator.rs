//! One step of the worker, driven directly: redeliveries without an id,
//! per-message outcomes inside one batch, a message that fails alone, and
//! a store that breaks its one-result-per-rotation contract.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rotation_worker::auth::ApiKeyHash;
use rotation_worker::domain::{Integration, NewIntegration, Owner, SecretId};
use rotation_worker::event::{Decoded, Envelope, Status};
use rotation_worker::rotator::{RetryPolicy, Rotator};
use rotation_worker::store::{
    ApiKeyInfo, ApiKeySelector, KeyUsage, OwnedIntegration, ReencryptReport, RenewalCandidate,
    RenewalRecord, RenewalState, Rotation, RotationResult, Store, StoreError, UnwrapSlot,
};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Backend, TestEnv, TestStore, create_api_key, create_integration, secret_of};

async fn setup(env: &TestEnv) -> (TestStore, Rotator, String, Uuid) {
    let store = env.store().await;
    let key = create_api_key(&store, "acme").await;
    let it = create_integration(&store, "acme", "prod", "s.initial").await;
    let retry = RetryPolicy {
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        budget: Duration::from_millis(200),
    };
    let rotator = Rotator::new(store.shared(), retry, Duration::from_secs(300));
    (store, rotator, key, it.id)
}

fn decoded(key: &str, fallback: Option<&str>, body: serde_json::Value) -> Decoded {
    Decoded::new(Envelope {
        authorization: Some(format!("Bearer {key}")),
        payload: Bytes::from(serde_json::to_vec(&body).unwrap()),
        fallback_id: fallback.map(str::to_owned),
        ..Envelope::default()
    })
}

async fn a_redelivered_message_without_an_id_is_the_same_event(backend: Backend) {
    let env = TestEnv::on(backend);
    let (store, rotator, key, id) = setup(&env).await;
    let first = decoded(
        &key,
        Some("js:S:1:7"),
        json!({"integrationId": id, "secretId": "s.one"}),
    );
    let handled = rotator
        .handle(std::slice::from_ref(&first))
        .await
        .unwrap()
        .remove(0);
    let done = handled.result.clone().expect("applied");
    assert!(done.changed && !done.duplicate);
    assert_eq!(handled.dedupe_id.as_deref(), Some("js:S:1:7"));
    assert_eq!(handled.event_id, None);

    // Another rotation in between, then the redelivery of the first message.
    let other = decoded(
        &key,
        Some("js:S:1:8"),
        json!({"integrationId": id, "secretId": "s.two"}),
    );
    rotator.handle(&[other]).await.unwrap();
    let again = decoded(
        &key,
        Some("js:S:1:7"),
        json!({"integrationId": id, "secretId": "s.one"}),
    );
    let repeat = rotator.handle(&[again]).await.unwrap().remove(0);
    let repeat = repeat.result.expect("same outcome");
    assert!(repeat.duplicate && !repeat.changed);
    assert_eq!(
        repeat.record, done.record,
        "the first record, same updatedAt"
    );
    assert_eq!(secret_of(&store, id).await, "s.two");
    assert_eq!(
        store
            .get_integration(id)
            .await
            .unwrap()
            .unwrap()
            .rotation_count,
        2
    );
}

async fn outcomes_in_one_batch_are_independent(backend: Backend) {
    let env = TestEnv::on(backend);
    let (store, rotator, key, id) = setup(&env).await;
    let batch = vec![
        decoded(
            &key,
            Some("p:1"),
            json!({"integrationId": Uuid::nil(), "secretId": "s.x"}),
        ),
        decoded(
            &key,
            Some("p:2"),
            json!({"integrationId": id, "secretId": "s.first"}),
        ),
        decoded(
            "rwk_nope",
            Some("p:3"),
            json!({"integrationId": id, "secretId": "s.x"}),
        ),
        decoded(
            &key,
            Some("p:4"),
            json!({"integrationId": id, "secretId": ""}),
        ),
        decoded(
            &key,
            Some("p:5"),
            json!({"integrationId": id, "secretId": "s.second", "roleId": "role-2"}),
        ),
        decoded(
            &key,
            Some("p:6"),
            json!({"integrationId": id, "secretId": "s.second"}),
        ),
    ];
    let handled = rotator.handle(&batch).await.unwrap();
    let statuses: Vec<Status> = handled.iter().map(|h| h.status()).collect();
    assert_eq!(
        statuses,
        [
            Status::NotFound,
            Status::Ok,
            Status::Unauthorized,
            Status::BadRequest,
            Status::BadRequest,
            Status::Ok
        ]
    );
    // Arrival order within the integration: the second secret is the last.
    assert_eq!(secret_of(&store, id).await, "s.second");
    assert_eq!(
        store
            .get_integration(id)
            .await
            .unwrap()
            .unwrap()
            .rotation_count,
        2
    );
}

/// A batch that fails as a whole is tried one message at a time; a
/// message that still fails is a 503 of its own, and the ones committed
/// before it keep their outcome (a 200, not a 503 and a dead letter for a
/// rotation that was applied).
async fn a_message_failing_alone_leaves_the_others_answered(backend: Backend) {
    let env = TestEnv::on(backend);
    let (store, rotator, key, id) = setup(&env).await;
    let damaged = create_integration(&store, "acme", "damaged", "s.damaged").await;
    store
        .insert_unreadable_processed_event("acme", "ev-damaged", damaged.id)
        .await;
    let batch = [
        decoded(
            &key,
            None,
            json!({"integrationId": id, "secretId": "s.fine"}),
        ),
        decoded(
            &key,
            None,
            json!({"integrationId": damaged.id, "secretId": "s.x", "eventId": "ev-damaged"}),
        ),
        decoded(
            &key,
            None,
            json!({"integrationId": id, "secretId": "s.after"}),
        ),
    ];
    let handled = rotator
        .handle(&batch)
        .await
        .expect("one result per message");
    let statuses: Vec<Status> = handled.iter().map(|h| h.status()).collect();
    assert_eq!(statuses, [Status::Ok, Status::Unavailable, Status::Ok]);
    assert_eq!(secret_of(&store, id).await, "s.after");
    assert_eq!(secret_of(&store, damaged.id).await, "s.damaged");
}

/// A store that breaks its contract by returning one result too few.
#[derive(Debug)]
struct ShortStore(Arc<dyn Store>);

#[async_trait::async_trait]
impl Store for ShortStore {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().await
    }
    fn pool_state(&self) -> rotation_worker::store::PoolState {
        self.0.pool_state()
    }
    async fn create_api_key(&self, o: &Owner, h: &ApiKeyHash) -> Result<ApiKeyInfo, StoreError> {
        self.0.create_api_key(o, h).await
    }
    async fn list_api_keys(&self, o: Option<&Owner>) -> Result<Vec<ApiKeyInfo>, StoreError> {
        self.0.list_api_keys(o).await
    }
    async fn revoke_api_key(&self, k: &ApiKeySelector) -> Result<Option<ApiKeyInfo>, StoreError> {
        self.0.revoke_api_key(k).await
    }
    async fn authenticate(&self, h: &ApiKeyHash) -> Result<Option<Owner>, StoreError> {
        self.0.authenticate(h).await
    }
    async fn create_integration(&self, n: &NewIntegration) -> Result<Integration, StoreError> {
        self.0.create_integration(n).await
    }
    async fn create_integrations(&self, n: &[NewIntegration]) -> Result<Vec<Uuid>, StoreError> {
        self.0.create_integrations(n).await
    }
    async fn get_integration(&self, id: Uuid) -> Result<Option<OwnedIntegration>, StoreError> {
        self.0.get_integration(id).await
    }
    async fn list_integrations(&self, o: Option<&Owner>) -> Result<Vec<Integration>, StoreError> {
        self.0.list_integrations(o).await
    }
    async fn delete_integration(&self, id: Uuid) -> Result<bool, StoreError> {
        self.0.delete_integration(id).await
    }
    async fn reveal_secret(&self, id: Uuid) -> Result<Option<secrecy::SecretString>, StoreError> {
        self.0.reveal_secret(id).await
    }
    async fn reencrypt(&self) -> Result<ReencryptReport, StoreError> {
        self.0.reencrypt().await
    }
    async fn integrations_of_role(
        &self,
        key: &ApiKeyHash,
        target: &rotation_worker::domain::RoleTarget,
    ) -> Result<Vec<Uuid>, StoreError> {
        self.0.integrations_of_role(key, target).await
    }
    async fn reveal_previous(
        &self,
        id: Uuid,
        now: time::OffsetDateTime,
    ) -> Result<Option<secrecy::SecretString>, StoreError> {
        self.0.reveal_previous(id, now).await
    }
    async fn erase_expired_previous(&self, now: time::OffsetDateTime) -> Result<u64, StoreError> {
        self.0.erase_expired_previous(now).await
    }
    async fn rotate(&self, batch: &[Rotation]) -> Result<Vec<RotationResult>, StoreError> {
        let mut results = self.0.rotate(batch).await?;
        results.pop();
        Ok(results)
    }
    async fn refresh_statistics(&self) -> Result<bool, StoreError> {
        self.0.refresh_statistics().await
    }
    async fn prune_processed(&self, before: time::OffsetDateTime) -> Result<u64, StoreError> {
        self.0.prune_processed(before).await
    }
    async fn put_unwrapped(
        &self,
        slot: UnwrapSlot<'_>,
        secret: &SecretId,
    ) -> Result<(), StoreError> {
        self.0.put_unwrapped(slot, secret).await
    }
    async fn get_unwrapped(&self, slot: UnwrapSlot<'_>) -> Result<Option<SecretId>, StoreError> {
        self.0.get_unwrapped(slot).await
    }
    async fn forget_unwrapped(&self, slot: UnwrapSlot<'_>) -> Result<(), StoreError> {
        self.0.forget_unwrapped(slot).await
    }
    async fn prior_event(
        &self,
        owner: &Owner,
        event_id: &str,
    ) -> Result<Option<(Uuid, rotation_worker::store::Outcome)>, StoreError> {
        self.0.prior_event(owner, event_id).await
    }
    async fn key_usage(&self) -> Result<KeyUsage, StoreError> {
        self.0.key_usage().await
    }
    async fn record_key_checks(
        &self,
        checks: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.0.record_key_checks(checks).await
    }

    async fn expired_previous(&self, now: time::OffsetDateTime) -> Result<Vec<Uuid>, StoreError> {
        self.0.expired_previous(now).await
    }

    async fn renewal_state(&self, id: Uuid) -> Result<RenewalState, StoreError> {
        self.0.renewal_state(id).await
    }

    async fn renewal_candidates(&self) -> Result<Vec<RenewalCandidate>, StoreError> {
        self.0.renewal_candidates().await
    }

    async fn claim_renewal(
        &self,
        id: Uuid,
        holder: Option<&str>,
        now: time::OffsetDateTime,
        until: time::OffsetDateTime,
    ) -> Result<bool, StoreError> {
        self.0.claim_renewal(id, holder, now, until).await
    }

    async fn record_renewal(&self, id: Uuid, record: RenewalRecord) -> Result<(), StoreError> {
        self.0.record_renewal(id, record).await
    }

    async fn record_expiry(
        &self,
        id: Uuid,
        secret: &SecretId,
        expires_at: Option<time::OffsetDateTime>,
    ) -> Result<bool, StoreError> {
        self.0.record_expiry(id, secret, expires_at).await
    }
    async fn mark_renewal_sweep_due(&self, id: Uuid) -> Result<bool, StoreError> {
        self.0.mark_renewal_sweep_due(id).await
    }
    async fn set_renewal_sweep_due(&self, id: Uuid, due: bool) -> Result<(), StoreError> {
        self.0.set_renewal_sweep_due(id, due).await
    }
}

/// A store that returns fewer results than rotations cannot shift one
/// message's outcome onto another, nor panic: the message without a result
/// is a 503 (retried), the others keep their own.
async fn a_missing_result_is_a_503_and_never_anothers(backend: Backend) {
    let env = TestEnv::on(backend);
    let (store, _, key, id) = setup(&env).await;
    let retry = RetryPolicy {
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        budget: Duration::from_millis(200),
    };
    let short = Rotator::new(
        Arc::new(ShortStore(store.shared())),
        retry,
        Duration::from_secs(300),
    );
    let batch = [
        decoded(
            &key,
            None,
            json!({"integrationId": Uuid::nil(), "secretId": "s.x"}),
        ),
        decoded(
            &key,
            None,
            json!({"integrationId": id, "secretId": "s.last"}),
        ),
    ];
    let handled = short.handle(&batch).await.expect("results");
    let statuses: Vec<Status> = handled.iter().map(|h| h.status()).collect();
    assert_eq!(statuses, [Status::NotFound, Status::Unavailable]);
}

crate::on_both_stores!(
    a_redelivered_message_without_an_id_is_the_same_event,
    outcomes_in_one_batch_are_independent,
    a_message_failing_alone_leaves_the_others_answered,
    a_missing_result_is_a_503_and_never_anothers,
);
