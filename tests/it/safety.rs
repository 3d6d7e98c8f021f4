//! Data safety on the message path: the clock bound, reused event ids,
//! suppression through the stream's shared duplicate window, late
//! deliveries, invalid ids, outcomes that cannot be published, bounded
//! streams, and owner-first locking. Each test drives the real worker
//! against the test's own nats-server and database.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use rotation_worker::event::{Decoded, Envelope};
use rotation_worker::rotator::{RetryPolicy, Rotator};
use rotation_worker::worker::ServerFeatures;
use serde_json::{Value, json};
use sha2::Digest;
use uuid::Uuid;

use crate::faults::wait_for_drained;
use crate::helpers::{Backend, NatsServer, TestEnv, read_stream};
use crate::worker::{Fixture, body, headers};

/// An RFC 3339 time `offset` from now.
fn from_now(offset: time::Duration) -> String {
    (time::OffsetDateTime::now_utc() + offset)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// Every message of a stream, with its headers; none may be missing.
async fn stream_messages(
    js: &jetstream::Context,
    name: &str,
) -> Vec<jetstream::message::StreamMessage> {
    let contents = read_stream(js, name).await;
    assert_eq!(contents.absent, [] as [u64; 0], "{name}: deleted sequences");
    contents.messages
}

/// Item 1: a `rotatedAt` beyond the allowed skew is a 400 and moves no
/// fence, on both paths; one within the skew is applied.
async fn a_rotation_from_the_future_is_refused_and_moves_no_fence(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.worker().await;
    let key = f.key.clone();
    f.remember_secret("s.future");
    let before = f.env.dump().await;

    let future =
        |at: &str| body(json!({"integrationId": it.id, "secretId": "s.future", "rotatedAt": at}));
    let reply = f
        .request(headers(Some(&key), None), future("9999-12-31T23:59:59Z"))
        .await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("400"));
    assert_eq!(reply.body["error"], "rotatedAt is in the future");
    assert_eq!(f.next_outcome().await.body["status"], 400);
    f.publish(
        headers(Some(&key), None),
        future(&from_now(time::Duration::seconds(400))),
    )
    .await;
    let refused = f.next_outcome().await;
    assert_eq!(refused.subject, "vault.approle.rotation.failed");
    assert_eq!(refused.body["error"], "rotatedAt is in the future");
    assert_eq!(
        f.env.dump().await,
        before,
        "a refused rotation changed the store"
    );

    // Within the skew (300 s by default): applied, and a later rotation
    // without rotatedAt is then still refused as older, as it should be.
    f.remember_secret("s.soon");
    let soon = from_now(time::Duration::seconds(120));
    let reply = f
        .request(
            headers(Some(&key), None),
            body(json!({"integrationId": it.id, "secretId": "s.soon", "rotatedAt": soon})),
        )
        .await;
    assert_eq!(
        reply.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        reply.body
    );
    assert_eq!(f.secret(it.id).await, "s.soon");
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Item 2: an event id already applied is refused (422) for another
/// integration or another secret; the exact repeat answers the first
/// record. What is kept is a keyed digest, never the secret or its plain
/// hash.
async fn a_reused_event_id_is_refused_and_changes_nothing(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let a = f.integration("acme", "s.initial-a").await;
    let b = f.integration("acme", "s.initial-b").await;
    let worker = f.worker().await;
    let key = f.key.clone();
    f.remember_secret("s.shared");
    let rotate = |id: Uuid, secret: &str| body(json!({"integrationId": id, "secretId": secret}));

    let first = f
        .request(
            headers(Some(&key), Some("ev-shared")),
            rotate(a.id, "s.shared"),
        )
        .await;
    assert_eq!(first.header("Nats-Service-Error-Code"), None);
    f.next_outcome().await;
    let before = f.env.dump().await;

    // The same id, the same secret, another integration: 422.
    let other = f
        .request(
            headers(Some(&key), Some("ev-shared")),
            rotate(b.id, "s.shared"),
        )
        .await;
    assert_eq!(other.header("Nats-Service-Error-Code"), Some("422"));
    assert_eq!(
        other.body,
        json!({"integrationId": b.id, "eventId": "ev-shared", "status": 422,
               "error": "event id already used for a different rotation"})
    );
    assert_eq!(f.next_outcome().await.body["status"], 422);
    assert_eq!(f.env.dump().await, before);
    assert_eq!(f.secret(b.id).await, "s.initial-b");

    // The exact repeat: the first record, nothing changes.
    let repeat = f
        .request(
            headers(Some(&key), Some("ev-shared")),
            rotate(a.id, "s.shared"),
        )
        .await;
    assert_eq!(repeat.body, first.body);
    f.next_outcome().await;
    assert_eq!(f.env.dump().await, before);

    // The digest is keyed: not the secret's plain SHA-256.
    let (key_id, digest) = f.store.processed_digest("ev-shared").await;
    assert_eq!(key_id, "local");
    assert_eq!(digest.len(), 32);
    assert_ne!(digest, sha2::Sha256::digest(b"s.shared").to_vec());
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Publishes until the stream takes the message as new: the duplicate
/// window is the 100 ms nats-server allows at the least, and a publisher
/// that reads a `duplicate` PubAck for its own fresh id publishes again.
async fn publish_until_stored(f: &Fixture, headers: async_nats::HeaderMap, payload: Bytes) {
    let stored = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let ack = f
                .js
                .publish_with_headers("vault.approle.rotated", headers.clone(), payload.clone())
                .await
                .unwrap()
                .await
                .unwrap();
            if !ack.duplicate {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        stored.is_ok(),
        "the stream kept dropping the message as a duplicate"
    );
}

/// Item 3: a message sent first with the real publisher's `Nats-Msg-Id`,
/// without a key or with another owner's key, does not stop the real one.
async fn a_stolen_message_id_does_not_suppress_the_real_rotation(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.worker().await;
    let info =
        f.js.get_stream("VAULT_ROTATIONS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
    assert_eq!(info.config.duplicate_window, Duration::from_millis(100));

    let (key, other_key) = (f.key.clone(), f.other_key.clone());
    f.remember_secret("s.attacker");
    let attack = body(json!({"integrationId": it.id, "secretId": "s.attacker"}));
    f.publish(headers(None, Some("ev-real-1")), attack.clone())
        .await;
    assert_eq!(f.next_outcome().await.body["status"], 401);
    f.publish(headers(Some(&other_key), Some("ev-real-2")), attack)
        .await;
    assert_eq!(f.next_outcome().await.body["status"], 404);

    for (n, id) in ["ev-real-1", "ev-real-2"].into_iter().enumerate() {
        let secret = format!("s.real-{n}");
        f.remember_secret(&secret);
        let payload = body(json!({"integrationId": it.id, "secretId": secret}));
        publish_until_stored(&f, headers(Some(&key), Some(id)), payload).await;
        let done = f.next_outcome().await;
        assert_eq!(done.subject, "vault.approle.rotation.completed", "{id}");
        assert_eq!(done.header("Rotation-Event-Id"), Some(id));
        assert_eq!(done.header("Rotation-Operation"), Some("rotate"));
        assert_eq!(f.secret(it.id).await, secret);
    }
    assert_eq!(f.rotation_count(it.id).await, 2);
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// A request-like message handled by the rotator in-process.
fn request_now(key: &str, payload: Value) -> Decoded {
    Decoded::new(Envelope {
        authorization: Some(format!("Bearer {key}")),
        payload: Bytes::from(serde_json::to_vec(&payload).unwrap()),
        received_at: Some(time::OffsetDateTime::now_utc()),
        ..Envelope::default()
    })
}

/// Item 4: an event without `rotatedAt` dates from when it reached the
/// stream, so one delivered after a newer rotation is stale (409) and
/// does not roll the secret back.
async fn a_late_delivery_does_not_roll_back_a_newer_rotation(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    // The worker makes the streams and the consumer, then goes away.
    f.worker().await.stop().await;
    let key = f.key.clone();
    f.remember_secret("s.older");
    f.publish(
        headers(Some(&key), Some("ev-older")),
        body(json!({"integrationId": it.id, "secretId": "s.older"})),
    )
    .await;

    // A newer rotation lands first (a request, received now).
    f.remember_secret("s.newer");
    let retry = RetryPolicy {
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
        budget: Duration::from_millis(200),
    };
    let rotator = Rotator::new(f.store.shared(), retry, Duration::from_secs(300));
    let handled = rotator
        .handle(&[request_now(
            &key,
            json!({"integrationId": it.id, "secretId": "s.newer"}),
        )])
        .await
        .unwrap();
    assert_eq!(handled[0].status().code(), 200);

    let worker = f.worker().await;
    let late = f.next_outcome().await;
    assert_eq!(late.subject, "vault.approle.rotation.failed");
    assert_eq!(late.body["status"], 409, "{:?}", late.body);
    assert_eq!(late.body["eventId"], "ev-older");
    assert_eq!(f.secret(it.id).await, "s.newer");
    assert_eq!(f.rotation_count(it.id).await, 1);
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Item 4, dead letters: an entry keeps the time its message reached NATS,
/// so a replay after a newer rotation is stale too.
#[test]
fn a_dead_letter_keeps_when_its_message_arrived() {
    use rotation_worker::crypto::{KeyRing, generate_key};
    use rotation_worker::dlq::DeadLetter;
    use rotation_worker::rotator::Handled;
    let key = generate_key();
    let keys = KeyRing::new([("k1", &key)], None).unwrap();
    let at = time::macros::datetime!(2026-03-01 12:00:00.123456 UTC);
    let envelope = Envelope {
        payload: Bytes::from_static(b"{}"),
        received_at: Some(at),
        ..Envelope::default()
    };
    let handled = Handled::unavailable(&Decoded::new(envelope.clone()));
    let entry = DeadLetter::new(&keys, &envelope, &handled, 3);
    let stored: DeadLetter = serde_json::from_slice(&serde_json::to_vec(&entry).unwrap()).unwrap();
    assert_eq!(stored.open(&keys).unwrap().received_at, Some(at));
}

/// Item 5: an invalid `Nats-Msg-Id` is a 400 that echoes nothing: not in
/// the outcome (eventId null, no Rotation-Event-Id, its own Nats-Msg-Id
/// short), not in the logs; the message is acknowledged, not redelivered.
async fn an_invalid_event_id_is_never_echoed(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.worker().await;
    let key = f.key.clone();
    let long_id = "m".repeat(40 * 1024);
    let payload = body(json!({"integrationId": it.id, "secretId": "s.never"}));
    f.remember_secret("s.never");
    let before = f.env.dump().await;

    f.publish(headers(Some(&key), Some(&long_id)), payload.clone())
        .await;
    let refused = f.next_outcome().await;
    let reply = f
        .request(headers(Some(&key), Some(&long_id)), payload)
        .await;
    assert_eq!(f.next_outcome().await.body["status"], 400);
    for seen in [&refused, &reply] {
        assert_eq!(seen.body["status"], 400);
        assert_eq!(seen.body["eventId"], Value::Null);
        assert_eq!(seen.header("Rotation-Event-Id"), None);
        assert!(!seen.body.to_string().contains("mmmmmmmm"));
    }
    let outcome_id = refused.header("Nats-Msg-Id").expect("an outcome id");
    assert!(!outcome_id.contains("mmmmmmmm"), "{outcome_id}");
    wait_for_drained(&f.js, Duration::from_secs(20)).await;
    assert_eq!(f.env.dump().await, before);
    let logs = worker.stop().await;
    assert!(!logs.contains("mmmmmmmmmmmmmmmm"), "the id was logged");
    f.assert_no_secret_leaked(&logs).await;
}

/// Item 6: a rotation whose outcome event the results stream refuses is
/// applied once, set aside at its last delivery (not redelivered forever),
/// and a replay publishes its outcome once the stream takes it.
async fn an_outcome_that_cannot_be_published_ends_in_the_dead_letter_stream(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    f.env.env.insert("NATS_URL".into(), f.nats.url.clone());
    let worker = f.worker().await;
    let js = f.js.clone();
    let results = |max: i32| {
        let js = js.clone();
        async move {
            let mut config = js
                .get_stream("VAULT_ROTATION_RESULTS")
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .clone();
            config.max_message_size = max;
            js.update_stream(config).await.unwrap();
        }
    };
    results(16).await;

    f.remember_secret("s.unannounced");
    f.publish(
        headers(Some(&f.key.clone()), Some("ev-6")),
        body(json!({"integrationId": it.id, "secretId": "s.unannounced"})),
    )
    .await;
    worker
        .wait_for_log("message set aside in the dead-letter stream")
        .await;
    wait_for_drained(&f.js, Duration::from_secs(20)).await;
    assert_eq!(f.secret(it.id).await, "s.unannounced");
    assert_eq!(f.rotation_count(it.id).await, 1);
    let listed = f.env.cli(&["dlq", "list"], "").await.json();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["status"], 503);
    assert_eq!(listed[0]["eventId"], "ev-6");
    assert_eq!(listed[0]["deliveries"], 3);
    assert!(
        listed[0]["error"]
            .as_str()
            .unwrap()
            .contains("outcome event could not be published"),
        "{listed}"
    );

    // The stream takes outcomes again: the replay publishes the first
    // outcome and removes the entry; nothing is applied twice.
    results(64 * 1024).await;
    let replayed = f.env.cli(&["dlq", "replay"], "").await.json();
    assert_eq!(replayed[0]["status"], 200, "{replayed}");
    assert_eq!(replayed[0]["removed"], true);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.header("Rotation-Event-Id"), Some("ev-6"));
    assert_eq!(f.rotation_count(it.id).await, 1);
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Item 6: every stream is bounded, and the limits that keep data are
/// enforced on a stream that existed before the worker.
#[tokio::test]
async fn streams_are_bounded_and_a_full_inbound_stream_refuses_instead_of_dropping() {
    let env = TestEnv::on(Backend::Sqlite);
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    // An inbound stream as an older version (or an operator) made it:
    // unbounded, dropping the oldest message when full, a 2-minute window.
    js.create_stream(stream::Config {
        name: "VAULT_ROTATIONS".into(),
        subjects: vec!["vault.approle.rotated".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await
    .unwrap();
    let small = [("ROTATION_WORKER_WORKER__STREAM_MAX_BYTES", "4096")];
    let logs = env.spawn_worker(&nats, &small).await.stop().await;
    let updated: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("stream limits updated"))
        .collect();
    assert_eq!(updated.len(), 1, "{logs}");
    assert!(updated[0].contains("VAULT_ROTATIONS"), "{logs}");
    // Streams that already fit are left alone.
    let logs = env.spawn_worker(&nats, &small).await.stop().await;
    assert!(!logs.contains("stream limits updated"), "{logs}");
    let config = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(name)
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .config
                .clone()
        }
    };
    // nats-server 2.9 lets a discard-new byte limit drop the oldest
    // message, so a message limit is set beside it there; later servers
    // refuse exactly at the byte limit.
    let exact = ServerFeatures::of_server(&js).exact_byte_limit;
    let inbound = config("VAULT_ROTATIONS").await;
    assert_eq!(
        (
            inbound.max_bytes,
            inbound.max_messages,
            inbound.max_message_size
        ),
        (4096, if exact { -1 } else { 4 }, 256 * 1024)
    );
    assert_eq!(
        (inbound.discard, inbound.duplicate_window),
        (stream::DiscardPolicy::New, Duration::from_millis(100))
    );
    let results = config("VAULT_ROTATION_RESULTS").await;
    assert_eq!(
        (results.max_bytes, results.max_message_size, results.discard),
        (268_435_456, 64 * 1024, stream::DiscardPolicy::Old)
    );
    let dlq = config("VAULT_ROTATION_DLQ").await;
    assert_eq!(
        (
            dlq.max_bytes,
            dlq.max_messages,
            dlq.max_message_size,
            dlq.discard
        ),
        (
            268_435_456,
            if exact { -1 } else { 65_536 },
            1024 * 1024,
            stream::DiscardPolicy::New
        )
    );

    // Full: the publisher is told, and what waits stays.
    let mut accepted = 0u64;
    let refusal = loop {
        let payload = Bytes::from(format!(
            r#"{{"integrationId":"{}","secretId":"s.{accepted}"}}"#,
            Uuid::new_v4()
        ));
        match js
            .publish("vault.approle.rotated", payload)
            .await
            .unwrap()
            .await
        {
            Ok(_) => accepted += 1,
            Err(e) => break e.to_string(),
        }
        assert!(accepted < 1000, "a 4 KiB stream took a thousand messages");
    };
    let state = js
        .get_stream("VAULT_ROTATIONS")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .clone();
    assert_eq!(
        (state.messages, state.first_sequence),
        (accepted, 1),
        "a message was dropped"
    );
    if exact {
        assert!(refusal.contains("maximum bytes exceeded"), "{refusal}");
        assert!(state.bytes <= 4096 && accepted > 4, "{state:?}");
    } else {
        assert!(refusal.contains("maximum messages exceeded"), "{refusal}");
        assert_eq!(accepted, 4);
    }
}

/// Item 7: a 200 after a 400 with the same event id is kept in the results
/// stream (an outcome's id carries its status).
async fn the_results_stream_keeps_a_success_after_a_failure(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.worker().await;
    let key = f.key.clone();
    f.remember_secret("s.second-try");
    let refused = f
        .request(
            headers(Some(&key), Some("ev-7")),
            body(json!({"integrationId": it.id, "secretId": ""})),
        )
        .await;
    assert_eq!(refused.body["status"], 400);
    f.next_outcome().await;
    let applied = f
        .request(
            headers(Some(&key), Some("ev-7")),
            body(json!({"integrationId": it.id, "secretId": "s.second-try"})),
        )
        .await;
    assert_eq!(applied.header("Nats-Service-Error-Code"), None);
    f.next_outcome().await;

    let stored: Vec<(String, Option<String>)> = stream_messages(&f.js, "VAULT_ROTATION_RESULTS")
        .await
        .into_iter()
        .map(|m| {
            let id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned());
            (m.subject.to_string(), id)
        })
        .collect();
    assert_eq!(
        stored,
        [
            (
                "vault.approle.rotation.failed".to_owned(),
                Some("4:acme:400:ev-7".to_owned())
            ),
            (
                "vault.approle.rotation.completed".to_owned(),
                Some("4:acme:200:ev-7".to_owned())
            ),
        ]
    );
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Item 9: a stored secret that does not open is never overwritten; the
/// rotation is a 503 and the row keeps its bytes for an operator.
async fn an_unreadable_stored_secret_is_never_overwritten(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    // Damaged after the worker proved its key at start (a damaged row
    // under a key with no check value yet would stop the start instead).
    let worker = f.worker().await;
    let mut damaged = f.store.ciphertext(it.id).await;
    damaged[20] ^= 0x55;
    f.store.set_ciphertext(it.id, &damaged).await;
    let before = f.env.dump().await;
    f.remember_secret("s.would-replace");
    let reply = f
        .request(
            headers(Some(&f.key.clone()), None),
            body(json!({"integrationId": it.id, "secretId": "s.would-replace"})),
        )
        .await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("503"));
    assert_eq!(f.env.dump().await, before);
    assert_eq!(f.store.ciphertext(it.id).await, damaged);
    let logs = worker.stop().await;
    assert!(
        logs.contains("stored secret does not decrypt; the row is left unchanged"),
        "{logs}"
    );
    f.assert_no_secret_leaked(&logs).await;
}

/// The number of backends of the test's database waiting on a lock.
async fn waiting_on_a_lock(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND wait_event_type = 'Lock'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Item 12 (PostgreSQL): another owner's rotation does not wait for a lock
/// on a row it may not see; and a revocation that commits while a rotation
/// waits for the key is seen by it.
#[tokio::test]
async fn rows_are_locked_owner_first_and_keys_checked_inside_the_transaction() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.worker().await;
    let pool = f.store.pg_pool().unwrap().clone();

    // acme's row is held by someone else; globex's rotation of it is a 404
    // at once, not after the lock goes.
    let holder = crate::helpers::hold_row(&pool, it.id).await;
    f.remember_secret("s.globex");
    let other = f
        .request(
            headers(Some(&f.other_key.clone()), None),
            body(json!({"integrationId": it.id, "secretId": "s.globex"})),
        )
        .await;
    assert_eq!(other.header("Nats-Service-Error-Code"), Some("404"));
    holder.rollback().await.unwrap();
    f.next_outcome().await;

    // A revocation in progress: the rotation waits for it, then sees it.
    let hash = rotation_worker::auth::ApiKey::parse(&f.key).unwrap().hash();
    let mut revoking = pool.begin().await.unwrap();
    sqlx::query("UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1")
        .bind(&hash.0[..])
        .execute(&mut *revoking)
        .await
        .unwrap();
    f.remember_secret("s.after-revocation");
    let client = f.client.clone();
    let (auth, payload) = (
        headers(Some(&f.key.clone()), None),
        body(json!({"integrationId": it.id, "secretId": "s.after-revocation"})),
    );
    let request = tokio::spawn(async move {
        client
            .request_with_headers("vault.approle.rotate", auth, payload)
            .await
    });
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while waiting_on_a_lock(&pool).await == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the rotation never waited for the key row");
    revoking.commit().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(20), request)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"));
    assert_eq!(code.map(|v| v.as_str()), Some("401"));
    assert_eq!(f.secret(it.id).await, "s.initial");
    assert_eq!(
        f.outcomes
            .next()
            .await
            .map(|m| m.subject.to_string())
            .as_deref(),
        Some("vault.approle.rotation.failed")
    );
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

crate::on_both_stores!(
    a_rotation_from_the_future_is_refused_and_moves_no_fence,
    a_reused_event_id_is_refused_and_changes_nothing,
    a_stolen_message_id_does_not_suppress_the_real_rotation,
    a_late_delivery_does_not_roll_back_a_newer_rotation,
    an_invalid_event_id_is_never_echoed,
    an_outcome_that_cannot_be_published_ends_in_the_dead_letter_stream,
    the_results_stream_keeps_a_success_after_a_failure,
    an_unreadable_stored_secret_is_never_overwritten,
);
