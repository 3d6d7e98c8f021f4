//! The worker end to end: the real worker (in the test's process, or the
//! real binary where signals and exit codes matter), a nats-server of the
//! test's own, and the test's own database. Every row of the contract's
//! table on the event path and on request-reply, idempotency, order,
//! backlog, discovery, dead letters, shutdown, and a search for secrets in
//! everything captured.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, Message, Subscriber};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use rotation_worker::auth::ApiKey;
use rotation_worker::domain::{
    Integration, Name, NewIntegration, Owner, RoleId, SecretId, VaultAddress,
};
use rotation_worker::worker::ServerFeatures;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    Backend, NatsServer, TestApp, TestEnv, TestStore, Worker, create_api_key, leaked_secret,
    read_stream, secret_of,
};

const ROLE: &str = "8f2e1c0c-0e4a-4b58-8b2e-4a9e1c8a4a11";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The world of one worker test.
pub struct Fixture {
    pub env: TestEnv,
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub store: TestStore,
    /// API key of owner `acme`.
    pub key: String,
    /// API key of owner `globex`.
    pub other_key: String,
    /// Revoked key of `acme`.
    pub revoked_key: String,
    pub outcomes: Subscriber,
    /// Every secret the test used, to search for at the end.
    pub secrets: Vec<String>,
    /// Everything the worker sent (events and replies), to search for secrets.
    pub outbound: Vec<u8>,
}

/// An outcome event or a reply, decoded.
#[derive(Debug)]
pub struct Seen {
    pub subject: String,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
}

impl Fixture {
    /// A world on PostgreSQL.
    pub async fn new() -> Self {
        Self::on(Backend::Postgres).await
    }

    /// A world on `backend`.
    pub async fn on(backend: Backend) -> Self {
        let env = TestEnv::on(backend);
        let nats = NatsServer::start().await;
        let client = nats.client().await;
        let js = jetstream::new(client.clone());
        let store = env.store().await;
        let key = create_api_key(&store, "acme").await;
        let other_key = create_api_key(&store, "globex").await;
        let revoked_key = create_api_key(&store, "acme").await;
        store
            .revoke_api_key(&rotation_worker::store::ApiKeySelector::Hash(
                ApiKey::parse(&revoked_key).unwrap().hash(),
            ))
            .await
            .unwrap();
        let outcomes = client.subscribe("vault.approle.rotation.>").await.unwrap();
        client.flush().await.unwrap();
        let secrets = vec![key.clone(), other_key.clone(), revoked_key.clone()];
        Self {
            env,
            nats,
            client,
            js,
            store,
            key,
            other_key,
            revoked_key,
            outcomes,
            secrets,
            outbound: Vec::new(),
        }
    }

    /// The worker, run in the test's own process.
    pub async fn worker(&self) -> TestApp {
        self.env.spawn_worker(&self.nats, &[]).await
    }

    /// The real binary, for what only a process shows: signals and exit
    /// codes.
    pub async fn binary(&self) -> Worker {
        self.env.worker(&self.nats, &[]).await
    }

    /// Creates an integration of `owner` whose timestamps lie an hour back,
    /// so that a bumped `updatedAt` shows even at second precision.
    pub async fn integration(&mut self, owner: &str, secret: &str) -> Integration {
        self.secrets.push(secret.to_owned());
        let created = self
            .store
            .create_integration(&NewIntegration {
                owner: Owner::parse(owner).unwrap(),
                name: Name::parse("prod-vault").unwrap(),
                address: VaultAddress::parse("https://vault.prod.example.com:8200").unwrap(),
                namespace: None,
                role_id: RoleId::parse(ROLE).unwrap(),
                secret_id: SecretId::parse(secret.to_owned()).unwrap(),
            })
            .await
            .unwrap();
        self.store
            .backdate(created.id, time::Duration::hours(1))
            .await;
        self.record(created.id).await
    }

    pub async fn record(&self, id: Uuid) -> Integration {
        self.store
            .get_integration(id)
            .await
            .unwrap()
            .unwrap()
            .integration
    }

    pub async fn secret(&self, id: Uuid) -> String {
        secret_of(&self.store, id).await
    }

    pub async fn rotation_count(&self, id: Uuid) -> i64 {
        self.store
            .get_integration(id)
            .await
            .unwrap()
            .unwrap()
            .rotation_count
    }

    pub fn remember_secret(&mut self, secret: &str) {
        self.secrets.push(secret.to_owned());
    }

