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
//! The lanes and the dispatcher are in `lanes.rs`; carrying out what the
//! delivery policy (`settle.rs`, a pure table) decides of each handled
//! message is `answer.rs`; the sources are `sources.rs`.
//!
//! [`App::build`] sets all this up on a client, a store and a key ring
//! handed to it; [`App::run_until`] runs it until its shutdown future
//! resolves (SIGTERM/SIGINT for `rotation-worker run`): the sources stop
//! taking messages, lanes finish what they hold within the grace period,
//! the NATS connection is drained.

mod answer;
mod connect;
mod http;
mod lanes;
pub(crate) mod schedule;
mod settle;
mod sources;
mod topology;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{Client, Subject, service};
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Ingest, Settings, WorkerSettings};
use crate::crypto::KeyRing;
use crate::endpoints::Inbound;
use crate::event::Decoded;
use crate::rotator::Rotator;
use crate::store::Store;
use crate::telemetry::{self, Metrics, Telemetry};
use crate::vault::Vault;
use crate::wire::Publisher;
use lanes::{Dispatcher, start_lanes};
use settle::{Kind, Policy};

pub use connect::{NatsConfigError, Servers, connect, connect_until_up, install_crypto_provider};
pub use http::ProbeServer;
pub use sources::SERVICE_NAME;
pub use topology::{ServerFeatures, Topology, ensure_topology};

/// The rotator the settings describe, with its Vault client.
pub fn rotator(settings: &Settings, store: Arc<dyn Store>) -> anyhow::Result<Rotator> {
    let w = &settings.worker;
    let vault = Vault::new(&settings.vault)?;
    Ok(Rotator::new(store, w.retry, w.max_clock_skew)
        .with_vault(vault, settings.vault.verify)
        .with_previous_retention(w.previous_secret_retention)
        .with_renewal(settings.renewal)
        .with_attempt_bound(settings.database.lock_timeout))
}

