//! Telemetry, built in one place: logs, traces and metrics.
//!
//! - **Logs** go to stderr (stdout belongs to the CLI's JSON), as text or
//!   JSON, filtered by `RUST_LOG` or `log.level` and, under that, by fixed
//!   caps on dependencies that would log message payloads (API keys and
//!   secrets) or repeat our own lines. JSON lines inside a span carry its
//!   `trace_id` and `span_id`.
//! - **Traces**: with an OTLP endpoint configured, `tracing` spans become
//!   OpenTelemetry spans exported over OTLP/HTTP. The exporter's own HTTP
//!   stack is kept out of the OpenTelemetry layer, or its logs would be
//!   exported in a loop. Without one, each span gets only its ids
//!   ([`ids`]): the W3C context still continues across NATS and into JSON
//!   lines, without building spans nobody receives.
//! - **Metrics** are OpenTelemetry instruments read by a Prometheus registry
//!   (served at `/metrics`) and, with an endpoint, pushed over OTLP. Every
//!   series shows from the start (counters at 0, histograms empty), so
//!   that `rate()` and alerts see the first event. The registry adds what
//!   only Prometheus knows: the process metrics and the build info.
//!
//! It knows nothing of the rest of the worker but its settings: the
//! connection gauges read [`Connections`] through a closure the worker
//! hands to [`Telemetry::watch`], trace context goes into whatever headers
//! the caller writes ([`inject`]), and status labels are numbers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use opentelemetry::metrics::{MeterProvider as _, ObservableGauge};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, FilterExt, LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriter};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

mod ids;
pub mod log_writer;
mod metrics;
mod text;

use metrics::{DURATION_BOUNDS, DURATION_HELP, LAG_BOUNDS, LAG_HELP, METRICS};
pub use metrics::{Metrics, PATHS};

/// The service name when neither `OTEL_SERVICE_NAME` nor the config set one.
pub const SERVICE_NAME: &str = "rotation-worker";

/// Handles to flush and shut down telemetry, and the metrics registry.
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
    meter_provider: SdkMeterProvider,
    registry: prometheus::Registry,
    /// What the connection gauges read (see [`Telemetry::watch`]).
    watched: Arc<Mutex<Option<Watched>>>,
    /// The connection gauges, kept as long as the provider.
    _gauges: Vec<ObservableGauge<u64>>,
    /// Whether spans and metrics are exported over OTLP.
    pub exporting: bool,
}

/// W3C trace context header names (NATS header maps are case-sensitive,
/// and the W3C names are lowercase).
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The values of the `status` label of `rotation_worker_rotations_total`:
/// the contract's status codes (`event::Status::ALL`, which a test there
/// checks against this list).
pub const STATUS_LABELS: [u16; 7] = [200, 400, 401, 404, 409, 422, 503];

/// What the connection gauges show, as the worker reads it at each scrape:
/// telemetry knows neither NATS nor the store, only these values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    /// Whether the NATS connection is up.
    pub nats_connected: bool,
    /// Database connections in use, open, and the most the pool opens;
    /// `None` when the store is gone.
    pub pool: Option<(u32, u32, u32)>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting", &self.exporting)
            .finish_non_exhaustive()
    }
}

