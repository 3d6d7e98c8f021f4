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

/// Binds `addr` and serves until shutdown; returns the bound address.
pub(super) async fn serve(
    addr: SocketAddr,
    probes: Probes,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for metrics and health: {e}"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Arc::new(probes));
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics and health server stopped");
        }
    });
    Ok((local, task))
}
