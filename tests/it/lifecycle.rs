//! Status, rollback and targeting by role, on both stores: each test runs
//! the worker against its own nats-server and database and checks replies,
//! outcome events and the stored state exactly.

use rotation_worker::domain::{
    Name, Namespace, NewIntegration, Owner, RoleId, SecretId, VaultAddress,
};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::Backend;
use crate::worker::{Fixture, Seen, body, headers};

const STATUS: &str = "vault.approle.status";
const ROLLBACK: &str = "vault.approle.rollback";

/// The status reply for `id`, asked with `key`.
pub(crate) async fn status(f: &mut Fixture, key: Option<&str>, id: Uuid) -> Seen {
    f.request_to(
        STATUS,
        headers(key, None),
        body(json!({"integrationId": id})),
    )
    .await
}

/// A rollback of `id` with `key` and event id `msg_id`.
pub(crate) async fn rollback(
    f: &mut Fixture,
    key: Option<&str>,
    msg_id: Option<&str>,
    id: Uuid,
) -> Seen {
    f.request_to(
        ROLLBACK,
        headers(key, msg_id),
        body(json!({"integrationId": id})),
    )
    .await
}

/// Rotates `id` to `secret` by a request, checking it applied.
pub(crate) async fn rotate(
    f: &mut Fixture,
    msg_id: Option<&str>,
    id: Uuid,
    secret: &str,
    at: Option<&str>,
) {
    f.remember_secret(secret);
    let key = f.key.clone();
    let mut event = json!({"integrationId": id, "secretId": secret});
    if let Some(at) = at {
        event["rotatedAt"] = json!(at);
    }
    let reply = f.request(headers(Some(&key), msg_id), body(event)).await;
    assert_eq!(reply.body["id"], json!(id), "{:?}", reply.body);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
}

/// Asserts a failed reply: its status header and the failure JSON.
pub(crate) fn assert_failure(
    reply: &Seen,
    status: u16,
    error: &str,
    integration: Option<Uuid>,
    event: Option<&str>,
) {
    assert_eq!(
        reply.header("Nats-Service-Error-Code"),
        Some(status.to_string().as_str()),
        "{:?}",
        reply.body
    );
    assert_eq!(
        reply.body,
        json!({"integrationId": integration, "eventId": event, "status": status, "error": error})
    );
}

/// A time of the reply, checked to be whole seconds in UTC and recent.
fn recent(value: &Value) -> time::OffsetDateTime {
    let text = value.as_str().expect("a time");
    assert_eq!(text.len(), 20, "whole seconds with Z: {text}");
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .expect("RFC 3339");
    let age = time::OffsetDateTime::now_utc() - t;
    assert!(
        age >= time::Duration::ZERO - time::Duration::seconds(1)
            && age < time::Duration::minutes(5),
        "{text} is not recent"
    );
    t
}

