//! A NATS deployment secured as real ones are: the shipped
//! `config/nats.conf` (users with least privilege, JetStream encrypted at
//! rest), and every way the worker can connect (TLS, mutual TLS,
//! user/password, token, nkey, creds file, a server list). Each test runs
//! its own nats-server.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::helpers::{
    Backend, NatsServer, TestEnv, TestStore, create_api_key, create_integration, leaked_secret,
    secret_of, shipped_config_for_server,
};
use crate::worker::{body, headers};

/// The passwords and the JetStream key the shipped config reads from its
/// environment.
pub const WORKER_PASSWORD: &str = "worker-pw-3c1f0b";
pub const PUBLISHER_PASSWORD: &str = "publisher-pw-77aa21";
pub const OPERATOR_PASSWORD: &str = "operator-pw-3c1f09";
pub const CONSUMER_PASSWORD: &str = "consumer-pw-9e02d4";
pub const JETSTREAM_KEY: &str = "jetstream-key-5b8f93e4d1c2";

/// The shipped `config/nats.conf`, on a free port, with its monitoring
/// port moved to a free one too. On nats-server 2.9, without its
/// `sync_interval` line, as docs/deployment.md says to run it there.
pub async fn shipped_nats() -> NatsServer {
    let conf = shipped_config_for_server("config/nats.conf");
    let conf = conf.to_str().expect("UTF-8 path");
    let monitor = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
        .to_string();
    NatsServer::start_with(
        &["-c", conf, "-m", &monitor],
        &[
            ("NATS_WORKER_PASSWORD", WORKER_PASSWORD),
            ("NATS_PUBLISHER_PASSWORD", PUBLISHER_PASSWORD),
            ("NATS_OPERATOR_PASSWORD", OPERATOR_PASSWORD),
            ("NATS_CONSUMER_PASSWORD", CONSUMER_PASSWORD),
            ("NATS_JETSTREAM_KEY", JETSTREAM_KEY),
        ],
    )
    .await
}

/// A client of one user, with the server's error messages in a channel.
pub struct Watched {
    pub client: Client,
    errors: mpsc::UnboundedReceiver<String>,
}

impl Watched {
    pub async fn connect(url: &str, user: &str, password: &str, inbox: &str) -> Self {
        let (tx, errors) = mpsc::unbounded_channel();
        let client = ConnectOptions::with_user_and_password(user.into(), password.into())
            .custom_inbox_prefix(inbox)
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let Event::ServerError(e) = event {
                        let _ = tx.send(e.to_string());
                    }
                }
            })
            .connect(url)
            .await
            .expect("connect as a configured user");
        Self { client, errors }
    }

    /// The next error the server sent this client.
    pub async fn next_error(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.errors.recv())
            .await
            .expect("an error from the server in time")
            .expect("client open")
    }

    /// Asserts that subscribing to `subject` is refused.
    pub async fn assert_cannot_subscribe(&mut self, subject: &str) {
        let _sub = self
            .client
            .subscribe(subject.to_owned())
            .await
            .expect("sent");
        self.client.flush().await.expect("flush");
        self.assert_violation("Subscription", subject).await;
    }

    /// Asserts that publishing to `subject` is refused.
    pub async fn assert_cannot_publish(&mut self, subject: &str) {
        self.client
            .publish(subject.to_owned(), "x".into())
            .await
            .expect("sent");
        self.client.flush().await.expect("flush");
        self.assert_violation("Publish", subject).await;
    }

    /// The next error is the permissions violation of `op` on `subject`:
    /// nothing before it was refused.
    async fn assert_violation(&mut self, op: &str, subject: &str) {
        let error = self.next_error().await;
        assert!(
            error.contains(&format!("permissions violation for {op} to \"{subject}\""))
                || error.contains(&format!("Permissions Violation for {op} to \"{subject}\"")),
            "expected a violation of {op} to {subject}, got {error:?}"
        );
    }

    /// Asserts that the server refused nothing so far: a refused operation
    /// sent now is the first error to arrive.
    pub async fn assert_nothing_refused(&mut self) {
        self.assert_cannot_publish("nobody.may.publish.this").await;
    }
}

