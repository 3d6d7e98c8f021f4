//! Telemetry end to end: spans at a real OTLP/HTTP receiver, Prometheus
//! metrics that move with each status, readiness that follows PostgreSQL,
//! and no secret in any of it.

use std::collections::HashMap;
use std::time::Duration;

use axum::body::Bytes as BodyBytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::helpers::{PgCluster, contains_secret, create_api_key, create_integration, http_get};
use crate::worker::{Fixture, body, headers};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP receiver: every export request's raw bytes, and its spans.
async fn otlp_receiver() -> (String, mpsc::UnboundedReceiver<(Vec<u8>, Vec<Span>)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let traces = {
        let tx = tx.clone();
        move |body: BodyBytes| {
            let tx = tx.clone();
            async move {
                let request =
                    ExportTraceServiceRequest::decode(body.as_ref()).expect("OTLP protobuf");
                let spans = request
                    .resource_spans
                    .into_iter()
                    .flat_map(|r| r.scope_spans)
                    .flat_map(|s| s.spans)
                    .collect();
                let _ = tx.send((body.to_vec(), spans));
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }
    };
    let metrics = move |body: BodyBytes| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((body.to_vec(), Vec::new()));
            (
                [("content-type", "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }
    };
    let app = axum::Router::new()
        .route("/v1/traces", post(traces))
        .route("/v1/metrics", post(metrics));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), rx)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

#[tokio::test]
async fn spans_reach_an_otlp_receiver_with_messaging_attributes() {
    let (endpoint, mut exported) = otlp_receiver().await;
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f
        .env
        .worker(
            &f.nats,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("OTEL_SERVICE_NAME", "rotation-worker-test"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ],
        )
        .await;
    let key = f.key.clone();
    f.remember_secret("s.traced");
    f.publish(
        headers(Some(&key), Some("ev-traced")),
        body(json!({"integrationId": it.id, "secretId": "s.traced"})),
    )
    .await;
    f.next_outcome().await;
    f.publish(
        headers(Some(&key), Some("ev-missing")),
        body(json!({"integrationId": Uuid::nil(), "secretId": "s.traced"})),
    )
    .await;
    f.next_outcome().await;
    let reply = f
        .request(
            headers(Some(&key), Some("req-traced")),
            body(json!({"integrationId": it.id, "secretId": "s.traced"})),
        )
        .await;
    assert_eq!(&reply.header("traceparent").unwrap()[3..35], TRACE_ID);
    f.next_outcome().await;

    // Wait for the spans the three messages must produce.
    let mut raw = Vec::new();
    let mut spans: Vec<Span> = Vec::new();
    let wanted = |spans: &[Span]| {
        let count = |name: &str| spans.iter().filter(|s| s.name == name).count();
        count("process vault.approle.rotated") >= 2
            && count("process vault.approle.rotate") >= 1
            && count("send vault.approle.rotation.completed") >= 2
            && count("send vault.approle.rotation.failed") >= 1
            && count("rotate transaction") >= 3
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while !wanted(&spans) {
            let (bytes, batch) = exported.recv().await.expect("receiver open");
            raw.extend(bytes);
            spans.extend(batch);
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "spans did not arrive: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        )
    });

    let by_event = |name: &str, id: &str| {
        spans
            .iter()
            .find(|s| {
                s.name == name
                    && attributes(s)
                        .get("messaging.message.id")
                        .map(String::as_str)
                        == Some(id)
            })
            .unwrap_or_else(|| panic!("no span {name} for {id}"))
            .clone()
    };
    let process = by_event("process vault.approle.rotated", "ev-traced");
    assert_eq!(
        hex(&process.trace_id),
        TRACE_ID,
        "the inbound trace continues"
    );
    assert_eq!(
        hex(&process.parent_span_id),
        PARENT_SPAN_ID,
        "the inbound span is the parent"
    );
    assert_eq!(process.kind, 5, "CONSUMER");
    let attrs = attributes(&process);
    assert_eq!(attrs["messaging.system"], "nats");
    assert_eq!(attrs["messaging.destination.name"], "vault.approle.rotated");
    assert_eq!(attrs["messaging.operation.type"], "process");
    assert_eq!(attrs["messaging.nats.delivery_attempt"], "1");
    assert_eq!(attrs["rotation.integration_id"], it.id.to_string());
    assert_eq!(attrs["rotation.status"], "200");
    assert!(!attrs.contains_key("error.type"));

    let send = spans
        .iter()
        .find(|s| {
            s.name == "send vault.approle.rotation.completed" && s.parent_span_id == process.span_id
        })
        .expect("a PRODUCER span under the process span");
    assert_eq!(send.kind, 4, "PRODUCER");
    assert_eq!(
        attributes(send)["messaging.message.id"],
        "4:acme:200:ev-traced"
    );
    assert_eq!(
        attributes(send)["messaging.destination.name"],
        "vault.approle.rotation.completed"
    );
    let tx = spans
        .iter()
        .find(|s| s.name == "rotate transaction" && s.parent_span_id == process.span_id)
        .expect("the transaction span under the process span");
    assert_eq!(hex(&tx.trace_id), TRACE_ID);
    assert_eq!(attributes(tx)["db.system.name"], "postgresql");

    let missing = by_event("process vault.approle.rotated", "ev-missing");
    let attrs = attributes(&missing);
    assert_eq!(attrs["rotation.status"], "404");
    assert_eq!(attrs["error.type"], "not_found");
    assert_eq!(
        missing.status.as_ref().map(|s| s.code),
        Some(2),
        "status ERROR"
    );

    let request = by_event("process vault.approle.rotate", "req-traced");
    assert_eq!(
        attributes(&request)["messaging.destination.name"],
        "vault.approle.rotate"
    );
    assert_eq!(hex(&request.trace_id), TRACE_ID);

    let (code, logs) = worker.terminate().await;
    assert_eq!(code, Some(0));
    // Whatever else arrived while shutting down counts too.
    while let Ok((bytes, _)) = exported.try_recv() {
        raw.extend(bytes);
    }
    for secret in &f.secrets {
        assert!(
            !contains_secret(&raw, secret),
            "secret in exported telemetry"
        );
    }
    f.assert_no_secret_leaked(&logs).await;
}

/// The sum of a metric's samples whose labels include `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_count_each_status_and_health_answers() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.initial").await;
    crate::worker::seed_last_rotation(&f, it.id).await;
    let worker = f
        .env
        .spawn_worker(&f.nats, &[("ROTATION_WORKER_LOG__FORMAT", "json")])
        .await;
    let addr = worker.http_addr();
    assert_eq!(http_get(&addr, "/healthz").await.0, 200);
    assert_eq!(
        http_get(&addr, "/readyz").await,
        (200, "ready\n".to_owned())
    );
    let (status, before) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&before, "rotation_worker_rotations_total", &[]), 0.0);

    let key = f.key.clone();
    let cases = [
        (
            Some(key.as_str()),
            json!({"integrationId": it.id, "secretId": "s.metric", "rotatedAt": "2026-03-01T00:00:00Z"}),
        ),
        (
            Some(key.as_str()),
            json!({"integrationId": it.id, "secretId": "s.metric-old", "rotatedAt": "2026-02-01T00:00:00Z"}),
        ),
        (
            Some(key.as_str()),
            json!({"integrationId": Uuid::nil(), "secretId": "s.x"}),
        ),
        (None, json!({"integrationId": it.id, "secretId": "s.x"})),
        (
            Some(key.as_str()),
            json!({"integrationId": it.id, "secretId": ""}),
        ),
        (
            Some(key.as_str()),
            json!({"integrationId": it.id, "secretId": "s.metric", "eventId": "ev-m"}),
        ),
        (
            Some(key.as_str()),
            json!({"integrationId": it.id, "secretId": "s.metric-2", "eventId": "ev-m"}),
        ),
        // The exact repeat: the first outcome again, a dedupe hit.
        (
            Some(key.as_str()),
            json!({"integrationId": it.id, "secretId": "s.metric", "eventId": "ev-m"}),
        ),
    ];
    for secret in ["s.metric", "s.metric-old", "s.x", "s.metric-2"] {
        f.remember_secret(secret);
    }
    for (k, b) in cases {
        f.publish(headers(k, None), body(b)).await;
        f.next_outcome().await;
    }
    f.request(
        headers(Some(&key), None),
        body(json!({"integrationId": Uuid::nil(), "secretId": "s.x"})),
    )
    .await;
    f.next_outcome().await;

    // A message leaves the in-flight count just after its outcome event is
    // out: scrape until it has.
    let text = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (_, text) = http_get(&addr, "/metrics").await;
            if metric(&text, "rotation_worker_in_flight", &[]) == 0.0 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("in-flight drops to zero");
    let rotations = |status: &str, path: &str| {
        metric(
            &text,
            "rotation_worker_rotations_total",
            &[("status", status), ("path", path)],
        )
    };
    assert_eq!(rotations("200", "event"), 3.0, "{text}");
    // The event id reused with another secret.
    assert_eq!(rotations("422", "event"), 1.0);
    assert_eq!(rotations("409", "event"), 1.0);
    assert_eq!(rotations("404", "event"), 1.0);
    assert_eq!(rotations("401", "event"), 1.0);
    assert_eq!(rotations("400", "event"), 1.0);
    assert_eq!(rotations("404", "request"), 1.0);
    assert_eq!(
        metric(
            &text,
            "rotation_worker_processing_duration_seconds_count",
            &[("path", "event")]
        ),
        8.0
    );
    assert_eq!(metric(&text, "rotation_worker_stale_drops_total", &[]), 1.0);
    assert_eq!(metric(&text, "rotation_worker_dedupe_hits_total", &[]), 1.0);
    assert_eq!(
        metric(&text, "rotation_worker_rotation_lag_seconds_count", &[]),
        1.0
    );
    assert_eq!(metric(&text, "rotation_worker_in_flight", &[]), 0.0);
    assert_eq!(
        metric(&text, "rotation_worker_dead_lettered_total", &[]),
        0.0
    );

    let logs = worker.stop().await;
    // One JSON line per handled message, with the fields operators need.
    let handled: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "rotation handled" || l["message"] == "rotation refused")
        .collect();
    assert_eq!(handled.len(), 9, "{logs}");
    for line in &handled {
        for field in [
            "event_id",
            "integration_id",
            "status",
            "attempt",
            "duration_ms",
            "path",
        ] {
            assert!(!line[field].is_null(), "{field} missing in {line}");
        }
    }
    for secret in &f.secrets {
        assert!(
            !contains_secret(text.as_bytes(), secret),
            "secret in /metrics"
        );
    }
    f.assert_no_secret_leaked(&logs).await;
}