/// Reads the worker's connections for the gauges.
type Watched = Box<dyn Fn() -> Connections + Send + Sync>;

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
    // No `otel_scope_name` label: every series comes from the one meter
    // of this crate, so the label would only repeat its name.
    match opentelemetry_prometheus::exporter()
        .with_registry(registry.clone())
        .without_target_info()
        .scope_info_enabled(false)
        .build()
    {
        Ok(reader) => meter_builder = meter_builder.with_reader(reader),
        Err(e) => export_errors.push(format!("Prometheus exporter: {e}")),
    }
    let process = ProcessAndBuild::new().and_then(|p| registry.register(Box::new(p)));
    if let Err(e) = process {
        export_errors.push(format!("process metrics: {e}"));
    }
    let tracer_provider = tracer_builder.build();
    let meter_provider = meter_builder.build();
    opentelemetry::global::set_tracer_provider(tracer_provider.clone());
    opentelemetry::global::set_meter_provider(meter_provider.clone());
    install_subscriber(log, output, &tracer_provider, endpoint.is_some());
    for error in export_errors {
        tracing::warn!(%error, "telemetry export disabled");
    }
    let _ = METRICS.set(Metrics::new(&meter_provider));
    Metrics::get().start_at_zero();
    let watched = Arc::new(Mutex::new(None));
    Telemetry {
        _gauges: connection_gauges(&meter_provider, &watched),
        tracer_provider,
        meter_provider,
        registry,
        watched,
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

/// Dependencies whose lines stop at a level whatever `RUST_LOG` or
/// `log.level` asks for. `async_nats` logs every protocol operation (with
/// its headers and payload: API keys and secrets) at TRACE and JetStream
/// API bodies at DEBUG, and logs each connection event at INFO, which the
/// worker's own event callback logs already (`worker::connect`).
pub const LOG_CAPS: &[(&str, tracing::Level)] = &[("async_nats", tracing::Level::WARN)];

/// Installs the global subscriber: formatted lines filtered by `RUST_LOG`
/// or `log.level` and the [`LOG_CAPS`], and this crate's spans as
/// OpenTelemetry spans when `exporting`, else with their ids only. A
/// subscriber installed before stays.
fn install_subscriber(
    log: &LogSettings,
    output: LogOutput,
    tracer_provider: &SdkTracerProvider,
    exporting: bool,
) {
    let asked = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // A line passes when both let it through: the caps only ever lower
    // what was asked (`RUST_LOG=trace` gives `async_nats` at WARN; an
    // operator may still ask for less, `async_nats=error`, never more).
    let caps = LOG_CAPS.iter().fold(
        Targets::new().with_default(LevelFilter::TRACE),
        |t, (target, level)| t.with_target(*target, *level),
    );
    let fmt_filter = asked.and(caps);
    // Colours only for a terminal, never in files or log pipelines. The
    // writer is named, not boxed: a boxed one costs an allocation a line.
    let fmt = match output {
        LogOutput::Stderr => lines_layer(
            log.format,
            log_writer::QueuedStderr,
            std::io::IsTerminal::is_terminal(&std::io::stderr()),
        ),
        LogOutput::Writer(writer) => lines_layer(log.format, writer, false),
    };
    // Only this crate's spans become OpenTelemetry spans; the exporter's
    // HTTP stack (hyper, reqwest, h2) and the SDK itself never do.
    let traced = || {
        Targets::new()
            .with_target("rotation_worker", tracing::Level::INFO)
            .with_default(LevelFilter::OFF)
    };
    // Spans carry what their fields say, not the layer's bookkeeping
    // (busy and idle times, thread, source location, module path).
    let otel = exporting.then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer_provider.tracer(SERVICE_NAME))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
            .with_target(false)
            .with_filter(traced())
    });
    let ids = (!exporting).then(|| {
        ids::IdsLayer {
            entered: log.format == LogFormat::Json,
        }
        .with_filter(traced())
    });
    let installed = Registry::default()
        .with(fmt.with_filter(fmt_filter))
        .with(otel)
        .with(ids)
        .try_init();
    if installed.is_ok() {
        EXPORTING_SPANS.store(exporting, Ordering::Relaxed);
    }
}

/// The layer of formatted lines, in `format`, written to `writer`.
fn lines_layer<W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn Layer<Registry> + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => fmt.fmt_fields(text::TextFields).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .map_event_format(WithTraceIds)
            .boxed(),
    }
}

/// Whether the installed subscriber exports spans, as [`init`] set it up.
static EXPORTING_SPANS: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported: without export, a span that would only
/// give a message another id need not be made.
pub fn exporting_spans() -> bool {
    EXPORTING_SPANS.load(Ordering::Relaxed)
}