/// Item 5: the publisher announces rotations and reads its own inbox, and
/// nothing else; the consumer follows outcomes and cannot announce or read
/// rotations.
#[tokio::test]
async fn the_shipped_config_gives_each_user_only_what_it_needs() {
    let nats = shipped_nats().await;
    let mut publisher = Watched::connect(
        &nats.url,
        "publisher",
        PUBLISHER_PASSWORD,
        "_INBOX_publisher",
    )
    .await;
    let mut consumer =
        Watched::connect(&nats.url, "consumer", CONSUMER_PASSWORD, "_INBOX_consumer").await;

    // What the consumer may follow arrives.
    let completed = consumer
        .client
        .subscribe("vault.approle.rotation.completed")
        .await
        .unwrap();
    consumer.client.flush().await.unwrap();
    consumer.assert_nothing_refused().await;

    publisher
        .client
        .publish("vault.approle.rotated", "{}".into())
        .await
        .unwrap();
    publisher
        .client
        .publish("vault.approle.rotate", "{}".into())
        .await
        .unwrap();
    let _inbox = publisher
        .client
        .subscribe("_INBOX_publisher.mine")
        .await
        .unwrap();
    publisher.client.flush().await.unwrap();
    publisher.assert_nothing_refused().await;
    for subject in [
        "_INBOX.>",
        ">",
        "vault.approle.rotated",
        "$JS.API.>",
        "_INBOX_consumer.>",
    ] {
        publisher.assert_cannot_subscribe(subject).await;
    }
    for subject in [
        "vault.approle.rotation.completed",
        "vault.approle.rotation.failed",
        "vault.approle.rollback",
        "vault.approle.renew",
        "$JS.API.STREAM.CREATE.VAULT_ROTATIONS",
    ] {
        publisher.assert_cannot_publish(subject).await;
    }

    // Rollbacks and renewals are the operator's, with status, and nothing
    // else.
    let mut operator =
        Watched::connect(&nats.url, "operator", OPERATOR_PASSWORD, "_INBOX_operator").await;
    for subject in [
        "vault.approle.rollback",
        "vault.approle.renew",
        "vault.approle.status",
    ] {
        operator.client.publish(subject, "{}".into()).await.unwrap();
    }
    let _inbox = operator
        .client
        .subscribe("_INBOX_operator.mine")
        .await
        .unwrap();
    operator.client.flush().await.unwrap();
    operator.assert_nothing_refused().await;
    for subject in ["vault.approle.rotated", "vault.approle.rotate"] {
        operator.assert_cannot_publish(subject).await;
    }
    operator.assert_cannot_subscribe("_INBOX_publisher.>").await;

    for subject in ["vault.approle.rotated", "vault.approle.rotate", "_INBOX.>"] {
        consumer.assert_cannot_subscribe(subject).await;
    }
    for subject in [
        "vault.approle.rotated",
        "vault.approle.rotate",
        "vault.approle.rotation.completed",
        "$JS.API.STREAM.DELETE.VAULT_ROTATION_RESULTS",
    ] {
        consumer.assert_cannot_publish(subject).await;
    }
    drop(completed);
}

/// A test PKI: a CA, a server certificate for 127.0.0.1 and localhost, and
/// a client certificate, as PEM files in a directory of their own.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "rotation-worker test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let leaf = |name: &str, sans: Vec<String>, usage| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(
                dir.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )
            .unwrap();
        };
        leaf(
            "server",
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        leaf("client", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth);
        Self { dir }
    }

    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

/// A JWT signed by `issuer`, as nats-server's operator mode reads them.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = serde_json::json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

