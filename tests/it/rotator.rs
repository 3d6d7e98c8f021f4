//! One step of the worker, driven directly: redeliveries without an id,
//! and per-message outcomes inside one batch.

use std::time::Duration;

use bytes::Bytes;
use rotation_worker::event::{Decoded, Envelope, Status};
use rotation_worker::rotator::{RetryPolicy, Rotator};
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

crate::on_both_stores!(
    a_redelivered_message_without_an_id_is_the_same_event,
    outcomes_in_one_batch_are_independent,
);