/// JSON lines that start with the `trace_id` and `span_id` of the span the
/// event happens in. They come from the span the trace layer (OpenTelemetry
/// or [`ids`]) last entered on the thread, not from the spans the log
/// filter shows: a WARN line inside an INFO span carries them under
/// `RUST_LOG=warn` too.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let entered = ids::entered().or_else(|| {
            let cx = Context::current();
            let span = cx.span();
            let ids = span.span_context();
            ids.is_valid().then(|| (ids.trace_id(), ids.span_id()))
        });
        let Some((trace_id, span_id)) = entered else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let rest = line.strip_prefix('{').ok_or(std::fmt::Error)?;
        let comma = if rest.starts_with('}') { "" } else { "," };
        write!(
            writer,
            "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"{comma}{rest}"
        )
    }
}

/// The gauges of the worker's connections: NATS up or not, and the
/// database pool's use. They read the client and store last given to
/// [`Telemetry::watch`], and show nothing before.
fn connection_gauges(
    provider: &SdkMeterProvider,
    watched: &Arc<Mutex<Option<Watched>>>,
) -> Vec<ObservableGauge<u64>> {
    let meter = provider.meter(SERVICE_NAME);
    let gauge = |name: &'static str, help: &'static str, read: fn(Connections) -> Option<u64>| {
        let watched = watched.clone();
        meter
            .u64_observable_gauge(name)
            .with_description(help)
            .with_callback(move |observer| {
                let watched = watched.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(value) = watched.as_ref().and_then(|reading| read(reading())) {
                    observer.observe(value, &[]);
                }
            })
            .build()
    };
    vec![
        gauge(
            "rotation_worker_nats_connected",
            "1 while the NATS connection is up, else 0",
            |c| Some(u64::from(c.nats_connected)),
        ),
        gauge(
            "rotation_worker_db_pool_in_use",
            "Database connections in use",
            |c| c.pool.map(|(in_use, _, _)| u64::from(in_use)),
        ),
        gauge(
            "rotation_worker_db_pool_size",
            "Database connections open (in use or idle)",
            |c| c.pool.map(|(_, size, _)| u64::from(size)),
        ),
        gauge(
            "rotation_worker_db_pool_max",
            "The most database connections the pool opens",
            |c| c.pool.map(|(_, _, max)| u64::from(max)),
        ),
    ]
}

/// `USER_HZ`, the unit of the CPU times in `/proc`: 100 on every Linux
/// the worker runs on (Prometheus' own procfs library fixes it too; the
/// alternative, `sysconf`, needs unsafe code).
const USER_HZ: f64 = 100.0;

/// What `/proc/self` tells of the process; `None` where it cannot be read.
#[derive(Debug, Default)]
struct ProcessStats {
    cpu_seconds: Option<f64>,
    resident_bytes: Option<f64>,
    virtual_bytes: Option<f64>,
    open_fds: Option<f64>,
    max_fds: Option<f64>,
    start_time_seconds: Option<f64>,
}

impl ProcessStats {
    fn read() -> Self {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        // Fields of /proc/self/stat after the command name, which is in
        // parentheses and may hold spaces: index 0 is field 3 (`state`).
        let stat = read("/proc/self/stat");
        let stat: Vec<f64> = stat
            .as_deref()
            .and_then(|s| s.rsplit_once(')'))
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .map(|f| f.parse().unwrap_or(f64::NAN))
                    .collect()
            })
            .unwrap_or_default();
        let field = |n: usize| stat.get(n - 3).copied().filter(|v| v.is_finite());
        let line_value = |text: Option<String>, prefix: &str| {
            text?
                .lines()
                .find_map(|l| l.strip_prefix(prefix))?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        };
        let boot_time = line_value(read("/proc/stat"), "btime ");
        Self {
            cpu_seconds: field(14)
                .zip(field(15))
                .map(|(user, system)| (user + system) / USER_HZ),
            resident_bytes: line_value(read("/proc/self/status"), "VmRSS:").map(|kb| kb * 1024.0),
            virtual_bytes: field(23),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|dir| dir.count() as f64),
            max_fds: line_value(read("/proc/self/limits"), "Max open files"),
            start_time_seconds: boot_time
                .zip(field(22))
                .map(|(boot, ticks)| boot + ticks / USER_HZ),
        }
    }
}