    /// Publishes an event to the stream and waits for its PubAck.
    pub async fn publish(&mut self, headers: HeaderMap, body: impl Into<Bytes>) {
        self.js
            .publish_with_headers("vault.approle.rotated", headers, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// Sends a request to the endpoint and returns the reply.
    pub async fn request(&mut self, headers: HeaderMap, body: impl Into<Bytes>) -> Seen {
        self.request_to("vault.approle.rotate", headers, body).await
    }

    /// Sends a request to one of the service's subjects and returns the
    /// reply.
    pub async fn request_to(
        &mut self,
        subject: &'static str,
        headers: HeaderMap,
        body: impl Into<Bytes>,
    ) -> Seen {
        let reply = tokio::time::timeout(
            Duration::from_secs(20),
            self.client
                .request_with_headers(subject, headers, body.into()),
        )
        .await
        .expect("reply in time")
        .expect("reply");
        self.seen(reply)
    }

    fn seen(&mut self, message: Message) -> Seen {
        self.outbound.extend_from_slice(&message.payload);
        if let Some(headers) = &message.headers {
            for (name, values) in headers.iter() {
                for v in values {
                    self.outbound
                        .extend_from_slice(format!("{name}: {}\n", v.as_str()).as_bytes());
                }
            }
        }
        Seen {
            subject: message.subject.to_string(),
            headers: message.headers.clone().unwrap_or_default(),
            body: serde_json::from_slice(&message.payload).expect("JSON body"),
        }
    }

    /// The next completion or failure event.
    pub async fn next_outcome(&mut self) -> Seen {
        let message = tokio::time::timeout(Duration::from_secs(20), self.outcomes.next())
            .await
            .expect("an outcome event in time")
            .expect("subscription open");
        self.seen(message)
    }

    /// Asserts that the next `n` outcome events are completions.
    pub async fn completions(&mut self, n: usize) {
        for _ in 0..n {
            let seen = self.next_outcome().await;
            assert_eq!(
                seen.subject, "vault.approle.rotation.completed",
                "{:?}",
                seen.body
            );
        }
    }

    /// Asserts that nothing the test captured holds a secret it used.
    pub async fn assert_no_secret_leaked(&self, logs: &str) {
        let dump = self.env.at_rest().await;
        let dlq = self.dlq_entries().await;
        let secrets = || self.secrets.iter().map(String::as_str);
        for (place, haystack) in [
            ("the worker's logs", logs.as_bytes()),
            ("the store at rest", &dump),
            ("a dead-letter entry", &dlq),
            ("an event or reply", &self.outbound),
        ] {
            assert_eq!(
                leaked_secret(haystack, secrets()),
                None,
                "secret in {place}"
            );
        }
    }

    /// Every payload in the dead-letter stream, concatenated.
    pub async fn dlq_entries(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.js.get_stream("VAULT_ROTATION_DLQ").await.is_err() {
            return out;
        }
        for m in read_stream(&self.js, "VAULT_ROTATION_DLQ").await.messages {
            out.extend_from_slice(&m.payload);
            out.push(b'\n');
        }
        out
    }
}

pub fn headers(key: Option<&str>, msg_id: Option<&str>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(key) = key {
        h.insert("Authorization", format!("Bearer {key}").as_str());
    }
    if let Some(id) = msg_id {
        h.insert("Nats-Msg-Id", id);
    }
    h.insert("traceparent", TRACEPARENT);
    h
}

pub fn body(v: Value) -> Bytes {
    Bytes::from(serde_json::to_vec(&v).unwrap())
}

/// What a case expects: status, the failure body's integrationId and
/// eventId, and a fragment of its error.
struct Case {
    name: &'static str,
    key: Option<String>,
    msg_id: Option<&'static str>,
    body: Bytes,
    status: u16,
    integration_id: Option<Uuid>,
    event_id: Option<&'static str>,
    error: &'static str,
}

fn refusals(f: &Fixture, mine: Uuid, theirs: Uuid) -> Vec<Case> {
    let ok_body = |extra: Value| {
        let mut b = json!({"integrationId": mine, "secretId": "s.refused-secret"});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body(b)
    };
    let key = Some(f.key.clone());
    vec![
        Case {
            name: "no Authorization",
            key: None,
            msg_id: None,
            body: ok_body(json!({})),
            status: 401,
            // A caller without a valid key cannot name anyone's integration.
            integration_id: None,
            event_id: None,
            error: "missing Authorization header",
        },
        Case {
            name: "unknown key",
            key: Some("rwk_unknown".into()),
            msg_id: None,
            body: ok_body(json!({})),
            status: 401,
            // A caller without a valid key cannot name anyone's integration.
            integration_id: None,
            event_id: None,
            error: "unknown or revoked API key",
        },
        Case {
            name: "revoked key",
            key: Some(f.revoked_key.clone()),
            msg_id: Some("ev-revoked"),
            body: ok_body(json!({})),
            status: 401,
            // A caller without a valid key cannot name anyone's integration.
            integration_id: None,
            event_id: Some("ev-revoked"),
            error: "unknown or revoked API key",
        },
        Case {
            name: "not an object",
            key: key.clone(),
            msg_id: None,
            body: Bytes::from_static(b"[1,2]"),
            status: 400,
            integration_id: None,
            event_id: None,
            error: "body must be a JSON object",
        },
        Case {
            name: "not JSON",
            key: key.clone(),
            msg_id: None,
            body: Bytes::from_static(b"{\"integrationId\":"),
            status: 400,
            integration_id: None,
            event_id: None,
            error: "not a valid JSON object",
        },
        Case {
            name: "over 64 KiB",
            key: key.clone(),
            msg_id: None,
            body: ok_body(json!({"pad": "x".repeat(70_000)})),
            status: 400,
            integration_id: None,
            event_id: None,
            error: "larger than 64 KiB",
        },
        Case {
            name: "integrationId not a UUID",
            key: key.clone(),
            msg_id: None,
            body: body(json!({"integrationId": "1; DROP TABLE integrations", "secretId": "s.x"})),
            status: 400,
            integration_id: None,
            event_id: None,
            error: "integrationId must be a UUID",
        },
        Case {
            name: "secretId missing",
            key: key.clone(),
            msg_id: None,
            body: body(json!({"integrationId": mine})),
            status: 400,
            integration_id: Some(mine),
            event_id: None,
            error: "exactly one of secretId (a non-empty string) and wrappedSecretId is required",
        },
        Case {
            name: "secretId null",
            key: key.clone(),
            msg_id: None,
            body: body(json!({"integrationId": mine, "secretId": null})),
            status: 400,
            integration_id: Some(mine),
            event_id: None,
            error: "exactly one of secretId (a non-empty string) and wrappedSecretId is required",
        },
        Case {
            name: "secretId number",
            key: key.clone(),
            msg_id: None,
            body: body(json!({"integrationId": mine, "secretId": 5})),
            status: 400,
            integration_id: Some(mine),
            event_id: None,
            error: "secretId must be a non-empty string",
        },
        Case {
            name: "secretId empty",
            key: key.clone(),
            msg_id: None,
            body: body(json!({"integrationId": mine, "secretId": ""})),
            status: 400,
            integration_id: Some(mine),
            event_id: None,
            error: "secretId must be a non-empty string",
        },
        Case {
            name: "secretId blank",
            key: key.clone(),
            msg_id: None,
            body: body(json!({"integrationId": mine, "secretId": " \t"})),
            status: 400,
            integration_id: Some(mine),
            event_id: None,
            error: "secretId must be a non-empty string",
        },
        Case {
            name: "secretId too long",
            key: key.clone(),
            msg_id: None,
            body: body(json!({"integrationId": mine, "secretId": "y".repeat(4097)})),
            status: 400,
            integration_id: Some(mine),
            event_id: None,
            error: "at most 4096 bytes",
        },
        Case {
            name: "rotatedAt not RFC 3339",
            key: key.clone(),
            msg_id: Some("ev-bad-time"),
            body: ok_body(json!({"rotatedAt": "24/04/2026"})),
            status: 400,
            integration_id: Some(mine),
            event_id: Some("ev-bad-time"),
            error: "rotatedAt must be an RFC 3339 time",
        },
        Case {
            name: "another roleId",
            key: key.clone(),
            msg_id: None,
            body: ok_body(json!({"roleId": "other-role"})),
            status: 400,
            integration_id: Some(mine),
            event_id: None,
            error: "roleId does not match",
        },
        Case {
            name: "no such integration",
            key: key.clone(),
            msg_id: None,
            body: body(json!({"integrationId": Uuid::nil(), "secretId": "s.x"})),
            status: 404,
            integration_id: Some(Uuid::nil()),
            event_id: None,
            error: "integration not found",
        },
        Case {
            name: "another owner's integration",
            key: Some(f.other_key.clone()),
            msg_id: None,
            body: body(json!({"integrationId": mine, "secretId": "s.x"})),
            status: 404,
            integration_id: Some(mine),
            event_id: None,
            error: "integration not found",
        },
        Case {
            name: "another owner's, even with its roleId",
            key: key.clone(),
            msg_id: Some("ev-theirs"),
            body: body(json!({"integrationId": theirs, "secretId": "s.x", "roleId": "nope"})),
            status: 404,
            integration_id: Some(theirs),
            event_id: Some("ev-theirs"),
            error: "integration not found",
        },
        Case {
            name: "stale",
            key: key.clone(),
            msg_id: None,
            body: ok_body(json!({"rotatedAt": "2020-01-01T00:00:00Z", "eventId": "ev-stale"})),
            status: 409,
            integration_id: Some(mine),
            event_id: Some("ev-stale"),
            error: "older than the rotation already applied",
        },
    ]
}

fn assert_failure(seen: &Seen, case: &Case) {
    assert_eq!(
        seen.body["status"], case.status,
        "{}: {:?}",
        case.name, seen.body
    );
    assert_eq!(
        seen.body["integrationId"],
        case.integration_id.map_or(Value::Null, |id| json!(id)),
        "{}",
        case.name
    );
    assert_eq!(
        seen.body["eventId"],
        case.event_id.map_or(Value::Null, |id| json!(id)),
        "{}",
        case.name
    );
    let error = seen.body["error"].as_str().unwrap_or_default();
    assert!(error.contains(case.error), "{}: error {error:?}", case.name);
    assert_eq!(
        seen.body.as_object().unwrap().len(),
        4,
        "{}: {:?}",
        case.name,
        seen.body
    );
    let traceparent = seen.header("traceparent").expect("traceparent");
    assert_eq!(
        &traceparent[3..35],
        &TRACEPARENT[3..35],
        "{}: same trace",
        case.name
    );
}

/// Sets a stale-proof rotation time, so that the stale case has something
/// to be older than.
pub async fn seed_last_rotation(f: &Fixture, id: Uuid) {
    f.store
        .set_last_rotated_at(id, time::macros::datetime!(2026-01-01 0:00 UTC))
        .await;
}

async fn event_path_follows_the_contract_table(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let mine = f.integration("acme", "s.initial-mine").await;
    let theirs = f.integration("globex", "s.initial-theirs").await;
    seed_last_rotation(&f, mine.id).await;
    let worker = f.binary().await;

    let before = f.env.dump().await;
    for case in refusals(&f, mine.id, theirs.id) {
        f.publish(headers(case.key.as_deref(), case.msg_id), case.body.clone())
            .await;
        let seen = f.next_outcome().await;
        assert_eq!(
            seen.subject, "vault.approle.rotation.failed",
            "{}",
            case.name
        );
        assert_failure(&seen, &case);
        assert_eq!(
            seen.header("Rotation-Event-Id"),
            case.event_id,
            "{}",
            case.name
        );
        assert!(
            seen.header("Nats-Msg-Id").is_some(),
            "{}: a stable Nats-Msg-Id",
            case.name
        );
    }
    f.remember_secret("s.refused-secret");
    assert_eq!(
        f.env.dump().await,
        before,
        "a refused event changed the store"
    );

    // 200: applied, updatedAt bumped, rotation time recorded.
    f.remember_secret("s.rotated-1");
    f.publish(
        headers(Some(&f.key.clone()), Some("ev-1")),
        body(json!({"integrationId": mine.id, "secretId": "s.rotated-1", "rotatedAt": "2026-04-24T09:18:11Z", "roleId": ROLE})),
    )
    .await;
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    let after = f.record(mine.id).await;
    assert!(after.updated_at > mine.updated_at, "updatedAt bumped");
    assert_eq!(
        done.body,
        serde_json::to_value(&after).unwrap(),
        "the body is exactly the record"
    );
    assert_eq!(done.header("Rotation-Event-Id"), Some("ev-1"));
    assert_eq!(done.header("Nats-Msg-Id"), Some("4:acme:200:ev-1"));
    assert_eq!(
        &done.header("traceparent").unwrap()[3..35],
        &TRACEPARENT[3..35]
    );
    assert_eq!(f.secret(mine.id).await, "s.rotated-1");
    assert_eq!(f.rotation_count(mine.id).await, 1);
    let owned = f.store.get_integration(mine.id).await.unwrap().unwrap();
    assert_eq!(
        owned.last_rotated_at,
        Some(time::macros::datetime!(2026-04-24 09:18:11 UTC))
    );
    let untouched = f.record(theirs.id).await;
    assert_eq!(untouched, theirs);

    // 200 with the same secret: nothing changes, updatedAt stays.
    f.publish(
        headers(Some(&f.key.clone()), None),
        body(json!({"integrationId": mine.id, "secretId": "s.rotated-1"})),
    )
    .await;
    let same = f.next_outcome().await;
    assert_eq!(same.subject, "vault.approle.rotation.completed");
    assert_eq!(same.body, serde_json::to_value(&after).unwrap());
    assert_eq!(
        same.header("Rotation-Event-Id"),
        None,
        "no id, no Rotation-Event-Id"
    );
    assert_eq!(f.rotation_count(mine.id).await, 1);

    // A repeat of ev-1 (by body eventId, which JetStream does not
    // de-duplicate) changes nothing and yields the first record.
    f.publish(
        headers(Some(&f.key.clone()), None),
        body(json!({"integrationId": mine.id, "secretId": "s.rotated-1", "eventId": "ev-1"})),
    )
    .await;
    let repeat = f.next_outcome().await;
    assert_eq!(repeat.subject, "vault.approle.rotation.completed");
    assert_eq!(repeat.body, done.body);
    assert_eq!(repeat.header("Nats-Msg-Id"), Some("4:acme:200:ev-1"));
    assert_eq!(f.secret(mine.id).await, "s.rotated-1");
    assert_eq!(f.rotation_count(mine.id).await, 1);

    // ev-1 reused with another secret is refused, not swallowed.
    f.remember_secret("s.reused-id");
    f.publish(
        headers(Some(&f.key.clone()), None),
        body(json!({"integrationId": mine.id, "secretId": "s.reused-id", "eventId": "ev-1"})),
    )
    .await;
    let reused = f.next_outcome().await;
    assert_eq!(reused.subject, "vault.approle.rotation.failed");
    assert_eq!(reused.body["status"], 422);
    assert_eq!(
        reused.body["error"],
        "event id already used for a different rotation"
    );
    assert_eq!(f.secret(mine.id).await, "s.rotated-1");
    assert_eq!(f.rotation_count(mine.id).await, 1);

    let (code, logs) = worker.terminate().await;
    assert_eq!(code, Some(0), "clean exit on SIGTERM: {logs}");
    assert!(
        logs.contains("rotation handled") && logs.contains("stopped"),
        "{logs}"
    );
    f.assert_no_secret_leaked(&logs).await;
}

async fn request_reply_follows_the_contract_table(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let mine = f.integration("acme", "s.initial-mine").await;
    let theirs = f.integration("globex", "s.initial-theirs").await;
    seed_last_rotation(&f, mine.id).await;
    let worker = f.worker().await;

    let before = f.env.dump().await;
    for case in refusals(&f, mine.id, theirs.id) {
        let reply = f
            .request(headers(case.key.as_deref(), case.msg_id), case.body.clone())
            .await;
        assert_failure(&reply, &case);
        assert_eq!(
            reply.header("Nats-Service-Error-Code"),
            Some(case.status.to_string().as_str()),
            "{}",
            case.name
        );
        assert_eq!(
            reply.header("Nats-Service-Error"),
            reply.body["error"].as_str(),
            "{}",
            case.name
        );
        let event = f.next_outcome().await;
        assert_eq!(
            event.subject, "vault.approle.rotation.failed",
            "{}",
            case.name
        );
        assert_eq!(event.body, reply.body, "{}", case.name);
        assert_eq!(
            event.header("Rotation-Event-Id"),
            case.event_id,
            "{}",
            case.name
        );
    }
    f.remember_secret("s.refused-secret");
    assert_eq!(
        f.env.dump().await,
        before,
        "a refused request changed the store"
    );

    f.remember_secret("s.by-request");
    let reply = f
        .request(
            headers(Some(&f.key.clone()), Some("req-1")),
            body(json!({"integrationId": mine.id, "secretId": "s.by-request"})),
        )
        .await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), None);
    let after = f.record(mine.id).await;
    assert!(after.updated_at > mine.updated_at);
    assert_eq!(reply.body, serde_json::to_value(&after).unwrap());
    assert_eq!(
        &reply.header("traceparent").unwrap()[3..35],
        &TRACEPARENT[3..35]
    );
    let event = f.next_outcome().await;
    assert_eq!(event.subject, "vault.approle.rotation.completed");
    assert_eq!(event.body, reply.body);
    assert_eq!(event.header("Rotation-Event-Id"), Some("req-1"));