/// Operator mode: the server configuration (operator, one account with
/// JetStream, preloaded) and a creds file for a user of that account.
pub fn operator_mode() -> (String, String) {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        "test-operator",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let limits = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        "rotations",
        serde_json::json!({"type": "account", "version": 2, "limits": limits}),
    );
    let system = nkeys::KeyPair::new_account();
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        "SYS",
        serde_json::json!({"type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        "worker",
        serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1}),
    );
    let conf = format!(
        "operator: \"{operator_jwt}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {sys}: \"{system_jwt}\"\n  {}: \"{account_jwt}\"\n}}\n",
        account.public_key(),
        sys = system.public_key(),
    );
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    (conf, creds)
}

/// A server started from `conf` (written to its directory, which also
/// holds the files `files` names), on a free port, with JetStream.
async fn nats_with(conf: &str, files: &[(&str, &str)]) -> NatsServer {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let path = dir.path().join("nats.conf");
    std::fs::write(
        &path,
        format!("listen: 127.0.0.1:4222\njetstream {{ store_dir: \"js\" }}\n{conf}"),
    )
    .unwrap();
    let mut nats = NatsServer::start_with(&["-c", path.to_str().unwrap()], &[]).await;
    nats.client_files = Some(dir.keep());
    nats
}

/// One owner with one integration, on SQLite; the worker under test is
/// started against whichever server a test builds.
struct Rig {
    env: TestEnv,
    store: TestStore,
    key: String,
    integration: Uuid,
}

impl Rig {
    async fn new() -> Self {
        let env = TestEnv::on(Backend::Sqlite);
        let store = env.store().await;
        let key = create_api_key(&store, "acme").await;
        let integration = create_integration(&store, "acme", "prod", "s.initial")
            .await
            .id;
        Self {
            env,
            store,
            key,
            integration,
        }
    }

    /// Starts the worker with `extra` settings, rotates through it by
    /// request-reply (the pull consumer and the service both work), stops
    /// it, and returns its logs, which must hold no credential in `secrets`.
    async fn assert_serves(&self, nats: &NatsServer, extra: &[(&str, &str)], secrets: &[&str]) {
        let worker = self.env.worker(nats, extra).await;
        let client = nats.client().await;
        let secret = format!("s.{}", Uuid::new_v4().simple());
        let reply = client
            .request_with_headers(
                "vault.approle.rotate",
                headers(Some(&self.key), Some(&Uuid::new_v4().to_string())),
                body(json!({"integrationId": self.integration, "secretId": secret})),
            )
            .await
            .expect("a reply");
        assert!(
            reply
                .headers
                .as_ref()
                .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none())
        );
        assert_eq!(secret_of(&self.store, self.integration).await, secret);
        let (code, logs) = worker.terminate().await;
        assert_eq!(code, Some(0));
        assert_eq!(
            leaked_secret(logs.as_bytes(), secrets.iter().copied()),
            None
        );
        let shown = nats.url.replace("nats://", "").replace("tls://", "");
        assert!(logs.contains(&shown), "the logs name the server");
    }
}

/// A free port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

#[tokio::test]
async fn user_and_password_in_the_url_or_in_settings() {
    let mut nats = nats_with("authorization { user: svc, password: \"p@ss w0rd\" }", &[]).await;
    nats.client_options =
        |_| ConnectOptions::with_user_and_password("svc".into(), "p@ss w0rd".into());
    let rig = Rig::new().await;
    let with_creds = format!("nats://svc:p%40ss%20w0rd@127.0.0.1:{}", nats.port);
    rig.assert_serves(
        &nats,
        &[("NATS_URL", &with_creds)],
        &["p@ss w0rd", "p%40ss"],
    )
    .await;
    rig.assert_serves(
        &nats,
        &[
            ("ROTATION_WORKER_NATS__USER", "svc"),
            ("ROTATION_WORKER_NATS__PASSWORD", "p@ss w0rd"),
        ],
        &["p@ss w0rd"],
    )
    .await;
}

