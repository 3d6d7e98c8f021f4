//! How many statements a request costs the database. The happy path of a
//! request on PostgreSQL is one statement in one round trip (its own
//! transaction); a batch is five round trips (`BEGIN`, the keys and rows,
//! the event ids, the writes, `COMMIT`), four when it writes nothing. The
//! worker's SQL is counted from sqlx's statement log (`sqlx::query` at
//! DEBUG), which shows every statement sent but `BEGIN`. And each of those
//! round trips leaves at once: the worker's connections to PostgreSQL send
//! without delay, and a connection goes back to its pool without a round
//! trip of its own.

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
    let before = statements(&app.logs.text());
    rotate_by_request(f, integration, msg_id, secret).await;
    statements(&app.logs.text()) - before
}

/// Rotates `integration` to `secret` by request (remembered for the leak
/// search), checking its reply, and waits for its outcome event.
async fn rotate_by_request(f: &mut Fixture, integration: Uuid, msg_id: Option<&str>, secret: &str) {
    f.remember_secret(secret);
    let key = f.key.clone();
    let payload = body(json!({"integrationId": integration, "secretId": secret}));
    let reply = f.request(headers(Some(&key), msg_id), payload).await;
    assert_eq!(reply.body["id"], json!(integration), "{:?}", reply.body);
    f.next_outcome().await;
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
    let sockets = tcp_connections(worker.pid());
    let to_postgres: Vec<bool> = sockets
        .iter()
        .filter(|c| c.peer.port() == port)
        .map(|c| c.nodelay)
        .collect();
    let peers: Vec<SocketAddr> = sockets.iter().map(|c| c.peer).collect();
    assert!(
        !to_postgres.is_empty(),
        "no connection to PostgreSQL among {peers:?}"
    );
    assert!(
        to_postgres.iter().all(|nodelay| *nodelay),
        "TCP_NODELAY of each connection to PostgreSQL: {to_postgres:?}"
    );
    let (code, logs) = worker.terminate().await;
    assert_eq!(code, Some(0), "{logs}");
    f.assert_no_secret_leaked(&logs).await;
}

/// A connection goes back to its pool without a round trip of its own.
/// sqlx 0.9.0 pings every connection it takes back (a `Sync` and its
/// answer): one more round trip per statement, for the worker and for
/// PostgreSQL. The vendored sqlx-core flushes instead (`vendor/README.md`).
/// On loopback, with `TCP_NODELAY`, a statement is one segment sent, so
/// requests of one statement each send as many segments as statements.
#[tokio::test]
async fn a_connection_goes_back_to_its_pool_without_a_round_trip() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.release-initial").await;
    let worker = f
        .env
        .worker(
            &f.nats,
            &[
                // `RUST_LOG` wins over `log.level`, and the tests set it.
                ("RUST_LOG", "info,sqlx::query=debug"),
                // One connection: a statement's first use on a connection
                // prepares it (a round trip of its own), once.
                ("ROTATION_WORKER_DATABASE__MAX_CONNECTIONS", "1"),
                ("ROTATION_WORKER_WORKER__LANES", "1"),
            ],
        )
        .await;
    // The first rotation of the row takes the batch path (four statements
    // and BEGIN); the next ones are one statement each, prepared by the
    // second.
    rotate(&mut f, it.id, 0).await;
    rotate(&mut f, it.id, 1).await;
    // The start's sweep of expired previous secrets runs beside it; its
    // last statement is this one.
    worker
        .wait_for_log("UPDATE integrations SET previous_ciphertext = NULL")
        .await;
    let port = url::Url::parse(&server_url())
        .expect("database URL")
        .port()
        .unwrap_or(5432);
    let before = segments_sent_to(worker.pid(), port);
    const REQUESTS: usize = 5;
    for i in 2..2 + REQUESTS {
        rotate(&mut f, it.id, i).await;
    }
    let after = segments_sent_to(worker.pid(), port);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "the same connections"
    );
    let sent: u32 = after.iter().map(|(socket, n)| n - before[socket]).sum();
    assert_eq!(f.secret(it.id).await, format!("s.release-{}", 1 + REQUESTS));
    let (code, logs) = worker.terminate().await;
    assert_eq!(code, Some(0), "{logs}");
    assert_eq!(statements(&logs), 5 + REQUESTS, "one statement per request");
    assert_eq!(
        sent as usize, REQUESTS,
        "segments sent for {REQUESTS} statements: {before:?} {after:?}"
    );
    f.assert_no_secret_leaked(&logs).await;
}

/// Rotates `integration` to secret `s.release-{i}` by request (event
/// `release-{i}`), and waits for its reply and outcome.
async fn rotate(f: &mut Fixture, integration: Uuid, i: usize) {
    let (secret, msg_id) = (format!("s.release-{i}"), format!("release-{i}"));
    rotate_by_request(f, integration, Some(&msg_id), &secret).await;
}

/// Data segments sent so far on each of process `pid`'s TCP connections
/// to `port` (`TCP_INFO`), by the connection's local address.
fn segments_sent_to(pid: u32, port: u16) -> std::collections::BTreeMap<SocketAddr, u32> {
    tcp_connections(pid)
        .into_iter()
        .filter(|c| c.peer.port() == port)
        .map(|c| (c.local, c.data_segs_out))
        .collect()
}

/// A connected TCP socket of the worker's, as seen through a copy of it.
struct TcpConnection {
    local: SocketAddr,
    peer: SocketAddr,
    nodelay: bool,
    /// Segments with data sent so far (`TCP_INFO`'s `tcpi_data_segs_out`).
    data_segs_out: u32,
}

/// The connected TCP sockets of process `pid`. Each socket is looked at
/// through a copy of its descriptor (`pidfd_getfd`), so nothing of the
/// worker's changes.
fn tcp_connections(pid: u32) -> Vec<TcpConnection> {
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
        let address =
            |a: Option<rustix::net::SocketAddrAny>| a.and_then(|a| SocketAddr::try_from(a).ok());
        let peer = address(rustix::net::getpeername(&copy).ok().flatten());
        let local = address(rustix::net::getsockname(&copy).ok());
        // Listeners, unconnected and Unix sockets have no TCP peer.
        if let (Some(peer), Some(local), Ok(nodelay)) =
            (peer, local, rustix::net::sockopt::tcp_nodelay(&copy))
        {
            sockets.push(TcpConnection {
                local,
                peer,
                nodelay,
                data_segs_out: tcp_info(&copy).tcpi_data_segs_out,
            });
        }
    }
    sockets
}

/// `TCP_INFO` of a TCP socket.
fn tcp_info(socket: &std::os::fd::OwnedFd) -> libc::tcp_info {
    use std::os::fd::AsRawFd;
    // SAFETY: `tcp_info` is plain data, all zeroes a valid value; the
    // kernel writes at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let done = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    assert_eq!(done, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info
}