/// What only Prometheus shows: the process metrics Prometheus clients
/// export (client_golang's names and meanings), read from `/proc/self` at
/// each scrape, and `rotation_worker_build_info`. (The `prometheus` crate
/// has a process collector behind its `process` feature, but it needs
/// `procfs`, unsafe `sysconf` calls, and counts CPU in whole seconds.)
/// OTLP carries the version as the resource's `service.version`.
struct ProcessAndBuild {
    cpu: prometheus::Counter,
    resident: prometheus::Gauge,
    virtual_memory: prometheus::Gauge,
    open_fds: prometheus::Gauge,
    max_fds: prometheus::Gauge,
    start_time: prometheus::Gauge,
    build_info: prometheus::Gauge,
}

impl ProcessAndBuild {
    fn new() -> prometheus::Result<Self> {
        use prometheus::{Gauge, Opts};
        let version = Opts::new(
            "rotation_worker_build_info",
            "The worker's version; always 1",
        )
        .const_label("version", env!("CARGO_PKG_VERSION"));
        let metrics = Self {
            cpu: prometheus::Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            )?,
            resident: Gauge::new(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            )?,
            virtual_memory: Gauge::new(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            )?,
            open_fds: Gauge::new("process_open_fds", "Number of open file descriptors.")?,
            max_fds: Gauge::new(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            )?,
            start_time: Gauge::new(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            )?,
            build_info: Gauge::with_opts(version)?,
        };
        metrics.build_info.set(1.0);
        Ok(metrics)
    }

    fn gauges(&self) -> [&prometheus::Gauge; 6] {
        [
            &self.resident,
            &self.virtual_memory,
            &self.open_fds,
            &self.max_fds,
            &self.start_time,
            &self.build_info,
        ]
    }
}

impl prometheus::core::Collector for ProcessAndBuild {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs = self.cpu.desc();
        descs.extend(self.gauges().into_iter().flat_map(|g| g.desc()));
        descs
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let stats = ProcessStats::read();
        if let Some(seconds) = stats.cpu_seconds {
            // A counter only goes up: add what was spent since the last scrape.
            self.cpu.inc_by((seconds - self.cpu.get()).max(0.0));
        }
        let read = [
            (&self.resident, stats.resident_bytes),
            (&self.virtual_memory, stats.virtual_bytes),
            (&self.open_fds, stats.open_fds),
            (&self.max_fds, stats.max_fds),
            (&self.start_time, stats.start_time_seconds),
        ];
        for (gauge, value) in read {
            if let Some(value) = value {
                gauge.set(value);
            }
        }
        let mut families = self.cpu.collect();
        families.extend(self.gauges().into_iter().flat_map(|g| g.collect()));
        families
    }
}

