//! Proof under faults: SIGKILLed workers, PostgreSQL and NATS restarted
//! mid-stream, three workers sharing one consumer. After each: every
//! integration holds the secret of its latest rotation, every event has
//! exactly one outcome in the results stream, every applied outcome is one
//! change in the store, and no message is left unacknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::StreamExt;
use rotation_worker::domain::{Name, NewIntegration, Owner, RoleId, SecretId, VaultAddress};
use rotation_worker::event::SUBJECT_ROTATED;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{
    Backend, NatsServer, PgCluster, TestEnv, TestStore, Worker, answered, create_api_key,
    leaked_secret, read_stream, secret_of,
};
use crate::worker::body;

/// A small deterministic generator (xorshift), seeded from the clock; the
/// seed is printed so a failing run can be repeated with `FAULT_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn new() -> Self {
        let seed = std::env::var("FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        eprintln!("FAULT_SEED={seed}");
        Self(seed)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// A generator of its own, seeded from this one: a task that draws
    /// from it does not change what the others draw.
    pub fn fork(&mut self) -> Self {
        Self(self.below(u64::MAX) | 1)
    }
}

/// One planned event.
struct Planned {
    event_id: String,
    integration: Uuid,
    secret: String,
    rotated_at: i64,
}

/// A stream of rotations over many integrations with known final secrets.
pub struct Workload {
    key: String,
    integrations: Vec<Uuid>,
    events: Vec<Planned>,
}

/// One outcome event as read back from the results stream.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug, in a failure's report
struct Outcome {
    seq: u64,
    subject: String,
    body: Value,
}

