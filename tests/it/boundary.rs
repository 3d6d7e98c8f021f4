//! The worker's own boundary, tried as an attacker would: a tenant whose
//! Vault hangs, floods, redirects or points inward, and anyone who may
//! publish a request subject naming a reply subject of their choice. The
//! hostile Vault here is a small HTTP server of the test's (it plays the
//! attacker's server; OpenBao stays the real Vault of every other test).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rotation_worker::domain::VaultAddress;
use rotation_worker::domain::{Integration, Name, NewIntegration, Owner, RoleId, SecretId};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

use crate::helpers::{Backend, TestEnv, http_get, leaked_secret, read_stream};
use crate::worker::{Fixture, body, headers};

/// What the hostile Vault does with each request.
#[derive(Clone, Debug)]
pub enum Behaviour {
    /// Reads the request and never answers.
    Hang,
    /// Answers 200 with an endless body: declared as 800 MB, or chunked.
    Huge { declared: bool },
    /// Answers 307 to `location`.
    Redirect(String),
    /// Answers this status with a Vault-like error body.
    Status(u16, &'static str),
    /// Answers 200 `{}`.
    Empty,
}

/// An HTTP server on loopback that plays a tenant's hostile Vault, and
/// records what it was sent.
pub struct HostileVault {
    pub addr: String,
    pub port: u16,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// Bytes of answer written before the client went away.
    sent: Arc<AtomicU64>,
    /// Every byte it received.
    received: Arc<Mutex<Vec<u8>>>,
    /// Requests read whole, and a wake-up for each.
    requests: Arc<(AtomicUsize, tokio::sync::Notify)>,
    task: tokio::task::JoinHandle<()>,
}

impl HostileVault {
    pub async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new((AtomicUsize::new(0), tokio::sync::Notify::new()));
        let (c, s, r, q) = (
            connections.clone(),
            sent.clone(),
            received.clone(),
            requests.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let seen = Seen {
                    sent: s.clone(),
                    received: r.clone(),
                    requests: q.clone(),
                };
                tokio::spawn(serve(socket, behaviour.clone(), seen));
            }
        });
        Self {
            addr: format!("http://127.0.0.1:{port}"),
            port,
            connections,
            sent,
            received,
            requests,
            task,
        }
    }

    /// Waits (up to 30 s) until `n` requests have been read whole.
    pub async fn wait_for_requests(&self, n: usize) {
        let (count, wake) = &*self.requests;
        let reached = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let woken = wake.notified();
                if count.load(Ordering::SeqCst) >= n {
                    return;
                }
                woken.await;
            }
        })
        .await;
        assert!(
            reached.is_ok(),
            "the hostile Vault got fewer than {n} requests"
        );
    }

    pub fn requests(&self) -> usize {
        self.requests.0.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for HostileVault {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a connection records for the test.
struct Seen {
    sent: Arc<AtomicU64>,
    received: Arc<Mutex<Vec<u8>>>,
    requests: Arc<(AtomicUsize, tokio::sync::Notify)>,
}

/// Reads each request (head and a Content-Length body), then behaves.
async fn serve(mut socket: TcpStream, behaviour: Behaviour, seen: Seen) {
    loop {
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            let Ok(n) = socket.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            request.extend_from_slice(&buf[..n]);
            if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&request[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while request.len() < head_end + length {
            let Ok(n) = socket.read(&mut buf).await else {
                return;
            };
            if n == 0 {
                return;
            }
            request.extend_from_slice(&buf[..n]);
        }
        seen.received.lock().unwrap().extend_from_slice(&request);
        seen.requests.0.fetch_add(1, Ordering::SeqCst);
        seen.requests.1.notify_waiters();
        let answer = match &behaviour {
            Behaviour::Hang => {
                std::future::pending::<()>().await;
                return;
            }
            Behaviour::Huge { declared } => {
                flood(&mut socket, *declared, &seen.sent).await;
                return;
            }
            Behaviour::Redirect(location) => format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n"
            ),
            Behaviour::Status(code, error) => {
                let body = json!({ "errors": [error] }).to_string();
                format!(
                    "HTTP/1.1 {code} Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
            Behaviour::Empty => {
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
                    .to_owned()
            }
        };
        if socket.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Writes an endless answer until the client goes away.
async fn flood(socket: &mut TcpStream, declared: bool, sent: &AtomicU64) {
    let head = if declared {
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 838860800\r\n\r\n"
    } else {
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    };
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let chunk = vec![b' '; 64 * 1024];
    let framed = [
        format!("{:x}\r\n", chunk.len()).into_bytes(),
        chunk.clone(),
        b"\r\n".to_vec(),
    ]
    .concat();
    let piece = if declared { &chunk } else { &framed };
    // 800 MB at most: the worker must stop reading long before.
    for _ in 0..12_800 {
        if socket.write_all(piece).await.is_err() {
            return;
        }
        sent.fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
}

/// The settings that let a worker reach Vaults on loopback over http.
const LOOPBACK: [(&str, &str); 2] = [
    ("ROTATION_WORKER_VAULT__ALLOW_HTTP", "true"),
    ("ROTATION_WORKER_VAULT__ALLOWED_NETWORKS", "127.0.0.0/8"),
];

/// An integration of `owner` whose Vault is at `address`.
async fn integration_at(f: &mut Fixture, owner: &str, address: &str) -> Integration {
    let secret = format!("s.stored-{}", Uuid::new_v4().simple());
    f.remember_secret(&secret);
    let created = f
        .store
        .create_integration(&NewIntegration {
            owner: Owner::parse(owner).unwrap(),
            name: Name::parse(&format!("vault-{}", Uuid::new_v4().simple())).unwrap(),
            address: VaultAddress::parse(address).unwrap(),
            namespace: None,
            role_id: RoleId::parse("role-1").unwrap(),
            secret_id: SecretId::parse(secret).unwrap(),
        })
        .await
        .unwrap();
    f.store.backdate(created.id, time::Duration::hours(1)).await;
    f.record(created.id).await
}

fn wrapped(id: Uuid, token: &str) -> bytes::Bytes {
    body(json!({"integrationId": id, "wrappedSecretId": token}))
}

/// Finding 1: a Vault that never answers holds up only its own tenant.
/// Tenant acme's Vault accepts connections and hangs; acme publishes ten
/// wrapped events. Meanwhile globex's plain-secret requests (one lane, so
/// that they share it with acme's) are all answered 200, each within 1 s;
/// and acme's own wrapped request is answered 503 within its deadline
/// (`worker.request_timeout_ms`), not after `vault.timeout_ms`.
#[tokio::test]
async fn a_hanging_vault_holds_up_no_other_tenant() {
    let mut f = Fixture::new().await;
    let hanging = HostileVault::start(Behaviour::Hang).await;
    let theirs = integration_at(&mut f, "acme", &hanging.addr).await;
    let ours = integration_at(&mut f, "globex", "https://vault.globex.example.com").await;
    let mut settings = LOOPBACK.to_vec();
    settings.extend([
        ("ROTATION_WORKER_WORKER__LANES", "1"),
        ("ROTATION_WORKER_WORKER__REQUEST_TIMEOUT_MS", "1500"),
        ("ROTATION_WORKER_VAULT__TIMEOUT_MS", "5000"),
    ]);
    let worker = f.env.spawn_worker(&f.nats, &settings).await;
    let key = f.key.clone();
    for i in 0..10 {
        let token = format!("hvs.wrapped-{i}");
        f.remember_secret(&token);
        f.publish(
            headers(Some(&key), Some(&format!("hang-{i}"))),
            wrapped(theirs.id, &token),
        )
        .await;
    }
    // acme's events are at its Vault before globex asks.
    hanging.wait_for_requests(1).await;
    let other = f.other_key.clone();
    let mut slowest = Duration::ZERO;
    for i in 0..28 {
        let secret = format!("s.globex-{i}");
        f.remember_secret(&secret);
        let started = Instant::now();
        let reply = f
            .request(
                headers(Some(&other), None),
                body(json!({"integrationId": ours.id, "secretId": secret})),
            )
            .await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(
            reply.header("Nats-Service-Error-Code"),
            None,
            "{:?}",
            reply.body
        );
        assert_eq!(f.secret(ours.id).await, secret);
    }
    assert!(
        slowest < Duration::from_secs(1),
        "slowest reply {slowest:?}"
    );

    let started = Instant::now();
    let reply = f
        .request(headers(Some(&key), None), wrapped(theirs.id, "hvs.asked"))
        .await;
    let took = started.elapsed();
    assert_eq!(reply.body["status"], 503, "{:?}", reply.body);
    assert!(
        took < Duration::from_millis(2500),
        "answered after {took:?}"
    );
    assert_eq!(f.rotation_count(theirs.id).await, 0);
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// A wrapped rotation of `it` by request; the reply.
async fn rotate_wrapped(f: &mut Fixture, it: &Integration, token: &str) -> crate::worker::Seen {
    f.remember_secret(token);
    let key = f.key.clone();
    f.request(headers(Some(&key), None), wrapped(it.id, token))
        .await
}

/// Asserts a final refusal that changed nothing.
async fn assert_refused(f: &Fixture, reply: &crate::worker::Seen, it: &Integration, error: &str) {
    assert_eq!(reply.body["status"], 422, "{:?}", reply.body);
    assert_eq!(reply.body["error"], error, "{:?}", reply.body);
    assert_eq!(f.record(it.id).await, *it, "the record is unchanged");
    assert_eq!(f.rotation_count(it.id).await, 0);
}

/// Finding 2: an answer of any size is not read. Declared (Content-Length)
/// or streamed in chunks, an answer beyond `vault.max_response_bytes` is a
/// final 422 and the worker stops reading at once.
#[tokio::test]
async fn an_oversized_vault_answer_is_a_final_422_and_is_not_read() {
    let mut f = Fixture::new().await;
    let worker = f.env.spawn_worker(&f.nats, &LOOPBACK).await;
    for declared in [true, false] {
        let huge = HostileVault::start(Behaviour::Huge { declared }).await;
        let it = integration_at(&mut f, "acme", &huge.addr).await;
        let reply = rotate_wrapped(&mut f, &it, "hvs.huge").await;
        assert_refused(&f, &reply, &it, "Vault's answer is too large").await;
        assert_eq!(huge.requests(), 1, "never retried");
        // What the server got written before the worker hung up: a few
        // socket buffers, not 800 MB.
        assert!(huge.sent() < 16 << 20, "{} bytes read", huge.sent());
    }
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Finding 2, the crash loop: a stream message whose deliveries all ended
/// without an answer (the worker died handling it, here at a crash point
/// just before its Vault call) is set aside unprocessed once it is past
/// `worker.max_deliver`: the next worker does not call the Vault again.
#[tokio::test]
async fn a_message_that_kills_the_worker_is_set_aside_before_vault_is_called_again() {
    let mut f = Fixture::new().await;
    let vault = HostileVault::start(Behaviour::Empty).await;
    let it = integration_at(&mut f, "acme", &vault.addr).await;
    let mut settings = LOOPBACK.to_vec();
    settings.extend(crate::faults::RESILIENT.iter().copied());
    settings.push(("ROTATION_WORKER_WORKER__MAX_DELIVER", "2"));
    let mut crashing = settings.clone();
    crashing.push(("ROTATION_WORKER_CRASHPOINT", "before-vault"));
    let key = f.key.clone();
    f.remember_secret("hvs.deadly");
    // The streams first, then the message.
    let first = f.env.worker(&f.nats, &settings).await;
    let mut logs = first.kill().await;
    f.publish(
        headers(Some(&key), Some("deadly-1")),
        wrapped(it.id, "hvs.deadly"),
    )
    .await;
    // Workers that abort at the point, until one sets the message aside.
    // A delivery can also go to a killed worker's pull the server has not
    // dropped yet: then fewer than two of them abort.
    let mut aborts = 0;
    loop {
        let worker = f.env.start_worker(&f.nats.url, &crashing);
        tokio::select! {
            biased;
            () = worker.wait_for_log("aborting at the configured crash point") => {
                aborts += 1;
                logs.push_str(&worker.kill().await);
                assert!(aborts <= 2, "aborted {aborts} times:\n{logs}");
            }
            () = worker.wait_for_log("dead-lettered message let go") => {
                let last = worker.kill().await;
                assert!(!last.contains("aborting"), "{last}");
                logs.push_str(&last);
                break;
            }
        }
    }
    assert!(aborts >= 1, "the crash point was never reached");
    let outcome = f.next_outcome().await;
    assert_eq!(outcome.subject, "vault.approle.rotation.failed");
    assert_eq!(outcome.body["status"], 503, "{:?}", outcome.body);
    assert_eq!(vault.connections(), 0, "Vault was never called");
    let dlq = read_stream(&f.js, "VAULT_ROTATION_DLQ").await;
    assert_eq!(dlq.messages.len(), 1);
    assert_eq!(f.rotation_count(it.id).await, 0);
    f.assert_no_secret_leaked(&logs).await;
}

/// Finding 3: a redirect is never followed, with or without a secret in
/// the call: the redirect's target is never even connected to. What the
/// hostile Vault itself received holds no API key and no stored secret.
#[tokio::test]
async fn a_redirect_is_a_final_422_and_its_target_gets_nothing() {
    let mut f = Fixture::new().await;
    let target = HostileVault::start(Behaviour::Empty).await;
    let location = format!("{}/v1/sys/wrapping/lookup", target.addr);
    let redirecting = HostileVault::start(Behaviour::Redirect(location)).await;
    let it = integration_at(&mut f, "acme", &redirecting.addr).await;

    let worker = f.env.spawn_worker(&f.nats, &LOOPBACK).await;
    let reply = rotate_wrapped(&mut f, &it, "hvs.redirected").await;
    assert_refused(&f, &reply, &it, "Vault answered with a redirect").await;
    let mut logs = worker.stop().await;

    // With a login, the new secret_id would travel too.
    let mut login = LOOPBACK.to_vec();
    login.push(("ROTATION_WORKER_VAULT__VERIFY", "login"));
    let worker = f.env.spawn_worker(&f.nats, &login).await;
    f.remember_secret("s.new-by-login");
    let key = f.key.clone();
    let reply = f
        .request(
            headers(Some(&key), None),
            body(json!({"integrationId": it.id, "secretId": "s.new-by-login"})),
        )
        .await;
    assert_refused(&f, &reply, &it, "Vault answered with a redirect").await;
    logs.push_str(&worker.stop().await);

    assert_eq!(redirecting.requests(), 2);
    assert_eq!(target.connections(), 0, "the redirect was followed");
    let stored = f.secrets.clone();
    let never: Vec<&str> = stored
        .iter()
        .map(String::as_str)
        .filter(|s| !["hvs.redirected", "s.new-by-login"].contains(s))
        .collect();
    assert_eq!(
        leaked_secret(&redirecting.received(), never.iter().copied()),
        None
    );
    f.assert_no_secret_leaked(&logs).await;
}

/// Finding 3, egress: a name that resolves to loopback, a loopback IP
/// literal, and http:// without `vault.allow_http` are refused before any
/// connection (final 422); listed in `vault.allowed_networks`, the same
/// Vault is reached.
#[tokio::test]
async fn addresses_inside_the_workers_network_are_refused_before_connecting() {
    let mut f = Fixture::new().await;
    let vault = HostileVault::start(Behaviour::Empty).await;
    let by_name = integration_at(&mut f, "acme", &format!("http://localhost:{}", vault.port)).await;
    let by_ip = integration_at(&mut f, "acme", &vault.addr).await;
    let https = integration_at(&mut f, "acme", &format!("https://localhost:{}", vault.port)).await;

    let worker = f
        .env
        .spawn_worker(&f.nats, &[("ROTATION_WORKER_VAULT__ALLOW_HTTP", "true")])
        .await;
    for it in [&by_name, &by_ip, &https] {
        let reply = rotate_wrapped(&mut f, it, "hvs.inward").await;
        assert_refused(&f, &reply, it, "Vault address not allowed").await;
    }
    let mut logs = worker.stop().await;
    let worker = f.env.spawn_worker(&f.nats, &[]).await;
    let reply = rotate_wrapped(&mut f, &by_name, "hvs.http").await;
    assert_refused(&f, &reply, &by_name, "Vault address not allowed").await;
    logs.push_str(&worker.stop().await);
    assert_eq!(vault.connections(), 0, "a refused address was connected to");

    // Listed, it is reached (and answers nothing useful: a final 422).
    let worker = f.env.spawn_worker(&f.nats, &LOOPBACK).await;
    let reply = rotate_wrapped(&mut f, &by_name, "hvs.listed").await;
    assert_eq!(reply.body["status"], 422, "{:?}", reply.body);
    assert_eq!(vault.requests(), 1);
    logs.push_str(&worker.stop().await);
    f.assert_no_secret_leaked(&logs).await;
}

/// Status codes that mean what they say: 429 and 5xx are transient (503,
/// and after `vault.breaker_failures` of them the breaker answers 503
/// without calling); a 403 is a final 422 without the interception alarm;
/// only a token refused as invalid raises it.
#[tokio::test]
async fn vault_statuses_are_transient_final_or_an_interception_as_they_mean() {
    let mut f = Fixture::new().await;
    let mut settings = LOOPBACK.to_vec();
    settings.extend([
        ("ROTATION_WORKER_VAULT__BREAKER_FAILURES", "3"),
        ("ROTATION_WORKER_VAULT__BREAKER_COOLDOWN_MS", "600000"),
        ("ROTATION_WORKER_WORKER__REQUEST_TIMEOUT_MS", "2000"),
    ]);
    let worker = f.env.spawn_worker(&f.nats, &settings).await;
    let throttling = HostileVault::start(Behaviour::Status(429, "rate limited")).await;
    let it = integration_at(&mut f, "acme", &throttling.addr).await;
    let reply = rotate_wrapped(&mut f, &it, "hvs.throttled").await;
    assert_eq!(reply.body["status"], 503, "{:?}", reply.body);
    assert_eq!(throttling.requests(), 3, "retried until the breaker opened");
    let reply = rotate_wrapped(&mut f, &it, "hvs.throttled-again").await;
    assert_eq!(reply.body["status"], 503, "{:?}", reply.body);
    assert_eq!(throttling.requests(), 3, "an open breaker calls nobody");

    let denying = HostileVault::start(Behaviour::Status(403, "permission denied")).await;
    let it = integration_at(&mut f, "acme", &denying.addr).await;
    let reply = rotate_wrapped(&mut f, &it, "hvs.denied").await;
    assert_refused(&f, &reply, &it, "Vault refused the request (HTTP 403)").await;
    let invalid = HostileVault::start(Behaviour::Status(
        400,
        "wrapping token is not valid or does not exist",
    ))
    .await;
    let it = integration_at(&mut f, "acme", &invalid.addr).await;
    let reply = rotate_wrapped(&mut f, &it, "hvs.intercepted").await;
    assert_refused(
        &f,
        &reply,
        &it,
        "wrapping token is invalid, expired or already used",
    )
    .await;
    let (_, metrics) = http_get(&worker.http_addr(), "/metrics").await;
    assert!(
        metrics.contains("rotation_worker_wrapping_failures_total 1\n"),
        "only the invalid token is an interception:\n{metrics}"
    );
    let logs = worker.stop().await;
    assert_eq!(
        logs.matches("it may have been intercepted").count(),
        1,
        "{logs}"
    );
    f.assert_no_secret_leaked(&logs).await;
}

/// Finding 4: a request naming a reply subject outside
/// `nats.reply_prefixes` is neither processed nor answered: the worker's
/// rights cannot fill the dead-letter or the results stream, and a rotation
/// asked that way is not applied. Counted, logged; `_INBOX` replies work.
#[tokio::test]
async fn a_reply_subject_outside_the_prefixes_gets_nothing() {
    let mut f = Fixture::new().await;
    let it = integration_at(&mut f, "acme", "https://vault.acme.example.com").await;
    let worker = f.env.spawn_worker(&f.nats, &[]).await;
    let key = f.key.clone();
    let status = body(json!({"integrationId": it.id}));
    let rotation = body(json!({"integrationId": it.id, "secretId": "s.hijacked"}));
    f.remember_secret("s.hijacked");
    let cases = [
        (
            "vault.approle.status",
            "rotation-worker.dlq",
            None,
            status.clone(),
        ),
        (
            "vault.approle.status",
            "vault.approle.rotation.completed",
            None,
            status.clone(),
        ),
        (
            "vault.approle.rotate",
            "rotation-worker.dlq",
            None,
            rotation.clone(),
        ),
        (
            "vault.approle.rotate",
            "vault.approle.rotation.completed",
            Some(key.as_str()),
            rotation.clone(),
        ),
        (
            "vault.approle.rollback",
            "_INBOX_rotation_worker.x",
            Some(key.as_str()),
            status,
        ),
    ];
    for (subject, reply, key, payload) in &cases {
        f.client
            .publish_with_reply_and_headers(*subject, *reply, headers(*key, None), payload.clone())
            .await
            .unwrap();
    }
    f.client.flush().await.unwrap();
    worker
        .wait_for_logs(
            "its reply subject is under no nats.reply_prefixes entry",
            cases.len(),
        )
        .await;
    // A well-formed request after them is answered: they were all read.
    let reply = f
        .request_to(
            "vault.approle.status",
            headers(Some(&key), None),
            body(json!({"integrationId": it.id})),
        )
        .await;
    assert_eq!(
        reply.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        reply.body
    );
    let (_, metrics) = http_get(&worker.http_addr(), "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "rotation_worker_refused_replies_total {}\n",
            cases.len()
        )),
        "{metrics}"
    );
    assert_eq!(f.record(it.id).await, it, "no rotation applied");
    for stream in ["VAULT_ROTATION_DLQ", "VAULT_ROTATION_RESULTS"] {
        let held = read_stream(&f.js, stream).await;
        assert_eq!(held.messages.len(), 0, "{stream} holds a message");
    }
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// `integration create` refuses an address the worker would not call.
#[tokio::test]
async fn integration_create_refuses_addresses_the_worker_would_not_call() {
    let env = TestEnv::on(Backend::Sqlite);
    for (address, why) in [
        (
            "http://127.0.0.1:9464/metrics#",
            "scheme, host and port only",
        ),
        (
            "http://169.254.169.254/latest/meta-data?x=",
            "scheme, host and port only",
        ),
        ("https://vault.example.com/v1", "scheme, host and port only"),
        ("http://vault.example.com", "http:// is not admitted"),
        ("https://169.254.169.254", "Vault address not allowed"),
        ("https://10.0.0.1:8200", "Vault address not allowed"),
        ("https://[::1]:8200", "Vault address not allowed"),
    ] {
        let out = create_at(&env, address, &[]).await;
        assert_ne!(out.code, 0, "{address} was accepted");
        assert!(out.stderr.contains(why), "{address}: {}", out.stderr);
    }
    assert_eq!(
        env.store()
            .await
            .list_integrations(None)
            .await
            .unwrap()
            .len(),
        0
    );
    let out = create_at(&env, "http://127.0.0.1:8200", &LOOPBACK).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = create_at(&env, "https://vault.example.com:8200/", &[]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
}

async fn create_at(
    env: &TestEnv,
    address: &str,
    settings: &[(&str, &str)],
) -> crate::helpers::CliOutput {
    let args = [
        "integration",
        "create",
        "--owner",
        "acme",
        "--name",
        &format!("v-{}", Uuid::new_v4().simple()),
        "--address",
        address,
        "--role-id",
        "role-1",
    ];
    env.cli_with(&args, "s.created\n", settings).await
}

/// Finding 5: a request whose deadline passes while its statement waits
/// for a lock is answered as the statement ended, not 503 while the
/// statement commits behind it: the attempt under way is not abandoned
/// (the server's own timeouts bound it), so the rotation applied is
/// answered 200 and its completion event published.
#[tokio::test]
async fn a_deadline_passing_mid_statement_does_not_turn_an_applied_rotation_into_a_503() {
    let mut f = Fixture::new().await;
    let it = integration_at(&mut f, "acme", "https://vault.acme.example.com").await;
    let settings = [("ROTATION_WORKER_WORKER__REQUEST_TIMEOUT_MS", "800")];
    let worker = f.env.spawn_worker(&f.nats, &settings).await;
    let key = f.key.clone();
    let rotate = |secret: &str| body(json!({"integrationId": it.id, "secretId": secret}));
    f.remember_secret("s.first");
    let first = f
        .request(headers(Some(&key), None), rotate("s.first"))
        .await;
    assert_eq!(
        first.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        first.body
    );
    assert_eq!(
        f.next_outcome().await.subject,
        "vault.approle.rotation.completed"
    );

    // Another transaction holds the row while the next request comes.
    let pool = f.store.pg_pool().unwrap().clone();
    let holder = crate::helpers::hold_row(&pool, it.id).await;
    f.remember_secret("s.late");
    let (client, h, late) = (
        f.client.clone(),
        headers(Some(&key), None),
        rotate("s.late"),
    );
    let asked = tokio::spawn(async move {
        client
            .request_with_headers("vault.approle.rotate", h, late)
            .await
    });
    // The worker's statement waits for the lock (seen in the server) ...
    let waiting = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_locks WHERE NOT granted")
                .fetch_one(&pool)
                .await
                .unwrap();
            if n > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waiting.is_ok(), "the worker's statement never waited");
    // ... past the request's deadline (800 ms), within the statement's
    // own bound (database.lock_timeout_ms, 2 s); then the lock goes.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    holder.rollback().await.unwrap();

    let reply = asked.await.unwrap().expect("a reply");
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.to_string());
    assert_eq!(f.secret(it.id).await, "s.late", "the statement committed");
    assert_eq!(code, None, "applied, yet answered {:?}", reply.payload);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Finding 6: a ciphertext copied from another row (its stored hash with
/// it) is never overwritten, on the single-statement path as on the batch
/// path: the rotation is a 503 "cannot be read" and the row stays as it is.
#[tokio::test]
async fn a_ciphertext_copied_from_another_row_is_never_overwritten() {
    let mut f = Fixture::new().await;
    let target = integration_at(&mut f, "acme", "https://vault.acme.example.com").await;
    let source = integration_at(&mut f, "acme", "https://vault.acme.example.com").await;
    let worker = f.env.spawn_worker(&f.nats, &[]).await;
    let key = f.key.clone();
    let rotate = |secret: &str| body(json!({"integrationId": target.id, "secretId": secret}));
    // Two rotations: the second one takes the single statement.
    for secret in ["s.one", "s.two"] {
        f.remember_secret(secret);
        let reply = f.request(headers(Some(&key), None), rotate(secret)).await;
        assert_eq!(
            reply.header("Nats-Service-Error-Code"),
            None,
            "{:?}",
            reply.body
        );
        f.next_outcome().await;
    }
    let pool = f.store.pg_pool().unwrap().clone();
    sqlx::query(
        "UPDATE integrations AS t SET secret_ciphertext = s.secret_ciphertext, \
         secret_key_id = s.secret_key_id, secret_ciphertext_sha256 = s.secret_ciphertext_sha256 \
         FROM integrations AS s WHERE t.id = $1 AND s.id = $2",
    )
    .bind(target.id)
    .bind(source.id)
    .execute(&pool)
    .await
    .unwrap();
    let row = |id: uuid::Uuid| {
        let pool = pool.clone();
        async move {
            sqlx::query_as::<_, (Vec<u8>, Option<Vec<u8>>, i64)>(
                "SELECT secret_ciphertext, previous_ciphertext, rotation_count \
                 FROM integrations WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let before = row(target.id).await;

    f.remember_secret("s.three");
    let reply = f
        .request(headers(Some(&key), None), rotate("s.three"))
        .await;
    assert_eq!(reply.body["status"], 503, "{:?}", reply.body);
    assert_eq!(
        reply.body["error"],
        "the stored secret_id cannot be read with the configured keys; the rotation was not applied"
    );
    assert_eq!(row(target.id).await, before, "the row was overwritten");
    let logs = worker.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}
