//! `rotation-worker run`: the NATS side of the worker.
//!
//! Three sources feed one set of *lanes*: the JetStream consumer (or a core
//! queue subscription), and the request-reply service endpoint. A message
//! goes to the lane its integration id hashes to, so messages of one
//! integration are handled one after another in arrival order, while lanes
//! run in parallel. A lane takes what has queued up (up to `max_batch`) and
//! hands it to the [`Rotator`] as one transaction; then, per message, it
//! publishes the outcome event, waits for the stream's PubAck, and only then
//! acknowledges, replies or NAKs.
//!
//! [`App::build`] sets all this up on a client, a store and a key ring
//! handed to it; [`App::run_until`] runs it until its shutdown future
//! resolves (SIGTERM/SIGINT for `rotation-worker run`): the sources stop
//! taking messages, lanes finish what they hold within the grace period,
//! the NATS connection is drained.

mod connect;
mod http;
mod settle;
mod sources;
mod topology;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, HeaderMap, Subject, service};
use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Ingest, Settings, WorkerSettings};
use crate::crashpoint::crashpoint;
use crate::crypto::KeyRing;
use crate::dlq::{DeadLetter, SUBJECT_DEAD_LETTER};
use crate::event::{
    Decoded, Envelope, Failure, Operation, SUBJECT_ROLLBACK, SUBJECT_ROTATE, SUBJECT_ROTATED,
    Status,
};
use crate::rotator::{Handled, RetryPolicy, Rotator};
use crate::store::Store;
use crate::telemetry::{self, Metrics, Telemetry};
use crate::vault::Vault;
use crate::wire::{self, Publisher};
use backon::Retryable;
use opentelemetry::KeyValue;
use opentelemetry::trace::TraceContextExt;
use settle::{Action, Kind, Policy};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

pub use connect::{NatsConfigError, Servers, connect, connect_until_up, install_crypto_provider};
pub use http::ProbeServer;
pub use sources::SERVICE_NAME;
pub use topology::{Topology, ensure_topology};

/// The retry policy the settings describe.
pub fn retry_policy(w: &WorkerSettings) -> RetryPolicy {
    RetryPolicy {
        min_delay: w.retry.min_delay,
        max_delay: w.retry.max_delay,
        budget: w.retry.budget,
    }
}

/// The rotator the settings describe, with its Vault client.
pub fn rotator(settings: &Settings, store: Arc<dyn Store>) -> anyhow::Result<Rotator> {
    let w = &settings.worker;
    let vault = Vault::new(&settings.vault)?;
    Ok(Rotator::new(store, retry_policy(w), w.max_clock_skew)
        .with_vault(vault, settings.vault.verify)
        .with_previous_retention(w.previous_secret_retention)
        .with_attempt_bound(settings.database.lock_timeout))
}

/// Where a message came from, and so how it is finished.
enum Source {
    /// From the JetStream consumer, with its delivery count.
    Stream(jetstream::Message, i64),
    /// From a core subscription, with its reply subject if any.
    Core(Option<Subject>),
    /// From the service endpoint.
    Request(service::Request),
}

impl Source {
    /// The `path` label of metrics and logs.
    fn path(&self) -> &'static str {
        match self {
            Self::Stream(..) => "event",
            Self::Core(_) => "core",
            Self::Request(_) => "request",
        }
    }

    fn attempt(&self) -> i64 {
        match self {
            Self::Stream(_, delivered) => *delivered,
            _ => 1,
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Self::Stream(..) => Kind::Stream,
            Self::Core(_) => Kind::Core,
            Self::Request(_) => Kind::Request,
        }
    }
}

/// Counts a message as held until it is dropped, and releases its permit.
struct Held {
    _permit: OwnedSemaphorePermit,
}

impl Held {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        Metrics::get().in_flight.add(1, &[]);
        Self { _permit: permit }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        Metrics::get().in_flight.add(-1, &[]);
    }
}

/// A message on its way through a lane, with its CONSUMER span and the
/// time it arrived.
struct Item {
    decoded: Decoded,
    source: Source,
    span: tracing::Span,
    received: Instant,
    held: Held,
}

/// What the lanes share.
struct Shared {
    rotator: Rotator,
    /// `db.system.name` of the store, for the transaction span.
    db_system: &'static str,
    publisher: Publisher,
    client: Client,
    keys: Arc<KeyRing>,
    settings: WorkerSettings,
    /// What becomes of a handled message.
    policy: Policy,
    /// Where a request's reply may go.
    reply_to: ReplyTo,
}

