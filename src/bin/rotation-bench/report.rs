//! The figures: latency percentiles, the results written as JSON, the
//! machine's CPU time, and the tables printed at the end.

use super::*;

#[derive(Debug, Serialize)]
pub(super) struct Latency {
    pub(super) requests: usize,
    pub(super) p50_ms: f64,
    pub(super) p90_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
}

/// What every run's figures are read against: when, on what machine and
/// servers, with which worker settings.
#[derive(Debug, Serialize)]
pub(super) struct Run {
    pub(super) date: String,
    pub(super) machine: serde_json::Value,
    pub(super) versions: serde_json::Value,
    pub(super) worker_settings: Vec<String>,
    pub(super) nats_nodes: usize,
    pub(super) replicas: u32,
    /// JetStream's `sync_interval` on the benchmark's own servers.
    pub(super) nats_sync: NatsSync,
}

impl Run {
    /// This run, now: `client`'s server, `database` as its version reads.
    pub(super) fn now(
        client: &async_nats::Client,
        database: &str,
        args: &Args,
        env: &[(String, String)],
        nats_url: &str,
    ) -> anyhow::Result<Self> {
        Ok(Self {
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
            replicas: setting(env, "ROTATION_WORKER_WORKER__REPLICAS").unwrap_or(1),
            nats_sync: args.nats_sync,
        })
    }

    /// The first line of a table.
    pub(super) fn print_heading(&self) {
        println!(
            "rotation-bench {} on {} cores; NATS {} ({} node(s), streams at R{}, sync {:?}), {}",
            self.date,
            self.machine["cores"],
            self.versions["nats"],
            self.nats_nodes,
            self.replicas,
            self.nats_sync,
            self.versions["database"]
        );
    }
}

#[derive(Debug, Serialize)]
pub(super) struct Results {
    #[serde(flatten)]
    pub(super) run: Run,
    pub(super) events: usize,
    pub(super) integrations: usize,
    /// How long seeding the integrations took.
    pub(super) seed_seconds: f64,
    pub(super) drain_seconds: f64,
    pub(super) drain_rotations_per_second: f64,
    pub(super) drain_failures: usize,
    /// CPU time (user and system) the worker used per event while
    /// draining, in microseconds.
    pub(super) drain_worker_cpu_us_per_event: f64,
    /// CPU time a bare async-nats client used per event for the NATS side
    /// of a drained event alone (a delivery, an outcome published and
    /// confirmed, an ack; `relay.rs`), in microseconds: the part of the
    /// worker's CPU per event the client library costs by itself.
    pub(super) relay_cpu_us_per_event: f64,
    /// CPU time the benchmark used per event for the store's side of a
    /// drained event alone (the same rotations with event ids, in the
    /// worker's batches and lanes, through the worker's store;
    /// `load::store_cpu_us_per_event`), in microseconds: the part of the
    /// worker's CPU per event its store costs by itself.
    pub(super) store_cpu_us_per_event: f64,
    /// CPU time (user and system) all processes of the machine used per
    /// event while draining (the worker, the database, NATS, this
    /// benchmark), in microseconds.
    pub(super) drain_machine_cpu_us_per_event: f64,
    /// The share of the machine's CPU time its hypervisor took (steal)
    /// while draining.
    pub(super) drain_steal_share: f64,
    /// What PostgreSQL wrote to its write-ahead log per drained event, in
    /// bytes (`None` on SQLite): a page changed for the first time since
    /// a checkpoint is written there whole.
    pub(super) drain_wal_bytes_per_event: Option<f64>,
    /// What the worker had written to storage per drained event, in
    /// bytes: with SQLite, its log (a whole page per page a commit
    /// changes) and the checkpoints into the database file.
    pub(super) drain_worker_disk_bytes_per_event: f64,
    pub(super) ready_ms: f64,
    /// The worker's resident memory once ready, before the drain.
    pub(super) ready_rss_kb: u64,
    /// The worker's peak resident memory up to the end of the drain.
    pub(super) drain_peak_rss_kb: u64,
    /// The worker's peak resident memory over the whole run (the drain and
    /// the request measurements).
    pub(super) peak_rss_kb: u64,
    pub(super) latency_sequential: Latency,
    pub(super) latency_fixed_rate: Latency,
    pub(super) fixed_rate_per_second: u32,
    pub(super) latency_concurrent: Latency,
    pub(super) concurrency: usize,
    pub(super) ceiling_clients: usize,
    pub(super) ceiling_per_event_tps: f64,
    pub(super) ratio_to_ceiling: f64,
    pub(super) commit_floor_ms: f64,
    pub(super) sequential_p50_to_floor: f64,
    /// p50 of a bare NATS request-reply of the same size, one at a time,
    /// to a responder that echoes it: the two hops a request adds to its
    /// commit.
    pub(super) nats_request_floor_ms: f64,
    /// p50 of one rotation applied straight through the store, one at a
    /// time, as the worker applies a request (on PostgreSQL its one
    /// statement): a request without NATS and without the worker.
    pub(super) store_floor_ms: f64,
    /// With `--vault`: requests verified by a login to OpenBao.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) vault_login: Option<vault::VaultLogin>,
}