/// The histograms' names as exported, with their help, bounds and the
/// label sets to show before the first observation.
struct EmptyHistogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    label: Option<(&'static str, &'static [&'static str])>,
}

const EMPTY_HISTOGRAMS: [EmptyHistogram; 2] = [
    EmptyHistogram {
        name: "rotation_worker_processing_duration_seconds",
        help: DURATION_HELP,
        bounds: DURATION_BOUNDS,
        label: Some(("path", &PATHS)),
    },
    EmptyHistogram {
        name: "rotation_worker_rotation_lag_seconds",
        help: LAG_HELP,
        bounds: LAG_BOUNDS,
        label: None,
    },
];

/// Adds the histogram series nothing was recorded in yet, empty (every
/// bucket at 0) as Prometheus clients show them: the OpenTelemetry
/// exporter only shows what was recorded.
fn show_empty_histograms(families: &mut Vec<prometheus::proto::MetricFamily>) {
    use prometheus::core::Collector as _;
    let labels = |m: &prometheus::proto::Metric| -> Vec<(String, String)> {
        m.get_label()
            .iter()
            .map(|l| (l.name().to_owned(), l.value().to_owned()))
            .collect()
    };
    for h in &EMPTY_HISTOGRAMS {
        let opts = prometheus::HistogramOpts::new(h.name, h.help).buckets(h.bounds.to_vec());
        let names: Vec<&str> = h.label.map(|(name, _)| name).into_iter().collect();
        let sets: Vec<Vec<&str>> = match h.label {
            Some((_, values)) => values.iter().map(|v| vec![*v]).collect(),
            None => vec![Vec::new()],
        };
        let Ok(empty) = prometheus::HistogramVec::new(opts, &names) else {
            continue;
        };
        for set in &sets {
            let _ = empty.get_metric_with_label_values(set);
        }
        let Some(empty) = empty.collect().pop() else {
            continue;
        };
        let at = match families.iter().position(|f| f.name() == h.name) {
            Some(at) => at,
            None => {
                families.push(empty.clone());
                families.len() - 1
            }
        };
        let shown = families[at].mut_metric();
        for metric in empty.get_metric() {
            if !shown.iter().any(|m| labels(m) == labels(metric)) {
                shown.push(metric.clone());
            }
        }
        shown.sort_by_key(labels);
    }
    families.sort_by(|a, b| a.name().cmp(b.name()));
}

impl Telemetry {
    /// Points the connection gauges at the worker's NATS client and store;
    /// in a process that builds several workers (tests), at the last.
    pub fn watch(&self, read: impl Fn() -> Connections + Send + Sync + 'static) {
        *self.watched.lock().unwrap_or_else(PoisonError::into_inner) = Some(Box::new(read));
    }

    /// The metrics in the Prometheus text format.
    pub fn prometheus_text(&self) -> String {
        let mut out = Vec::new();
        let mut families = self.registry.gather();
        show_empty_histograms(&mut families);
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
        // Every log line out before the process exits.
        log_writer::flush();
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

/// Hands the span's W3C context to `put` as header names and values (the
/// caller writes them into its message's headers).
pub fn inject(span: &tracing::Span, mut put: impl FnMut(&'static str, &str)) {
    let ids = match ids::span_context(span) {
        Some(ids) => ids,
        None => span.context().span().span_context().clone(),
    };
    if !ids.is_valid() {
        return;
    }
    put(TRACEPARENT, traceparent(&ids).as_str());
    let state = ids.trace_state().header();
    if !state.is_empty() {
        put(TRACESTATE, state.as_str());
    }
}

/// The `traceparent` value of a valid context, as the W3C propagator
/// writes it (`00-{trace id}-{span id}-{flags}`), without going through
/// `format!` for each of its parts.
fn traceparent(ids: &opentelemetry::trace::SpanContext) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let flags = ids.trace_flags().to_u8() & opentelemetry::trace::TraceFlags::SAMPLED.to_u8();
    let mut out = String::with_capacity(55);
    let parts: [&[u8]; 4] = [
        &[0],
        &ids.trace_id().to_bytes(),
        &ids.span_id().to_bytes(),
        &[flags],
    ];
    for (i, part) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push('-');
        }
        for b in part {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
    out
}

/// Makes `parent` (a remote context, from [`remote_context`]) the parent
/// of `span`, which has no children yet.
pub fn set_parent(span: &tracing::Span, parent: Context) {
    if !ids::set_parent(span, &parent) {
        let _ = span.set_parent(parent);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn traceparent_is_written_as_the_w3c_propagator_writes_it() {
        use opentelemetry::propagation::TextMapPropagator as _;
        use opentelemetry::trace::TraceContextExt as _;
        use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
        for flags in [
            TraceFlags::SAMPLED,
            TraceFlags::NOT_SAMPLED,
            TraceFlags::new(0xff),
        ] {
            let ids = SpanContext::new(
                TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                true,
                TraceState::NONE,
            );
            let mut written = std::collections::HashMap::new();
            let cx = opentelemetry::Context::new().with_remote_span_context(ids.clone());
            super::TraceContextPropagator::new().inject_context(&cx, &mut written);
            assert_eq!(Some(&super::traceparent(&ids)), written.get("traceparent"));
        }
    }
}