    // The same request again: same record, nothing changes.
    let again = f
        .request(
            headers(Some(&f.key.clone()), Some("req-1")),
            body(json!({"integrationId": mine.id, "secretId": "s.by-request"})),
        )
        .await;
    assert_eq!(again.body, reply.body);
    assert_eq!(f.next_outcome().await.body, reply.body);
    assert_eq!(f.secret(mine.id).await, "s.by-request");
    assert_eq!(f.rotation_count(mine.id).await, 1);

    // The same request id with another secret: 422, nothing changes.
    f.remember_secret("s.reused");
    let reused = f
        .request(
            headers(Some(&f.key.clone()), Some("req-1")),
            body(json!({"integrationId": mine.id, "secretId": "s.reused"})),
        )
        .await;
    assert_eq!(reused.header("Nats-Service-Error-Code"), Some("422"));
    assert_eq!(reused.body["status"], 422);
    assert_eq!(reused.body["eventId"], "req-1");
    assert_eq!(f.secret(mine.id).await, "s.by-request");
    assert_eq!(f.rotation_count(mine.id).await, 1);

    // Discovery through the micro protocol.
    let ping = f
        .client
        .request("$SRV.PING.rotation-worker", Bytes::new())
        .await
        .unwrap();
    let ping: Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "rotation-worker");
    let info = f
        .client
        .request("$SRV.INFO.rotation-worker", Bytes::new())
        .await
        .unwrap();
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    let mut endpoints: Vec<(String, String, String)> = info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let field = |name: &str| e[name].as_str().unwrap_or_default().to_owned();
            (field("name"), field("subject"), field("queue_group"))
        })
        .collect();
    endpoints.sort();
    let group = || "rotation-worker".to_owned();
    assert_eq!(
        endpoints,
        [
            ("renew".into(), "vault.approle.renew".into(), group()),
            ("rollback".into(), "vault.approle.rollback".into(), group()),
            ("rotate".into(), "vault.approle.rotate".into(), group()),
            ("status".into(), "vault.approle.status".into(), group()),
        ]
    );
    let stats = f
        .client
        .request("$SRV.STATS.rotation-worker", Bytes::new())
        .await
        .unwrap();
    let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
    let refused = refusals(&f, mine.id, theirs.id).len();
    let rotate = stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "rotate")
        .expect("the rotate endpoint's stats");
    // The refusals, the reused id, and two successes.
    assert_eq!(rotate["num_requests"], refused + 3);
    assert_eq!(rotate["num_errors"], refused + 1);
    let last_error = &rotate["last_error"];
    assert!(
        last_error.as_str().is_some_and(|e| !e.is_empty()),
        "{last_error}"
    );

    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

