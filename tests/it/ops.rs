//! An operator's first bad day: commands that only read create nothing,
//! the dead-letter list needs no database, and every command says which
//! store it opened.

use crate::helpers::{Backend, NatsServer, TestEnv, create_with_cli};

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
