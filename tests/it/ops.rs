//! An operator's first bad day: commands that only read create nothing,
//! the dead-letter list needs no database, and every command says which
//! store it opened.

use crate::helpers::{Backend, NatsServer, TestEnv, create_with_cli, secret_of};

/// A database that exists right now, for a PostgreSQL world.
async fn database_exists(name: &str) -> bool {
    use sqlx::{ConnectOptions, Connection};
    let options: sqlx::postgres::PgConnectOptions = crate::helpers::server_url().parse().unwrap();
    let mut conn = options.connect().await.unwrap();
    let found: Option<(i32,)> = sqlx::query_as("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    found.is_some()
}

const READ_ONLY: [&[&str]; 3] = [
    &["integration", "list"],
    &["api-key", "list"],
    &["integration", "get", "6f1c2a9e-3c2d-4b8a-9d4e-0a1b2c3d4e5f"],
];

/// Item 5: on SQLite, a read-only command in an empty directory fails
/// with the absolute path it looked at, and leaves no file, directory or
/// key file; `migrate` then creates the store, and the same commands work.
#[tokio::test]
async fn read_only_commands_create_nothing_on_sqlite() {
    let env = TestEnv::on(Backend::Sqlite);
    let data = env.dir.path().join("data");
    let expected = format!("no store at sqlite:{}", env.sqlite_file().display());
    for args in READ_ONLY {
        env.cli(args, "").await.assert_fails_with(&expected);
        assert!(!data.exists(), "{args:?} created {}", data.display());
        assert!(!env.key_file().exists(), "{args:?} wrote a key file");
    }
    let migrated = env.cli(&["migrate"], "").await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    assert!(
        migrated
            .stderr
            .contains(&format!("store=sqlite:{}", env.sqlite_file().display()))
    );
    let listed = env.cli(&["integration", "list"], "").await;
    assert_eq!(listed.code, 0, "{listed:?}");
    assert_eq!(listed.json(), serde_json::json!([]));
}

/// Item 5: on PostgreSQL, a database name that does not exist is reported
/// (its URL without the password) and not created.
#[tokio::test]
async fn read_only_commands_create_nothing_on_postgres() {
    let env = TestEnv::on(Backend::Postgres);
    let name = env.db.as_ref().unwrap().name.clone();
    let mut url = url::Url::parse(&env.db.as_ref().unwrap().url).unwrap();
    url.set_password(Some("hunter2-b7c1")).unwrap();
    let with_password = url.to_string();
    for args in READ_ONLY {
        let out = env
            .cli_with(args, "", &[("DATABASE_URL", &with_password)])
            .await;
        out.assert_fails_with("no store at postgres://postgres:***@");
        assert!(out.stderr.contains(&name));
        assert!(!out.stderr.contains("hunter2-b7c1"), "{out:?}");
        assert!(
            !database_exists(&name).await,
            "{args:?} created the database"
        );
    }
    assert!(
        !env.key_file().exists(),
        "a read-only command wrote a key file"
    );
    let created = create_with_cli(&env, "acme", "prod", "s.initial").await;
    assert_eq!(created.code, 0, "{created:?}");
    assert!(database_exists(&name).await);
}

/// Item 5: `dlq list` answers from NATS alone, with the database down.
#[tokio::test]
async fn the_dead_letter_list_needs_no_database() {
    let env = TestEnv::on(Backend::Postgres);
    let nats = NatsServer::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let unreachable = format!("postgres://postgres@127.0.0.1:{closed}/nowhere");
    // The stream exists once a worker has run; create it as the worker does.
    let worker = env.worker(&nats, &[]).await;
    worker.terminate().await;
    let out = env
        .cli_with(
            &["dlq", "list"],
            "",
            &[("DATABASE_URL", &unreachable), ("NATS_URL", &nats.url)],
        )
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), serde_json::json!([]));
}

/// Item 1: NATS down at start. The probes answer at once (`/healthz` 200,
/// `/readyz` 503 naming the server), every attempt is one WARN line naming
/// it, and the worker gets ready as soon as NATS comes.
#[tokio::test]
async fn the_probes_answer_while_nats_is_down_at_start() {
    use crate::helpers::{free_port, http_get};
    let env = TestEnv::on(Backend::Sqlite);
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let worker = env.start_worker(&url, &[]);
    let addr = worker.http_addr().await;
    assert_eq!(http_get(&addr, "/healthz").await, (200, "ok\n".into()));
    worker.logs.wait_for("NATS unreachable", 2).await;
    assert_eq!(
        http_get(&addr, "/readyz").await,
        (503, format!("not ready: NATS unreachable: {url}\n"))
    );
    let text = worker.logs.text();
    let attempts: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("NATS unreachable"))
        .collect();
    for line in &attempts {
        assert!(
            line.contains("WARN") && line.contains(&format!("servers={url}")),
            "{line}"
        );
    }
    let _nats = NatsServer::start_on(port).await;
    worker.wait_for_log("rotation-worker ready").await;
    assert_eq!(http_get(&addr, "/readyz").await, (200, "ready\n".into()));
    let (code, _) = worker.terminate().await;
    assert_eq!(code, Some(0));
}

