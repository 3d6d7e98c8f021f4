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
//!
//! With `--soak`, instead of 2 to 5: a steady load for a given time, with
//! the worker's memory, descriptors, connections and latency recorded at
//! every interval (`soak.rs`).

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

mod baseline;
mod load;
mod processes;
mod relay;
mod renewal;
mod report;
mod soak;
mod vault;

use baseline::*;
use load::*;
use processes::*;
use report::*;

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
    /// Requests per second of the fixed-rate measurement (default 200);
    /// with --soak, events per second of the load (default 1000).
    #[arg(long)]
    rate: Option<u32>,
    /// Requests in flight in the full-concurrency measurement.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// With --vault, renewals in flight (each on its own integration). On
    /// one role, OpenBao 2.7's dev server refuses a share of 64 renewals'
    /// transactions at once ("transaction commit failed"), called alone as
    /// through the worker.
    #[arg(long, default_value_t = 8)]
    renewal_concurrency: usize,
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
    /// How often the private nats-servers flush JetStream writes to disk:
    /// `default` (the server's own: every two minutes) or `always` (each
    /// write, as the shipped configurations set; nats-server 2.10+).
    #[arg(long, value_enum, default_value_t = NatsSync::Default, conflicts_with = "nats_url")]
    nats_sync: NatsSync,
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
    /// Instead of the other measurements, hold a steady load of --rate
    /// events per second for this long (`90s`, `30m`, `1h`) and record
    /// the worker's RSS, descriptors, database connections and latency
    /// at every --soak-interval.
    #[arg(long, value_parser = soak::parse_duration, conflicts_with = "vault")]
    soak: Option<Duration>,
    /// How often a soak records a row of figures.
    #[arg(long, value_parser = soak::parse_duration, default_value = "60s")]
    soak_interval: Duration,
}

/// When the benchmark's own nats-servers flush JetStream writes to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum NatsSync {
    Default,
    Always,
}

/// The `application_name` of the benchmark's own database connections, so
/// that a count of the worker's leaves them out.
const APPLICATION_NAME: &str = "rotation-bench";

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

/// PostgreSQL's position in its write-ahead log, in bytes (`None` on
/// SQLite): what a drain wrote to it is the difference of two.
async fn wal_position(pg: Option<&PgStore>) -> anyhow::Result<Option<f64>> {
    let Some(pg) = pg else { return Ok(None) };
    let sql = "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8";
    Ok(Some(sqlx::query_scalar(sql).fetch_one(pg.pool()).await?))
}

/// Gives PostgreSQL's planner the statistics of the tables as the drain
/// left them, and so new plans to this process's statements: prepared
/// while `processed_events` was small, a lookup of it may keep a plan
/// that scans the whole table (seconds per batch after a drain), which
/// the worker's own analyses (with autovacuum off) or autovacuum's
/// replace for the worker but not for this process.
async fn analyze(pg: Option<&PgStore>) -> anyhow::Result<()> {
    if let Some(pg) = pg {
        sqlx::query("ANALYZE").execute(pg.pool()).await?;
    }
    Ok(())
}

/// The database's name and version as its server gives it, e.g.
/// `SQLite 3.51.3`.
async fn database_version(backend: &Backend, pg: Option<&PgStore>) -> anyhow::Result<String> {
    Ok(match (backend, pg) {
        (Backend::Postgres, Some(pg)) => {
            let version: String = sqlx::query_scalar("SHOW server_version")
                .fetch_one(pg.pool())
                .await?;
            format!("PostgreSQL {version}")
        }
        (Backend::Sqlite(path), _) => {
            use sqlx::{ConnectOptions, Connection};
            let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                .filename(path)
                .connect()
                .await?;
            let version: String = sqlx::query_scalar("SELECT sqlite_version()")
                .fetch_one(&mut conn)
                .await?;
            conn.close().await?;
            format!("SQLite {version}")
        }
        (Backend::Postgres, None) => bail!("no PostgreSQL store"),
    })
}

