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

/// The attribute `key` of a span, as exported.
fn value<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
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
                // Distinct names, to tell which one a span carries.
                ("ROTATION_WORKER_WORKER__CONSUMER", "traced-consumer"),
                ("ROTATION_WORKER_WORKER__QUEUE_GROUP", "traced-group"),
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

    // The conventions' operation, group and server, numbers as numbers,
    // and nothing of the tracing layer's own bookkeeping.
    let nats_port = i64::from(f.nats.port);
    for (span, group) in [(&process, "traced-consumer"), (&request, "traced-group")] {
        let attrs = attributes(span);
        assert_eq!(attrs["messaging.operation.name"], "process");
        assert_eq!(attrs["messaging.consumer.group.name"], group);
        assert_eq!(attrs["server.address"], "127.0.0.1");
        assert_eq!(
            value(span, "server.port"),
            Some(&AnyValue::IntValue(nats_port))
        );
        assert_eq!(
            value(span, "messaging.nats.delivery_attempt"),
            Some(&AnyValue::IntValue(1))
        );
    }
    assert_eq!(
        value(&process, "rotation.status"),
        Some(&AnyValue::IntValue(200))
    );
    assert_eq!(
        value(&missing, "rotation.status"),
        Some(&AnyValue::IntValue(404))
    );
    assert_eq!(attributes(send)["messaging.operation.name"], "send");
    assert_eq!(attributes(send)["server.address"], "127.0.0.1");
    assert_eq!(
        value(send, "server.port"),
        Some(&AnyValue::IntValue(nats_port))
    );
    assert!(!attributes(send).contains_key("messaging.consumer.group.name"));
    assert_eq!(
        value(tx, "rotation.batch_size"),
        Some(&AnyValue::IntValue(1))
    );
    for span in &spans {
        // Log lines inside a span become its events, with their `level`
        // and `target` (which the layer always adds).
        let events = span.events.iter().flat_map(|e| &e.attributes);
        let keys = span.attributes.iter().map(|kv| (kv.key.as_str(), false));
        for (key, in_event) in keys.chain(events.map(|kv| (kv.key.as_str(), true))) {
            assert!(
                !["busy_ns", "idle_ns"].contains(&key)
                    && (in_event || key != "target")
                    && !key.starts_with("thread.")
                    && !key.starts_with("code."),
                "{key} exported on {}",
                span.name
            );
        }
        let all = span
            .attributes
            .iter()
            .chain(span.events.iter().flat_map(|e| &e.attributes));
        for kv in all {
            if let Some(AnyValue::StringValue(text)) =
                kv.value.as_ref().and_then(|v| v.value.as_ref())
            {
                assert!(
                    text.parse::<f64>().is_err(),
                    "{} = {text:?}: a number exported as a string",
                    kv.key
                );
            }
        }
    }

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
    // Each line inside a message's span carries its trace and span ids:
    // the publisher's trace, a span of the worker's own per message.
    let mut span_ids = std::collections::HashSet::new();
    for line in &handled {
        assert_eq!(line["trace_id"], TRACE_ID, "{line}");
        let span_id = line["span_id"].as_str().unwrap_or_default();
        assert!(is_span_id(span_id) && span_id != PARENT_SPAN_ID, "{line}");
        span_ids.insert(span_id.to_owned());
    }
    assert_eq!(span_ids.len(), handled.len(), "one span per message");
    let ready = json_line(&logs, "rotation-worker ready");
    assert!(ready.get("trace_id").is_none(), "outside any span: {ready}");
    for secret in &f.secrets {
        assert!(
            !contains_secret(text.as_bytes(), secret),
            "secret in /metrics"
        );
    }
    f.assert_no_secret_leaked(&logs).await;
}

/// The first JSON log line whose message is `message`.
fn json_line(logs: &str, message: &str) -> serde_json::Value {
    logs.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == message)
        .unwrap_or_else(|| panic!("no line {message:?}: {logs}"))
}

fn is_span_id(id: &str) -> bool {
    id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()) && id != "0000000000000000"
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