async fn out_of_order_events_keep_the_newest_rotation(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.worker().await;
    let key = f.key.clone();
    f.remember_secret("s.newer");
    f.remember_secret("s.older");
    f.publish(
        headers(Some(&key), Some("e-newer")),
        body(json!({"integrationId": it.id, "secretId": "s.newer", "rotatedAt": "2026-05-01T10:00:00Z"})),
    )
    .await;
    f.publish(
        headers(Some(&key), Some("e-older")),
        body(json!({"integrationId": it.id, "secretId": "s.older", "rotatedAt": "2026-05-01T09:00:00+00:00"})),
    )
    .await;
    // Outcome events of different messages may go out in either order.
    let mut seen = [f.next_outcome().await, f.next_outcome().await];
    seen.sort_by(|a, b| a.subject.cmp(&b.subject));
    let [first, second] = seen;
    assert_eq!(first.subject, "vault.approle.rotation.completed");
    assert_eq!(second.subject, "vault.approle.rotation.failed");
    assert_eq!(second.body["status"], 409);
    assert_eq!(second.body["eventId"], "e-older");
    assert_eq!(f.secret(it.id).await, "s.newer");
    assert_eq!(f.rotation_count(it.id).await, 1);
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

async fn a_backlog_over_many_integrations_is_applied_once_each(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(f.integration("acme", &format!("s.initial-{i}")).await.id);
    }
    // Start once to create the streams, stop, then publish while no worker runs.
    let (code, _) = f.binary().await.terminate().await;
    assert_eq!(code, Some(0));
    let key = f.key.clone();
    for round in 0..5 {
        for (i, id) in ids.iter().enumerate() {
            let secret = format!("s.round-{round}-of-{i}");
            f.remember_secret(&secret);
            // Without ids or times: arrival order decides.
            f.publish(
                headers(Some(&key), None),
                body(json!({"integrationId": id, "secretId": secret})),
            )
            .await;
        }
    }
    let worker = f.worker().await;
    f.completions(100).await;
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(f.secret(*id).await, format!("s.round-4-of-{i}"));
        assert_eq!(f.rotation_count(*id).await, 5);
    }
    // The work queue is empty: every message was acknowledged (an ack
    // follows its outcome event, so it is waited for).
    crate::faults::wait_for_drained(&f.js, Duration::from_secs(20)).await;
    let mut stream = f.js.get_stream("VAULT_ROTATIONS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 0);
    let mut results = f.js.get_stream("VAULT_ROTATION_RESULTS").await.unwrap();
    assert_eq!(results.info().await.unwrap().state.messages, 100);
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// A previous secret that expired while no worker ran is erased by the
/// next start's sweep, which waits for the backlog waiting at the start to
/// be delivered rather than for its period (five minutes).
async fn a_start_with_a_backlog_erases_what_expired_once_the_backlog_is_delivered(
    backend: Backend,
) {
    let mut f = Fixture::on(backend).await;
    let kept = f.integration("acme", "s.kept-first").await;
    let busy = f.integration("acme", "s.busy-first").await;
    let worker = f.worker().await;
    crate::lifecycle::rotate(&mut f, Some("kept-1"), kept.id, "s.kept-second", None).await;
    let mut logs = worker.stop().await;
    f.store.expire_previous(kept.id).await;
    assert!(
        f.store.previous_columns(kept.id).await.1,
        "expired, not erased"
    );
    let key = f.key.clone();
    for i in 0..50 {
        let secret = format!("s.busy-{i}");
        f.remember_secret(&secret);
        f.publish(
            headers(Some(&key), None),
            body(json!({"integrationId": busy.id, "secretId": secret})),
        )
        .await;
    }
    let worker = f.worker().await;
    worker.wait_for_log("erased expired previous secrets").await;
    assert_eq!(
        f.store.previous_columns(kept.id).await,
        (None, false, false)
    );
    f.completions(50).await;
    assert_eq!(f.secret(busy.id).await, "s.busy-49");
    assert_eq!(f.rotation_count(busy.id).await, 50);
    assert_eq!(f.secret(kept.id).await, "s.kept-second");
    logs.push_str(&worker.stop().await);
    f.assert_no_secret_leaked(&logs).await;
}

/// Takes the database away from the worker until the guard is released.
/// PostgreSQL: no new connections, and the open ones are closed. SQLite:
/// another connection holds the write lock, as a long-running backup or
/// admin session would.
pub(crate) enum Outage {
    Postgres { pool: sqlx::PgPool, db: String },
    Sqlite(sqlx::SqliteConnection),
}

impl Outage {
    pub(crate) async fn begin(env: &TestEnv) -> Self {
        match &env.db {
            Some(db) => {
                let pool = sqlx::PgPool::connect(&crate::helpers::server_url())
                    .await
                    .unwrap();
                let name = db.name.clone();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
                )))
                .execute(&pool)
                .await
                .unwrap();
                sqlx::query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                )
                .bind(&name)
                .execute(&pool)
                .await
                .unwrap();
                Self::Postgres { pool, db: name }
            }
            None => {
                use sqlx::ConnectOptions;
                let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(env.sqlite_file())
                    .connect()
                    .await
                    .unwrap();
                sqlx::raw_sql("BEGIN EXCLUSIVE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                Self::Sqlite(conn)
            }
        }
    }

    pub(crate) async fn end(self) {
        match self {
            Self::Postgres { pool, db } => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true"
                )))
                .execute(&pool)
                .await
                .unwrap();
            }
            Self::Sqlite(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
            }
        }
    }
}

