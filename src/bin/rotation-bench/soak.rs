//! `--soak`: a steady load for a long time. A drain of a few seconds shows
//! the worker's speed, not what hours of traffic do to it: whether its
//! memory, descriptors and database connections stay flat and its latency
//! steady. The soak publishes `--rate` events per second to the inbound
//! stream, spread over the seeded integrations, and records a row of
//! figures at every `--soak-interval` and at the end.
//!
//! Each event's latency is end to end: from just before it is published to
//! the arrival here of its outcome event, found by its `Rotation-Event-Id`.
//! The outcomes are received by a plain subscription to the completion and
//! failure subjects, the cheapest way to an event's own latency: the
//! results stream's stored times would have to be read back message by
//! message (the same deliveries, plus a consumer and its acknowledgements).
//! The drain does without them (see `main.rs`): there the CPU they cost
//! would slow what is measured; a soak's rate is fixed, and its latency
//! includes them alike at every interval.
//!
//! The pace is kept by computed deadlines (event `n` is due `n / rate`
//! seconds after the start), so a late wake-up publishes what is due at
//! once instead of shifting every later event; publish acknowledgements
//! are awaited beside the pace, at most `ACK_WINDOW` at a time.

use std::collections::HashMap;

use futures::stream::FuturesUnordered;
use rotation_worker::event::{HEADER_EVENT_ID, HEADER_MSG_ID, SUBJECT_COMPLETED, SUBJECT_ROTATED};
use tokio::time::{Instant as TokioInstant, sleep_until};

use super::*;

/// Publishes awaiting their acknowledgement at most; at the window the
/// pace waits (and the rows show fewer events published).
const ACK_WINDOW: usize = 1024;

/// How long, after the last publish, the soak waits for outcomes to keep
/// arriving before it reports the missing ones as pending.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A duration as `500ms`, `90s`, `30m`, `1h` or a bare number of seconds.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 90s, 30m or 1h"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("`{unit}`: the units are ms, s, m and h")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a positive duration"))
}

/// What the soak needs of the rest of the benchmark.
pub(super) struct Setup<'a> {
    pub(super) args: &'a Args,
    pub(super) worker_bin: &'a Path,
    pub(super) env: &'a [(String, String)],
    pub(super) nats_url: &'a str,
    pub(super) backend: &'a Backend,
    pub(super) pg: Option<&'a PgStore>,
    pub(super) api_key: &'a str,
    pub(super) ids: &'a [Uuid],
    pub(super) duration: Duration,
}

/// One row: an interval of the soak, and the worker as it ended.
#[derive(Debug, Serialize)]
pub(super) struct Interval {
    /// Seconds from the start of the load to the end of the interval.
    pub(super) at_s: f64,
    pub(super) seconds: f64,
    pub(super) published: u64,
    /// Completion events that arrived in the interval (failures apart).
    pub(super) completed: u64,
    pub(super) failed: u64,
    /// Latencies of the events completed in the interval.
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    /// The worker's resident memory (`VmRSS`).
    pub(super) rss_kb: u64,
    /// The worker's open file descriptors.
    pub(super) fds: u64,
    /// The worker's database connections: on PostgreSQL its sessions in
    /// `pg_stat_activity`, on SQLite its descriptors open on the database
    /// file (one per connection).
    pub(super) db_connections: Option<u64>,
}

/// The soak's figures, written as JSON.
#[derive(Debug, Serialize)]
pub(super) struct SoakResults {
    #[serde(flatten)]
    pub(super) run: Run,
    pub(super) integrations: usize,
    pub(super) rate_per_second: u32,
    pub(super) soak_seconds: f64,
    pub(super) interval_seconds: f64,
    pub(super) published: u64,
    pub(super) completed: u64,
    pub(super) failed: u64,
    /// Published events without an outcome at the end.
    pub(super) pending: u64,
    /// Latency over the whole soak.
    pub(super) latency: Latency,
    /// PostgreSQL's `autovacuum` setting. Off, nothing analyses the
    /// worker's growing tables nor replans its prepared statements, whose
    /// plans may have been made on empty tables: a soak then measures that.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) autovacuum: Option<String>,
    /// RSS at the last row over RSS at the first full interval after
    /// warm-up (the second row; the first with fewer than three rows).
    pub(super) rss_ratio_last_to_warm: f64,
    pub(super) soak: Vec<Interval>,
}

/// Where the worker's database connections are counted.
enum Connections<'a> {
    Postgres(&'a PgStore),
    /// The database file, as the worker's descriptors name it.
    Sqlite(PathBuf),
}