/// The metric names of docs/operations.md's Observability table, with
/// their label names.
fn documented_metrics() -> Vec<(String, Vec<String>)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .expect("docs/operations.md");
    let section = doc
        .split("## Observability")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("an Observability section");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(|series| match series.split_once('{') {
            Some((name, labels)) => (
                name.to_owned(),
                labels
                    .trim_end_matches('}')
                    .split(',')
                    .map(|l| l.trim().to_owned())
                    .collect(),
            ),
            None => (series.to_owned(), Vec::new()),
        })
        .collect()
}

/// The value of the one sample `name{labels}` (labels in any order), if
/// the scrape has it.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            let pairs: Vec<&str> = rest
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
                .collect();
            metric == name
                && pairs.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(found.len() <= 1, "{name}{labels:?} twice in {text}");
    found.first().copied()
}

#[tokio::test]
async fn a_fresh_worker_shows_every_documented_series() {
    let mut f = Fixture::new().await;
    let worker = f.worker().await;
    let (status, text) = http_get(&worker.http_addr(), "/metrics").await;
    assert_eq!(status, 200);
    let documented = documented_metrics();
    assert!(documented.len() >= 15, "{documented:?}");

    // Every documented series is there, nothing undocumented is.
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for (name, _) in &documented {
        assert!(families.contains(&name.as_str()), "{name} missing:\n{text}");
    }
    for family in &families {
        assert!(
            documented.iter().any(|(name, _)| name == family),
            "{family} is exported but not documented"
        );
    }
    assert!(!text.contains("otel_scope"), "{text}");
    assert!(!text.contains("target_info"), "{text}");

    // Counters at 0 for each documented label set, histograms empty.
    let paths = ["event", "request", "core"];
    for path in paths {
        for status in ["200", "400", "401", "404", "409", "422", "503"] {
            let labels = [("path", path), ("status", status)];
            assert_eq!(
                sample(&text, "rotation_worker_rotations_total", &labels),
                Some(0.0),
                "{labels:?}"
            );
        }
        let count = "rotation_worker_processing_duration_seconds_count";
        assert_eq!(sample(&text, count, &[("path", path)]), Some(0.0), "{path}");
    }
    for (name, labels) in &documented {
        let unlabelled = labels.is_empty() && name.starts_with("rotation_worker_");
        if unlabelled && name.ends_with("_total") {
            assert_eq!(sample(&text, name, &[]), Some(0.0), "{name}");
        }
    }
    assert_eq!(sample(&text, "rotation_worker_in_flight", &[]), Some(0.0));
    let lag = "rotation_worker_rotation_lag_seconds_count";
    assert_eq!(sample(&text, lag, &[]), Some(0.0));

    // The connections, the process and the build.
    assert_eq!(
        sample(&text, "rotation_worker_nats_connected", &[]),
        Some(1.0)
    );
    let pool = |name: &str| sample(&text, name, &[]).unwrap_or_else(|| panic!("{name}"));
    assert!(pool("rotation_worker_db_pool_size") >= 1.0);
    assert!(pool("rotation_worker_db_pool_in_use") <= pool("rotation_worker_db_pool_size"));
    assert!(pool("rotation_worker_db_pool_max") >= pool("rotation_worker_db_pool_size"));
    for name in [
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ] {
        assert!(pool(name) > 0.0, "{name}");
    }
    assert!(pool("process_cpu_seconds_total") >= 0.0);
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(
        sample(&text, "rotation_worker_build_info", &version),
        Some(1.0)
    );

    // NATS going away shows.
    f.nats.kill();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (_, text) = http_get(&worker.http_addr(), "/metrics").await;
            if sample(&text, "rotation_worker_nats_connected", &[]) == Some(0.0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the gauge drops to 0 without NATS");
    drop(worker);
}

/// Under `RUST_LOG=trace` the worker logs no API key and no secret, and
/// each NATS connection event once: the NATS client, which logs payloads
/// at TRACE and every event at INFO, is capped at WARN.
#[tokio::test]
async fn trace_logs_hold_no_secret_and_each_connection_event_once() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.initial").await;
    let worker = f.env.worker(&f.nats, &[("RUST_LOG", "trace")]).await;
    let key = f.key.clone();
    let revoked = f.revoked_key.clone();
    f.remember_secret("s.trace-1");
    f.remember_secret("s.trace-2");
    for (key, secret) in [(&key, "s.trace-1"), (&revoked, "s.trace-2")] {
        f.publish(
            headers(Some(key), None),
            body(json!({"integrationId": it.id, "secretId": secret})),
        )
        .await;
        f.next_outcome().await;
    }
    f.request(
        headers(Some(&key), None),
        body(json!({"integrationId": it.id, "secretId": "s.trace-2"})),
    )
    .await;
    f.next_outcome().await;

    // A disconnection and a reconnection.
    f.nats.restart().await;
    worker.wait_for_log("disconnected from NATS").await;
    worker.logs.wait_for("connected to NATS", 2).await;
    let (code, logs) = worker.terminate().await;
    assert_eq!(code, Some(0));

    assert!(
        logs.lines().any(|l| l.contains("TRACE")),
        "the worker logged at TRACE"
    );
    f.assert_no_secret_leaked(&logs).await;
    let lines = |needle: &str| logs.lines().filter(|l| l.contains(needle)).count();
    let events = [lines("connected to NATS"), lines("disconnected from NATS")];
    assert_eq!(
        events,
        [2, 1],
        "one line per connection event (connected, disconnected, connected):\n{logs}"
    );
    // The client reports `closed` from a task of its own, which the
    // process may not run again once the connection is drained.
    assert!(lines("event=closed") <= 1, "{logs}");
    // Not a second one from the NATS client ("event: connected",
    // "connected successfully"), nor anything else of it below WARN.
    assert_eq!(lines("async_nats"), 0, "{logs}");

    // Text lines show each field of a message's span once, and none of
    // the `otel.*` instructions.
    let in_span: Vec<&str> = logs.lines().filter(|l| l.contains("process{")).collect();
    assert!(in_span.len() >= 3, "{logs}");
    for line in in_span {
        let fields = line
            .split_once("process{")
            .and_then(|(_, rest)| rest.split_once('}'))
            .map_or("", |(fields, _)| fields);
        let keys: Vec<&str> = fields
            .split(' ')
            .filter_map(|f| Some(f.split_once('=')?.0))
            .collect();
        let unique: std::collections::HashSet<&str> = keys.iter().copied().collect();
        assert_eq!(unique.len(), keys.len(), "a field twice: {line}");
        assert!(!fields.contains("otel."), "{line}");
        assert!(keys.contains(&"rotation.integration_id"), "{line}");
    }
}

