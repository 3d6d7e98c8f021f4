//! A NATS deployment secured as real ones are: the shipped
//! `config/nats.conf` (users with least privilege, JetStream encrypted at
//! rest), and every way the worker can connect (TLS, mutual TLS,
//! user/password, token, nkey, creds file, a server list). Each test runs
//! its own nats-server.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};
use tokio::sync::mpsc;

use crate::helpers::NatsServer;

/// The passwords and the JetStream key the shipped config reads from its
/// environment.
pub const WORKER_PASSWORD: &str = "worker-pw-3c1f0b";
pub const PUBLISHER_PASSWORD: &str = "publisher-pw-77aa21";
pub const CONSUMER_PASSWORD: &str = "consumer-pw-9e02d4";
pub const JETSTREAM_KEY: &str = "jetstream-key-5b8f93e4d1c2";

/// The shipped `config/nats.conf`, on a free port, with its monitoring
/// port moved to a free one too.
pub async fn shipped_nats() -> NatsServer {
    let conf = concat!(env!("CARGO_MANIFEST_DIR"), "/config/nats.conf");
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
        "$JS.API.STREAM.CREATE.VAULT_ROTATIONS",
    ] {
        publisher.assert_cannot_publish(subject).await;
    }

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
