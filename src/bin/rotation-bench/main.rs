//! `rotation-bench`: measures the worker on this machine, beside the
//! database's own ceiling, and prints a table and a JSON file.
//!
//! 1. Seeds integrations and an API key in a database of its own.
//! 2. Starts the real worker binary once (creating the streams) and
//!    measures its time from start to ready; then queues N events while no
//!    worker runs, starts the worker again and times the backlog's drain
//!    until every outcome event has arrived.
//! 3. Measures request-reply latency one request at a time, at a fixed
//!    rate, and at full concurrency; reads the worker's peak RSS.
//! 4. Runs `pgbench` with the worker's per-event SQL at the worker's
//!    connection count (the ceiling of one commit per event) and a bare
//!    one-row commit with one client (the latency floor). With an
//!    `sqlite:PATH` database the same two loops run in-process on the file,
//!    with the worker's settings (WAL, synchronous FULL, one writer).
//! 5. With `--vault`, request-reply again with `vault.verify = "login"`
//!    against an OpenBao dev server of its own (`vault.rs`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use async_nats::HeaderMap;
use clap::Parser;
use futures::{FutureExt, StreamExt};
use rotation_worker::auth::ApiKey;
use rotation_worker::config::{DatabaseSettings, Settings};
use rotation_worker::crypto::{KeyRing, generate_key};
use rotation_worker::domain::{Name, NewIntegration, Owner, RoleId, SecretId, VaultAddress};
use rotation_worker::event::SUBJECT_FAILED;
use rotation_worker::store::{Backend, Change, Outcome, PgStore, Rotation, RotationResult, Store};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncBufReadExt;
use uuid::Uuid;

mod vault;

/// Benchmarks rotation-worker against a database and NATS on this machine.
#[derive(Debug, Parser)]
#[command(name = "rotation-bench", version)]
struct Args {
    /// Events in the backlog.
    #[arg(long, default_value_t = 50_000)]
    events: usize,
    /// Integrations the backlog is spread over.
    #[arg(long, default_value_t = 5_000)]
    integrations: usize,
    /// Requests per latency measurement.
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
    /// Requests per second of the fixed-rate measurement.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Requests in flight in the full-concurrency measurement.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The worker binary (default: `rotation-worker` beside this one).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// A database of the benchmark's own; it is dropped and recreated.
    /// `sqlite:PATH` measures the embedded store on that file instead.
    #[arg(
        long,
        default_value = "postgres://postgres@localhost:5432/rotation_bench"
    )]
    database_url: String,
    /// A NATS server (or a comma-separated list) to use; by default a
    /// private nats-server (from PATH or NATS_SERVER_BIN) is started on a
    /// free port with a temporary store.
    #[arg(long)]
    nats_url: Option<String>,
    /// Start three private nats-servers in one JetStream cluster instead of
    /// one, and run the worker's streams at three replicas
    /// (ROTATION_WORKER_WORKER__REPLICAS=3, unless --worker-env says
    /// otherwise).
    #[arg(long, conflicts_with = "nats_url")]
    cluster: bool,
    /// Where the figures are written as JSON.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// Seconds each pgbench run lasts.
    #[arg(long, default_value_t = 10)]
    pgbench_seconds: u32,
    /// Extra worker settings as NAME=VALUE environment variables, e.g.
    /// ROTATION_WORKER_WORKER__MAX_BATCH=1.
    #[arg(long = "worker-env", value_name = "NAME=VALUE")]
    worker_env: Vec<String>,
    /// Append the timed worker's log lines to this file (for the worker's
    /// own view of each message: `duration_ms` from arrival to outcome).
    #[arg(long)]
    worker_log: Option<PathBuf>,
    /// After the other measurements, measure requests with
    /// `vault.verify = "login"` against an OpenBao dev server of the
    /// benchmark's own (`bao` on PATH): one at a time, and --concurrency
    /// in flight on as many integrations.
    #[arg(long)]
    vault: bool,
}