/// Where a message came from, and so how it is finished.
enum Source {
    /// From the JetStream consumer, with its delivery count.
    Stream(jetstream::Message, i64),
    /// From a core subscription, with its reply subject if any.
    Core(Option<Subject>),
    /// From a service endpoint: the request, and the endpoint's row of the
    /// table.
    Request(service::Request, &'static Inbound),
    /// A request its lane has already answered ([`answer::reply_first`]):
    /// its log line, to be written, and its outcome event remain.
    Answered(&'static Inbound, answer::LogLine),
    /// From the renewal schedule: nothing to acknowledge or answer but
    /// the outcome event.
    Schedule,
}

impl Source {
    /// The `path` label of metrics and logs.
    fn path(&self) -> &'static str {
        match self {
            Self::Stream(..) => "event",
            Self::Core(_) => "core",
            Self::Request(..) | Self::Answered(..) => "request",
            Self::Schedule => "schedule",
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
            Self::Request(..) | Self::Answered(..) => Kind::Request,
            Self::Schedule => Kind::Schedule,
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
    /// What the connected nats-server offers beyond 2.9.
    features: ServerFeatures,
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
            policy: w.delivery,
            reply_to: ReplyTo {
                prefixes: settings.nats.reply_prefixes.clone(),
                own_inbox: settings.nats.inbox_prefix.clone(),
            },
            features: ServerFeatures::of_server(js),
        })
    }
}

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
    /// requests) and the periodic pruning, all until `stop`. The
    /// dispatcher goes to the sources, so the lanes end after them.
    fn start(self, w: &WorkerSettings, stop: &CancellationToken) -> TaskTracker {
        let tracker = TaskTracker::new();
        let dispatcher = self.dispatcher;
        let (caught_up, delivered) = tokio::sync::watch::channel(false);
        match self.ingress {
            Ingress::Jetstream(topology) => tracker.spawn(sources::jetstream(
                *topology,
                dispatcher.clone(),
                caught_up,
                w.clone(),
                stop.clone(),
            )),
            Ingress::Core(subscriber) => {
                // A core subscription has no backlog to wait for.
                caught_up.send_replace(true);
                tracker.spawn(sources::core(subscriber, dispatcher.clone(), stop.clone()))
            }
        };
        tracker.spawn(schedule::schedule(dispatcher.clone(), stop.clone()));
        let rotator = dispatcher.shared.rotator.clone();
        tracker.spawn(sources::requests(self.service, dispatcher, stop.clone()));
        tracker.spawn(prune(rotator, w.clone(), delivered, stop.clone()));
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
        let (nats, pool) = (client.clone(), Arc::downgrade(&store));
        telemetry.watch(move || telemetry::Connections {
            nats_connected: nats.connection_state() == async_nats::connection::State::Connected,
            pool: pool.upgrade().map(|store| {
                let p = store.pool_state();
                (p.in_use, p.size, p.max)
            }),
        });
        let server = match (server, settings.telemetry.http_addr) {
            (Some(server), _) => Some(server),
            (None, Some(addr)) => Some(ProbeServer::start(addr, telemetry).await?),
            (None, None) => None,
        };
        let js = jetstream::new(client.clone());
        let shared = Arc::new(Shared::new(settings, store.clone(), keys, &client, &js)?);
        let (lanes, dispatcher) = start_lanes(&shared);
        let ingress = ingress_when_placed(&client, &js, w, server.as_ref()).await?;
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

    /// The store the worker was built on.
    pub fn store(&self) -> Arc<dyn Store> {
        self.sources.store.clone()
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

/// [`ingress`], tried again while JetStream is not there yet or cannot
/// place the streams' replicas yet (a cluster forming, a node down): one
/// WARN line per try, and `/readyz` says what the worker waits for. Any
/// other failure ends the start-up. Cancel the future to give up.
async fn ingress_when_placed(
    client: &Client,
    js: &jetstream::Context,
    w: &WorkerSettings,
    probes: Option<&ProbeServer>,
) -> anyhow::Result<Ingress> {
    let mut delays = connect::start_delays();
    loop {
        match ingress(client, js, w).await {
            Err(e) if topology::passes(&e) => {
                let delay = delays.next().unwrap_or(connect::START_DELAY_MAX);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64,
                    "JetStream cannot set up the streams yet");
                if let Some(probes) = probes {
                    probes.starting(&format!("waiting for JetStream: {e}"));
                }
                tokio::time::sleep(delay).await;
            }
            done => return done,
        }
    }
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

/// How often the planner's statistics are refreshed where the database
/// does not refresh them itself: a table taking a thousand events a second
/// grows tenfold in its first minutes, and a plan made for it empty would
/// be kept.
const REFRESH_STATISTICS_EVERY: Duration = Duration::from_secs(60);

/// Until the source says the start's backlog has been delivered, or has
/// ended without a word.
async fn caught_up(delivered: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = delivered.wait_for(|caught_up| *caught_up).await;
}

/// Refreshes the planner's statistics where the database does not
/// (PostgreSQL with `autovacuum` off; see `docs/deployment.md`).
async fn refresh_statistics(store: &Arc<dyn Store>) {
    match store.refresh_statistics().await {
        Ok(true) => tracing::debug!("refreshed the planner's statistics (autovacuum is off)"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "refreshing the planner's statistics failed"),
    }
}

/// Forgets processed event ids older than the retention and erases the
/// previous secrets kept past theirs, every few minutes (an expired
/// previous secret is refused from the moment it expires; this erases it).
///
/// The first sweep catches up on what expired while no worker ran, once
/// the backlog waiting at the start has been delivered (`delivered`), or
/// one period after the start: its scans of the integrations (a third of
/// a second of PostgreSQL's time at a million) would otherwise take from
/// the drain a restart is most often followed by.
async fn prune(
    rotator: Rotator,
    w: WorkerSettings,
    mut delivered: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let store = rotator.store().clone();
    let retention = time::Duration::try_from(w.dedupe_retention).unwrap_or(time::Duration::MAX);
    let mut every =
        tokio::time::interval_at(tokio::time::Instant::now() + PRUNE_EVERY, PRUNE_EVERY);
    let mut first = true;
    // The first analysis one period after the start, not at it: it would
    // find the tables as the last run left them, and at a million
    // integrations it takes PostgreSQL a third of a second, which a start
    // with a backlog would take from the drain.
    let mut statistics = tokio::time::interval_at(
        tokio::time::Instant::now() + REFRESH_STATISTICS_EVERY,
        REFRESH_STATISTICS_EVERY,
    );
    loop {
        tokio::select! {
            // A source ends at shutdown too: no sweep then.
            biased;
            _ = shutdown.cancelled() => return,
            _ = statistics.tick() => {
                refresh_statistics(&store).await;
                continue;
            }
            () = caught_up(&mut delivered), if first => every.reset(),
            _ = every.tick() => {}
        }
        first = false;
        let now = time::OffsetDateTime::now_utc();
        match store.prune_processed(now - retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "forgot old processed event ids"),
            Err(e) => tracing::warn!(error = %e, "pruning processed event ids failed"),
        }
        // A secret a renewal replaced is destroyed in Vault first.
        rotator.retire_expired_previous(now).await;
        match store.erase_expired_previous(now).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(erased = n, "erased expired previous secrets"),
            Err(e) => tracing::warn!(error = %e, "erasing expired previous secrets failed"),
        }
    }
}