impl Connections<'_> {
    async fn count(&self, worker: &Worker) -> anyhow::Result<Option<u64>> {
        match self {
            Connections::Postgres(pg) => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                     AND backend_type = 'client backend' AND application_name <> $1",
                )
                .bind(APPLICATION_NAME)
                .fetch_one(pg.pool())
                .await?;
                Ok(u64::try_from(n).ok())
            }
            Connections::Sqlite(file) => Ok(worker.fds_on(file)),
        }
    }
}

/// The figures of the interval under way.
#[derive(Default)]
struct Tally {
    published: u64,
    completed: u64,
    failed: u64,
    ms: Vec<f64>,
}

/// Starts the worker, holds the load, stops the worker; writes the JSON
/// and prints the table. Fails when an event is left without an outcome or
/// failed (after writing the figures).
pub(super) async fn run(s: &Setup<'_>) -> anyhow::Result<()> {
    let args = s.args;
    let rate = args.rate.unwrap_or(1000).max(1);
    let connections = match (s.backend, s.pg) {
        (Backend::Postgres, Some(pg)) => Connections::Postgres(pg),
        (Backend::Sqlite(path), _) => Connections::Sqlite(std::fs::canonicalize(path)?),
        (Backend::Postgres, None) => bail!("no PostgreSQL store"),
    };
    let autovacuum = match s.pg {
        Some(pg) => Some(
            sqlx::query_scalar::<_, String>("SHOW autovacuum")
                .fetch_one(pg.pool())
                .await?,
        ),
        None => None,
    };
    if autovacuum.as_deref() == Some("off") {
        eprintln!(
            "soak: PostgreSQL runs with autovacuum off: the worker analyses its own \
             tables every minute instead"
        );
    }
    let worker = Worker::start(s.worker_bin, s.env, args.worker_log.as_deref()).await?;
    let client = connect(s.nats_url).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut completions = client.subscribe(SUBJECT_COMPLETED).await?;
    let mut failures = client.subscribe(SUBJECT_FAILED).await?;
    client.flush().await?;

    // Event ids unique to this run: a NATS server given by --nats-url may
    // remember an earlier run's within its de-duplication window.
    let prefix = format!("soak-{}-", &Uuid::new_v4().simple().to_string()[..8]);
    let event_number = |message: &async_nats::Message| -> Option<u64> {
        message
            .headers
            .as_ref()?
            .get(HEADER_EVENT_ID)?
            .as_str()
            .strip_prefix(&prefix)?
            .parse()
            .ok()
    };
    eprintln!(
        "soak: {rate} events/s for {:?}, a row every {:?}",
        s.duration, args.soak_interval
    );
    let start = TokioInstant::now();
    let end = start + s.duration;
    let due = |n: u64| start + Duration::from_secs_f64(n as f64 / f64::from(rate));
    let mut next_sample = start + args.soak_interval;
    let mut last_sample = start;
    let (mut n, mut next_publish) = (0u64, start);
    let mut pending: HashMap<u64, Instant> = HashMap::new();
    let mut acks = FuturesUnordered::new();
    let (mut tally, mut all_ms) = (Tally::default(), Vec::new());
    let (mut failed, mut rows) = (0u64, Vec::new());
    let mut last_progress = Instant::now();
    loop {
        let publishing = next_publish < end;
        if !publishing && pending.is_empty() && acks.is_empty() {
            break;
        }
        tokio::select! {
            biased;
            Some(message) = completions.next() => {
                if let Some(sent) = event_number(&message).and_then(|k| pending.remove(&k)) {
                    let ms = sent.elapsed().as_secs_f64() * 1000.0;
                    tally.completed += 1;
                    tally.ms.push(ms);
                    all_ms.push(ms);
                    last_progress = Instant::now();
                }
            }
            Some(message) = failures.next() => {
                if event_number(&message).and_then(|k| pending.remove(&k)).is_some() {
                    tally.failed += 1;
                    failed += 1;
                    last_progress = Instant::now();
                }
            }
            Some(ack) = acks.next() => {
                ack?;
            }
            _ = sleep_until(next_publish), if publishing && acks.len() < ACK_WINDOW => {
                // Every event due by now, so that a late wake-up keeps the
                // rate rather than shifting the rest.
                let now = TokioInstant::now();
                while next_publish <= now && next_publish < end && acks.len() < ACK_WINDOW {
                    let mut h = headers(s.api_key);
                    h.insert(HEADER_MSG_ID, format!("{prefix}{n}").as_str());
                    let payload = rotation(s.ids[n as usize % s.ids.len()], n as usize);
                    pending.insert(n, Instant::now());
                    acks.push(js.publish_with_headers(SUBJECT_ROTATED, h, payload).await?.into_future());
                    tally.published += 1;
                    n += 1;
                    next_publish = due(n);
                }
                last_progress = Instant::now();
            }
            _ = sleep_until(next_sample), if next_sample < end => {
                rows.push(sample(&mut tally, &worker, &connections, start, last_sample).await?);
                last_sample = next_sample;
                next_sample += args.soak_interval;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)), if !publishing => {
                if last_progress.elapsed() > SETTLE_TIMEOUT {
                    eprintln!("soak: {} events still without an outcome", pending.len());
                    break;
                }
            }
        }
    }
    rows.push(sample(&mut tally, &worker, &connections, start, last_sample).await?);
    worker.stop().await?;

    let database = database_version(s.backend, s.pg).await?;
    let warm = if rows.len() >= 3 { &rows[1] } else { &rows[0] };
    let last = rows.last().unwrap_or(warm);
    let results = SoakResults {
        run: Run::now(&client, &database, args, s.env, s.nats_url)?,
        integrations: s.ids.len(),
        rate_per_second: rate,
        soak_seconds: s.duration.as_secs_f64(),
        interval_seconds: args.soak_interval.as_secs_f64(),
        published: n,
        completed: all_ms.len() as u64,
        failed,
        pending: pending.len() as u64,
        latency: latency(all_ms),
        autovacuum,
        rss_ratio_last_to_warm: last.rss_kb as f64 / warm.rss_kb.max(1) as f64,
        soak: rows,
    };
    std::fs::write(&args.json, serde_json::to_vec_pretty(&results)?)?;
    print_soak_table(&results);
    if results.pending > 0 || results.failed > 0 {
        bail!(
            "{} events without an outcome, {} failed",
            results.pending,
            results.failed
        );
    }
    Ok(())
}

