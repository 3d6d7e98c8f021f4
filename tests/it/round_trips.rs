//! How many statements a request costs the database. The happy path of a
//! request on PostgreSQL is one statement in one round trip (its own
//! transaction); a batch is five round trips (`BEGIN`, the keys and rows,
//! the event ids, the writes, `COMMIT`), four when it writes nothing. The
//! worker's SQL is counted from sqlx's statement log (`sqlx::query` at
//! DEBUG), which shows every statement sent but `BEGIN`. And each of those
//! round trips leaves at once: the worker's connections to PostgreSQL send
//! without delay.

use std::net::SocketAddr;

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestApp, server_url};
use crate::worker::{Fixture, body, headers};

/// Statements logged so far on behalf of a message (inside its `process`
/// span; the hourly pruning, for one, is not).
fn statements(logs: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains("sqlx::query") && l.contains("process{"))
        .count()
}

/// Sends a request rotating `integration` to `secret` (as event `msg_id`)
/// and returns how many statements it cost, once its 200 and its outcome
/// event are in.
async fn request_cost(
    f: &mut Fixture,
    app: &TestApp,
    integration: Uuid,
    msg_id: Option<&str>,
    secret: &str,
) -> usize {
    f.remember_secret(secret);
    let before = statements(&app.logs.text());
    let key = f.key.clone();
    let reply = f
        .request(
            headers(Some(&key), msg_id),
            body(json!({"integrationId": integration, "secretId": secret})),
        )
        .await;
    assert_eq!(reply.body["id"], json!(integration), "{:?}", reply.body);
    f.next_outcome().await;
    statements(&app.logs.text()) - before
}

#[tokio::test]
async fn a_request_on_the_happy_path_is_one_statement_on_postgres() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.trips-initial").await;
    let app = f
        .env
        .spawn_worker(
            &f.nats,
            &[("ROTATION_WORKER_LOG__LEVEL", "info,sqlx::query=debug")],
        )
        .await;
    let mut costs = Vec::new();
    for (i, msg_id) in [Some("trip-1"), None, Some("trip-3")]
        .into_iter()
        .enumerate()
    {
        let secret = format!("s.trips-{i}");
        costs.push(request_cost(&mut f, &app, it.id, msg_id, &secret).await);
        assert_eq!(f.secret(it.id).await, secret);
    }
    // The first rotation of a row since the worker started takes the batch
    // path (the keys and the locked rows, the event ids, the plan, COMMIT):
    // it opens the stored secret there, and the single statement then
    // overwrites only a ciphertext the worker opened or wrote. The next
    // ones are one statement each.
    assert_eq!(costs, [4, 1, 1], "statements per request");

    // A rotation the single statement cannot decide takes the batch path:
    // that statement (which changed nothing), then (after BEGIN, which the
    // log leaves out) the keys and the locked rows in one statement, the
    // event ids, the plan written in one statement, COMMIT. A row without
    // a digest is such a case.
    f.store.forget_digest(it.id).await;
    let cost = request_cost(&mut f, &app, it.id, Some("trip-4"), "s.trips-batch").await;
    assert_eq!(cost, 5, "a batch that writes");
    assert_eq!(f.secret(it.id).await, "s.trips-batch");
    assert_eq!(f.rotation_count(it.id).await, 4);

    // A repeat takes the batch path too, and writes nothing: one statement
    // fewer, and the same answer as ever.
    let cost = request_cost(&mut f, &app, it.id, Some("trip-4"), "s.trips-batch").await;
    assert_eq!(cost, 4, "a batch that writes nothing");
    assert_eq!(f.rotation_count(it.id).await, 4);

    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// Every TCP connection the worker holds to PostgreSQL has `TCP_NODELAY`.
/// sqlx 0.9.0 leaves Nagle's algorithm on: a statement larger than one
/// segment (a batch's UPDATE of a few hundred rows is about 90 KB) sent
/// its tail only once the server's delayed ACK came, 40 ms later, and that
/// halved the drain. The vendored sqlx-core sets it (`vendor/README.md`);
/// this test keeps it set when sqlx is upgraded.
#[tokio::test]
async fn the_workers_connections_to_postgres_send_without_delay() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.nodelay-initial").await;
    // The real binary: its own process, its own sockets.
    let worker = f.env.worker(&f.nats, &[]).await;
    f.remember_secret("s.nodelay-1");
    let reply = f
        .request(
            headers(Some(&f.key.clone()), Some("nodelay-1")),
            body(json!({"integrationId": it.id, "secretId": "s.nodelay-1"})),
        )
        .await;
    assert_eq!(reply.body["id"], json!(it.id), "{:?}", reply.body);

    let port = url::Url::parse(&server_url())
        .expect("database URL")
        .port()
        .unwrap_or(5432);
    let sockets = tcp_sockets(worker.pid());
    let to_postgres: Vec<bool> = sockets
        .iter()
        .filter(|(peer, _)| peer.port() == port)
        .map(|(_, nodelay)| *nodelay)
        .collect();
    assert!(
        !to_postgres.is_empty(),
        "no connection to PostgreSQL among {sockets:?}"
    );
    assert!(
        to_postgres.iter().all(|nodelay| *nodelay),
        "TCP_NODELAY of each connection to PostgreSQL: {to_postgres:?}"
    );
    let (code, logs) = worker.terminate().await;
    assert_eq!(code, Some(0), "{logs}");
    f.assert_no_secret_leaked(&logs).await;
}

/// The connected TCP sockets of process `pid`: each peer's address and
/// whether `TCP_NODELAY` is set. Each socket is looked at through a copy
/// of its descriptor (`pidfd_getfd`), so nothing of the worker's changes.
fn tcp_sockets(pid: u32) -> Vec<(SocketAddr, bool)> {
    let pid = Pid::from_raw(pid as i32).expect("a process id");
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).expect("pidfd_open");
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the worker's descriptors") {
        let entry = entry.expect("a descriptor");
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // Closed since the listing: not one of the pool's.
        let Ok(copy) = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) else {
            continue;
        };
        let peer = rustix::net::getpeername(&copy)
            .ok()
            .flatten()
            .and_then(|a| SocketAddr::try_from(a).ok());
        // Listeners, unconnected and Unix sockets have no TCP peer.
        if let (Some(peer), Ok(nodelay)) = (peer, rustix::net::sockopt::tcp_nodelay(&copy)) {
            sockets.push((peer, nodelay));
        }
    }
    sockets
}