/// A dead letter remembers the trace of the delivery that set it aside;
/// `dlq replay` continues it, and the outcome event carries it on.
#[tokio::test]
async fn a_replayed_dead_letter_continues_the_trace() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.initial").await;
    // JSON at WARN: the line that sets the message aside is a WARN inside
    // the message's INFO span, which the log filter hides.
    let worker = f
        .env
        .spawn_worker(
            &f.nats,
            &[
                ("ROTATION_WORKER_LOG__FORMAT", "json"),
                ("ROTATION_WORKER_LOG__LEVEL", "warn"),
            ],
        )
        .await;
    let outage = crate::worker::Outage::begin(&f.env).await;
    f.remember_secret("s.replayed");
    f.publish(
        headers(Some(&f.key.clone()), Some("ev-replayed")),
        body(json!({"integrationId": it.id, "secretId": "s.replayed"})),
    )
    .await;
    let failed = f.next_outcome().await;
    assert_eq!(failed.body["status"], 503);
    worker
        .wait_for_log("set aside in the dead-letter stream")
        .await;
    outage.end().await;
    let logs = worker.stop().await;
    let set_aside = json_line(&logs, "message set aside in the dead-letter stream");
    assert_eq!(set_aside["trace_id"], TRACE_ID, "{set_aside}");
    assert!(is_span_id(
        set_aside["span_id"].as_str().unwrap_or_default()
    ));

    f.env.env.insert("NATS_URL".to_owned(), f.nats.url.clone());
    let replayed = f.env.cli(&["dlq", "replay"], "").await.json();
    assert_eq!(replayed[0]["status"], 200, "{replayed}");
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    let traceparent = done.header("traceparent").expect("a traceparent");
    assert_eq!(&traceparent[3..35], TRACE_ID, "the publisher's trace");
    assert_ne!(&traceparent[36..52], PARENT_SPAN_ID, "a span of its own");
    f.assert_no_secret_leaked(&logs).await;
}