/// The machine's CPU time, from the first line of `/proc/stat`, in
/// seconds: busy (user, nice, system, irq, softirq), stolen by the
/// hypervisor, and in all.
#[derive(Debug)]
pub(super) struct MachineCpu {
    pub(super) busy: f64,
    pub(super) steal: f64,
    pub(super) total: f64,
}

impl MachineCpu {
    pub(super) fn now() -> Self {
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

    pub(super) fn since(&self, earlier: &Self) -> Self {
        Self {
            busy: self.busy - earlier.busy,
            steal: self.steal - earlier.steal,
            total: self.total - earlier.total,
        }
    }

    pub(super) fn steal_share(&self) -> f64 {
        if self.total > 0.0 {
            self.steal / self.total
        } else {
            0.0
        }
    }
}

pub(super) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

pub(super) fn latency(mut ms: Vec<f64>) -> Latency {
    ms.sort_by(|a, b| a.total_cmp(b));
    Latency {
        requests: ms.len(),
        p50_ms: percentile(&ms, 0.50),
        p90_ms: percentile(&ms, 0.90),
        p99_ms: percentile(&ms, 0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
    }
}

/// One row of latency figures.
pub(super) fn latency_row(name: &str, l: &Latency) {
    println!(
        "| {name:<34} | p50 {:>7.3} ms | p90 {:>7.3} ms | p99 {:>7.3} ms | max {:>8.3} ms |",
        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
    )
}

pub(super) fn print_table(r: &Results) {
    r.run.print_heading();
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
    // A tiny drain may take less than one clock tick of the worker's CPU.
    let share = |part: f64| match r.drain_worker_cpu_us_per_event {
        w if w > 0.0 => format!("{:.0}%", 100.0 * part / w),
        _ => "an unmeasured share".into(),
    };
    println!(
        "| NATS side of an event, a bare client         | {:.1} µs/event = {} of the worker's CPU per event |",
        r.relay_cpu_us_per_event,
        share(r.relay_cpu_us_per_event),
    );
    println!(
        "| store side of an event, the worker's store   | {:.1} µs/event = {} of the worker's CPU per event |",
        r.store_cpu_us_per_event,
        share(r.store_cpu_us_per_event),
    );
    match r.drain_wal_bytes_per_event {
        Some(bytes) => {
            println!("| database WAL per drained event               | {bytes:.0} bytes |");
        }
        None => println!(
            "| worker's disk writes per drained event       | {:.0} bytes |",
            r.drain_worker_disk_bytes_per_event
        ),
    }
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
        "| worker start to ready (database migrated)    | {:.0} ms; {} integrations seeded in {:.1} s |",
        r.ready_ms, r.integrations, r.seed_seconds
    );
    if let Some(v) = &r.vault_login {
        v.print_rows();
    }
}
