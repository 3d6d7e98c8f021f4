//! Telemetry, built in one place: logs, traces and metrics.
//!
//! - **Logs** go to stderr (stdout belongs to the CLI's JSON), as text or
//!   JSON, filtered by `RUST_LOG` or `log.level`.
//! - **Traces**: `tracing` spans become OpenTelemetry spans. An SDK tracer is
//!   always installed, so every span has real ids and the W3C context can be
//!   continued across NATS even when nothing is exported; spans are exported
//!   over OTLP/HTTP only when an endpoint is configured. The exporter's own
//!   HTTP stack is kept out of the OpenTelemetry layer, or its logs would be
//!   exported in a loop.
//! - **Metrics** are OpenTelemetry instruments read by a Prometheus registry
//!   (served at `/metrics`) and, with an endpoint, pushed over OTLP.

use std::sync::OnceLock;

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _, UpDownCounter};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// The service name when neither `OTEL_SERVICE_NAME` nor the config set one.
pub const SERVICE_NAME: &str = "rotation-worker";

/// Handles to flush and shut down telemetry, and the metrics registry.
#[derive(Debug)]
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    registry: prometheus::Registry,
    /// Whether spans and metrics are exported over OTLP.
    pub exporting: bool,
}

/// The configured OTLP base endpoint: the standard environment variables
/// first, then the config file. `None` turns export off.
fn otlp_endpoint(settings: &TelemetrySettings) -> Option<Option<String>> {
    let env_set = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var(v).is_ok_and(|s| !s.is_empty()));
    if env_set {
        // The exporter reads the variables itself.
        Some(None)
    } else {
        settings
            .otlp_endpoint
            .as_deref()
            .map(|base| Some(base.trim_end_matches('/').to_owned()))
    }
}

fn resource(settings: &TelemetrySettings) -> Resource {
    let mut builder = Resource::builder();
    // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by the
    // default detectors; the config only fills in a missing name.
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        builder = builder.with_service_name(settings.service_name.clone());
    }
    builder
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Where log lines go.
pub enum LogOutput {
    /// Standard error, coloured only when it is a terminal.
    Stderr,
    /// A writer of the caller's, never coloured: tests that run the worker
    /// in their own process read its lines this way.
    Writer(BoxMakeWriter),
}

/// Installs logging, tracing and metrics, logging to stderr. Call once,
/// before any metric is recorded; later calls only install what is missing.
pub fn init(log: &LogSettings, settings: &TelemetrySettings) -> Telemetry {
    init_with(log, settings, LogOutput::Stderr)
}

/// [`init`], with log lines going to `output`.
pub fn init_with(log: &LogSettings, settings: &TelemetrySettings, output: LogOutput) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let endpoint = otlp_endpoint(settings);
    let mut export_errors = Vec::new();
    let (tracer_builder, mut meter_builder) =
        otlp_exporters(settings, endpoint.as_ref(), &mut export_errors);
    let registry = prometheus::Registry::new();
    match opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .build()
    {
        Ok(reader) => meter_builder = meter_builder.with_reader(reader),
        Err(e) => export_errors.push(format!("Prometheus exporter: {e}")),
    }
    let tracer_provider = tracer_builder.build();
    let meter_provider = meter_builder.build();
    opentelemetry::global::set_tracer_provider(tracer_provider.clone());
    opentelemetry::global::set_meter_provider(meter_provider.clone());
    install_subscriber(log, output, &tracer_provider);
    for error in export_errors {
        tracing::warn!(%error, "telemetry export disabled");
    }
    let _ = METRICS.set(Metrics::new(&meter_provider));
    Telemetry {
        tracer_provider,
        meter_provider,
        registry,
        exporting: endpoint.is_some(),
    }
}

/// The tracer and meter providers' builders, with OTLP exporters when an
/// endpoint is configured; what could not be built is added to `errors`.
fn otlp_exporters(
    settings: &TelemetrySettings,
    endpoint: Option<&Option<String>>,
    errors: &mut Vec<String>,
) -> (
    opentelemetry_sdk::trace::TracerProviderBuilder,
    opentelemetry_sdk::metrics::MeterProviderBuilder,
) {
    let resource = resource(settings);
    let mut tracer_builder = SdkTracerProvider::builder().with_resource(resource.clone());
    let mut meter_builder = SdkMeterProvider::builder().with_resource(resource);
    let Some(endpoint) = endpoint else {
        return (tracer_builder, meter_builder);
    };
    let mut spans = opentelemetry_otlp::SpanExporter::builder().with_http();
    let mut metrics = opentelemetry_otlp::MetricExporter::builder().with_http();
    if let Some(base) = endpoint {
        spans = spans.with_endpoint(format!("{base}/v1/traces"));
        metrics = metrics.with_endpoint(format!("{base}/v1/metrics"));
    }
    match spans.build() {
        Ok(exporter) => tracer_builder = tracer_builder.with_batch_exporter(exporter),
        Err(e) => errors.push(format!("OTLP span exporter: {e}")),
    }
    match metrics.build() {
        Ok(exporter) => meter_builder = meter_builder.with_periodic_exporter(exporter),
        Err(e) => errors.push(format!("OTLP metric exporter: {e}")),
    }
    (tracer_builder, meter_builder)
}