async fn a_store_outage_ends_in_dead_letters_that_replay_applies(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    // SQLite waits this long for the write lock before the attempt fails.
    f.env.env.insert(
        "ROTATION_WORKER_DATABASE__ACQUIRE_TIMEOUT_MS".to_owned(),
        "200".to_owned(),
    );
    let worker = f.worker().await;
    let outage = Outage::begin(&f.env).await;
    let term_with_reason = ServerFeatures::of_server(&f.js).term_with_reason;
    let mut terminated =
        f.js.client()
            .subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.>")
            .await
            .unwrap();

    f.remember_secret("s.during-outage");
    f.publish(
        headers(Some(&f.key.clone()), Some("ev-outage")),
        body(json!({"integrationId": it.id, "secretId": "s.during-outage"})),
    )
    .await;
    let failed = f.next_outcome().await;
    assert_eq!(failed.subject, "vault.approle.rotation.failed");
    assert_eq!(failed.body["status"], 503);
    assert_eq!(failed.body["eventId"], "ev-outage");
    assert_eq!(failed.body["integrationId"], json!(it.id));
    let error = failed.body["error"].as_str().unwrap();
    assert!(
        !error.to_lowercase().contains("sql") && !error.contains("pg_"),
        "internals leaked: {error}"
    );
    worker.wait_for_log("dead-lettered message let go").await;
    let mut inbound = f.js.get_stream("VAULT_ROTATIONS").await.unwrap();
    assert_eq!(
        inbound.info().await.unwrap().state.messages,
        0,
        "the message was let go"
    );
    if term_with_reason {
        // Terminated, with the reason, where the server takes one.
        let advisory = tokio::time::timeout(Duration::from_secs(10), terminated.next())
            .await
            .expect("a termination advisory")
            .unwrap();
        let advisory: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap();
        assert_eq!(
            (&advisory["stream"], &advisory["reason"]),
            (&json!("VAULT_ROTATIONS"), &json!("dead-lettered: 503")),
            "{advisory}"
        );
    }

    outage.end().await;
    let logs = worker.stop().await;

    f.env.env.insert("NATS_URL".to_owned(), f.nats.url.clone());
    let listed = f.env.cli(&["dlq", "list"], "").await.json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["eventId"], "ev-outage");
    assert_eq!(listed[0]["status"], 503);
    assert_eq!(listed[0]["deliveries"], 3);

    // Rotate the encryption key while the entry waits: the key file's key
    // joins a configured ring as `local`, k2 becomes active, the store and
    // the dead letter move to k2, and `local` leaves the ring.
    let local = std::fs::read_to_string(f.env.key_file()).unwrap();
    let k2 = rotation_worker::crypto::generate_key();
    for (name, value) in [
        ("KEYS__LOCAL", local.trim()),
        ("KEYS__K2", secrecy::ExposeSecret::expose_secret(&k2)),
        ("ACTIVE_KEY", "k2"),
    ] {
        f.env.env.insert(
            format!("ROTATION_WORKER_ENCRYPTION__{name}"),
            value.to_owned(),
        );
    }
    f.remember_secret(local.trim());
    f.remember_secret(secrecy::ExposeSecret::expose_secret(&k2));
    let moved = json!({ "reencrypted": 1, "activeKey": "k2" });
    assert_eq!(f.env.cli(&["reencrypt"], "").await.json(), moved);
    assert_eq!(f.env.cli(&["dlq", "reencrypt"], "").await.json(), moved);
    assert_eq!(
        f.env.cli(&["dlq", "reencrypt"], "").await.json(),
        json!({ "reencrypted": 0, "activeKey": "k2" })
    );
    f.env.env.remove("ROTATION_WORKER_ENCRYPTION__KEYS__LOCAL");
    let relisted = f.env.cli(&["dlq", "list"], "").await.json();
    let relisted = relisted.as_array().unwrap();
    assert_eq!(relisted.len(), 1);
    assert_eq!(relisted[0]["id"], listed[0]["id"], "the same entry");
    assert_ne!(relisted[0]["seq"], listed[0]["seq"], "stored anew");

    let replayed = f.env.cli(&["dlq", "replay"], "").await.json();
    assert_eq!(replayed[0]["status"], 200, "{replayed}");
    assert_eq!(replayed[0]["removed"], true);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.header("Rotation-Event-Id"), Some("ev-outage"));
    let k2_only = f.env.store().await;
    assert_eq!(secret_of(&k2_only, it.id).await, "s.during-outage");
    assert_eq!(k2_only.key_ids().await, ["k2"]);
    assert_eq!(f.env.cli(&["dlq", "list"], "").await.json(), json!([]));
    f.assert_no_secret_leaked(&logs).await;
}