/// Where a request's reply may go: under `nats.reply_prefixes`, never
/// under the worker's own inbox prefix.
struct ReplyTo {
    prefixes: Vec<String>,
    own_inbox: String,
}

impl Shared {
    fn new(
        settings: &Settings,
        store: Arc<dyn Store>,
        keys: Arc<KeyRing>,
        client: &Client,
        js: &jetstream::Context,
    ) -> anyhow::Result<Self> {
        let w = &settings.worker;
        let publisher = Publisher::new(w.ingest, client, js);
        Ok(Self {
            db_system: match store.backend() {
                "postgres" => "postgresql",
                other => other,
            },
            rotator: rotator(settings, store)?,
            publisher,
            client: client.clone(),
            keys,
            settings: w.clone(),
            policy: Policy::of(w),
            reply_to: ReplyTo {
                prefixes: settings.nats.reply_prefixes.clone(),
                own_inbox: settings.nats.inbox_prefix.clone(),
            },
        })
    }
}

/// Hands messages to lanes by integration id.
#[derive(Clone)]
struct Dispatcher {
    lanes: Vec<mpsc::Sender<Item>>,
    permits: Arc<Semaphore>,
    /// For the spans: the client and the consumer's and group's names.
    shared: Arc<Shared>,
}

/// The CONSUMER span of one message, continuing the inbound trace.
fn process_span(decoded: &Decoded, source: &Source, shared: &Shared) -> tracing::Span {
    let w = &shared.settings;
    let (subject, group) = match source {
        Source::Stream(..) => (SUBJECT_ROTATED, &w.consumer),
        Source::Core(_) => (SUBJECT_ROTATED, &w.queue_group),
        Source::Request(_) => match decoded.envelope.operation {
            Operation::Rotate => (SUBJECT_ROTATE, &w.queue_group),
            Operation::Rollback => (SUBJECT_ROLLBACK, &w.queue_group),
        },
    };
    let from = wire::Consumed {
        subject,
        group: Some(group),
        path: source.path(),
        attempt: source.attempt(),
    };
    let parent = telemetry::remote_context(
        decoded.envelope.traceparent.as_deref(),
        decoded.envelope.tracestate.as_deref(),
    );
    wire::process_span(decoded, &from, shared.publisher.server(), parent)
}

impl Dispatcher {
    /// Waits for room (back-pressure on the source), then queues the
    /// message on its lane.
    async fn dispatch(&self, mut decoded: Decoded, source: Source) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        self.find_role(&mut decoded).await;
        if source.attempt() > 1 {
            Metrics::get().redeliveries.add(1, &[]);
        }
        let lane = decoded
            .integration_id()
            .map_or(0, |id| (id.as_u128() % self.lanes.len() as u128) as usize);
        let item = Item {
            span: process_span(&decoded, &source, &self.shared),
            decoded,
            source,
            received: Instant::now(),
            held: Held::new(permit),
        };
        if self.lanes[lane].send(item).await.is_err() {
            tracing::warn!("lane closed; message left for redelivery");
        }
    }
}

impl Dispatcher {
    /// Resolves a message that names a role instead of an integration, so
    /// that it goes to its integration's lane and keeps its order there.
    /// One read, given [`FIND_ROLE_WAIT`] at most (the source waits for
    /// it); if it does not find exactly one integration in time, the
    /// rotator looks again (with retries) and answers.
    async fn find_role(&self, decoded: &mut Decoded) {
        let (Some(role), Ok(key)) = (decoded.role_target(), &decoded.key) else {
            return;
        };
        let store = self.shared.rotator.store();
        let found = tokio::time::timeout(
            FIND_ROLE_WAIT,
            store.integrations_of_role(&key.hash(), role),
        )
        .await;
        if let Ok(Ok(ids)) = found
            && let [id] = ids[..]
        {
            decoded.resolve_to(id);
        }
    }
}

/// How long a source waits for a role to be resolved on arrival: a store
/// that does not answer must not hold up every message behind it.
const FIND_ROLE_WAIT: Duration = Duration::from_millis(250);