#[tokio::test]
async fn a_token_in_the_url_or_in_settings() {
    let mut nats = nats_with("authorization { token: \"t0ken-8c1e\" }", &[]).await;
    nats.client_options = |_| ConnectOptions::with_token("t0ken-8c1e".into());
    let rig = Rig::new().await;
    let with_token = format!("nats://t0ken-8c1e@127.0.0.1:{}", nats.port);
    rig.assert_serves(&nats, &[("NATS_URL", &with_token)], &["t0ken-8c1e"])
        .await;
    rig.assert_serves(
        &nats,
        &[("ROTATION_WORKER_NATS__TOKEN", "t0ken-8c1e")],
        &["t0ken-8c1e"],
    )
    .await;
}

#[tokio::test]
async fn an_nkey_seed_file() {
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let conf = format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    );
    let mut nats = nats_with(&conf, &[("user.nk", &seed)]).await;
    nats.client_options = |n| {
        let dir = n.client_files.as_ref().unwrap();
        let seed = std::fs::read_to_string(dir.join("user.nk")).unwrap();
        ConnectOptions::with_nkey(seed)
    };
    let file = nats.client_files.as_ref().unwrap().join("user.nk");
    let rig = Rig::new().await;
    rig.assert_serves(
        &nats,
        &[(
            "ROTATION_WORKER_NATS__NKEY_SEED_FILE",
            file.to_str().unwrap(),
        )],
        &[&seed],
    )
    .await;
}

#[tokio::test]
async fn a_creds_file_in_operator_mode() {
    let (conf, creds) = operator_mode();
    let mut nats = nats_with(&conf, &[("worker.creds", &creds)]).await;
    nats.client_options = |n| {
        let dir = n.client_files.as_ref().unwrap();
        let creds = std::fs::read_to_string(dir.join("worker.creds")).unwrap();
        ConnectOptions::with_credentials(&creds).unwrap()
    };
    let file = nats.client_files.as_ref().unwrap().join("worker.creds");
    let seed = creds
        .lines()
        .find(|l| l.starts_with("SU"))
        .unwrap()
        .to_owned();
    let rig = Rig::new().await;
    rig.assert_serves(
        &nats,
        &[("ROTATION_WORKER_NATS__CREDS_FILE", file.to_str().unwrap())],
        &[&seed],
    )
    .await;
}

/// A server with TLS from `pki` (`verify`: it requires a client
/// certificate), on a `tls://` URL; the test's clients trust the CA and
/// offer the client certificate.
async fn tls_nats(pki: &Pki, verify: bool) -> NatsServer {
    install_provider();
    let conf = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\", ca_file: \"{}\", verify: {verify} }}",
        pki.path("server.pem"),
        pki.path("server-key.pem"),
        pki.path("ca.pem"),
    );
    let mut nats = nats_with(&conf, &[]).await;
    nats.url = format!("tls://127.0.0.1:{}", nats.port);
    nats.client_files = Some(pki.dir.path().to_owned());
    nats.client_options = |n| {
        let dir = n.client_files.as_ref().unwrap();
        ConnectOptions::new()
            .add_root_certificates(dir.join("ca.pem"))
            .add_client_certificate(dir.join("client.pem"), dir.join("client-key.pem"))
            .require_tls(true)
    };
    nats
}

/// TLS against a private CA: the worker trusts the server through
/// `nats.tls_ca_file` and a `tls://` URL.
#[tokio::test]
async fn tls_with_a_private_ca() {
    let pki = Pki::new();
    let nats = tls_nats(&pki, false).await;
    let rig = Rig::new().await;
    let url = nats.url.clone();
    let ca = pki.path("ca.pem");
    let settings = [
        ("NATS_URL", url.as_str()),
        ("ROTATION_WORKER_NATS__TLS_CA_FILE", &ca),
    ];
    rig.assert_serves(&nats, &settings, &[]).await;
}

