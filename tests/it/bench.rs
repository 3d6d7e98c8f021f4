//! The benchmark as a smoke test: a tiny run completes and writes
//! well-formed figures. (Speed is measured by the tool, never asserted here.)

use crate::helpers::{Backend, TestDb, nats_server_bin};

/// Runs the benchmark on `url` with `args`; returns its table and its
/// figures.
async fn bench(url: &str, args: &[&str]) -> (String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotation-bench"))
        .args(args)
        .arg("--worker-bin")
        .arg(env!("CARGO_BIN_EXE_rotation-worker"))
        .arg("--database-url")
        .arg(url)
        .arg("--json")
        .arg(&json)
        .env("NATS_SERVER_BIN", nats_server_bin())
        .output()
        .await
        .expect("run rotation-bench");
    assert!(
        out.status.success(),
        "rotation-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let figures = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    (table, figures)
}

/// Runs a tiny benchmark on `url` with `extra` arguments; returns its
/// figures, checked for the fields every run writes.
async fn run_bench(url: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--events",
        "200",
        "--integrations",
        "20",
        "--requests",
        "20",
        "--rate",
        "100",
        "--concurrency",
        "4",
        "--pgbench-seconds",
        "1",
    ];
    args.extend_from_slice(extra);
    let (table, r) = bench(url, &args).await;
    assert!(
        table.contains("backlog drain")
            && table.contains("worker RSS: ready / drain peak / run peak"),
        "{table}"
    );

    assert_eq!(r["events"], 200);
    assert_eq!(r["drain_failures"], 0);
    assert!(r["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(!r["versions"]["nats"].as_str().unwrap().is_empty());
    for field in [
        "drain_seconds",
        "drain_rotations_per_second",
        "ready_ms",
        "ceiling_per_event_tps",
        "ratio_to_ceiling",
        "commit_floor_ms",
        "nats_request_floor_ms",
    ] {
        let v = r[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} is not a number"));
        assert!(v.is_finite() && v > 0.0, "{field} = {v}");
    }
    let rss = |field: &str| {
        r[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{field} is missing"))
    };
    let (ready, drain, peak) = (
        rss("ready_rss_kb"),
        rss("drain_peak_rss_kb"),
        rss("peak_rss_kb"),
    );
    assert!(
        0 < ready && ready <= drain && drain <= peak,
        "RSS ready {ready} / drain peak {drain} / run peak {peak} KiB"
    );
    // A tiny drain may take less than one clock tick of the worker's CPU,
    // and the bare client's relay of as many events (or the store's side of
    // them) less than one of its.
    for field in [
        "drain_worker_cpu_us_per_event",
        "relay_cpu_us_per_event",
        "store_cpu_us_per_event",
    ] {
        let cpu = r[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} is not a number"));
        assert!(cpu.is_finite() && cpu >= 0.0, "{field} = {cpu}");
    }
    assert!(
        table.contains("store side of an event, the worker's store"),
        "{table}"
    );
    assert!(
        table.contains("NATS side of an event, a bare client"),
        "{table}"
    );
    for run in [
        "latency_sequential",
        "latency_fixed_rate",
        "latency_concurrent",
    ] {
        let l = &r[run];
        assert_eq!(l["requests"], 20);
        let p: Vec<f64> = ["p50_ms", "p90_ms", "p99_ms", "max_ms"]
            .iter()
            .map(|k| l[k].as_f64().unwrap())
            .collect();
        assert!(
            p[0] > 0.0 && p.windows(2).all(|w| w[0] <= w[1]),
            "{run}: {p:?}"
        );
    }
    r
}

async fn the_benchmark_runs_and_writes_well_formed_figures(backend: Backend) {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let r = run_bench(&url(backend, &db, &dir), &[]).await;
    let database = r["versions"]["database"].as_str().unwrap();
    let expected = match backend {
        Backend::Postgres => "PostgreSQL ",
        Backend::Sqlite => "SQLite ",
    };
    assert!(database.starts_with(expected), "{database}");
    // A drain writes PostgreSQL's log; on SQLite the worker writes its
    // own files (nothing counted on a file system without a disk).
    let wal = r["drain_wal_bytes_per_event"].as_f64();
    match backend {
        Backend::Postgres => assert!(wal.is_some_and(|b| b > 0.0), "{wal:?}"),
        Backend::Sqlite => assert_eq!(wal, None),
    }
    let disk = r["drain_worker_disk_bytes_per_event"].as_f64().unwrap();
    assert!(disk.is_finite() && disk >= 0.0, "{disk}");
    assert_eq!(
        (r["nats_nodes"].as_u64(), r["replicas"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(r.get("vault_login").is_none(), "only with --vault");
}

/// The benchmark's database on `backend`: `db`, or a file in `dir`.
fn url(backend: Backend, db: &TestDb, dir: &tempfile::TempDir) -> String {
    match backend {
        Backend::Postgres => db.url.clone(),
        Backend::Sqlite => format!("sqlite:{}", dir.path().join("bench.db").display()),
    }
}

/// `--soak`, for a few seconds: a row of figures per interval, every
/// published event completed, none failed.
async fn a_soak_records_every_interval_and_leaves_nothing_pending(backend: Backend) {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let (table, r) = bench(
        &url(backend, &db, &dir),
        &[
            "--soak",
            "4s",
            "--soak-interval",
            "1s",
            "--rate",
            "200",
            "--integrations",
            "20",
        ],
    )
    .await;
    assert!(table.contains("| at (s) | published |"), "{table}");
    let rows = r["soak"].as_array().expect("a soak array");
    assert!(rows.len() >= 3, "{rows:?}");
    for row in rows {
        assert!(row["rss_kb"].as_u64().unwrap() > 0, "{row}");
        assert!(row["fds"].as_u64().unwrap() > 0, "{row}");
        assert!(row["db_connections"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["failed"], 0, "{row}");
    }
    let sum = |field: &str| {
        rows.iter()
            .map(|row| row[field].as_u64().unwrap())
            .sum::<u64>()
    };
    let published = r["published"].as_u64().unwrap();
    assert!(published > 0);
    assert_eq!(sum("published"), published);
    assert_eq!(sum("completed"), published);
    assert_eq!(r["completed"].as_u64(), Some(published));
    assert_eq!(
        (r["failed"].as_u64(), r["pending"].as_u64()),
        (Some(0), Some(0))
    );
    let ratio = r["rss_ratio_last_to_warm"].as_f64().unwrap();
    assert!(ratio.is_finite() && ratio > 0.0, "{ratio}");
}

/// `--cluster`: three private nats-servers in one cluster, streams at R3.
#[tokio::test]
async fn the_benchmark_runs_on_a_three_node_cluster_at_three_replicas() {
    let db = TestDb::new();
    let r = run_bench(&db.url, &["--cluster"]).await;
    assert_eq!(
        (r["nats_nodes"].as_u64(), r["replicas"].as_u64()),
        (Some(3), Some(3))
    );
}

/// `--vault`: requests verified by a login to a private OpenBao, one at a
/// time and 4 in flight, every one a 200; a made-up secret_id is a 422 that
/// changes nothing; renewals one at a time and 2 in flight
/// (`--renewal-concurrency`), every one a 200, beside OpenBao's own rate
/// for the calls a renewal needs.
#[tokio::test]
async fn the_benchmark_measures_requests_verified_by_a_vault_login() {
    let db = TestDb::new();
    let r = run_bench(&db.url, &["--vault", "--renewal-concurrency", "2"]).await;
    let v = &r["vault_login"];
    assert!(v.is_object(), "no vault_login in {r}");
    assert_eq!(v["failures"], 0, "{v}");
    assert_eq!(v["concurrency"], 4);
    assert_eq!(v["made_up_secret_status"], 422, "{v}");
    assert_eq!(v["made_up_secret_changed_record"], false);
    assert!(v["bao_version"].as_str().unwrap().starts_with("OpenBao"));
    for run in ["sequential", "concurrent"] {
        assert_eq!(v[run]["requests"], 20, "{run}: {v}");
        assert!(v[run]["p50_ms"].as_f64().unwrap() > 0.0);
        let rate = v[&format!("{run}_per_second")].as_f64().unwrap();
        assert!(rate.is_finite() && rate > 0.0, "{run}: {rate}");
    }
    for ratio in [
        "speedup",
        "bao_login_ceiling_per_second",
        "concurrent_to_ceiling",
        "bao_same_calls_per_second",
        "concurrent_to_same_calls",
    ] {
        assert!(v[ratio].as_f64().unwrap() > 0.0, "{ratio}: {v}");
    }
    assert_cpu_times(
        v,
        &[
            "concurrent_worker_cpu_us",
            "concurrent_machine_cpu_us",
            "bao_same_calls_machine_cpu_us",
        ],
    );
    let renewal = &v["renewal"];
    assert_eq!(renewal["failures"], 0, "{renewal}");
    assert_eq!(renewal["concurrency"], 2);
    assert_eq!(renewal["sequential"]["requests"], 20, "{renewal}");
    assert_eq!(renewal["concurrent"]["requests"], 20, "{renewal}");
    for rate in [
        "sequential_per_second",
        "concurrent_per_second",
        "bao_renewal_ceiling_per_second",
        "concurrent_to_ceiling",
    ] {
        let value = renewal[rate].as_f64().unwrap();
        assert!(value.is_finite() && value > 0.0, "{rate}: {renewal}");
    }
    assert_cpu_times(
        renewal,
        &[
            "concurrent_worker_cpu_us",
            "concurrent_machine_cpu_us",
            "bao_renewal_machine_cpu_us",
        ],
    );
}

/// Each of `fields` of `v` is a CPU time, zero or more: a short run may
/// take less than one clock tick of a process's CPU.
fn assert_cpu_times(v: &serde_json::Value, fields: &[&str]) {
    for field in fields {
        let us = v[field].as_f64().unwrap();
        assert!(us.is_finite() && us >= 0.0, "{field}: {v}");
    }
}

crate::on_both_stores!(
    the_benchmark_runs_and_writes_well_formed_figures,
    a_soak_records_every_interval_and_leaves_nothing_pending,
);