/// What the worker is built from, set up by the caller (the CLI, or a test
/// running the worker in its own process).
pub struct Deps {
    /// A connected client (see [`connect`]); the worker drains it when it
    /// stops.
    pub client: Client,
    /// The store, opened and migrated, its keys checked.
    pub store: Arc<dyn Store>,
    /// The key ring dead letters are sealed under.
    pub keys: Arc<KeyRing>,
    /// Telemetry, for `/metrics`.
    pub telemetry: Arc<Telemetry>,
    /// The probe server, already serving (the CLI starts it before
    /// anything else); `None`: the worker starts one on
    /// `telemetry.http_addr`, if set.
    pub probes: Option<ProbeServer>,
}

/// Where events come from, set up and waiting to be read.
enum Ingress {
    /// The durable consumer (boxed: it is large beside a subscription).
    Jetstream(Box<Topology>),
    /// A core queue subscription.
    Core(async_nats::Subscriber),
}

/// What the sources take once the worker runs.
struct Sources {
    ingress: Ingress,
    service: sources::Service,
    dispatcher: Dispatcher,
    store: Arc<dyn Store>,
}

impl Sources {
    /// Starts taking messages (the event source and the service's
    /// requests) and the hourly pruning, all until `stop`. The dispatcher
    /// goes to the sources, so the lanes end after them.
    fn start(self, w: &WorkerSettings, stop: &CancellationToken) -> TaskTracker {
        let tracker = TaskTracker::new();
        let dispatcher = self.dispatcher;
        match self.ingress {
            Ingress::Jetstream(topology) => tracker.spawn(sources::jetstream(
                *topology,
                dispatcher.clone(),
                w.clone(),
                stop.clone(),
            )),
            Ingress::Core(subscriber) => {
                tracker.spawn(sources::core(subscriber, dispatcher.clone(), stop.clone()))
            }
        };
        tracker.spawn(sources::requests(self.service, dispatcher, stop.clone()));
        tracker.spawn(prune(self.store, w.clone(), stop.clone()));
        tracker.close();
        tracker
    }
}

/// The worker, built and not yet running: the streams and the consumer
/// exist, every subscription is in place on the server, the lanes wait for
/// messages and the probe server's port is bound. [`App::run_until`] takes
/// messages until its shutdown future resolves, then drains.
pub struct App {
    settings: WorkerSettings,
    client: Client,
    backend: &'static str,
    lanes: TaskTracker,
    sources: Sources,
    probes: Option<(ProbeServer, http::Probes)>,
}

impl App {
    /// Sets the worker up on `deps`, as `settings` describe.
    pub async fn build(settings: &Settings, deps: Deps) -> anyhow::Result<Self> {
        let w = &settings.worker;
        let Deps {
            client,
            store,
            keys,
            telemetry,
            probes: server,
        } = deps;
        telemetry.watch(&client, &store);
        let server = match (server, settings.telemetry.http_addr) {
            (Some(server), _) => Some(server),
            (None, Some(addr)) => Some(ProbeServer::start(addr, telemetry).await?),
            (None, None) => None,
        };
        let js = jetstream::new(client.clone());
        let shared = Arc::new(Shared::new(settings, store.clone(), keys, &client, &js)?);
        let (lanes, dispatcher) = start_lanes(&shared);
        let ingress = ingress(&client, &js, w).await?;
        let probes = server.map(|server| {
            let checks = http::Probes {
                store: store.clone(),
                client: client.clone(),
                jetstream: (w.ingest == Ingest::Jetstream).then(|| (js.clone(), w.clone())),
            };
            (server, checks)
        });
        let service = sources::start_service(&client, w).await?;
        // Every subscription above is in place on the server before the
        // worker runs and anyone is told it is ready.
        round_trip(&client).await?;
        Ok(Self {
            settings: w.clone(),
            backend: store.backend(),
            sources: Sources {
                ingress,
                service,
                dispatcher,
                store,
            },
            client,
            lanes,
            probes,
        })
    }