/// Closes the interval from `since` to now: its tally, and the worker now.
async fn sample(
    tally: &mut Tally,
    worker: &Worker,
    connections: &Connections<'_>,
    start: TokioInstant,
    since: TokioInstant,
) -> anyhow::Result<Interval> {
    let now = TokioInstant::now();
    let t = std::mem::take(tally);
    let l = latency(t.ms);
    Ok(Interval {
        at_s: (now - start).as_secs_f64(),
        seconds: (now - since).as_secs_f64(),
        published: t.published,
        completed: t.completed,
        failed: t.failed,
        p50_ms: l.p50_ms,
        p99_ms: l.p99_ms,
        max_ms: l.max_ms,
        rss_kb: worker.rss_kb(),
        fds: worker.open_fds(),
        db_connections: connections.count(worker).await?,
    })
}

fn print_soak_table(r: &SoakResults) {
    r.run.print_heading();
    println!(
        "soak: {} events/s for {:.0} s over {} integrations, a row every {:.0} s",
        r.rate_per_second, r.soak_seconds, r.integrations, r.interval_seconds
    );
    println!(
        "| at (s) | published | completed | failed | p50 ms | p99 ms |  max ms | RSS MB | fds | db conns |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &r.soak {
        println!(
            "| {:>6.0} | {:>9} | {:>9} | {:>6} | {:>6.3} | {:>6.3} | {:>7.3} | {:>6.1} | {:>3} | {:>8} |",
            row.at_s,
            row.published,
            row.completed,
            row.failed,
            row.p50_ms,
            row.p99_ms,
            row.max_ms,
            row.rss_kb as f64 / 1024.0,
            row.fds,
            row.db_connections
                .map_or_else(|| "n/a".to_owned(), |n| n.to_string()),
        );
    }
    println!(
        "| soak: {} published, {} completed, {} failed, {} pending; p50 {:.3} ms, p99 {:.3} ms; RSS last / first after warm-up = {:.3}x |",
        r.published,
        r.completed,
        r.failed,
        r.pending,
        r.latency.p50_ms,
        r.latency.p99_ms,
        r.rss_ratio_last_to_warm
    );
    if r.autovacuum.as_deref() == Some("off") {
        println!("| PostgreSQL autovacuum off: the worker analysed its own tables every minute |");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_written() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("4"), Ok(Duration::from_secs(4)));
        for bad in ["", "s", "0s", "5 min", "-1s", "1d", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
