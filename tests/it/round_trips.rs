//! How many statements a request costs the database. The happy path of a
//! request on PostgreSQL is one statement in one round trip (its own
//! transaction); the worker's SQL is counted from sqlx's statement log
//! (`sqlx::query` at DEBUG), which shows every statement sent, `BEGIN` and
//! `COMMIT` included. And each of those round trips leaves at once: the
//! worker's connections to PostgreSQL send without delay.

use std::net::SocketAddr;

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
use serde_json::json;

use crate::helpers::server_url;
use crate::worker::{Fixture, body, headers};

/// Statements logged so far on behalf of a message (inside its `process`
/// span; the hourly pruning, for one, is not).
fn statements(logs: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains("sqlx::query") && l.contains("process{"))
        .count()
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
    let key = f.key.clone();
    let mut costs = Vec::new();
    for (i, msg_id) in [Some("trip-1"), None, Some("trip-3")]
        .into_iter()
        .enumerate()
    {
        let secret = format!("s.trips-{i}");
        f.remember_secret(&secret);
        let before = statements(&app.logs.text());
        let reply = f
            .request(
                headers(Some(&key), msg_id),
                body(json!({"integrationId": it.id, "secretId": secret})),
            )
            .await;
        assert_eq!(reply.body["id"], json!(it.id), "{:?}", reply.body);
        f.next_outcome().await;
        costs.push(statements(&app.logs.text()) - before);
        assert_eq!(f.secret(it.id).await, secret);
    }
    // The first rotation of a row written before digests were kept would
    // take the batch path; this row was created with its digest.
    assert_eq!(costs, [1, 1, 1], "statements per request");

    // A refusal or a repeat takes the batch path: more statements, and
    // the same answers as ever.
    let before = statements(&app.logs.text());
    let repeat = f
        .request(
            headers(Some(&key), Some("trip-3")),
            body(json!({"integrationId": it.id, "secretId": "s.trips-2"})),
        )
        .await;
    assert_eq!(repeat.body["id"], json!(it.id));
    assert!(statements(&app.logs.text()) - before > 1);
    assert_eq!(f.rotation_count(it.id).await, 3);

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