    /// The address `/metrics`, `/healthz` and `/readyz` are served on;
    /// `None` when `telemetry.http_addr` is empty.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.probes.as_ref().map(|(server, _)| server.local_addr())
    }

    /// Runs until `shutdown` resolves, then stops taking messages, lets
    /// the lanes finish what they hold within the grace period and drains
    /// the NATS connection. The probes answer until the end.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let w = &self.settings;
        let server = self.probes.map(|(server, checks)| {
            server.running(checks);
            server
        });
        let stop = CancellationToken::new();
        let sources = self.sources.start(w, &stop);
        tracing::info!(
            ingest = ?w.ingest,
            lanes = w.lanes,
            store = self.backend,
            "rotation-worker ready"
        );

        shutdown.await;
        stop.cancel();
        drain(w, &sources, &self.lanes, &self.client).await;
        if let Some(server) = server {
            server.stop().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Starts the lanes and the dispatcher that feeds them.
fn start_lanes(shared: &Arc<Shared>) -> (TaskTracker, Dispatcher) {
    let w = &shared.settings;
    let lanes = TaskTracker::new();
    let mut senders = Vec::new();
    for _ in 0..w.lanes.max(1) {
        // Room for a lane's share of the in-flight messages, so that one
        // busy lane does not hold up the source for the others.
        let room = w.max_batch.max(w.max_in_flight / w.lanes.max(1)).max(1);
        let (tx, rx) = mpsc::channel(room);
        senders.push(tx);
        lanes.spawn(lane(rx, shared.clone(), lanes.clone()));
    }
    lanes.close();
    let dispatcher = Dispatcher {
        lanes: senders,
        permits: Arc::new(Semaphore::new(w.max_in_flight.max(1))),
        shared: shared.clone(),
    };
    (lanes, dispatcher)
}

/// How long a round trip through the server may take at start-up.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(10);

/// A message to the client itself, through the server. The server handles
/// one connection's commands in order, so once it comes back, every
/// subscription this client made before is in place there (`flush` only
/// writes them to the socket).
async fn round_trip(client: &Client) -> anyhow::Result<()> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, Bytes::new()).await?;
    client.flush().await?;
    tokio::time::timeout(ROUND_TRIP_TIMEOUT, echo.next())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("NATS did not answer a round trip in time"))?;
    echo.unsubscribe().await?;
    Ok(())
}

/// Sets up the event source: the streams and the durable consumer, or a
/// core queue subscription.
async fn ingress(
    client: &Client,
    js: &jetstream::Context,
    w: &WorkerSettings,
) -> anyhow::Result<Ingress> {
    match w.ingest {
        Ingest::Jetstream => Ok(Ingress::Jetstream(Box::new(ensure_topology(js, w).await?))),
        Ingest::Core => {
            // Dead letters need their stream even without the others; a
            // server without JetStream keeps none.
            if let Err(e) = topology::ensure_dlq_stream(js, w).await {
                tracing::warn!(error = %e, "no dead-letter stream: messages set aside are only published");
            }
            let subscriber = client
                .queue_subscribe(crate::event::SUBJECT_ROTATED, w.queue_group.clone())
                .await?;
            Ok(Ingress::Core(subscriber))
        }
    }
}

/// Stops taking messages, lets the lanes finish what they hold within the
/// grace period, and drains the NATS connection.
async fn drain(w: &WorkerSettings, sources: &TaskTracker, lanes: &TaskTracker, client: &Client) {
    tracing::info!("shutting down: no new messages; finishing in-flight ones");
    let drained = tokio::time::timeout(w.shutdown_grace, async {
        sources.wait().await;
        lanes.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            grace_ms = w.shutdown_grace.as_millis() as u64,
            "in-flight messages did not finish in time; they will be redelivered"
        );
    }
    if let Err(e) = client.drain().await {
        tracing::warn!(error = %e, "draining the NATS connection failed");
    }
}

/// How often old event ids and expired previous secrets are erased.
const PRUNE_EVERY: Duration = Duration::from_secs(300);

/// Forgets processed event ids older than the retention and erases the
/// previous secrets kept past theirs, every few minutes (an expired
/// previous secret is refused from the moment it expires; this erases it).
async fn prune(store: Arc<dyn Store>, w: WorkerSettings, shutdown: CancellationToken) {
    let retention = time::Duration::try_from(w.dedupe_retention).unwrap_or(time::Duration::MAX);
    let mut every = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let now = time::OffsetDateTime::now_utc();
        match store.prune_processed(now - retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "forgot old processed event ids"),
            Err(e) => tracing::warn!(error = %e, "pruning processed event ids failed"),
        }
        match store.erase_expired_previous(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(erased = n, "erased expired previous secrets"),
            Err(e) => tracing::warn!(error = %e, "erasing expired previous secrets failed"),
        }
    }
}