/// Mutual TLS: the server verifies the worker's client certificate; a
/// plain `nats://` URL, TLS required because certificates are configured.
#[tokio::test]
async fn mutual_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let nats = tls_nats(&pki, true).await;
    let rig = Rig::new().await;
    let client_key = std::fs::read_to_string(pki.path("client-key.pem")).unwrap();
    let key_body: String = client_key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let plain = nats.url.replace("tls://", "nats://");
    rig.assert_serves(
        &nats,
        &[
            ("NATS_URL", plain.as_str()),
            ("ROTATION_WORKER_NATS__TLS_CA_FILE", &pki.path("ca.pem")),
            (
                "ROTATION_WORKER_NATS__TLS_CERT_FILE",
                &pki.path("client.pem"),
            ),
            (
                "ROTATION_WORKER_NATS__TLS_KEY_FILE",
                &pki.path("client-key.pem"),
            ),
        ],
        &[&key_body[..40]],
    )
    .await;
}

/// A seed list whose first server is down: the worker connects to the one
/// that answers.
#[tokio::test]
async fn a_server_list_with_the_first_one_down() {
    let nats = NatsServer::start().await;
    let rig = Rig::new().await;
    let list = format!(
        "nats://127.0.0.1:{},nats://127.0.0.1:{}",
        dead_port(),
        nats.port
    );
    rig.assert_serves(&nats, &[("NATS_URL", &list)], &[]).await;
}

/// Waits for `n` messages on `subscriber`.
async fn await_outcomes(subscriber: &mut async_nats::Subscriber, n: usize) {
    for _ in 0..n {
        tokio::time::timeout(
            Duration::from_secs(20),
            futures::StreamExt::next(subscriber),
        )
        .await
        .expect("an outcome event")
        .expect("subscription open");
    }
}

/// The test process's own TLS clients need a crypto provider too.
fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Every file under `dir`, concatenated.
fn files_under(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                out.extend_from_slice(&bytes);
            }
        }
    }
    out
}