async fn core_ingest_replies_to_requests_on_the_event_subject(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f
        .env
        .worker(&f.nats, &[("ROTATION_WORKER_WORKER__INGEST", "core")])
        .await;
    f.remember_secret("s.core");
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        f.client.request_with_headers(
            "vault.approle.rotated",
            headers(Some(&f.key.clone()), Some("core-1")),
            body(json!({"integrationId": it.id, "secretId": "s.core"})),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let reply = f.seen(reply);
    assert_eq!(
        reply.body,
        serde_json::to_value(f.record(it.id).await).unwrap()
    );
    let event = f.next_outcome().await;
    assert_eq!(event.subject, "vault.approle.rotation.completed");
    assert_eq!(f.secret(it.id).await, "s.core");
    assert!(
        f.js.get_stream("VAULT_ROTATIONS").await.is_err(),
        "core ingest creates no stream"
    );
    let (code, logs) = worker.terminate().await;
    assert_eq!(code, Some(0));
    f.assert_no_secret_leaked(&logs).await;
}

/// Core ingest through a store outage: a message cannot be redelivered, so
/// it is set aside at once, in the dead-letter stream the worker made
/// itself, with one 503 failure event and a 503 reply.
async fn core_ingest_sets_a_message_aside_once_in_its_own_stream(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    f.env.env.insert(
        "ROTATION_WORKER_DATABASE__ACQUIRE_TIMEOUT_MS".to_owned(),
        "200".to_owned(),
    );
    let worker = f
        .env
        .spawn_worker(&f.nats, &[("ROTATION_WORKER_WORKER__INGEST", "core")])
        .await;
    let mut dlq =
        f.js.get_stream("VAULT_ROTATION_DLQ")
            .await
            .expect("core ingest makes the dead-letter stream");
    let outage = Outage::begin(&f.env).await;
    f.remember_secret("s.core-outage");
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        f.client.request_with_headers(
            "vault.approle.rotated",
            headers(Some(&f.key.clone()), Some("core-outage")),
            body(json!({"integrationId": it.id, "secretId": "s.core-outage"})),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let reply = f.seen(reply);
    assert_eq!(reply.body["status"], 503);
    assert_eq!(f.next_outcome().await.body["status"], 503);
    assert_eq!(dlq.info().await.unwrap().state.messages, 1);
    outage.end().await;

    // The next outcome is the next message's: the 503 went out once.
    f.remember_secret("s.core-after");
    f.client
        .publish_with_headers(
            "vault.approle.rotated",
            headers(Some(&f.key.clone()), Some("core-after")),
            body(json!({"integrationId": it.id, "secretId": "s.core-after"})),
        )
        .await
        .unwrap();
    let next = f.next_outcome().await;
    assert_eq!(
        next.subject, "vault.approle.rotation.completed",
        "{:?}",
        next.body
    );
    assert_eq!(next.header("Rotation-Event-Id"), Some("core-after"));
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

async fn the_worker_rides_out_a_nats_restart(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.worker().await;
    let key = f.key.clone();
    f.remember_secret("s.before-restart");
    f.publish(
        headers(Some(&key), Some("before")),
        body(json!({"integrationId": it.id, "secretId": "s.before-restart"})),
    )
    .await;
    let before = f.next_outcome().await;
    assert_eq!(before.subject, "vault.approle.rotation.completed");

    f.nats.restart().await;
    // Fresh connections for the test side; the worker reconnects by itself.
    f.client = f.nats.client().await;
    f.js = jetstream::new(f.client.clone());
    f.outcomes = f
        .client
        .subscribe("vault.approle.rotation.>")
        .await
        .unwrap();
    f.client.flush().await.unwrap();
    worker.wait_for_logs("connected to NATS", 2).await;

    f.remember_secret("s.after-restart");
    f.publish(
        headers(Some(&key), Some("after")),
        body(json!({"integrationId": it.id, "secretId": "s.after-restart"})),
    )
    .await;
    // A server killed hard may forget an ack it had not yet stored: then
    // "before" comes again, and must come out exactly as the first time.
    let done = loop {
        let seen = f.next_outcome().await;
        if seen.header("Rotation-Event-Id") == Some("before") {
            assert_eq!(
                seen.body, before.body,
                "a redelivery yields the first record"
            );
            continue;
        }
        break seen;
    };
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.header("Rotation-Event-Id"), Some("after"));
    assert_eq!(f.secret(it.id).await, "s.after-restart");
    assert_eq!(f.rotation_count(it.id).await, 2);
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

async fn hundreds_of_concurrent_rotations_of_one_integration_keep_the_newest(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.worker().await;
    let base = time::macros::datetime!(2026-06-01 00:00:00 UTC);
    let at = |i: i64| {
        (base + time::Duration::seconds(i))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    // 300 rotations, newest and oldest interleaved: half as requests, half
    // as events, all in flight at once.
    let mut order: Vec<i64> = (0..300).collect();
    order.sort_by_key(|i| (i * 37) % 301);
    let mut requests = Vec::new();
    for (n, i) in order.iter().enumerate() {
        let secret = format!("s.concurrent-{i}");
        f.remember_secret(&secret);
        let payload =
            body(json!({"integrationId": it.id, "secretId": secret, "rotatedAt": at(*i)}));
        let h = headers(Some(&f.key), Some(&format!("c-{i}")));
        if n % 2 == 0 {
            let client = f.client.clone();
            requests.push(
                async move {
                    let reply = client
                        .request_with_headers("vault.approle.rotate", h, payload)
                        .await
                        .expect("reply");
                    Some((*i, reply))
                }
                .boxed(),
            );
        } else {
            let js = f.js.clone();
            requests.push(
                async move {
                    js.publish_with_headers("vault.approle.rotated", h, payload)
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                    None
                }
                .boxed(),
            );
        }
    }
    let replies: Vec<(i64, async_nats::Message)> = futures::future::join_all(requests)
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..300 {
        let seen = f.next_outcome().await;
        let status = seen
            .body
            .get("status")
            .and_then(Value::as_u64)
            .unwrap_or(200);
        *statuses.entry(status).or_insert(0) += 1;
    }
    // Only applied or stale: no deadlock or serialization error reaches a caller.
    assert!(
        statuses.keys().all(|k| *k == 200 || *k == 409),
        "{statuses:?}"
    );
    assert_eq!(f.secret(it.id).await, "s.concurrent-299");
    let owned = f.store.get_integration(it.id).await.unwrap().unwrap();
    assert_eq!(
        owned.last_rotated_at,
        Some(base + time::Duration::seconds(299))
    );
    assert_eq!(owned.rotation_count, statuses[&200]);
    // updatedAt is the time the newest rotation was applied.
    let record = serde_json::to_value(&owned.integration).unwrap();
    if let Some((_, reply)) = replies.iter().find(|(i, _)| *i == 299) {
        let newest: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(newest["updatedAt"], record["updatedAt"]);
    } else {
        let newest: Value = serde_json::from_str(&f.store.processed_record("c-299").await).unwrap();
        assert_eq!(newest["updatedAt"], record["updatedAt"]);
    }
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

crate::on_both_stores!(
    core_ingest_sets_a_message_aside_once_in_its_own_stream,
    event_path_follows_the_contract_table,
    request_reply_follows_the_contract_table,
    out_of_order_events_keep_the_newest_rotation,
    a_backlog_over_many_integrations_is_applied_once_each,
    a_start_with_a_backlog_erases_what_expired_once_the_backlog_is_delivered,
    a_store_outage_ends_in_dead_letters_that_replay_applies,
    core_ingest_replies_to_requests_on_the_event_subject,
    the_worker_rides_out_a_nats_restart,
    hundreds_of_concurrent_rotations_of_one_integration_keep_the_newest,
);