/// A lane: takes what has queued up and applies it as one batch; then,
/// while the outcome events and acks of that batch are on their way, it
/// takes the next one (the store's order per integration is what matters,
/// and it is kept: one transaction after the other). Ends when every sender
/// is gone, the queue is empty and no message of it waits on a Vault;
/// `finishing` tracks the rest.
///
/// A message that calls its integration's Vault leaves the lane ([`Aside`]):
/// a tenant's Vault may hang, and the lane's other integrations must not
/// wait for it. Messages of that integration that arrive meanwhile wait
/// behind it, in order, and follow it one at a time.
async fn lane(mut rx: mpsc::Receiver<Item>, shared: Arc<Shared>, finishing: TaskTracker) {
    let max_batch = shared.settings.max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch);
    let mut aside = Aside::default();
    // Unbounded, but each message holds an in-flight permit: no more than
    // `max_in_flight` notices can be queued.
    let (done, mut finished) = mpsc::unbounded_channel();
    let mut open = true;
    while open || !aside.waiting.is_empty() {
        tokio::select! {
            taken = rx.recv_many(&mut batch, max_batch), if open => {
                if taken == 0 {
                    open = false;
                    continue;
                }
                let direct = aside.take_in(&shared.rotator, std::mem::take(&mut batch));
                process(&shared, &finishing, direct).await;
                for item in std::mem::take(&mut aside.start) {
                    spawn_aside(&shared, &finishing, &done, item);
                }
            }
            Some(id) = finished.recv() => {
                if let Some(item) = aside.next_of(id) {
                    spawn_aside(&shared, &finishing, &done, item);
                }
            }
        }
    }
}

/// The messages of a lane that call a Vault, handled outside it.
#[derive(Default)]
struct Aside {
    /// Integrations with a message out of the lane, and the messages of
    /// theirs that arrived since, in arrival order.
    waiting: HashMap<Uuid, VecDeque<Item>>,
    /// Messages to start once the lane's current batch has been applied
    /// (it may hold an earlier message of the same integration).
    start: Vec<Item>,
}

impl Aside {
    /// Takes the messages that call a Vault, or that follow one of their
    /// integration, out of `batch`; returns the rest.
    fn take_in(&mut self, rotator: &Rotator, batch: Vec<Item>) -> Vec<Item> {
        let mut direct = Vec::with_capacity(batch.len());
        for item in batch {
            let id = item.decoded.integration_id();
            match id {
                Some(id) if self.waiting.contains_key(&id) => {
                    self.waiting.entry(id).or_default().push_back(item);
                }
                _ if rotator.needs_vault(&item.decoded) => {
                    if let Some(id) = id {
                        self.waiting.insert(id, VecDeque::new());
                    }
                    self.start.push(item);
                }
                _ => direct.push(item),
            }
        }
        direct
    }

    /// The next message of integration `id`, whose last one is done; the
    /// integration is back in the lane once none waits.
    fn next_of(&mut self, id: Uuid) -> Option<Item> {
        let queue = self.waiting.get_mut(&id)?;
        let next = queue.pop_front();
        if next.is_none() {
            self.waiting.remove(&id);
        }
        next
    }
}

/// Handles one message outside its lane, then tells the lane its
/// integration may go on.
fn spawn_aside(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    done: &mpsc::UnboundedSender<Uuid>,
    item: Item,
) {
    let id = item.decoded.integration_id();
    let (shared, finishing, done) = (shared.clone(), tracker.clone(), done.clone());
    tracker.spawn(async move {
        process(&shared, &finishing, vec![item]).await;
        if let Some(id) = id {
            // The lane is gone only at the end of a shutdown's grace.
            let _ = done.send(id);
        }
    });
}

