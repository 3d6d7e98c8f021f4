//! The rules `config/default.toml` states, enforced once the settings
//! are read: every broken rule is reported by the setting's name and the
//! rule, never by its value.

use secrecy::ExposeSecret;

use super::{ConfigError, DatabaseSettings, Settings, VaultSettings, WorkerSettings};

impl Settings {
    /// Enforces the rules `config/default.toml` states. Every broken rule
    /// is reported, each by the setting's name and the rule, never by its
    /// value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut rules = Rules::default();
        rules.check(
            !self.nats.url.expose_secret().trim().is_empty(),
            "nats.url",
            "must name a server",
        );
        rules.worker_names(&self.worker);
        rules.worker_bounds(&self.worker, &self.database);
        rules.worker_timing(&self.worker);
        rules.vault(&self.vault);
        rules.check(
            self.renewal.max_lookups_per_sec > 0,
            "renewal.max_lookups_per_sec",
            "must be at least 1",
        );
        for (setting, value) in [
            ("renewal.wrap_ttl_secs", self.renewal.wrap_ttl),
            ("renewal.check_interval_secs", self.renewal.check_interval),
        ] {
            rules.check(!value.is_zero(), setting, "must be at least 1");
        }
        rules.check(
            !self.nats.reply_prefixes.is_empty()
                && self
                    .nats
                    .reply_prefixes
                    .iter()
                    .all(|p| crate::event::is_subject_prefix(p)),
            "nats.reply_prefixes",
            "must list subject prefixes without wildcards",
        );
        rules.check(
            self.telemetry
                .otlp_endpoint
                .as_deref()
                .is_none_or(is_http_url),
            "telemetry.otlp_endpoint",
            "must be empty or an http:// or https:// URL",
        );
        rules.check(
            tracing_subscriber::EnvFilter::try_new(&self.log.level).is_ok(),
            "log.level",
            "must be a filter in RUST_LOG syntax",
        );
        if rules.broken.is_empty() {
            return Ok(());
        }
        Err(ConfigError(format!(
            "invalid settings: {}",
            rules.broken.join("; ")
        )))
    }
}

/// The rules found broken so far, as `setting rule` sentences.
#[derive(Default)]
struct Rules {
    broken: Vec<String>,
}

impl Rules {
    fn check(&mut self, holds: bool, setting: &str, rule: &str) {
        if !holds {
            self.broken.push(format!("{setting} {rule}"));
        }
    }

    /// Streams, the consumer and the queue group need names.
    fn worker_names(&mut self, w: &WorkerSettings) {
        for (setting, name) in [
            ("worker.stream", &w.stream),
            ("worker.consumer", &w.consumer),
            ("worker.results_stream", &w.results_stream),
            ("worker.dlq_stream", &w.dlq_stream),
            ("worker.queue_group", &w.queue_group),
        ] {
            self.check(!name.trim().is_empty(), setting, "must not be empty");
        }
    }

    /// Counts and limits: nothing unbounded, nothing that can never run.
    fn worker_bounds(&mut self, w: &WorkerSettings, database: &DatabaseSettings) {
        for (setting, count) in [
            ("worker.max_in_flight", w.max_in_flight),
            ("worker.lanes", w.lanes),
            ("worker.max_batch", w.max_batch),
        ] {
            self.check(count > 0, setting, "must be at least 1");
        }
        self.check(
            w.lanes <= database.max_connections as usize,
            "worker.lanes",
            "must be at most database.max_connections",
        );
        self.check(
            (1..=5).contains(&w.replicas),
            "worker.replicas",
            "must be 1 to 5",
        );
        self.check(
            w.delivery.max_deliver > 0,
            "worker.max_deliver",
            "must be at least 1",
        );
        for (setting, bytes) in [
            ("worker.stream_max_bytes", w.stream_max_bytes),
            ("worker.results_max_bytes", w.results_max_bytes),
            ("worker.dlq_max_bytes", w.dlq_max_bytes),
        ] {
            self.check(
                bytes > 0,
                setting,
                "must be positive: every stream is bounded",
            );
        }
    }

    /// The Vault settings' rules.
    fn vault(&mut self, vault: &VaultSettings) {
        let mount = vault.approle_mount.trim_matches('/');
        self.check(
            !mount.is_empty() && !mount.chars().any(|c| c.is_whitespace() || c.is_control()),
            "vault.approle_mount",
            "must be a mount path",
        );
        self.check(
            !vault.timeout.is_zero(),
            "vault.timeout_ms",
            "must be at least 1",
        );
        self.check(
            vault.max_response_bytes >= 1024,
            "vault.max_response_bytes",
            "must be at least 1024",
        );
        self.check(
            vault.max_concurrent_per_address > 0,
            "vault.max_concurrent_per_address",
            "must be at least 1",
        );
        self.check(
            vault.breaker_failures > 0,
            "vault.breaker_failures",
            "must be at least 1",
        );
    }

    /// Delays that fit together: a retry budget within the ack wait, a
    /// first delay within its cap.
    fn worker_timing(&mut self, w: &WorkerSettings) {
        self.check(
            !w.ack_wait.is_zero(),
            "worker.ack_wait_secs",
            "must be at least 1",
        );
        self.check(
            !w.request_timeout.is_zero(),
            "worker.request_timeout_ms",
            "must be at least 1",
        );
        self.check(
            w.retry.min_delay <= w.retry.max_delay,
            "worker.retry_min_delay_ms",
            "must be at most worker.retry_max_delay_ms",
        );
        self.check(
            w.retry.budget < w.ack_wait,
            "worker.retry_budget_ms",
            "must be less than worker.ack_wait_secs",
        );
        self.check(
            w.delivery.nak_delay <= w.delivery.nak_max_delay,
            "worker.nak_delay_ms",
            "must be at most worker.nak_max_delay_ms",
        );
        self.check(
            !w.dedupe_retention.is_zero(),
            "worker.dedupe_retention_hours",
            "must be at least 1",
        );
    }
}

/// Whether `text` is an http or https URL with a host.
fn is_http_url(text: &str) -> bool {
    url::Url::parse(text)
        .is_ok_and(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
}