#[derive(Debug, Serialize)]
struct Latency {
    requests: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    date: String,
    machine: serde_json::Value,
    versions: serde_json::Value,
    worker_settings: Vec<String>,
    nats_nodes: usize,
    replicas: u32,
    events: usize,
    integrations: usize,
    drain_seconds: f64,
    drain_rotations_per_second: f64,
    drain_failures: usize,
    /// CPU time (user and system) the worker used per event while
    /// draining, in microseconds.
    drain_worker_cpu_us_per_event: f64,
    /// CPU time (user and system) all processes of the machine used per
    /// event while draining (the worker, the database, NATS, this
    /// benchmark), in microseconds.
    drain_machine_cpu_us_per_event: f64,
    /// The share of the machine's CPU time its hypervisor took (steal)
    /// while draining.
    drain_steal_share: f64,
    ready_ms: f64,
    /// The worker's resident memory once ready, before the drain.
    ready_rss_kb: u64,
    /// The worker's peak resident memory up to the end of the drain.
    drain_peak_rss_kb: u64,
    /// The worker's peak resident memory over the whole run (the drain and
    /// the request measurements).
    peak_rss_kb: u64,
    latency_sequential: Latency,
    latency_fixed_rate: Latency,
    fixed_rate_per_second: u32,
    latency_concurrent: Latency,
    concurrency: usize,
    ceiling_clients: usize,
    ceiling_per_event_tps: f64,
    ratio_to_ceiling: f64,
    commit_floor_ms: f64,
    sequential_p50_to_floor: f64,
    /// p50 of a bare NATS request-reply of the same size, one at a time,
    /// to a responder that echoes it: the two hops a request adds to its
    /// commit.
    nats_request_floor_ms: f64,
    /// p50 of one rotation applied straight through the store, one at a
    /// time, as the worker applies a request (on PostgreSQL its one
    /// statement): a request without NATS and without the worker.
    store_floor_ms: f64,
    /// With `--vault`: requests verified by a login to OpenBao.
    #[serde(skip_serializing_if = "Option::is_none")]
    vault_login: Option<vault::VaultLogin>,
}

/// The machine's CPU time, from the first line of `/proc/stat`, in
/// seconds: busy (user, nice, system, irq, softirq), stolen by the
/// hypervisor, and in all.
#[derive(Debug)]
struct MachineCpu {
    busy: f64,
    steal: f64,
    total: f64,
}