impl Workload {
    /// `integrations` integrations, `per` events each, interleaved; each
    /// integration's events carry increasing `rotatedAt`.
    pub async fn seed(store: &TestStore, integrations: usize, per: usize) -> Self {
        let key = create_api_key(store, "acme").await;
        let mut ids = Vec::new();
        for i in 0..integrations {
            let created = store
                .create_integration(&NewIntegration {
                    owner: Owner::parse("acme").unwrap(),
                    name: Name::parse(&format!("vault-{i}")).unwrap(),
                    address: VaultAddress::parse("https://vault:8200").unwrap(),
                    namespace: None,
                    role_id: RoleId::parse("role").unwrap(),
                    secret_id: SecretId::parse(seed_secret(i)).unwrap(),
                })
                .await
                .unwrap();
            ids.push(created.id);
        }
        let mut events = Vec::new();
        for round in 0..per {
            for (i, id) in ids.iter().enumerate() {
                events.push(Planned {
                    event_id: format!("ev-{i}-{round}"),
                    integration: *id,
                    secret: format!("s.fault-{i}-{round}-{}", Uuid::new_v4().simple()),
                    rotated_at: 1_780_000_000 + round as i64,
                });
            }
        }
        Self {
            key,
            integrations: ids,
            events,
        }
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn secrets(&self) -> Vec<String> {
        let mut all: Vec<String> = self.events.iter().map(|e| e.secret.clone()).collect();
        all.push(self.key.clone());
        all
    }

    /// The headers (its key, and its event id as `Nats-Msg-Id`) and body
    /// of event `e`.
    fn message(&self, e: &Planned) -> (HeaderMap, bytes::Bytes) {
        let mut h = HeaderMap::new();
        h.insert("Authorization", format!("Bearer {}", self.key).as_str());
        h.insert("Nats-Msg-Id", e.event_id.as_str());
        let rotated_at = time::OffsetDateTime::from_unix_timestamp(e.rotated_at)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let payload = body(json!({
            "integrationId": e.integration, "secretId": e.secret, "rotatedAt": rotated_at,
        }));
        (h, payload)
    }

    /// Publishes every event (or those in `range`) to the stream, waiting
    /// for each PubAck.
    pub async fn publish(&self, js: &jetstream::Context, range: std::ops::Range<usize>) {
        let acks = futures::stream::iter(&self.events[range])
            .map(|e| {
                let (h, payload) = self.message(e);
                let js = js.clone();
                async move {
                    js.publish_with_headers(SUBJECT_ROTATED, h, payload)
                        .await
                        .expect("publish")
                        .await
                        .expect("PubAck")
                }
            })
            .buffer_unordered(256);
        acks.collect::<Vec<_>>().await;
    }

    /// Publishes every event as a publisher does through NATS outages: a
    /// publish that fails (no PubAck in time, no stream leader to answer)
    /// is sent again, the same message with the same `Nats-Msg-Id`, until
    /// it is acknowledged; an event not acknowledged within `within` of its
    /// first attempt fails the test. Returns how many publishes were sent
    /// again. A retry of a message the stream did store (only its PubAck
    /// was lost) is a second copy of the event in the stream: its duplicate
    /// window is 100 ms (see `src/worker/topology.rs`), and the worker's
    /// own record of the event id answers the copy.
    pub async fn publish_through_outages(
        &self,
        js: &jetstream::Context,
        within: Duration,
    ) -> usize {
        let retries = std::sync::atomic::AtomicUsize::new(0);
        let acks = futures::stream::iter(&self.events)
            .map(|e| {
                let (h, payload) = self.message(e);
                let retries = &retries;
                async move {
                    let deadline = tokio::time::Instant::now() + within;
                    loop {
                        let sent = js
                            .publish_with_headers(SUBJECT_ROTATED, h.clone(), payload.clone())
                            .await;
                        let error = match sent {
                            Ok(ack) => match ack.await {
                                Ok(_) => return,
                                Err(e) => e,
                            },
                            Err(e) => e,
                        };
                        assert!(
                            tokio::time::Instant::now() < deadline,
                            "event {} was not acknowledged within {within:?}: {error}",
                            e.event_id
                        );
                        retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        // A publisher's backoff, not a wait for an event.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            })
            .buffer_unordered(256);
        acks.collect::<Vec<_>>().await;
        retries.into_inner()
    }

    /// Checks every promise against the store and the streams.
    /// `server_crashed`: nats-server 2.9 killed hard may keep a few work-queue
    /// messages whose acks it did restore (the consumer shows them acked);
    /// then only the consumer's state is checked, not the stream's count.
    pub async fn verify(
        &self,
        store: &TestStore,
        js: &jetstream::Context,
        server_crashed: bool,
    ) -> Vec<u8> {
        let (outcomes, raw) = self.outcomes(js).await;
        let mut applied: BTreeMap<Uuid, i64> = BTreeMap::new();
        for e in self.events.iter() {
            if reported_applied(&outcomes, e) {
                *applied.entry(e.integration).or_default() += 1;
            }
        }
        // Every applied outcome is exactly one change; the latest wins.
        for (i, id) in self.integrations.iter().enumerate() {
            let latest = self
                .events
                .iter()
                .filter(|e| e.integration == *id)
                .max_by_key(|e| e.rotated_at)
                .unwrap();
            let secret = secret_of(store, *id).await;
            assert_eq!(secret, latest.secret, "integration {i}");
            let owned = store.get_integration(*id).await.unwrap().unwrap();
            assert_eq!(
                owned.rotation_count,
                applied.get(id).copied().unwrap_or(0),
                "integration {i}"
            );
            let recorded = store.applied_events(*id).await;
            assert_eq!(
                recorded, owned.rotation_count,
                "integration {i}: one record per change"
            );
        }
        assert_settled(js, server_crashed).await;
        raw
    }

    /// Checks what holds even after a failover that lost commits (a
    /// standby promoted without everything the primary acknowledged): every
    /// event has exactly one outcome, nothing is left unacknowledged, each
    /// recorded rotation is one change (none applied twice) and each
    /// integration holds the secret of its latest recorded rotation (its
    /// latest event's, or an earlier one's when that was lost). Returns the
    /// raw outcomes and the ids of the events whose outcome reports them
    /// applied but which the store does not record as applied: the
    /// rotations lost.
    pub async fn verify_after_loss(
        &self,
        store: &TestStore,
        js: &jetstream::Context,
    ) -> (Vec<u8>, Vec<String>) {
        let (outcomes, raw) = self.outcomes(js).await;
        let recorded = store.applied_event_ids().await;
        let known: HashSet<&str> = self.events.iter().map(|e| e.event_id.as_str()).collect();
        let foreign: Vec<&String> = recorded
            .iter()
            .filter(|id| !known.contains(id.as_str()))
            .collect();
        assert!(foreign.is_empty(), "records of no event: {foreign:?}");
        for (i, id) in self.integrations.iter().enumerate() {
            let kept: Vec<&Planned> = self
                .events
                .iter()
                .filter(|e| e.integration == *id && recorded.contains(&e.event_id))
                .collect();
            let expected = kept
                .iter()
                .max_by_key(|e| e.rotated_at)
                .map_or_else(|| seed_secret(i), |e| e.secret.clone());
            let secret = secret_of(store, *id).await;
            assert_eq!(
                secret, expected,
                "integration {i}: the secret of its latest recorded rotation"
            );
            let owned = store.get_integration(*id).await.unwrap().unwrap();
            assert_eq!(
                owned.rotation_count,
                kept.len() as i64,
                "integration {i}: one change per recorded rotation"
            );
            assert_eq!(
                store.applied_events(*id).await,
                kept.len() as i64,
                "integration {i}: its records"
            );
        }
        assert_settled(js, false).await;
        let lost = self
            .events
            .iter()
            .filter(|e| reported_applied(&outcomes, e) && !recorded.contains(&e.event_id))
            .map(|e| e.event_id.clone())
            .collect();
        (raw, lost)
    }

    /// The results stream's outcomes by event id, and their raw bytes.
    /// Fails the test unless each event has exactly one outcome and no
    /// other event has any; anything else is reported whole (which ids,
    /// which sequences and subjects, what the consumer holds).
    async fn outcomes(&self, js: &jetstream::Context) -> (HashMap<String, Vec<Outcome>>, Vec<u8>) {
        let contents = read_stream(js, "VAULT_ROTATION_RESULTS").await;
        let mut outcomes: HashMap<String, Vec<Outcome>> = HashMap::new();
        let mut raw = Vec::new();
        for m in &contents.messages {
            raw.extend_from_slice(&m.payload);
            let id = m
                .headers
                .get("Rotation-Event-Id")
                .unwrap_or_else(|| panic!("outcome {} has no event id", m.sequence))
                .as_str()
                .to_owned();
            let mut body: Value = serde_json::from_slice(&m.payload).unwrap();
            if m.subject.as_str() == "vault.approle.rotation.completed" {
                body = json!({"status": 200});
            }
            outcomes.entry(id).or_default().push(Outcome {
                seq: m.sequence,
                subject: m.subject.to_string(),
                body,
            });
        }
        let missing: Vec<&str> = self
            .events
            .iter()
            .map(|e| e.event_id.as_str())
            .filter(|id| !outcomes.contains_key(*id))
            .collect();
        let doubled: Vec<(&String, &Vec<Outcome>)> =
            outcomes.iter().filter(|(_, o)| o.len() > 1).collect();
        let known: HashSet<&str> = self.events.iter().map(|e| e.event_id.as_str()).collect();
        let unknown: Vec<(&String, &Vec<Outcome>)> = outcomes
            .iter()
            .filter(|(id, _)| !known.contains(id.as_str()))
            .collect();
        if !missing.is_empty() || !doubled.is_empty() || !unknown.is_empty() {
            let consumer = match backlog_consumer(js).await {
                Ok(c) => format!("{:#?}", c.cached_info()),
                Err(e) => e.to_string(),
            };
            panic!(
                "{} events, {} outcomes read, absent sequences {:?}\n\
                 events without an outcome: {missing:?}\n\
                 events with more than one: {doubled:#?}\n\
                 outcomes of no event of the workload: {unknown:#?}\n\
                 consumer: {consumer}",
                self.events.len(),
                contents.messages.len(),
                contents.absent,
            );
        }
        (outcomes, raw)
    }
}

/// Whether `e`'s one outcome says it was applied (200); the only other
/// outcome allowed is 409, a redelivery that came after a newer
/// rotation: stale, and so not applied.
fn reported_applied(outcomes: &HashMap<String, Vec<Outcome>>, e: &Planned) -> bool {
    let seen = &outcomes[&e.event_id][0];
    match seen.body["status"].as_u64() {
        Some(200) => true,
        Some(409) => false,
        other => panic!("event {} ended with {other:?}: {seen:?}", e.event_id),
    }
}

/// The secret integration `i` of a [`Workload`] is created with.
fn seed_secret(i: usize) -> String {
    format!("s.seed-{i}")
}

/// Nothing left in the work queue (unless the server crashed, see
/// [`Workload::verify`]), nothing waiting for delivery or an ack.
async fn assert_settled(js: &jetstream::Context, server_crashed: bool) {
    if !server_crashed {
        let queued = answered(|| async {
            let mut inbound = js.get_stream("VAULT_ROTATIONS").await?;
            Ok::<_, async_nats::Error>(inbound.info().await?.state.messages)
        })
        .await;
        assert_eq!(queued, 0, "work queue drained");
    }
    let consumer = answered(|| backlog_consumer(js)).await;
    let info = consumer.cached_info();
    assert_eq!(info.num_ack_pending, 0, "no message left unacked");
    assert_eq!(info.num_pending, 0);
}

/// Waits until the results stream holds `n` outcomes (it drops repeats, so
/// that is one per event). Polls the stream's state: the condition lives in
/// the server, not in an event this process can await.
pub async fn wait_for_outcomes(js: &jetstream::Context, n: usize, within: Duration) {
    if let Err(state) = try_wait_for_outcomes(js, n, within).await {
        panic!("{state}");
    }
}

/// [`wait_for_outcomes`], returning on a timeout what the server holds:
/// the outcomes, the backlog and its consumer, for the failure message.
pub async fn try_wait_for_outcomes(
    js: &jetstream::Context,
    n: usize,
    within: Duration,
) -> Result<(), String> {
    let outcomes = || async {
        let mut stream = js.get_stream("VAULT_ROTATION_RESULTS").await.ok()?;
        Some(stream.info().await.ok()?.state.messages as usize)
    };
    let done = tokio::time::timeout(within, async {
        loop {
            if outcomes().await.is_some_and(|have| have >= n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if done.is_ok() {
        return Ok(());
    }
    let have = outcomes().await.unwrap_or(0);
    let backlog = match js.get_stream("VAULT_ROTATIONS").await {
        Ok(mut s) => format!("{:?}", s.info().await.map(|i| i.state.clone())),
        Err(e) => e.to_string(),
    };
    let consumer = match backlog_consumer(js).await {
        Ok(c) => {
            let i = c.cached_info();
            format!(
                "pending {}, ack pending {}, redelivered {}, waiting pulls {}, delivered {:?}, \
                 ack floor {:?}",
                i.num_pending,
                i.num_ack_pending,
                i.num_redelivered,
                i.num_waiting,
                i.delivered,
                i.ack_floor
            )
        }
        Err(e) => e.to_string(),
    };
    Err(format!(
        "only {have} of {n} outcomes after {within:?}; backlog: {backlog}; consumer: {consumer}"
    ))
}

/// The worker's durable consumer of the backlog, with its state as the
/// server reports it now.
async fn backlog_consumer(
    js: &jetstream::Context,
) -> Result<
    jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    jetstream::stream::ConsumerError,
> {
    js.get_consumer_from_stream("rotation-worker", "VAULT_ROTATIONS")
        .await
}

/// Waits until nothing awaits delivery or an ack (the last acks follow the
/// last outcome events). Polls the server's state.
pub async fn wait_for_drained(js: &jetstream::Context, within: Duration) {
    let done = tokio::time::timeout(within, async {
        loop {
            if let Ok(consumer) = backlog_consumer(js).await
                && consumer.cached_info().num_ack_pending == 0
                && consumer.cached_info().num_pending == 0
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        done.is_ok(),
        "the work queue did not drain within {within:?}"
    );
}

/// Waits until the backlog's consumer is empty after its stream's leaders
/// changed: empty once, then empty again after one ack wait. A consumer
/// leader elected in a kill may not have the acks its predecessor took
/// (nats-server 2.9): it counts those messages as delivered and
/// unacknowledged until their ack wait passes, then redelivers them. The
/// workers must stay up through one ack wait (2 s in [`RESILIENT`]), a
/// timer in the server no event here announces, and answer the
/// redeliveries; then the consumer must be empty again.
pub async fn wait_for_drained_after_failovers(js: &jetstream::Context) {
    wait_for_drained(js, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_for_drained(js, Duration::from_secs(60)).await;
}

/// Short retries and quick redelivery, and enough deliveries that a crash
/// never dead-letters.
pub const RESILIENT: &[(&str, &str)] = &[
    ("ROTATION_WORKER_WORKER__ACK_WAIT_SECS", "2"),
    ("ROTATION_WORKER_WORKER__MAX_DELIVER", "100"),
    ("ROTATION_WORKER_WORKER__RETRY_BUDGET_MS", "1000"),
];

pub fn assert_clean(logs: &str, raw: &[u8], secrets: &[String]) {
    let secrets = || secrets.iter().map(String::as_str);
    assert_eq!(
        leaked_secret(logs.as_bytes(), secrets()),
        None,
        "secret in logs"
    );
    assert_eq!(
        leaked_secret(raw, secrets()),
        None,
        "secret in an outcome event"
    );
}

async fn sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice(backend: Backend) {
    let env = TestEnv::on(backend);
    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let store = env.store().await;
    let work = Workload::seed(&store, 200, 10).await;
    let mut rng = Rng::new();

    // Create the streams, then queue the whole workload.
    let first = env.worker(&nats, RESILIENT).await;
    let mut logs = first.kill().await;
    work.publish(&js, 0..work.len()).await;

    for _ in 0..4 {
        let worker = env.worker(&nats, RESILIENT).await;
        tokio::time::sleep(Duration::from_millis(50 + rng.below(400))).await;
        logs.push_str(&worker.kill().await);
    }
    let worker = env.worker(&nats, RESILIENT).await;
    wait_for_outcomes(&js, work.len(), Duration::from_secs(180)).await;
    wait_for_drained(&js, Duration::from_secs(60)).await;
    logs.push_str(&worker.kill().await);
    assert!(logs.matches("rotation-worker ready").count() >= 6);

    let raw = work.verify(&store, &js, false).await;
    assert_clean(&logs, &raw, &work.secrets());
    let secrets = work.secrets();
    assert_eq!(
        leaked_secret(&env.at_rest().await, secrets.iter().map(String::as_str)),
        None,
        "secret at rest"
    );
}

#[tokio::test]
async fn postgresql_restarted_mid_stream_is_ridden_out() {
    let cluster = PgCluster::start().await;
    let url = cluster.url("rotation_worker");
    let env = TestEnv::new();
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    let store = env.store_with_url(&url).await;
    let work = Workload::seed(&store, 100, 10).await;

    let mut extra = RESILIENT.to_vec();
    extra.push(("DATABASE_URL", url.as_str()));
    let worker = env.spawn_worker(&nats, &extra).await;
    work.publish(&js, 0..work.len() / 2).await;
    wait_for_outcomes(&js, 100, Duration::from_secs(60)).await;
    cluster.stop();
    work.publish(&js, work.len() / 2..work.len()).await;
    worker.wait_for_log("store unavailable").await;
    cluster.resume().await;
    wait_for_outcomes(&js, work.len(), Duration::from_secs(180)).await;
    wait_for_drained(&js, Duration::from_secs(60)).await;
    let logs = worker.stop().await;

    let store = env.store_with_url(&url).await;
    let raw = work.verify(&store, &js, false).await;
    assert_clean(&logs, &raw, &work.secrets());
}

async fn nats_restarted_mid_stream_is_ridden_out(backend: Backend) {
    let env = TestEnv::on(backend);
    let mut nats = NatsServer::start().await;
    let store = env.store().await;
    let work = Workload::seed(&store, 100, 10).await;
    let worker = env.spawn_worker(&nats, RESILIENT).await;
    let js = jetstream::new(nats.client().await);
    work.publish(&js, 0..work.len() / 2).await;
    wait_for_outcomes(&js, 100, Duration::from_secs(60)).await;

    nats.restart().await;
    let js = jetstream::new(nats.client().await);
    work.publish(&js, work.len() / 2..work.len()).await;
    if let Err(state) = try_wait_for_outcomes(&js, work.len(), Duration::from_secs(180)).await {
        // What the worker saw beside its outcome lines, to tell a stalled
        // worker from events or outcomes the killed server did not keep.
        let logs = worker.logs.text();
        let outcome = |l: &str| l.contains("rotation handled") || l.contains("rotation refused");
        let outcomes = logs.lines().filter(|l| outcome(l)).count();
        let mut other: Vec<&str> = logs
            .lines()
            .filter(|l| !outcome(l))
            .rev()
            .take(60)
            .collect();
        other.reverse();
        panic!(
            "{state}\nthe worker logged {outcomes} outcomes; its last other lines:\n{}",
            other.join("\n")
        );
    }
    wait_for_drained(&js, Duration::from_secs(60)).await;
    let logs = worker.stop().await;
    assert!(
        logs.contains("disconnected from NATS"),
        "the restart was seen"
    );

    let raw = work.verify(&store, &js, true).await;
    assert_clean(&logs, &raw, &work.secrets());
}

/// The consumer deleted while the worker runs, then lost by a server that
/// restarts without it (as a cluster restarted whole may lose it): each
/// time the worker creates it again and drains what waited, without a
/// restart of its own.
#[tokio::test]
async fn a_lost_consumer_is_created_again() {
    let env = TestEnv::new();
    let mut nats = NatsServer::start().await;
    let store = env.store().await;
    let work = Workload::seed(&store, 30, 6).await;
    let worker = env.spawn_worker(&nats, RESILIENT).await;
    let js = jetstream::new(nats.client().await);
    let third = work.len() / 3;
    work.publish(&js, 0..third).await;
    wait_for_outcomes(&js, third, Duration::from_secs(60)).await;
    wait_for_drained(&js, Duration::from_secs(60)).await;

    let inbound = js.get_stream("VAULT_ROTATIONS").await.unwrap();
    delete_consumer(&inbound).await;
    work.publish(&js, third..2 * third).await;
    worker.wait_for_log("created it again").await;
    wait_for_outcomes(&js, 2 * third, Duration::from_secs(60)).await;
    wait_for_drained(&js, Duration::from_secs(60)).await;

    nats.kill();
    // A consumer created a moment ago may not be on disk yet (2.9 writes
    // it lazily); either way the restarted server does not know it, and
    // the worker must say it created it again.
    if let Some(consumer_dir) = find_dir(nats.store_dir.path(), "obs/rotation-worker") {
        std::fs::remove_dir_all(&consumer_dir).unwrap();
    }
    nats.restart().await;
    let js = jetstream::new(nats.client().await);
    work.publish(&js, 2 * third..work.len()).await;
    worker.wait_for_logs("created it again", 2).await;
    wait_for_outcomes(&js, work.len(), Duration::from_secs(60)).await;
    wait_for_drained(&js, Duration::from_secs(60)).await;
    let logs = worker.stop().await;
    let raw = work.verify(&store, &js, true).await;
    assert_clean(&logs, &raw, &work.secrets());
}

/// Deletes the worker's consumer. nats-server 2.9 may refuse while it is
/// still writing the consumer's state (the acks just received): "unlinkat
/// …/obs/rotation-worker: directory not empty"; asked again, it deletes.
async fn delete_consumer(inbound: &jetstream::stream::Stream) {
    for _ in 0..100 {
        match inbound.delete_consumer("rotation-worker").await {
            Ok(_) => return,
            Err(e) if e.to_string().contains("directory not empty") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("deleting the consumer: {e}"),
        }
    }
    panic!("the server kept refusing to delete the consumer");
}

/// The directory under `root` whose path ends with `tail`.
fn find_dir(root: &std::path::Path, tail: &str) -> Option<std::path::PathBuf> {
    if root.ends_with(tail) {
        return Some(root.to_owned());
    }
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_dir(&e.path(), tail))
}

#[tokio::test]
async fn three_workers_share_one_consumer_and_survive_losing_one() {
    let env = TestEnv::new();
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    let store = env.store().await;
    let work = Workload::seed(&store, 150, 10).await;
    let first = env.worker(&nats, RESILIENT).await;
    let mut logs = first.kill().await;
    work.publish(&js, 0..work.len()).await;

    // A small in-flight window each, so that no worker can take the whole
    // backlog before the others have pulled: the work is shared.
    let mut sharing = RESILIENT.to_vec();
    sharing.push(("ROTATION_WORKER_WORKER__MAX_IN_FLIGHT", "32"));
    let workers: Vec<Worker> =
        futures::future::join_all((0..3).map(|_| env.worker(&nats, &sharing))).await;
    let mut workers = workers.into_iter();
    let doomed = workers.next().unwrap();
    doomed.wait_for_log("rotation handled").await;
    let doomed_logs = doomed.kill().await;
    wait_for_outcomes(&js, work.len(), Duration::from_secs(180)).await;
    wait_for_drained(&js, Duration::from_secs(60)).await;

    let mut handled = vec![doomed_logs.matches("rotation handled").count()];
    logs.push_str(&doomed_logs);
    for worker in workers {
        let l = worker.kill().await;
        handled.push(l.matches("rotation handled").count());
        logs.push_str(&l);
    }
    assert!(
        handled.iter().all(|&n| n > 0),
        "the work was shared: {handled:?}"
    );
    let raw = work.verify(&store, &js, false).await;
    assert_clean(&logs, &raw, &work.secrets());
}

/// Crashes at the exact points between commit, outcome and ack, then lets
/// a healthy worker finish: nothing lost, nothing applied twice.
async fn crash_at(backend: Backend, point: &str) {
    let env = TestEnv::on(backend);
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    let store = env.store().await;
    let work = Workload::seed(&store, 50, 4).await;
    let first = env.worker(&nats, RESILIENT).await;
    let mut logs = first.kill().await;
    work.publish(&js, 0..work.len()).await;

    let mut crashing = RESILIENT.to_vec();
    crashing.push(("ROTATION_WORKER_CRASHPOINT", point));
    let doomed = env.worker(&nats, &crashing).await;
    doomed
        .wait_for_log("aborting at the configured crash point")
        .await;
    logs.push_str(&doomed.kill().await);

    let worker = env.worker(&nats, RESILIENT).await;
    wait_for_outcomes(&js, work.len(), Duration::from_secs(120)).await;
    wait_for_drained(&js, Duration::from_secs(60)).await;
    logs.push_str(&worker.kill().await);
    let raw = work.verify(&store, &js, false).await;
    assert_clean(&logs, &raw, &work.secrets());
}

async fn a_crash_between_commit_and_outcome_loses_nothing(backend: Backend) {
    crash_at(backend, "after-commit").await;
}

async fn a_crash_between_outcome_and_ack_applies_nothing_twice(backend: Backend) {
    crash_at(backend, "after-outcome").await;
}

crate::on_both_stores!(
    sigkill_at_random_moments_loses_nothing_and_applies_nothing_twice,
    nats_restarted_mid_stream_is_ridden_out,
    a_crash_between_commit_and_outcome_loses_nothing,
    a_crash_between_outcome_and_ack_applies_nothing_twice,
);
