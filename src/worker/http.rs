//! The worker's small HTTP side: `/metrics` for Prometheus, `/healthz`
//! (the process answers) and `/readyz` (the database answers, the NATS
//! connection is up and, with JetStream ingest, the consumer exists), for
//! container probes.

use std::net::SocketAddr;
use std::sync::Arc;
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

/// What the probes look at.
pub(super) struct Probes {
    pub(super) store: Arc<dyn Store>,
    pub(super) client: Client,
    /// The JetStream context and settings, when ingest is JetStream.
    pub(super) jetstream: Option<(jetstream::Context, WorkerSettings)>,
    pub(super) telemetry: Arc<Telemetry>,
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl Probes {
    /// Why the worker is not ready, if it is not.
    async fn not_ready(&self) -> Option<&'static str> {
        match tokio::time::timeout(PROBE_TIMEOUT, self.store.ping()).await {
            Ok(Ok(())) => {}
            _ => return Some("database unavailable"),
        }
        if self.client.connection_state() != State::Connected {
            return Some("NATS disconnected");
        }
        if let Some((js, w)) = &self.jetstream {
            let consumer = js.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(
                &w.consumer,
                &w.stream,
            );
            match tokio::time::timeout(PROBE_TIMEOUT, consumer).await {
                Ok(Ok(_)) => {}
                _ => return Some("JetStream consumer unavailable"),
            }
        }
        None
    }
}

async fn metrics(Extract(probes): Extract<Arc<Probes>>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4")],
        probes.telemetry.prometheus_text(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(Extract(probes): Extract<Arc<Probes>>) -> (StatusCode, String) {
    match probes.not_ready().await {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The probe server: its port bound, serving once [`Listener::serve`] is
/// called (connections wait in the backlog until then).
pub(super) struct Listener {
    listener: tokio::net::TcpListener,
    local: SocketAddr,
    router: Router,
}

/// Binds `addr` for the probes.
pub(super) async fn bind(addr: SocketAddr, probes: Probes) -> anyhow::Result<Listener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics and health: {e}"))?;
    let local = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(probes));
    Ok(Listener {
        listener,
        local,
        router,
    })
}

impl Listener {
    /// The bound address (a port of 0 in the settings is the one chosen).
    pub(super) fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves until shutdown.
    pub(super) fn serve(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let served = axum::serve(self.listener, self.router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "metrics and health server stopped");
            }
        })
    }
}