async fn status_reports_applied_rotations_for_the_owner_only(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.status-initial").await;
    let app = f.worker().await;
    let key = f.key.clone();

    let before = status(&mut f, Some(&key), it.id).await;
    assert_eq!(before.header("Nats-Service-Error-Code"), None);
    assert_eq!(
        before.body,
        json!({"integration": it, "rotationCount": 0, "lastRotatedAt": null,
               "lastEventId": null, "lastAppliedAt": null, "previousSecretKept": false,
               "secretExpiresAt": null, "lastRenewedAt": null, "nextRenewalAt": null})
    );

    rotate(
        &mut f,
        Some("evt-42"),
        it.id,
        "s.status-second",
        Some("2026-02-01T00:00:00.250Z"),
    )
    .await;
    let after = status(&mut f, Some(&key), it.id).await;
    let record = f.record(it.id).await;
    assert_eq!(after.body["integration"], json!(record));
    assert_eq!(after.body["rotationCount"], 1);
    assert_eq!(after.body["lastRotatedAt"], "2026-02-01T00:00:00Z");
    assert_eq!(after.body["lastEventId"], "evt-42");
    recent(&after.body["lastAppliedAt"]);
    assert_eq!(after.body["previousSecretKept"], true);

    // The same secret again, a repeat and a refusal change nothing.
    let same = f
        .request(
            headers(Some(&key), Some("evt-43")),
            body(json!({"integrationId": it.id, "secretId": "s.status-second"})),
        )
        .await;
    assert_eq!(same.body["id"], json!(it.id));
    let stale = f
        .request(
            headers(Some(&key), Some("evt-44")),
            body(json!({"integrationId": it.id, "secretId": "s.status-stale",
                        "rotatedAt": "2026-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(stale.header("Nats-Service-Error-Code"), Some("409"));
    f.remember_secret("s.status-stale");
    let mut seen: Vec<String> = Vec::new();
    for _ in 0..2 {
        seen.push(f.next_outcome().await.subject);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "vault.approle.rotation.completed",
            "vault.approle.rotation.failed"
        ]
    );
    assert_eq!(status(&mut f, Some(&key), it.id).await.body, after.body);

    // A request without an event id: counted, and no event id reported.
    rotate(&mut f, None, it.id, "s.status-third", None).await;
    let third = status(&mut f, Some(&key), it.id).await;
    assert_eq!(third.body["rotationCount"], 2);
    assert_eq!(third.body["lastEventId"], Value::Null);
    recent(&third.body["lastRotatedAt"]);

    // The CLI prints the same report.
    let printed = f
        .env
        .cli(&["integration", "status", "--id", &it.id.to_string()], "")
        .await
        .json();
    assert_eq!(printed, third.body);

    // 401 before 400 before 404; another owner's integration is a 404.
    let other = f.other_key.clone();
    let revoked = f.revoked_key.clone();
    let not_found = "integration not found";
    assert_failure(
        &status(&mut f, Some(&other), it.id).await,
        404,
        not_found,
        Some(it.id),
        None,
    );
    let unknown = Uuid::new_v4();
    assert_failure(
        &status(&mut f, Some(&key), unknown).await,
        404,
        not_found,
        Some(unknown),
        None,
    );
    let unauthorized = status(&mut f, Some(&revoked), it.id).await;
    assert_eq!(unauthorized.header("Nats-Service-Error-Code"), Some("401"));
    assert_eq!(unauthorized.body["integrationId"], Value::Null);
    let missing = status(&mut f, None, it.id).await;
    assert_eq!(missing.header("Nats-Service-Error-Code"), Some("401"));
    let bad = json!({"integrationId": "nope"});
    let invalid = f
        .request_to(STATUS, headers(Some(&key), None), body(bad.clone()))
        .await;
    assert_failure(
        &invalid,
        400,
        "integrationId must be a UUID string",
        None,
        None,
    );
    let both = f
        .request_to(STATUS, headers(Some(&revoked), None), body(bad))
        .await;
    assert_eq!(both.header("Nats-Service-Error-Code"), Some("401"));

    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

async fn a_rollback_restores_the_previous_secret_and_a_second_one_undoes_it(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.rollback-first").await;
    let app = f.worker().await;
    let key = f.key.clone();

    let none = rollback(&mut f, Some(&key), Some("rb-0"), it.id).await;
    assert_failure(&none, 409, "no previous secret", Some(it.id), Some("rb-0"));
    assert_eq!(f.secret(it.id).await, "s.rollback-first");
    let failed = f.next_outcome().await;
    assert_eq!(failed.subject, "vault.approle.rotation.failed");
    assert_eq!(failed.body, none.body);

    rotate(&mut f, Some("rot-1"), it.id, "s.rollback-second", None).await;
    f.store.backdate(it.id, time::Duration::hours(1)).await;
    let backdated = f.record(it.id).await;

    let first = rollback(&mut f, Some(&key), Some("rb-1"), it.id).await;
    assert_eq!(first.header("Nats-Service-Error-Code"), None);
    let record = f.record(it.id).await;
    assert_eq!(first.body, json!(record));
    assert!(record.updated_at > backdated.updated_at, "updatedAt bumped");
    assert_eq!(f.secret(it.id).await, "s.rollback-first");
    assert_eq!(f.rotation_count(it.id).await, 2);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.body, json!(record));
    assert_eq!(done.header("Rotation-Event-Id"), Some("rb-1"));
    assert_eq!(done.header("Rotation-Operation"), Some("rollback"));
    assert_eq!(done.header("Nats-Msg-Id"), Some("4:acme:200:rb-1"));
    assert!(done.header("traceparent").is_some());

    // A repeat yields the first record and changes nothing.
    let again = rollback(&mut f, Some(&key), Some("rb-1"), it.id).await;
    assert_eq!(again.body, first.body);
    assert_eq!(f.secret(it.id).await, "s.rollback-first");
    assert_eq!(f.rotation_count(it.id).await, 2);
    f.next_outcome().await;

    // The second rollback undoes the first.
    let second = rollback(&mut f, Some(&key), Some("rb-2"), it.id).await;
    assert_eq!(second.body["id"], json!(it.id));
    assert_eq!(f.secret(it.id).await, "s.rollback-second");
    assert_eq!(f.rotation_count(it.id).await, 3);
    f.next_outcome().await;
    let report = status(&mut f, Some(&key), it.id).await;
    assert_eq!(report.body["lastEventId"], "rb-2");
    assert_eq!(report.body["rotationCount"], 3);
    assert_eq!(report.body["previousSecretKept"], true);

    // A rollback's event id used for a rotation is a reused id.
    let reused = f
        .request(
            headers(Some(&key), Some("rb-2")),
            body(json!({"integrationId": it.id, "secretId": "s.rollback-reused"})),
        )
        .await;
    f.remember_secret("s.rollback-reused");
    assert_eq!(reused.header("Nats-Service-Error-Code"), Some("422"));

    // Scoping, in the contract's order.
    let other = f.other_key.clone();
    let theirs = rollback(&mut f, Some(&other), Some("rb-x"), it.id).await;
    assert_failure(
        &theirs,
        404,
        "integration not found",
        Some(it.id),
        Some("rb-x"),
    );
    let revoked = f.revoked_key.clone();
    let refused = rollback(&mut f, Some(&revoked), Some("rb-y"), it.id).await;
    assert_eq!(refused.header("Nats-Service-Error-Code"), Some("401"));
    let invalid = f
        .request_to(
            ROLLBACK,
            headers(Some(&key), None),
            body(json!({"integrationId": 7})),
        )
        .await;
    assert_eq!(invalid.header("Nats-Service-Error-Code"), Some("400"));
    assert_eq!(f.secret(it.id).await, "s.rollback-second");
    assert_eq!(f.rotation_count(it.id).await, 3);

    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

async fn an_expired_previous_secret_cannot_be_rolled_back_to_and_is_erased(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.expiry-first").await;
    let app = f.worker().await;
    let key = f.key.clone();
    rotate(&mut f, Some("exp-1"), it.id, "s.expiry-second", None).await;
    assert!(
        f.store.previous_columns(it.id).await.1,
        "a previous secret is kept"
    );

    f.store.expire_previous(it.id).await;
    let report = status(&mut f, Some(&key), it.id).await;
    assert_eq!(report.body["previousSecretKept"], false);
    let refused = rollback(&mut f, Some(&key), Some("exp-rb"), it.id).await;
    assert_failure(
        &refused,
        409,
        "no previous secret",
        Some(it.id),
        Some("exp-rb"),
    );
    assert_eq!(f.secret(it.id).await, "s.expiry-second");

    // Erased by the worker's pruning (which runs at start and may come
    // late) or now; either way the columns are empty.
    let store = f.store.shared();
    let erased = store
        .erase_expired_previous(time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    assert!(erased <= 1);
    assert_eq!(f.store.previous_columns(it.id).await, (None, false, false));
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// An integration of `owner` with the given role, address and namespace.
async fn with_role(
    f: &mut Fixture,
    owner: &str,
    role: &str,
    address: &str,
    namespace: Option<&str>,
) -> Uuid {
    let secret = format!("s.role-{}", Uuid::new_v4());
    f.remember_secret(&secret);
    f.store
        .create_integration(&NewIntegration {
            owner: Owner::parse(owner).unwrap(),
            name: Name::parse("by-role").unwrap(),
            address: VaultAddress::parse(address).unwrap(),
            namespace: namespace.map(|n| Namespace::parse(n).unwrap()),
            role_id: RoleId::parse(role).unwrap(),
            secret_id: SecretId::parse(secret).unwrap(),
        })
        .await
        .unwrap()
        .id
}

async fn a_role_names_the_owners_one_integration(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let app = f.worker().await;
    let key = f.key.clone();
    let alone = with_role(&mut f, "acme", "role-alone", "https://a.example.com", None).await;
    let east = with_role(
        &mut f,
        "acme",
        "role-twice",
        "https://east.example.com",
        None,
    )
    .await;
    let west = with_role(
        &mut f,
        "acme",
        "role-twice",
        "https://west.example.com",
        Some("team"),
    )
    .await;
    let theirs = with_role(
        &mut f,
        "globex",
        "role-globex",
        "https://g.example.com",
        None,
    )
    .await;

    // An event naming the role: applied to its integration, announced as it.
    f.remember_secret("s.by-role-1");
    let event = json!({"roleId": "role-alone", "secretId": "s.by-role-1"});
    f.publish(headers(Some(&key), Some("role-ev-1")), body(event.clone()))
        .await;
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.body, json!(f.record(alone).await));
    assert_eq!(done.header("Nats-Msg-Id"), Some("4:acme:200:role-ev-1"));
    assert_eq!(f.secret(alone).await, "s.by-role-1");
    assert_eq!(f.rotation_count(alone).await, 1);

    // Its repeat, by request: the first record, nothing changed.
    let repeat = f
        .request(headers(Some(&key), Some("role-ev-1")), body(event))
        .await;
    assert_eq!(repeat.body, done.body);
    assert_eq!(f.rotation_count(alone).await, 1);
    f.next_outcome().await;

    // Unknown roles and another owner's role are 404s; a bad key a 401.
    let secret = "s.by-role-refused";
    f.remember_secret(secret);
    for role in ["role-nobody", "role-globex"] {
        let reply = f
            .request(
                headers(Some(&key), None),
                body(json!({"roleId": role, "secretId": secret})),
            )
            .await;
        assert_eq!(
            reply.header("Nats-Service-Error-Code"),
            Some("404"),
            "{role}"
        );
        assert_eq!(reply.body["integrationId"], Value::Null);
        assert_eq!(reply.body["error"], "no integration has this roleId");
        f.next_outcome().await;
    }
    let revoked = f.revoked_key.clone();
    let reply = f
        .request(
            headers(Some(&revoked), None),
            body(json!({"roleId": "role-alone", "secretId": secret})),
        )
        .await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("401"));
    f.next_outcome().await;

    // Two integrations with the role: ambiguous, until the address says.
    let ambiguous = json!({"roleId": "role-twice", "secretId": "s.by-role-2"});
    f.remember_secret("s.by-role-2");
    let reply = f.request(headers(Some(&key), None), body(ambiguous)).await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("400"));
    assert_eq!(
        reply.body["error"],
        "roleId matches several integrations: add address"
    );
    f.next_outcome().await;
    let by_address = json!({"roleId": "role-twice", "address": "https://west.example.com",
                            "secretId": "s.by-role-2"});
    let reply = f.request(headers(Some(&key), None), body(by_address)).await;
    assert_eq!(reply.body["id"], json!(west));
    assert_eq!(f.secret(west).await, "s.by-role-2");
    f.next_outcome().await;
    let by_namespace = json!({"roleId": "role-twice", "namespace": "team",
                              "secretId": "s.by-role-3"});
    f.remember_secret("s.by-role-3");
    let reply = f
        .request(headers(Some(&key), None), body(by_namespace))
        .await;
    assert_eq!(reply.body["id"], json!(west));
    assert_eq!(f.secret(west).await, "s.by-role-3");
    f.next_outcome().await;

    assert_eq!(f.rotation_count(east).await, 0);
    assert_eq!(f.rotation_count(theirs).await, 0);
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// With a retention of zero no previous secret is kept.
#[tokio::test]
async fn a_retention_of_zero_keeps_no_previous_secret() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.zero-first").await;
    let app = f
        .env
        .spawn_worker(
            &f.nats,
            &[(
                "ROTATION_WORKER_WORKER__PREVIOUS_SECRET_RETENTION_HOURS",
                "0",
            )],
        )
        .await;
    let key = f.key.clone();
    rotate(&mut f, Some("zero-1"), it.id, "s.zero-second", None).await;
    assert_eq!(f.store.previous_columns(it.id).await, (None, false, false));
    let refused = rollback(&mut f, Some(&key), Some("zero-rb"), it.id).await;
    assert_failure(
        &refused,
        409,
        "no previous secret",
        Some(it.id),
        Some("zero-rb"),
    );
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

crate::on_both_stores!(
    status_reports_applied_rotations_for_the_owner_only,
    a_rollback_restores_the_previous_secret_and_a_second_one_undoes_it,
    an_expired_previous_secret_cannot_be_rolled_back_to_and_is_erased,
    a_role_names_the_owners_one_integration,
);