async fn process(shared: &Arc<Shared>, tracker: &TaskTracker, batch: Vec<Item>) {
    // A request already past its deadline (it waited in the lane) is
    // answered 503 at once; the rest share the earliest deadline among
    // them: a request's, or the retry budget from now.
    let now = Instant::now();
    let w = &shared.settings;
    let deadline = |item: &Item| match item.source {
        Source::Request(_) => item.received + w.request_timeout,
        _ => now + w.retry.budget,
    };
    let (late, batch): (Vec<Item>, Vec<Item>) = batch.into_iter().partition(|i| deadline(i) <= now);
    if !late.is_empty() {
        let (decoded, rest) = split(late);
        let handled = decoded.iter().map(Handled::unavailable).collect();
        finish(shared, tracker, handled, decoded, rest);
    }
    // A stream message delivered more often than it may be was never
    // settled (the worker died handling it): set aside before anything,
    // a Vault call included, can end the same way again.
    let (overdelivered, batch): (Vec<Item>, Vec<Item>) = batch
        .into_iter()
        .partition(|i| settle::overdelivered(i.source.kind(), i.source.attempt(), &shared.policy));
    if !overdelivered.is_empty() {
        let (decoded, rest) = split(overdelivered);
        let handled = decoded.iter().map(Handled::overdelivered).collect();
        finish(shared, tracker, handled, decoded, rest);
    }
    let Some(until) = batch.iter().map(deadline).min() else {
        return;
    };
    // One transaction for the batch: a child of the first message's span,
    // linked to the others.
    let tx_span = tracing::info_span!(
        parent: &batch[0].span,
        "transaction",
        otel.name = "rotate transaction",
        otel.kind = "client",
        db.system.name = shared.db_system,
        db.operation.name = "rotate",
        rotation.batch_size = batch.len() as i64,
    );
    for item in &batch[1..] {
        tx_span.add_link(item.span.context().span().span_context().clone());
    }
    let (decoded, rest) = split(batch);
    let handled = match shared
        .rotator
        .handle_until(&decoded, until)
        .instrument(tx_span)
        .await
    {
        Ok(handled) => handled,
        Err(e) => {
            tracing::warn!(error = %e, size = decoded.len(), "store unavailable after retries");
            decoded.iter().map(Handled::unavailable).collect()
        }
    };
    finish(shared, tracker, handled, decoded, rest);
}

/// What settling a message needs beside its decoded form.
type Rest = (Source, tracing::Span, Instant, Held);

fn split(items: Vec<Item>) -> (Vec<Decoded>, Vec<Rest>) {
    items
        .into_iter()
        .map(|i| (i.decoded, (i.source, i.span, i.received, i.held)))
        .unzip()
}

/// Settles each item with its outcome (event, reply, ack, dead letter),
/// in the background: the lane goes on to its next batch meanwhile.
///
/// Each message's future owns what settling it needs (only the envelope of
/// its decoded form: the key and the body are dropped here), and the steps
/// below borrow it: a step that took it by value would keep a copy of its
/// own in the future, and thousands of these wait for PubAcks at once.
fn finish(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    handled: Vec<Handled>,
    decoded: Vec<Decoded>,
    rest: Vec<Rest>,
) {
    let shared = shared.clone();
    tracker.spawn(async move {
        let shared = &shared;
        let finishing = handled.into_iter().zip(decoded).zip(rest).map(
            |((handled, decoded), (source, span, received, held))| {
                let envelope = decoded.envelope;
                async move {
                    settle(shared, &handled, &envelope, &source, received).await;
                    drop(held);
                }
                .instrument(span)
            },
        );
        futures::future::join_all(finishing).await;
    });
}

/// Records the outcome on the current (process) span and in the metrics,
/// and returns the one log line per handled message, to be written once
/// the outcome has left (a reply first: the caller waits for it).
fn observe(handled: &Handled, path: &'static str, attempt: i64, received: Instant) -> LogLine {
    let status = handled.status();
    let elapsed = received.elapsed();
    let metrics = Metrics::get();
    metrics
        .rotations
        .add(1, &Metrics::rotation_labels(status, path));
    metrics
        .duration
        .record(elapsed.as_secs_f64(), &[KeyValue::new("path", path)]);
    wire::record_outcome(&tracing::Span::current(), handled);
    match &handled.result {
        Ok(done) => {
            if done.duplicate {
                metrics.dedupe_hits.add(1, &[]);
            }
            if let (true, Some(at)) = (done.changed, handled.rotated_at) {
                let lag = time::OffsetDateTime::now_utc() - at;
                metrics.lag.record(lag.as_seconds_f64().max(0.0), &[]);
            }
        }
        Err(_) if status == Status::Conflict => metrics.stale.add(1, &[]),
        Err(_) => {}
    }
    LogLine {
        path,
        attempt,
        // To the microsecond: the clock says no more, and the shortest
        // form of such a number is quicker to write and to read.
        duration_ms: (elapsed.as_secs_f64() * 1e6).round() / 1e3,
    }
}

/// What the log line of a handled message says beside the outcome.
struct LogLine {
    path: &'static str,
    attempt: i64,
    duration_ms: f64,
}