/// Installs the global subscriber: formatted lines filtered by `RUST_LOG`
/// or `log.level`, and this crate's spans as OpenTelemetry spans. A
/// subscriber installed before stays.
fn install_subscriber(log: &LogSettings, output: LogOutput, tracer_provider: &SdkTracerProvider) {
    let fmt_filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal, never in files or log pipelines.
    let fmt = match output {
        LogOutput::Stderr => tracing_subscriber::fmt::layer()
            .with_writer(BoxMakeWriter::new(std::io::stderr))
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        LogOutput::Writer(writer) => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(false),
    };
    let fmt = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    // Only this crate's spans become OpenTelemetry spans; the exporter's
    // HTTP stack (hyper, reqwest, h2) and the SDK itself never do.
    let otel_filter = Targets::new()
        .with_target("rotation_worker", tracing::Level::INFO)
        .with_default(tracing_subscriber::filter::LevelFilter::OFF);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer(SERVICE_NAME))
        .with_filter(otel_filter);
    let _ = Registry::default()
        .with(fmt.with_filter(fmt_filter))
        .with(otel)
        .try_init();
}

impl Telemetry {
    /// The metrics in the Prometheus text format.
    pub fn prometheus_text(&self) -> String {
        let mut out = Vec::new();
        let families = self.registry.gather();
        if let Err(e) =
            prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut out)
        {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Flushes and stops the exporters.
    pub fn shutdown(&self) {
        if let Err(e) = self.tracer_provider.shutdown() {
            tracing::debug!(error = %e, "tracer shutdown");
        }
        if let Err(e) = self.meter_provider.shutdown() {
            tracing::debug!(error = %e, "meter shutdown");
        }
    }
}

/// The worker's instruments.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Handled messages by `status` and `path` (event, request, core).
    pub rotations: Counter<u64>,
    /// Time from receipt to outcome, by `path`.
    pub duration: Histogram<f64>,
    /// Store retries within a delivery.
    pub retries: Counter<u64>,
    /// Messages delivered more than once.
    pub redeliveries: Counter<u64>,
    /// Events recognised as already processed.
    pub dedupe_hits: Counter<u64>,
    /// Stale (409) events dropped.
    pub stale: Counter<u64>,
    /// Messages set aside in the dead-letter stream.
    pub dead_lettered: Counter<u64>,
    /// Wrapping tokens Vault refused (invalid, expired or already used):
    /// possible interceptions.
    pub wrapping_failures: Counter<u64>,
    /// Messages held by the worker right now.
    pub in_flight: UpDownCounter<i64>,
    /// Time from `rotatedAt` to the commit of the rotation.
    pub lag: Histogram<f64>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

impl Metrics {
    fn new(provider: &SdkMeterProvider) -> Self {
        let meter = provider.meter(SERVICE_NAME);
        let seconds = vec![
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        Self {
            rotations: meter
                .u64_counter("rotation_worker_rotations")
                .with_description("Handled rotation messages by status and path")
                .build(),
            duration: meter
                .f64_histogram("rotation_worker_processing_duration")
                .with_unit("s")
                .with_description("Time from receipt to outcome")
                .with_boundaries(seconds.clone())
                .build(),
            retries: meter
                .u64_counter("rotation_worker_retries")
                .with_description("Store retries within a delivery")
                .build(),
            redeliveries: meter
                .u64_counter("rotation_worker_redeliveries")
                .with_description("Messages delivered more than once")
                .build(),
            dedupe_hits: meter
                .u64_counter("rotation_worker_dedupe_hits")
                .with_description("Events recognised as already processed")
                .build(),
            stale: meter
                .u64_counter("rotation_worker_stale_drops")
                .with_description("Events older than the rotation already applied (409)")
                .build(),
            dead_lettered: meter
                .u64_counter("rotation_worker_dead_lettered")
                .with_description("Messages set aside in the dead-letter stream")
                .build(),
            wrapping_failures: meter
                .u64_counter("rotation_worker_wrapping_failures")
                .with_description(
                    "Wrapping tokens Vault refused as invalid, expired or already used",
                )
                .build(),
            in_flight: meter
                .i64_up_down_counter("rotation_worker_in_flight")
                .with_description("Messages held by this worker")
                .build(),
            lag: meter
                .f64_histogram("rotation_worker_rotation_lag")
                .with_unit("s")
                .with_description("Time from rotatedAt to the commit of the rotation")
                .with_boundaries(vec![
                    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0,
                ])
                .build(),
        }
    }

    /// The instruments; no-ops until [`init`] has run.
    pub fn get() -> &'static Metrics {
        METRICS.get_or_init(|| Metrics::new(&SdkMeterProvider::builder().build()))
    }
}

/// Reads W3C headers from a NATS header map (lowercase names: the map is
/// case-sensitive).
struct HeaderExtractor<'a>(&'a [(&'static str, Option<&'a str>)]);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| *k == key).and_then(|(_, v)| *v)
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| *k)
            .collect()
    }
}

/// The remote parent described by inbound `traceparent`/`tracestate`.
pub fn remote_context(traceparent: Option<&str>, tracestate: Option<&str>) -> Context {
    let headers = [("traceparent", traceparent), ("tracestate", tracestate)];
    TraceContextPropagator::new().extract(&HeaderExtractor(&headers))
}

struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Writes the span's W3C context into NATS headers.
pub fn inject(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut NatsInjector(headers));
}