/// The worker's setting `name` as the environment gives it (the last
/// entry wins, as for the worker).
fn setting<T: std::str::FromStr>(env: &[(String, String)], name: &str) -> Option<T> {
    env.iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn main() -> anyhow::Result<()> {
    // The worker's allocator setting, so that the sides of an event this
    // process does alone (`relay`, `store_cpu_us_per_event`) pay the
    // allocator as the worker pays it.
    rotation_worker::allocator::install();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
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
        None => Some(start_nats(args.cluster, args.nats_sync).await?),
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
            let mut own = url::Url::parse(&args.database_url)?;
            own.query_pairs_mut()
                .append_pair("application_name", APPLICATION_NAME);
            let own = DatabaseSettings {
                url: SecretString::from(own.to_string()),
                ..settings.clone()
            };
            let pg = PgStore::connect(&own, keys).await?;
            (Arc::new(pg.clone()), Some(pg))
        }
    };
    eprintln!("seeding {} integrations", args.integrations);
    let seeding = Instant::now();
    let (api_key, ids) = seed(store.as_ref(), args.integrations).await?;
    let seed_seconds = seeding.elapsed().as_secs_f64();
    eprintln!("seeded in {seed_seconds:.1} s");

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

    if let Some(duration) = args.soak {
        let setup = soak::Setup {
            args: &args,
            worker_bin: &worker_bin,
            env: &env,
            nats_url: &nats_url,
            backend: &backend,
            pg: pg.as_ref(),
            api_key: &api_key,
            ids: &ids,
            duration,
        };
        let outcome = soak::run(&setup).await;
        drop(private_nats);
        return outcome;
    }

    // First start creates the streams; it is not the one timed.
    Worker::start(&worker_bin, &env, None).await?.stop().await?;
    let client = connect(&nats_url).await?;
    let js = async_nats::jetstream::new(client.clone());
    eprintln!("queueing {} events", args.events);
    queue(&js, "vault.approle.rotated", args.events, |n| {
        (headers(&api_key), rotation(ids[n % ids.len()], n))
    })
    .await?;

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
    let wal_before = wal_position(pg.as_ref()).await?;
    let worker = Worker::start(&worker_bin, &env, args.worker_log.as_deref()).await?;
    let drain_started = SystemTime::now() - worker.ready_after;
    let cpu_at_ready = worker.cpu_seconds();
    let written_at_ready = worker.disk_write_bytes();
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
    let wal_after = wal_position(pg.as_ref()).await?;
    let written = worker.disk_write_bytes().saturating_sub(written_at_ready);
    let drain_wal_bytes_per_event = wal_before
        .zip(wal_after)
        .map(|(before, after)| (after - before) / args.events as f64);
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
    analyze(pg.as_ref()).await?;
    let fixed_rate = args.rate.unwrap_or(200);
    let one_at_a_time = one_at_a_time(
        &nats_url,
        &client,
        &api_key,
        store.as_ref(),
        &ids,
        args.requests,
    )
    .await?;
    let mut fixed = tokio::task::JoinSet::new();
    let mut tick =
        tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(fixed_rate.max(1))));
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
    let peak_rss_kb = worker.peak_rss_kb().max(drain_peak_rss_kb);
    let ready_ms = worker.ready_after.as_secs_f64() * 1000.0;
    worker.stop().await?;
    let relay_cpu_us_per_event = {
        let last = results.info().await?.state.last_sequence;
        let outcome = results.get_raw_message(last).await?;
        let shapes = relay::Shapes {
            event: (headers(&api_key), rotation(ids[0], 0)),
            outcome: (outcome.headers, outcome.payload),
        };
        eprintln!("the NATS side of {} events, by a bare client", args.events);
        let window = streams.max_in_flight.max(1);
        relay::cpu_us_per_event(&js, &shapes, args.events, window, window.min(256)).await?
    };

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
    eprintln!("the store side of {} events, by the benchmark", args.events);
    analyze(pg.as_ref()).await?;
    let store_cpu_us_per_event = store_cpu_us_per_event(
        store.as_ref(),
        &hash,
        &ids,
        args.events,
        streams.max_batch,
        streams.lanes,
    )
    .await?;
    let hash = hash.0;
    let (ceiling, floor_ms, database, clients) = match (&backend, &pg) {
        (Backend::Postgres, Some(pg)) => {
            eprintln!("pgbench");
            let (ceiling, floor_ms) =
                postgres_baseline(pg, &args, &hash, ids.len(), clients).await?;
            let version = database_version(&backend, Some(pg)).await?;
            (ceiling, floor_ms, version, clients)
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
            renewal_concurrency: args.renewal_concurrency,
        };
        Some(vault::measure(&setup).await?)
    } else {
        None
    };

    let rate = args.events as f64 / drain;
    let results = Results {
        run: Run::now(&client, &database, &args, &env, &nats_url)?,
        events: args.events,
        integrations: args.integrations,
        seed_seconds,
        drain_seconds: drain,
        drain_rotations_per_second: rate,
        drain_failures: failures,
        drain_worker_cpu_us_per_event: drain_cpu * 1e6 / args.events as f64,
        relay_cpu_us_per_event,
        store_cpu_us_per_event,
        drain_machine_cpu_us_per_event: machine.busy * 1e6 / args.events as f64,
        drain_steal_share: machine.steal_share(),
        drain_wal_bytes_per_event,
        drain_worker_disk_bytes_per_event: written as f64 / args.events as f64,
        ready_ms,
        ready_rss_kb,
        drain_peak_rss_kb,
        peak_rss_kb,
        latency_sequential: latency(one_at_a_time.requests),
        latency_fixed_rate: latency(fixed),
        fixed_rate_per_second: fixed_rate,
        latency_concurrent: latency(concurrent),
        concurrency: args.concurrency,
        ceiling_clients: clients,
        ceiling_per_event_tps: ceiling,
        ratio_to_ceiling: if ceiling > 0.0 { rate / ceiling } else { 0.0 },
        commit_floor_ms: floor_ms,
        sequential_p50_to_floor: 0.0,
        nats_request_floor_ms: one_at_a_time.nats_floor_ms,
        store_floor_ms: one_at_a_time.store_floor_ms,
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