impl LogLine {
    /// Writes the line: `rotation handled` or `rotation refused`.
    fn write(self, handled: &Handled) {
        let LogLine {
            path,
            attempt,
            duration_ms,
        } = self;
        // Signed: the OpenTelemetry layer exports unsigned fields as strings.
        let code = i64::from(handled.status().code());
        let event_id = handled.event_id.as_deref().unwrap_or("-");
        let id = handled.integration_id;
        let integration_id: &dyn std::fmt::Display = match &id {
            Some(id) => id,
            None => &"-",
        };
        match &handled.result {
            Ok(done) => tracing::info!(
                path, event_id, %integration_id, status = code, attempt, duration_ms,
                changed = done.changed, duplicate = done.duplicate,
                "rotation handled"
            ),
            Err(failure) => tracing::info!(
                path, event_id, %integration_id, status = code, attempt, duration_ms,
                error = %failure.message,
                "rotation refused"
            ),
        }
    }
}

/// Publishes the outcome event (retrying within the budget) in a PRODUCER
/// span whose context the event carries.
async fn publish_outcome(shared: &Shared, handled: &Handled) -> Result<(), async_nats::Error> {
    let subject = wire::subject(handled);
    let (span, headers) = shared.publisher.outcome_span(handled);
    let body = handled.body();
    // The first attempt takes the headers; a retry builds them again.
    let mut first = Some(headers);
    let attempt = || {
        let headers = first
            .take()
            .unwrap_or_else(|| wire::outcome_headers(handled, &span));
        shared.publisher.publish(subject, headers, body.clone())
    };
    let span = span.clone();
    attempt
        .retry(shared.rotator.retry().backoff())
        .instrument(span)
        .await
}

/// Carries out what the delivery policy ([`settle::decide`]) says of a
/// handled message.
async fn settle(
    shared: &Shared,
    handled: &Handled,
    envelope: &Envelope,
    source: &Source,
    received: Instant,
) {
    let delivered = source.attempt();
    match settle::decide(source.kind(), handled.status(), delivered, &shared.policy) {
        Action::Answer => answer(shared, handled, envelope, source, received).await,
        Action::Retry(delay) => {
            tracing::info!(delivered, "store unavailable; NAK for redelivery");
            if let Source::Stream(message, _) = source {
                ack(message, AckKind::Nak(Some(delay))).await;
            }
        }
        Action::SetAside => {
            let line = observe(handled, source.path(), delivered, received);
            // Boxed, as every rare path: its future would otherwise size
            // every message's.
            Box::pin(set_aside(shared, handled, envelope, source)).await;
            line.write(handled);
        }
    }
}

/// Answers a message. A stream message: outcome event first (stored,
/// PubAck), then the ack; an event that cannot be stored is retried, then
/// set aside ([`settle::unpublished`]). A request (or core message with a
/// reply subject): the reply first, as the caller waits for it, then the
/// outcome event.
async fn answer(
    shared: &Shared,
    handled: &Handled,
    envelope: &Envelope,
    source: &Source,
    received: Instant,
) {
    // The transaction has committed; nothing is published or acked yet.
    crashpoint("after-commit");
    // Recorded before anything leaves, so that whoever sees the outcome
    // also finds it in the metrics; the log line of a request follows its
    // reply.
    let line = observe(handled, source.path(), source.attempt(), received);
    let published = match source {
        Source::Stream(message, delivered) => {
            line.write(handled);
            return answer_stream(shared, handled, envelope, message, *delivered).await;
        }
        Source::Core(reply) => {
            reply_core(shared, reply.as_ref(), handled).await;
            line.write(handled);
            publish_outcome(shared, handled).await
        }
        Source::Request(request) => {
            respond(request, handled).await;
            line.write(handled);
            publish_outcome(shared, handled).await
        }
    };
    if let Err(e) = &published {
        tracing::warn!(error = %e, "publishing the outcome event failed");
    }
}

/// Answers a stream message: the outcome event (stored, PubAck), then the
/// ack; an event that cannot be stored is retried, then set aside.
async fn answer_stream(
    shared: &Shared,
    handled: &Handled,
    envelope: &Envelope,
    message: &jetstream::Message,
    delivered: i64,
) {
    let published = publish_outcome(shared, handled).await;
    // The outcome is stored in the results stream; no ack yet.
    crashpoint("after-outcome");
    let Err(e) = published else {
        ack(message, AckKind::Ack).await;
        return;
    };
    tracing::warn!(error = %e, delivered, "publishing the outcome event failed");
    match settle::unpublished(delivered, &shared.policy) {
        // Redelivered later: the store recognises the event and the
        // outcome is published again.
        Action::Retry(delay) => ack(message, AckKind::Nak(Some(delay))).await,
        _ => {
            Box::pin(set_aside_unpublished(
                shared, handled, envelope, message, delivered,
            ))
            .await
        }
    }
}