/// Polls `/readyz` until it answers `want` (a state change cannot be
/// awaited as an event from outside the process).
async fn readyz_becomes(addr: &str, want: u16) -> String {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (status, body) = http_get(addr, "/readyz").await;
            if status == want {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("/readyz never answered {want}"))
}

#[tokio::test]
async fn readyz_follows_postgresql_down_and_back() {
    let cluster = PgCluster::start().await;
    let url = cluster.url("rotation_worker");
    let mut f = Fixture::new().await;
    // The worker's store is on the private cluster, which this test stops.
    f.env.env.insert("DATABASE_URL".into(), url.clone());
    let store = f.env.store_with_url(&url).await;
    let key = create_api_key(&store, "acme").await;
    let it = create_integration(&store, "acme", "prod", "s.initial").await;
    drop(store);
    let worker = f.worker().await;
    let addr = worker.http_addr();
    readyz_becomes(&addr, 200).await;

    cluster.stop();
    let why = readyz_becomes(&addr, 503).await;
    assert_eq!(why, "not ready: database unavailable\n");
    assert_eq!(
        http_get(&addr, "/healthz").await.0,
        200,
        "alive while not ready"
    );

    cluster.resume().await;
    readyz_becomes(&addr, 200).await;
    // And it carries on by itself.
    f.remember_secret("s.after-outage");
    f.publish(
        headers(Some(&key), Some("ev-back")),
        body(json!({"integrationId": it.id, "secretId": "s.after-outage"})),
    )
    .await;
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    let stored = worker.store.reveal_secret(it.id).await.unwrap().unwrap();
    assert_eq!(stored.expose_secret(), "s.after-outage");
    let logs = worker.stop().await;
    for secret in ["s.after-outage", key.as_str()] {
        assert!(!contains_secret(logs.as_bytes(), secret));
    }
}