/// Items 4 and 5 with the worker: it runs as `worker` under the shipped
/// config without one permissions violation; publishers get replies and
/// PubAcks on their own inbox, the consumer gets the outcome; and the
/// JetStream store holds no secret_id or API key in clear, also while
/// messages wait in it.
#[tokio::test]
async fn the_worker_runs_as_worker_and_no_secret_rests_in_clear() {
    let mut nats = shipped_nats().await;
    nats.discoverable = false;
    let rig = Rig::new().await;
    let url = format!("nats://worker:{WORKER_PASSWORD}@127.0.0.1:{}", nats.port);
    let publisher = Watched::connect(
        &nats.url,
        "publisher",
        PUBLISHER_PASSWORD,
        "_INBOX_publisher",
    )
    .await;
    let consumer =
        Watched::connect(&nats.url, "consumer", CONSUMER_PASSWORD, "_INBOX_consumer").await;
    let mut completed = consumer
        .client
        .subscribe("vault.approle.rotation.completed")
        .await
        .unwrap();
    consumer.client.flush().await.unwrap();
    let js = async_nats::jetstream::new(publisher.client.clone());
    let mut secrets = vec![rig.key.clone()];
    let mut rotate = |event: bool| {
        let secret = format!("s.{}", Uuid::new_v4().simple());
        secrets.push(secret.clone());
        let headers = headers(Some(&rig.key), Some(&Uuid::new_v4().to_string()));
        let body = body(json!({"integrationId": rig.integration, "secretId": secret}));
        let (publisher, js) = (publisher.client.clone(), js.clone());
        async move {
            if event {
                let ack = js.publish_with_headers("vault.approle.rotated", headers, body);
                assert!(!ack.await.unwrap().await.unwrap().duplicate);
            } else {
                let reply = publisher
                    .request_with_headers("vault.approle.rotate", headers, body)
                    .await
                    .unwrap();
                assert!(
                    reply
                        .headers
                        .is_none_or(|h| h.get("Nats-Service-Error-Code").is_none())
                );
            }
            secret
        }
    };

    let worker = rig.env.worker(&nats, &[("NATS_URL", &url)]).await;
    rotate(false).await;
    let last = rotate(true).await;
    await_outcomes(&mut completed, 2).await;
    assert_eq!(secret_of(&rig.store, rig.integration).await, last);
    let (code, _) = worker.terminate().await;
    assert_eq!(code, Some(0));

    // Messages waiting for a worker: encrypted in the server's files.
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(rotate(true).await);
    }
    let at_rest = files_under(nats.store_dir.path());
    assert!(at_rest.len() > 1000, "the stream has files");
    let all = || secrets.iter().map(String::as_str);
    assert_eq!(leaked_secret(&at_rest, all()), None);

    let worker = rig.env.worker(&nats, &[("NATS_URL", &url)]).await;
    await_outcomes(&mut completed, 3).await;
    assert_eq!(
        &secret_of(&rig.store, rig.integration).await,
        waiting.last().unwrap()
    );
    worker.terminate().await;
    // The operator's dead-letter commands work as `worker` too.
    let listed = rig
        .env
        .cli_with(&["dlq", "list"], "", &[("NATS_URL", &url)])
        .await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert_eq!(listed.json(), json!([]));
    let replayed = rig
        .env
        .cli_with(&["dlq", "replay"], "", &[("NATS_URL", &url)])
        .await;
    assert_eq!(replayed.code, 0, "{replayed:?}");
    let log = std::fs::read_to_string(&nats.log).unwrap();
    assert!(!log.contains("Permissions Violation"), "{log}");
    assert!(log.contains("Encryption:      ChaCha20-Poly1305"));
    assert_eq!(
        leaked_secret(&files_under(nats.store_dir.path()), all()),
        None
    );
}

/// Item 4: while the worker drains a backlog, a subscriber on `_INBOX.>`
/// (what publishers may subscribe to) sees no secret: pull deliveries
/// travel on the worker's own inbox prefix.
#[tokio::test]
async fn a_subscriber_on_the_default_inbox_sees_no_secret() {
    let nats = NatsServer::start().await;
    let rig = Rig::new().await;
    let snooper = nats.client().await;
    let mut inbox = snooper.subscribe("_INBOX.>").await.unwrap();
    snooper.flush().await.unwrap();
    let worker = rig.env.worker(&nats, &[]).await;
    let publisher = nats.client().await;
    let js = async_nats::jetstream::new(publisher.clone());
    let mut completed = publisher
        .subscribe("vault.approle.rotation.completed")
        .await
        .unwrap();
    publisher.flush().await.unwrap();
    let mut secrets = vec![rig.key.clone()];
    for _ in 0..20 {
        let secret = format!("s.{}", Uuid::new_v4().simple());
        secrets.push(secret.clone());
        js.publish_with_headers(
            "vault.approle.rotated",
            headers(Some(&rig.key), Some(&Uuid::new_v4().to_string())),
            body(json!({"integrationId": rig.integration, "secretId": secret})),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    await_outcomes(&mut completed, 20).await;
    worker.terminate().await;
    // Everything that reached the snooper (the worker is gone, and the
    // flush's answer follows whatever the server sent it before): our own
    // PubAcks, and nothing of the worker's.
    snooper.flush().await.unwrap();
    let mut seen = Vec::new();
    while let Some(Some(message)) =
        futures::FutureExt::now_or_never(futures::StreamExt::next(&mut inbox))
    {
        seen.extend_from_slice(&message.payload);
    }
    assert!(!seen.is_empty(), "the snooper saw the PubAcks");
    assert_eq!(
        leaked_secret(&seen, secrets.iter().map(String::as_str)),
        None
    );
}
