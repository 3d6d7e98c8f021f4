//! The worker's instruments: the counters and histograms every part of
//! the worker records into, named and described once, started at zero so
//! that `rate()` sees a series' first event.

use std::sync::OnceLock;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _, UpDownCounter};
use opentelemetry_sdk::metrics::SdkMeterProvider;

use super::{SERVICE_NAME, STATUS_LABELS};

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
    /// Secret_ids the worker destroyed in Vault (replaced by a renewal, or
    /// minted by one that did not finish).
    pub secret_ids_destroyed: Counter<u64>,
    /// Renewals by `result`: renewed, refused (422), unavailable (503).
    pub renewals: Counter<u64>,
    /// Integrations whose secret expires within `renewal.before_expiry`,
    /// as the schedule last counted them.
    pub secrets_expiring: opentelemetry::metrics::Gauge<u64>,
    /// Requests refused for their reply subject, neither processed nor
    /// answered.
    pub refused_replies: Counter<u64>,
    /// Messages held by the worker right now.
    pub in_flight: UpDownCounter<i64>,
    /// Time from `rotatedAt` to the commit of the rotation.
    pub lag: Histogram<f64>,
}

pub(super) static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The values of the `path` label (`worker::Source::path`).
pub const PATHS: [&str; 4] = ["event", "request", "core", "schedule"];

pub(super) const DURATION_HELP: &str = "Time from receipt to outcome";
pub(super) const DURATION_BOUNDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
pub(super) const LAG_HELP: &str = "Time from rotatedAt to the commit of the rotation";
pub(super) const LAG_BOUNDS: &[f64] = &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 3600.0];

/// A counter's name and description.
type Named = (&'static str, &'static str);

const ROTATIONS: Named = (
    "rotation_worker_rotations",
    "Handled rotation messages by status and path",
);
const RETRIES: Named = ("rotation_worker_retries", "Store retries within a delivery");
const REDELIVERIES: Named = (
    "rotation_worker_redeliveries",
    "Messages delivered more than once",
);
const DEDUPE_HITS: Named = (
    "rotation_worker_dedupe_hits",
    "Events recognised as already processed",
);
const STALE: Named = (
    "rotation_worker_stale_drops",
    "Events older than the rotation already applied (409)",
);
const DEAD_LETTERED: Named = (
    "rotation_worker_dead_lettered",
    "Messages set aside in the dead-letter stream",
);
const WRAPPING_FAILURES: Named = (
    "rotation_worker_wrapping_failures",
    "Wrapping tokens Vault refused as invalid, expired or already used",
);
const SECRET_IDS_DESTROYED: Named = (
    "rotation_worker_secret_ids_destroyed",
    "Secret_ids the worker destroyed in Vault",
);
const RENEWALS: Named = (
    "rotation_worker_renewals",
    "Renewals by result: renewed, refused (422), unavailable (503)",
);
const REFUSED_REPLIES: Named = (
    "rotation_worker_refused_replies",
    "Requests whose reply subject is under no nats.reply_prefixes entry",
);

impl Metrics {
    pub(super) fn new(provider: &SdkMeterProvider) -> Self {
        let meter = provider.meter(SERVICE_NAME);
        let counter = |(name, help): Named| meter.u64_counter(name).with_description(help).build();
        let seconds = |name: &'static str, help: &'static str, bounds: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(help)
                .with_boundaries(bounds.to_vec())
                .build()
        };
        Self {
            rotations: counter(ROTATIONS),
            duration: seconds(
                "rotation_worker_processing_duration",
                DURATION_HELP,
                DURATION_BOUNDS,
            ),
            retries: counter(RETRIES),
            redeliveries: counter(REDELIVERIES),
            dedupe_hits: counter(DEDUPE_HITS),
            stale: counter(STALE),
            dead_lettered: counter(DEAD_LETTERED),
            wrapping_failures: counter(WRAPPING_FAILURES),
            secret_ids_destroyed: counter(SECRET_IDS_DESTROYED),
            renewals: counter(RENEWALS),
            secrets_expiring: meter
                .u64_gauge("rotation_worker_secrets_expiring")
                .with_description(
                    "Integrations whose secret expires within renewal.before_expiry_secs",
                )
                .build(),
            refused_replies: counter(REFUSED_REPLIES),
            in_flight: meter
                .i64_up_down_counter("rotation_worker_in_flight")
                .with_description("Messages held by this worker")
                .build(),
            lag: seconds("rotation_worker_rotation_lag", LAG_HELP, LAG_BOUNDS),
        }
    }

    /// The labels of `rotations`: the status as a number, and the path.
    pub fn rotation_labels(status: u16, path: &'static str) -> [KeyValue; 2] {
        [
            KeyValue::new("status", i64::from(status)),
            KeyValue::new("path", path),
        ]
    }

    /// Adds 0 to every counter, for each label set it has: a series that
    /// appears only with its first event hides that event from `rate()`
    /// and `increase()`.
    pub(super) fn start_at_zero(&self) {
        for path in PATHS {
            for status in STATUS_LABELS {
                self.rotations.add(0, &Self::rotation_labels(status, path));
            }
        }
        for counter in [
            &self.retries,
            &self.redeliveries,
            &self.dedupe_hits,
            &self.stale,
            &self.dead_lettered,
            &self.wrapping_failures,
            &self.secret_ids_destroyed,
            &self.refused_replies,
        ] {
            counter.add(0, &[]);
        }
        for result in ["renewed", "refused", "unavailable"] {
            self.renewals.add(0, &[KeyValue::new("result", result)]);
        }
        self.secrets_expiring.record(0, &[]);
        self.in_flight.add(0, &[]);
    }

    /// The instruments; no-ops until [`init`] has run.
    pub fn get() -> &'static Metrics {
        METRICS.get_or_init(|| Metrics::new(&SdkMeterProvider::builder().build()))
    }
}