impl MachineCpu {
    fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        let at = |n: usize| ticks.get(n).copied().unwrap_or(0.0);
        let hz = clock_ticks_per_second();
        // user nice system idle iowait irq softirq steal (guest time is
        // already counted in user).
        Self {
            busy: (at(0) + at(1) + at(2) + at(5) + at(6)) / hz,
            steal: at(7) / hz,
            total: (0..8).map(at).sum::<f64>() / hz,
        }
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            busy: self.busy - earlier.busy,
            steal: self.steal - earlier.steal,
            total: self.total - earlier.total,
        }
    }

    fn steal_share(&self) -> f64 {
        if self.total > 0.0 {
            self.steal / self.total
        } else {
            0.0
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn latency(mut ms: Vec<f64>) -> Latency {
    ms.sort_by(|a, b| a.total_cmp(b));
    Latency {
        requests: ms.len(),
        p50_ms: percentile(&ms, 0.50),
        p90_ms: percentile(&ms, 0.90),
        p99_ms: percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
    }
}

/// The benchmark's own nats-servers (one, or three in a cluster), killed
/// on drop.
struct PrivateNats {
    children: Vec<std::process::Child>,
    /// The seed list, as `NATS_URL` takes it.
    url: String,
    /// The servers' stores.
    dir: tempfile::TempDir,
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts one nats-server with JetStream on a free port, or with
/// `cluster`, three (`n1`..`n3`) routed into one JetStream cluster, each
/// with a store of its own, and waits until JetStream answers.
async fn start_nats(cluster: bool) -> anyhow::Result<PrivateNats> {
    let dir = tempfile::tempdir()?;
    let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
    let nodes = if cluster { 3 } else { 1 };
    let routes = (0..nodes)
        .map(|_| free_port())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let route_url = |port: &u16| format!("nats://127.0.0.1:{port}");
    let mut private = PrivateNats {
        children: Vec::new(),
        url: String::new(),
        dir,
    };
    let mut urls = Vec::new();
    for (i, own) in routes.iter().enumerate() {
        let port = free_port()?;
        let store = private.dir.path().join(format!("n{}", i + 1));
        let mut command = std::process::Command::new(&bin);
        command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(&store);
        if cluster {
            let others: Vec<String> = routes.iter().filter(|p| *p != own).map(route_url).collect();
            command
                .args(["-n", &format!("n{}", i + 1), "--cluster_name", "bench"])
                .args(["-cluster", &route_url(own), "-routes", &others.join(",")]);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {bin} (set NATS_SERVER_BIN)"))?;
        private.children.push(child);
        wait_for_port(port).await?;
        urls.push(format!("nats://127.0.0.1:{port}"));
    }
    private.url = urls.join(",");
    // A cluster answers JetStream requests once it has elected a leader.
    // `$JS.API.INFO` by hand: the client's account type does not read every
    // reply of nats-server 2.9.
    let client = connect(&private.url).await?;
    for _ in 0..300 {
        if let Ok(reply) = client.request("$JS.API.INFO", "".into()).await {
            let info: serde_json::Value = serde_json::from_slice(&reply.payload)?;
            if info.get("error").is_none() {
                return Ok(private);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("JetStream did not answer")
}

async fn wait_for_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    bail!("nats-server did not start on port {port}")
}

/// Connects to any server of a comma-separated list.
async fn connect(list: &str) -> anyhow::Result<async_nats::Client> {
    let addrs = list
        .split(',')
        .map(|url| url.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(async_nats::connect(addrs).await?)
}

/// A running worker: its pid, and when it said it was ready.
struct Worker {
    child: tokio::process::Child,
    ready_after: Duration,
}

impl Worker {
    async fn start(
        bin: &Path,
        env: &[(String, String)],
        log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut child = tokio::process::Command::new(bin)
            .arg("run")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        let ready_after = loop {
            match tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
                Ok(Ok(Some(line))) if line.contains("rotation-worker ready") => {
                    break started.elapsed();
                }
                Ok(Ok(Some(_))) => {}
                _ => bail!("the worker did not become ready"),
            }
        };
        // Keep reading its log (into `log`, or dropped) so that it never
        // blocks.
        let mut file = match log {
            Some(path) => Some(
                tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?,
            ),
            None => None,
        };
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(file) = file.as_mut() {
                    let _ = file.write_all(format!("{line}\n").as_bytes()).await;
                }
            }
        });
        Ok(Self { child, ready_after })
    }

    /// The CPU time (user and system) the worker has used so far, in
    /// seconds, from `/proc/PID/stat` (in clock ticks).
    fn cpu_seconds(&self) -> f64 {
        let Some(pid) = self.child.id() else {
            return 0.0;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which may hold spaces: state is
        // the first, utime and stime the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        let ticks = |n: usize| fields.get(n).and_then(|f| f.parse::<f64>().ok());
        let hz = clock_ticks_per_second();
        (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / hz
    }

    /// The peak resident memory so far, in KiB.
    fn peak_rss_kb(&self) -> u64 {
        self.memory("VmHWM:")
    }

    /// The resident memory now, in KiB.
    fn rss_kb(&self) -> u64 {
        self.memory("VmRSS:")
    }

    /// A line of `/proc/PID/status`, in KiB.
    fn memory(&self, field: &str) -> u64 {
        let Some(pid) = self.child.id() else { return 0 };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await?;
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??;
        Ok(())
    }
}

fn headers(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {key}").as_str());
    h
}

/// A rotation request's body: `secret` for integration `id`.
fn body(id: Uuid, secret: &str) -> bytes::Bytes {
    bytes::Bytes::from(
        serde_json::to_vec(&json!({"integrationId": id, "secretId": secret})).unwrap_or_default(),
    )
}

fn rotation(id: Uuid, n: usize) -> bytes::Bytes {
    body(id, &format!("s.bench-{n}-{}", Uuid::new_v4().simple()))
}

/// Where seeded integrations point: a Vault address and a role_id.
struct SeedTarget<'a> {
    /// Prefix of the integrations' names.
    name: &'a str,
    address: &'a str,
    role_id: &'a str,
}

/// The benchmark's API key (owner `bench`) and `n` integrations.
async fn seed(store: &dyn Store, n: usize) -> anyhow::Result<(String, Vec<Uuid>)> {
    let key = ApiKey::generate();
    store
        .create_api_key(&Owner::parse("bench")?, &key.hash())
        .await?;
    let target = SeedTarget {
        name: "vault",
        address: "https://vault.example.com:8200",
        role_id: "bench-role",
    };
    let ids = seed_integrations(store, n, &target).await?;
    Ok((key.expose().to_owned(), ids))
}

/// Creates `n` integrations of owner `bench` at `target`; returns their ids.
async fn seed_integrations(
    store: &dyn Store,
    n: usize,
    target: &SeedTarget<'_>,
) -> anyhow::Result<Vec<Uuid>> {
    futures::stream::iter(0..n)
        .map(|i| async move {
            store
                .create_integration(&NewIntegration {
                    owner: Owner::parse("bench")?,
                    name: Name::parse(&format!("{}-{i}", target.name))?,
                    address: VaultAddress::parse(target.address)?,
                    namespace: None,
                    role_id: RoleId::parse(target.role_id)?,
                    secret_id: SecretId::parse(format!("s.seed-{i}"))?,
                })
                .await
                .map(|r| r.id)
                .map_err(anyhow::Error::from)
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// What one request came to: its round trip, and for a failure reply its
/// status and body (`None`: a 200).
struct Reply {
    ms: f64,
    failure: Option<(u16, String)>,
}

/// One `vault.approle.rotate` request with `payload`, timed.
async fn round_trip(
    client: &async_nats::Client,
    key: &str,
    payload: bytes::Bytes,
) -> anyhow::Result<Reply> {
    let started = Instant::now();
    let reply = client
        .request_with_headers("vault.approle.rotate", headers(key), payload)
        .await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let failure = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|code| {
            (
                code.as_str().parse().unwrap_or(0),
                String::from_utf8_lossy(&reply.payload).into_owned(),
            )
        });
    Ok(Reply { ms, failure })
}

/// The p50 of `requests` bare NATS request-replies, one at a time, with
/// the headers and body of a rotation request, answered by an echo
/// responder on a connection of its own (as the worker's is).
async fn nats_floor(url: &str, key: &str, id: Uuid, requests: usize) -> anyhow::Result<f64> {
    let responder = connect(url).await?;
    let mut echo = responder.subscribe("rotation-bench.echo").await?;
    responder.flush().await?;
    let echoing = tokio::spawn(async move {
        while let Some(message) = echo.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    let client = connect(url).await?;
    let mut times = Vec::with_capacity(requests);
    for n in 0..requests {
        let started = Instant::now();
        client
            .request_with_headers("rotation-bench.echo", headers(key), rotation(id, n))
            .await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    echoing.abort();
    Ok(latency(times).p50_ms)
}

/// The p50 of `requests` rotations applied straight through the store,
/// one at a time, each as the worker applies a request: a new secret, no
/// event id. Every one must be applied.
async fn store_floor(
    store: &dyn Store,
    key: &rotation_worker::auth::ApiKeyHash,
    ids: &[Uuid],
    requests: usize,
) -> anyhow::Result<f64> {
    let mut times = Vec::with_capacity(requests);
    for n in 0..requests {
        let secret = SecretId::parse(format!("s.store-{n}-{}", Uuid::new_v4().simple()))?;
        let now = time::OffsetDateTime::now_utc();
        let rotation = Rotation {
            key: key.clone(),
            integration_id: ids[n % ids.len()],
            change: Change::Secret(secret),
            role_id: None,
            rotated_at: now,
            event_id: None,
            own_event_id: None,
            keep_previous_until: now + time::Duration::hours(24),
        };
        let started = Instant::now();
        let results = store.rotate(std::slice::from_ref(&rotation)).await?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        if !matches!(
            results.as_slice(),
            [RotationResult {
                outcome: Outcome::Applied(_),
                ..
            }]
        ) {
            bail!("the store did not apply rotation {n}: {results:?}");
        }
    }
    Ok(latency(times).p50_ms)
}

async fn request(
    client: &async_nats::Client,
    key: &str,
    id: Uuid,
    n: usize,
) -> anyhow::Result<f64> {
    let reply = round_trip(client, key, rotation(id, n)).await?;
    if let Some((_, body)) = reply.failure {
        bail!("request failed: {body}");
    }
    Ok(reply.ms)
}

/// Runs pgbench with a script; returns (tps, average latency in ms).
fn pgbench(url: &str, script: &str, clients: usize, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("script.sql");
    std::fs::write(&path, script)?;
    let out = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .args(["-T", &seconds.to_string(), "-f"])
        .arg(&path)
        .arg(url)
        .output()
        .context("cannot run pgbench (install PostgreSQL's client tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let number = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((number("tps = "), number("latency average = ")))
}

/// The fewest clients of the per-event ceiling: the worker's lane count
/// before its default became 2.
const CEILING_MIN_CLIENTS: usize = 4;

/// The PostgreSQL baseline: `pgbench` with the worker's per-event SQL at
/// `clients` (the ceiling), and a bare one-row commit with one client (the
/// floor). Returns (tps, floor in ms).
async fn postgres_baseline(
    pg: &PgStore,
    args: &Args,
    hash: &[u8],
    integrations: usize,
    clients: usize,
) -> anyhow::Result<(f64, f64)> {
    sqlx::raw_sql(
        "CREATE TABLE bench_ids AS SELECT row_number() OVER (ORDER BY id) AS n, id FROM integrations; \
         CREATE UNIQUE INDEX ON bench_ids (n); \
         CREATE TABLE bench_floor (id int PRIMARY KEY, v int NOT NULL); \
         INSERT INTO bench_floor SELECT g, 0 FROM generate_series(1, 1000) g;",
    )
    .execute(pg.pool())
    .await?;
    let hash: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let record = "x".repeat(330);
    let per_event = format!(
        "\\set n random(1, {integrations})\n\
         BEGIN;\n\
         SELECT key_hash, owner FROM api_keys WHERE key_hash = '\\x{hash}'::bytea AND revoked_at IS NULL FOR SHARE;\n\
         SELECT id, owner, name, address, namespace, role_id, secret_ciphertext, secret_key_id, created_at, updated_at, last_rotated_at, rotation_count \
           FROM integrations WHERE (id, owner) = ((SELECT id FROM bench_ids WHERE n = :n), 'bench') FOR UPDATE;\n\
         INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, digest_key_id, secret_digest, processed_at) \
           VALUES ('bench', gen_random_uuid()::text, (SELECT id FROM bench_ids WHERE n = :n), 'applied', '{record}', 'bench', '\\x{digest}'::bytea, now()) ON CONFLICT DO NOTHING;\n\
         UPDATE integrations SET secret_ciphertext = '\\x{blob}'::bytea, secret_key_id = 'bench', updated_at = now(), \
           last_rotated_at = GREATEST(last_rotated_at, now()), rotation_count = rotation_count + 1 \
           WHERE id = (SELECT id FROM bench_ids WHERE n = :n);\n\
         COMMIT;\n",
        blob = "ab".repeat(60),
        digest = "cd".repeat(32),
    );
    let (ceiling, _) = pgbench(
        &args.database_url,
        &per_event,
        clients,
        args.pgbench_seconds,
    )?;
    let floor_script = "\\set n random(1, 1000)\nUPDATE bench_floor SET v = v + 1 WHERE id = :n;\n";
    let (_, floor_ms) = pgbench(&args.database_url, floor_script, 1, args.pgbench_seconds)?;
    Ok((ceiling, floor_ms))
}

/// The SQLite baseline, in-process on the benchmark's file with the
/// worker's settings: the worker's per-event statements, one transaction
/// per event (SQLite has one writer, so one loop is its ceiling), and a
/// bare one-row commit (the floor). Returns (tps, floor in ms, version).
async fn sqlite_baseline(
    path: &Path,
    hash: &[u8],
    ids: &[Uuid],
    seconds: u32,
) -> anyhow::Result<(f64, f64, String)> {
    use sqlx::ConnectOptions;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE bench_floor (id INTEGER PRIMARY KEY, v INTEGER NOT NULL); \
         INSERT INTO bench_floor (id, v) VALUES (1, 0);",
    )
    .execute(&mut conn)
    .await?;
    let budget = Duration::from_secs(u64::from(seconds.max(1)));
    let record = "x".repeat(330);
    let blob = vec![0xab_u8; 60];
    let (started, mut n) = (Instant::now(), 0usize);
    while started.elapsed() < budget {
        let id = ids[n % ids.len()].hyphenated().to_string();
        let mut tx = sqlx::Connection::begin_with(&mut conn, "BEGIN IMMEDIATE").await?;
        sqlx::query("SELECT owner FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
            .bind(hash)
            .fetch_optional(&mut *tx)
            .await?;
        sqlx::query("SELECT * FROM integrations WHERE id = $1 AND owner = 'bench'")
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, \
             digest_key_id, secret_digest, processed_at) VALUES ('bench', $1, $2, 'applied', $3, 'bench', $4, 0)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(&id)
        .bind(&record)
        .bind(&[0xcd_u8; 32][..])
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE integrations SET secret_ciphertext = $2, updated_at = updated_at + 1, \
             rotation_count = rotation_count + 1 WHERE id = $1",
        )
        .bind(&id)
        .bind(&blob)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        n += 1;
    }
    let ceiling = n as f64 / started.elapsed().as_secs_f64();
    let (started, mut commits) = (Instant::now(), 0u32);
    while started.elapsed() < budget {
        sqlx::query("UPDATE bench_floor SET v = v + 1 WHERE id = 1")
            .execute(&mut conn)
            .await?;
        commits += 1;
    }
    let floor_ms = started.elapsed().as_secs_f64() * 1000.0 / f64::from(commits.max(1));
    let version: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(&mut conn)
        .await?;
    Ok((ceiling, floor_ms, format!("SQLite {version}")))
}

/// The unit of `/proc`'s CPU times.
fn clock_ticks_per_second() -> f64 {
    version("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0)
}

fn version(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The worker's setting `name` as the environment gives it (the last
/// entry wins, as for the worker).
fn setting<T: std::str::FromStr>(env: &[(String, String)], name: &str) -> Option<T> {
    env.iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let worker_bin = match &args.worker_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?.with_file_name("rotation-worker"),
    };
    if !worker_bin.exists() {
        bail!(
            "no worker binary at {}: run `cargo build --release` first",
            worker_bin.display()
        );
    }
    let private_nats = match &args.nats_url {
        Some(_) => None,
        None => Some(start_nats(args.cluster).await?),
    };
    let nats_url = args
        .nats_url
        .clone()
        .or_else(|| private_nats.as_ref().map(|n| n.url.clone()))
        .unwrap_or_default();

    // A fresh database and a key ring of the benchmark's own.
    let key = generate_key();
    let keys = Arc::new(KeyRing::new([("bench", &key)], None)?);
    let settings = DatabaseSettings {
        url: SecretString::from(args.database_url.clone()),
        sqlite_path: PathBuf::new(),
        max_connections: 8,
        acquire_timeout: std::time::Duration::from_secs(10),
        lock_timeout: std::time::Duration::from_secs(2),
    };
    let backend = Backend::of(&settings)?;
    let (store, pg): (Arc<dyn Store>, Option<PgStore>) = match &backend {
        Backend::Sqlite(path) => {
            for suffix in ["", "-wal", "-shm"] {
                let mut file = path.clone().into_os_string();
                file.push(suffix);
                let _ = std::fs::remove_file(file);
            }
            (
                rotation_worker::store::open(
                    &settings,
                    keys,
                    rotation_worker::store::Create::IfMissing,
                )
                .await?,
                None,
            )
        }
        Backend::Postgres => {
            let mut admin = url::Url::parse(&args.database_url)?;
            let db_name = admin.path().trim_start_matches('/').to_owned();
            admin.set_path("/postgres");
            {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(admin.as_str()).await?;
                let drop_sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
                sqlx::raw_sql(sqlx::AssertSqlSafe(drop_sql))
                    .execute(&mut conn)
                    .await?;
            }
            let pg = PgStore::connect(&settings, keys).await?;
            (Arc::new(pg.clone()), Some(pg))
        }
    };
    eprintln!("seeding {} integrations", args.integrations);
    let (api_key, ids) = seed(store.as_ref(), args.integrations).await?;

    let mut env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), args.database_url.clone()),
        ("NATS_URL".into(), nats_url.clone()),
        (
            "ROTATION_WORKER_ENCRYPTION__KEYS__BENCH".into(),
            key.expose_secret().to_owned(),
        ),
        (
            "ROTATION_WORKER_TELEMETRY__HTTP_ADDR".into(),
            "127.0.0.1:0".into(),
        ),
    ];
    if args.cluster {
        env.push(("ROTATION_WORKER_WORKER__REPLICAS".into(), "3".into()));
    }
    for pair in &args.worker_env {
        let (k, v) = pair
            .split_once('=')
            .context("--worker-env takes NAME=VALUE")?;
        env.push((k.into(), v.into()));
    }

    // First start creates the streams; it is not the one timed.
    Worker::start(&worker_bin, &env, None).await?.stop().await?;
    let client = connect(&nats_url).await?;
    let js = async_nats::jetstream::new(client.clone());
    eprintln!("queueing {} events", args.events);
    let queued = futures::stream::iter(0..args.events)
        .map(|n| {
            let js = js.clone();
            let payload = rotation(ids[n % ids.len()], n);
            let h = headers(&api_key);
            async move {
                js.publish_with_headers("vault.approle.rotated", h, payload)
                    .await?
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(1024)
        .collect::<Vec<_>>()
        .await;
    queued.into_iter().collect::<anyhow::Result<Vec<_>>>()?;

    // The drain ends when the results stream holds an outcome of every
    // event and the backlog is empty (every event acknowledged). It is timed
    // to the stored time of the last outcome, and watched by asking the
    // streams: a subscriber to all 50,000 outcomes would itself cost
    // nats-server and this process CPU on the cores the drain runs on. Only
    // failures (none in a healthy run) are delivered here, to be counted.
    let mut failed = client.subscribe(SUBJECT_FAILED).await?;
    client.flush().await?;
    // The stream names as the timed worker reads them.
    let streams = Settings::load_with_env(None, env.clone())?.worker;
    let mut results = js.get_stream(&streams.results_stream).await?;
    let mut backlog = js.get_stream(&streams.stream).await?;
    let results_before = results.info().await?.state.last_sequence;
    let worker = Worker::start(&worker_bin, &env, args.worker_log.as_deref()).await?;
    let drain_started = SystemTime::now() - worker.ready_after;
    let cpu_at_ready = worker.cpu_seconds();
    let machine_at_ready = MachineCpu::now();
    let ready_rss_kb = worker.rss_kb();
    eprintln!("draining");
    let mut progress = (0, Instant::now());
    let drain = loop {
        let state = results.info().await?.state.clone();
        let stored = state.last_sequence - results_before;
        if stored >= args.events as u64 && backlog.info().await?.state.messages == 0 {
            let last = SystemTime::from(state.last_timestamp);
            break last.duration_since(drain_started)?.as_secs_f64();
        }
        if stored > progress.0 {
            progress = (stored, Instant::now());
        } else if progress.1.elapsed() > Duration::from_secs(120) {
            bail!(
                "outcomes stopped arriving after {stored} of {}",
                args.events
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let drain_cpu = worker.cpu_seconds() - cpu_at_ready;
    let machine = MachineCpu::now().since(&machine_at_ready);
    // The kernel folds the current RSS into VmHWM lazily: a later reading
    // may be lower than an earlier one, so each peak is the largest seen.
    let drain_peak_rss_kb = worker.peak_rss_kb().max(ready_rss_kb);
    client.flush().await?;
    let mut failures = 0;
    while let Some(Some(_)) = failed.next().now_or_never() {
        failures += 1;
    }
    drop(failed);

    eprintln!("request latency");
    let mut sequential = Vec::with_capacity(args.requests);
    for n in 0..args.requests {
        sequential.push(request(&client, &api_key, ids[n % ids.len()], n).await?);
    }
    let mut fixed = tokio::task::JoinSet::new();
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1))));
    for n in 0..args.requests {
        tick.tick().await;
        let (client, key, id) = (client.clone(), api_key.clone(), ids[n % ids.len()]);
        fixed.spawn(async move { request(&client, &key, id, n).await });
    }
    let fixed = fixed
        .join_all()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let concurrent = futures::stream::iter(0..args.requests)
        .map(|n| request(&client, &api_key, ids[n % ids.len()], n))
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    let nats_floor_ms = nats_floor(&nats_url, &api_key, ids[0], args.requests).await?;
    let peak_rss_kb = worker.peak_rss_kb().max(drain_peak_rss_kb);
    let ready_ms = worker.ready_after.as_secs_f64() * 1000.0;
    worker.stop().await?;

    // The ceiling runs as many clients as the worker has lanes, and at
    // least 4: on this kind of machine 4 commit more per second than 2
    // (their commits share WAL flushes), so fewer lanes never lower the
    // bar.
    let clients = setting(&env, "ROTATION_WORKER_WORKER__LANES")
        .unwrap_or(2usize)
        .max(CEILING_MIN_CLIENTS);
    let hash = ApiKey::parse(&api_key)?.hash();
    // Before the baselines: their scripts write the rows behind the
    // store's back.
    let store_floor_ms = store_floor(store.as_ref(), &hash, &ids, args.requests).await?;
    let hash = hash.0;
    let (ceiling, floor_ms, database, clients) = match (&backend, &pg) {
        (Backend::Postgres, Some(pg)) => {
            eprintln!("pgbench");
            let (ceiling, floor_ms) =
                postgres_baseline(pg, &args, &hash, ids.len(), clients).await?;
            let version: String = sqlx::query_scalar("SHOW server_version")
                .fetch_one(pg.pool())
                .await?;
            (ceiling, floor_ms, format!("PostgreSQL {version}"), clients)
        }
        (Backend::Sqlite(path), _) => {
            eprintln!("SQLite baseline");
            let (ceiling, floor_ms, version) =
                sqlite_baseline(path, &hash, &ids, args.pgbench_seconds).await?;
            (ceiling, floor_ms, version, 1)
        }
        (Backend::Postgres, None) => bail!("no PostgreSQL store"),
    };
    let vault_login = if args.vault {
        eprintln!("requests verified by a login to OpenBao");
        let setup = vault::Setup {
            store: store.as_ref(),
            worker_bin: &worker_bin,
            env: &env,
            worker_log: args.worker_log.as_deref(),
            client: &client,
            api_key: &api_key,
            requests: args.requests,
            concurrency: args.concurrency,
        };
        Some(vault::measure(&setup).await?)
    } else {
        None
    };

    let rate = args.events as f64 / drain;
    let results = Results {
        date: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)?,
        machine: json!({
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": version("uname", &["-sr"]),
        }),
        versions: json!({
            "nats": client.server_info().version,
            "database": database,
        }),
        worker_settings: args.worker_env.clone(),
        nats_nodes: nats_url.split(',').count(),
        replicas: setting(&env, "ROTATION_WORKER_WORKER__REPLICAS").unwrap_or(1),
        events: args.events,
        integrations: args.integrations,
        drain_seconds: drain,
        drain_rotations_per_second: rate,
        drain_failures: failures,
        drain_worker_cpu_us_per_event: drain_cpu * 1e6 / args.events as f64,
        drain_machine_cpu_us_per_event: machine.busy * 1e6 / args.events as f64,
        drain_steal_share: machine.steal_share(),
        ready_ms,
        ready_rss_kb,
        drain_peak_rss_kb,
        peak_rss_kb,
        latency_sequential: latency(sequential),
        latency_fixed_rate: latency(fixed),
        fixed_rate_per_second: args.rate,
        latency_concurrent: latency(concurrent),
        concurrency: args.concurrency,
        ceiling_clients: clients,
        ceiling_per_event_tps: ceiling,
        ratio_to_ceiling: if ceiling > 0.0 { rate / ceiling } else { 0.0 },
        commit_floor_ms: floor_ms,
        sequential_p50_to_floor: 0.0,
        nats_request_floor_ms: nats_floor_ms,
        store_floor_ms,
        vault_login,
    };
    let results = Results {
        sequential_p50_to_floor: if floor_ms > 0.0 {
            results.latency_sequential.p50_ms / floor_ms
        } else {
            0.0
        },
        ..results
    };
    std::fs::write(&args.json, serde_json::to_vec_pretty(&results)?)?;
    print_table(&results);
    drop(private_nats);
    match &results.vault_login {
        Some(v) => v.check(),
        None => Ok(()),
    }
}

/// One row of latency figures.
fn latency_row(name: &str, l: &Latency) {
    println!(
        "| {name:<34} | p50 {:>7.3} ms | p90 {:>7.3} ms | p99 {:>7.3} ms | max {:>8.3} ms |",
        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
    )
}

fn print_table(r: &Results) {
    println!(
        "rotation-bench {} on {} cores; NATS {} ({} node(s), streams at R{}), {}",
        r.date,
        r.machine["cores"],
        r.versions["nats"],
        r.nats_nodes,
        r.replicas,
        r.versions["database"]
    );
    println!(
        "| backlog drain ({} events / {} integrations) | {:.0} rotations/s in {:.2} s, {} failed; worker CPU {:.1} µs/event; machine CPU {:.1} µs/event, {:.1}% stolen |",
        r.events,
        r.integrations,
        r.drain_rotations_per_second,
        r.drain_seconds,
        r.drain_failures,
        r.drain_worker_cpu_us_per_event,
        r.drain_machine_cpu_us_per_event,
        r.drain_steal_share * 100.0,
    );
    println!(
        "| database per-event ceiling ({} clients)       | {:.0} tps; worker / ceiling = {:.2}x |",
        r.ceiling_clients, r.ceiling_per_event_tps, r.ratio_to_ceiling
    );
    latency_row("requests, one at a time", &r.latency_sequential);
    println!(
        "| bare one-row commit (1 client)               | {:.3} ms; sequential p50 / floor = {:.2}x |",
        r.commit_floor_ms, r.sequential_p50_to_floor
    );
    println!(
        "| NATS request-reply floor (echo, 1 client)    | {:.3} ms; p50 / (commit + NATS floor) = {:.2}x |",
        r.nats_request_floor_ms,
        r.latency_sequential.p50_ms / (r.commit_floor_ms + r.nats_request_floor_ms)
    );
    println!(
        "| one rotation through the store (1 client)    | {:.3} ms = {:.2}x floor; p50 / (store + NATS floor) = {:.2}x |",
        r.store_floor_ms,
        r.store_floor_ms / r.commit_floor_ms,
        r.latency_sequential.p50_ms / (r.store_floor_ms + r.nats_request_floor_ms)
    );
    latency_row(
        &format!("requests at {}/s", r.fixed_rate_per_second),
        &r.latency_fixed_rate,
    );
    latency_row(
        &format!("requests, {} in flight", r.concurrency),
        &r.latency_concurrent,
    );
    println!(
        "| worker RSS: ready / drain peak / run peak    | {:.1} / {:.1} / {:.1} MB |",
        r.ready_rss_kb as f64 / 1024.0,
        r.drain_peak_rss_kb as f64 / 1024.0,
        r.peak_rss_kb as f64 / 1024.0
    );
    println!(
        "| worker start to ready (database migrated)    | {:.0} ms |",
        r.ready_ms
    );
    if let Some(v) = &r.vault_login {
        v.print_rows();
    }
}