/// Item 1: SIGTERM and SIGINT end the process within a second at any
/// point of start-up (here: while it waits for NATS).
#[tokio::test]
async fn a_signal_during_start_up_ends_the_process_at_once() {
    let env = TestEnv::on(Backend::Sqlite);
    let url = format!("nats://127.0.0.1:{}", crate::helpers::free_port());
    for signal in ["TERM", "INT"] {
        let mut worker = env.start_worker(&url, &[]);
        worker.wait_for_log("NATS unreachable").await;
        let (took, code) = worker.signal(signal).await;
        assert_eq!(code, Some(0), "SIG{signal}");
        assert!(
            took < std::time::Duration::from_millis(1500),
            "SIG{signal} took {took:?}"
        );
    }
}

/// A request's reply and how long it took from sending.
async fn timed_request(
    client: &async_nats::Client,
    key: &str,
    integration: uuid::Uuid,
    secret: &str,
) -> (std::time::Duration, Option<String>) {
    use crate::worker::{body, headers};
    let sent = std::time::Instant::now();
    let reply = client
        .request_with_headers(
            "vault.approle.rotate",
            headers(Some(key), Some(&uuid::Uuid::new_v4().to_string())),
            body(serde_json::json!({"integrationId": integration, "secretId": secret})),
        )
        .await
        .expect("a reply");
    let code = reply
        .headers
        .and_then(|h| h.get("Nats-Service-Error-Code").map(|v| v.to_string()));
    (sent.elapsed(), code)
}

/// The default `worker.request_timeout_ms`, and the slack a loaded test
/// machine gets beyond it.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(2500);
const SLACK: std::time::Duration = std::time::Duration::from_millis(1000);

/// A worker in this process on PostgreSQL, with one owner's integration.
struct Running {
    env: TestEnv,
    /// Kept running for the worker.
    _nats: NatsServer,
    store: crate::helpers::TestStore,
    key: String,
    it: rotation_worker::domain::Integration,
    worker: crate::helpers::TestApp,
    client: async_nats::Client,
}

impl Running {
    async fn start() -> Self {
        use crate::helpers::{create_api_key, create_integration};
        let env = TestEnv::on(Backend::Postgres);
        let nats = NatsServer::start().await;
        let store = env.store().await;
        let key = create_api_key(&store, "acme").await;
        let it = create_integration(&store, "acme", "prod", "s.initial").await;
        let worker = env.spawn_worker(&nats, &[]).await;
        let client = nats.client().await;
        Self {
            env,
            _nats: nats,
            store,
            key,
            it,
            worker,
            client,
        }
    }
}

/// Item 2: a request whose row another transaction holds is answered 503
/// within `worker.request_timeout_ms`, not when the lock goes; once it has
/// gone, the same rotation applies.
#[tokio::test]
async fn a_request_on_a_locked_row_is_answered_in_bounded_time() {
    let r = Running::start().await;

    let holder = crate::helpers::hold_row(r.store.pg_pool().unwrap(), r.it.id).await;
    let (took, code) = timed_request(&r.client, &r.key, r.it.id, "s.locked").await;
    assert_eq!(code.as_deref(), Some("503"));
    assert!(took < REQUEST_TIMEOUT + SLACK, "answered after {took:?}");
    assert_eq!(secret_of(&r.store, r.it.id).await, "s.initial");
    holder.rollback().await.unwrap();

    let (_, code) = timed_request(&r.client, &r.key, r.it.id, "s.locked").await;
    assert_eq!(code, None);
    assert_eq!(secret_of(&r.store, r.it.id).await, "s.locked");
    r.worker.stop().await;
}

/// Item 2: with PostgreSQL refusing connections, every request is
/// answered 503 within the bound, the second one in the lane too, and
/// `/readyz` says so within 500 ms; once it accepts them again, requests
/// apply.
#[tokio::test]
async fn requests_are_answered_in_bounded_time_while_postgresql_refuses_connections() {
    use crate::helpers::http_get;
    use sqlx::{ConnectOptions, Connection};
    let r = Running::start().await;
    let name = r.env.db.as_ref().unwrap().name.clone();
    let addr = r.worker.http_addr();

    let admin: sqlx::postgres::PgConnectOptions = crate::helpers::server_url().parse().unwrap();
    let mut admin = admin.connect().await.unwrap();
    let refuse = |allow: bool| format!("ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {allow}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(refuse(false)))
        .execute(&mut admin)
        .await
        .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut admin)
        .await
        .unwrap();

    let (first, second) = tokio::join!(
        timed_request(&r.client, &r.key, r.it.id, "s.down-1"),
        timed_request(&r.client, &r.key, r.it.id, "s.down-2"),
    );
    for (took, code) in [first, second] {
        assert_eq!(code.as_deref(), Some("503"));
        assert!(took < REQUEST_TIMEOUT + SLACK, "answered after {took:?}");
    }
    let asked = std::time::Instant::now();
    let (status, body) = http_get(&addr, "/readyz").await;
    let took = asked.elapsed();
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: database unavailable\n")
    );
    assert!(
        took < std::time::Duration::from_millis(500) + SLACK,
        "/readyz took {took:?}"
    );

    sqlx::raw_sql(sqlx::AssertSqlSafe(refuse(true)))
        .execute(&mut admin)
        .await
        .unwrap();
    admin.close().await.unwrap();
    let (_, code) = timed_request(&r.client, &r.key, r.it.id, "s.back").await;
    assert_eq!(code, None);
    assert_eq!(secret_of(&r.store, r.it.id).await, "s.back");
    r.worker.stop().await;
}