/// Sets aside a stream message whose outcome event could not be stored, as
/// a 503: replaying the dead letter publishes the event.
async fn set_aside_unpublished(
    shared: &Shared,
    handled: &Handled,
    envelope: &Envelope,
    message: &jetstream::Message,
    delivered: i64,
) {
    let unannounced = Handled {
        result: Err(Failure {
            status: Status::Unavailable,
            message:
                "the outcome event could not be published; replay the dead letter to publish it"
                    .into(),
        }),
        ..handled.clone()
    };
    let source = Source::Stream(message.clone(), delivered);
    set_aside(shared, &unannounced, envelope, &source).await;
}

/// Answers a core message that asked for a reply.
async fn reply_core(shared: &Shared, reply: Option<&Subject>, handled: &Handled) {
    let Some(reply) = reply.cloned() else { return };
    let (headers, body) = wire::reply_parts(handled);
    if let Err(e) = shared
        .client
        .publish_with_headers(reply, headers, body)
        .await
    {
        tracing::warn!(error = %e, "reply failed");
    }
}

/// Answers a request. A failure goes out through the service's error path,
/// so that $SRV.STATS counts it; the body is the failure JSON either way.
async fn respond(request: &service::Request, handled: &Handled) {
    let (headers, body) = wire::reply_parts(handled);
    let replied = match &handled.result {
        Ok(_) => request.respond_with_headers(Ok(body), headers).await,
        Err(failure) => {
            let error = async_nats::service::error::Error {
                status: failure.message.clone(),
                code: usize::from(failure.status.code()),
            };
            request.respond_error_with_body(error, headers, body).await
        }
    };
    if let Err(e) = replied {
        tracing::warn!(error = %e, "reply failed");
    }
}

/// Sets a message aside: the dead-letter entry (and its 503 failure
/// event), then the reply for a core message, or the ack of a stream
/// message (a NAK when the entry could not be stored).
async fn set_aside(shared: &Shared, handled: &Handled, envelope: &Envelope, source: &Source) {
    let delivered = source.attempt();
    let stored = dead_letter(shared, envelope, handled, delivered).await;
    match source {
        Source::Stream(message, _) if !stored => {
            let delay = shared.policy.nak_delay(delivered);
            ack(message, AckKind::Nak(Some(delay))).await;
        }
        // Rare and final: wait for the server to confirm the ack.
        Source::Stream(message, _) => match message.double_ack().await {
            Ok(()) => tracing::info!(delivered, "dead-lettered message acknowledged"),
            Err(e) => tracing::warn!(error = %e, "ack of a dead-lettered message failed; \
                a redelivery will be dead-lettered again"),
        },
        Source::Core(reply) => reply_core(shared, reply.as_ref(), handled).await,
        Source::Request(request) => respond(request, handled).await,
    }
}

/// Stores the dead-letter entry, then publishes the 503 failure event;
/// true when the entry is stored (the entry is what keeps the message; the
/// event only tells, and may fail for the reason the message is set aside).
async fn dead_letter(
    shared: &Shared,
    envelope: &Envelope,
    handled: &Handled,
    deliveries: i64,
) -> bool {
    let entry = DeadLetter::new(&shared.keys, envelope, handled, deliveries);
    let body = Bytes::from(serde_json::to_vec(&entry).unwrap_or_default());
    let mut headers = HeaderMap::new();
    telemetry::inject(&tracing::Span::current(), &mut headers);
    if let Err(e) = shared
        .publisher
        .publish(SUBJECT_DEAD_LETTER, headers, body)
        .await
    {
        tracing::error!(error = %e, "could not set the message aside");
        return false;
    }
    Metrics::get().dead_lettered.add(1, &[]);
    tracing::warn!(dead_letter_id = %entry.summary.id, event_id = handled.event_id.as_deref().unwrap_or("-"),
        "message set aside in the dead-letter stream");
    if let Err(e) = publish_outcome(shared, handled).await {
        tracing::warn!(error = %e, "publishing the 503 failure event failed");
    }
    true
}

async fn ack(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(error = %e, "acknowledgement failed; the message will be redelivered");
    }
}
