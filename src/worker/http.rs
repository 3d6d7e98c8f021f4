//! The worker's small HTTP side: `/metrics` for Prometheus, `/healthz`
//! (the process answers) and `/readyz` (started, the database answers, the
//! NATS connection is up and, with JetStream ingest, the consumer exists),
//! for container probes. It serves from the first moment of start-up, so
//! an orchestrator sees why a worker is not ready yet.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::Client;
use async_nats::connection::State;
use async_nats::jetstream;
use axum::Router;
use axum::extract::State as Extract;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerSettings;
use crate::store::Store;
use crate::telemetry::Telemetry;

/// What the probes look at once the worker runs.
pub(super) struct Probes {
    pub(super) store: Arc<dyn Store>,
    pub(super) client: Client,
    /// The JetStream context and settings, when ingest is JetStream.
    pub(super) jetstream: Option<(jetstream::Context, WorkerSettings)>,
}

/// How long `/readyz` waits for its checks, which run side by side: the
/// answer leaves within Kubernetes' default probe timeout (1 s) whatever
/// the dependencies do.
const PROBE_TIMEOUT: Duration = Duration::from_millis(400);

impl Probes {
    /// Why the worker is not ready, if it is not.
    async fn not_ready(&self) -> Option<&'static str> {
        if self.client.connection_state() != State::Connected {
            return Some("NATS disconnected");
        }
        let store = tokio::time::timeout(PROBE_TIMEOUT, self.store.ping());
        let jetstream = async {
            match &self.jetstream {
                None => None,
                Some((js, w)) => tokio::time::timeout(PROBE_TIMEOUT, jetstream_not_ready(js, w))
                    .await
                    .unwrap_or(Some("JetStream did not answer")),
            }
        };
        match tokio::join!(store, jetstream) {
            (Ok(Ok(())), why) => why,
            _ => Some("database unavailable"),
        }
    }
}

/// Why JetStream cannot deliver: the inbound stream has no leader (a
/// cluster that lost its quorum for it), or the consumer is gone.
async fn jetstream_not_ready(js: &jetstream::Context, w: &WorkerSettings) -> Option<&'static str> {
    let Ok(stream) = js.get_stream_no_info(&w.stream).await else {
        return Some("inbound stream unavailable");
    };
    match stream.get_info().await {
        Ok(info) if info.cluster.as_ref().is_some_and(|c| c.leader.is_none()) => {
            return Some("inbound stream has no leader");
        }
        Ok(_) => {}
        // A stream without a leader cannot answer for itself either.
        Err(_) => return Some("inbound stream has no leader"),
    }
    let consumer = js
        .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(&w.consumer, &w.stream)
        .await;
    consumer.err().map(|_| "JetStream consumer unavailable")
}

/// Where the worker is on its way to ready.
enum Readiness {
    /// Starting: why it is not ready yet.
    Starting(String),
    /// Running: ready when the checks pass.
    Running(Arc<Probes>),
}

/// What the handlers share.
#[derive(Clone)]
struct Shared {
    readiness: Arc<RwLock<Readiness>>,
    telemetry: Arc<Telemetry>,
}

async fn metrics(Extract(shared): Extract<Shared>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.telemetry.prometheus_text(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(Extract(shared): Extract<Shared>) -> (StatusCode, String) {
    let probes = match &*shared.readiness.read().unwrap_or_else(|e| e.into_inner()) {
        Readiness::Starting(why) => Err(why.clone()),
        Readiness::Running(probes) => Ok(probes.clone()),
    };
    let why = match probes {
        Err(why) => Some(why),
        Ok(probes) => probes.not_ready().await.map(str::to_owned),
    };
    match why {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The probe server, serving from the moment it is started (before the
/// worker connects to anything): `/healthz` answers 200 at once, `/readyz`
/// 503 with the reason until the worker runs.
pub struct ProbeServer {
    local: SocketAddr,
    readiness: Arc<RwLock<Readiness>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl ProbeServer {
    /// Binds `addr` and serves.
    pub async fn start(addr: SocketAddr, telemetry: Arc<Telemetry>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics and health: {e}"))?;
        let local = listener.local_addr()?;
        let readiness = Arc::new(RwLock::new(Readiness::Starting("starting".into())));
        let router = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(Shared {
                readiness: readiness.clone(),
                telemetry,
            });
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "metrics and health server stopped");
            }
        });
        tracing::info!(addr = %local, "serving /metrics, /healthz and /readyz");
        Ok(Self {
            local,
            readiness,
            stop,
            task,
        })
    }

    /// The bound address (a port of 0 in the settings is the one chosen).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Says why the worker is not ready yet.
    pub fn starting(&self, why: &str) {
        self.set(Readiness::Starting(why.to_owned()));
    }

    /// From now on `/readyz` checks `probes`.
    pub(super) fn running(&self, probes: Probes) {
        self.set(Readiness::Running(Arc::new(probes)));
    }

    fn set(&self, readiness: Readiness) {
        *self.readiness.write().unwrap_or_else(|e| e.into_inner()) = readiness;
    }

    /// Stops serving.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
