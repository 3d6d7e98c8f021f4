//! Typed settings, read once at start-up.
//!
//! Layers, later wins: `config/default.toml` (compiled in, so the binary
//! runs from any directory), an optional file (`--config` or
//! `ROTATION_WORKER_CONFIG`), `ROTATION_WORKER_<SECTION>__<KEY>` environment
//! variables, and finally `DATABASE_URL` / `NATS_URL`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

/// The compiled-in defaults; the file documents every setting.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");
/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "ROTATION_WORKER";

/// All settings.
#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    /// The store.
    pub database: DatabaseSettings,
    /// The NATS connection.
    pub nats: NatsSettings,
    /// The worker.
    pub worker: WorkerSettings,
    /// Encryption at rest.
    pub encryption: EncryptionSettings,
    /// Traces, metrics and health.
    pub telemetry: TelemetrySettings,
    /// Logging.
    pub log: LogSettings,
}

/// Traces, metrics and health endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    /// OTLP/HTTP base endpoint; empty for none.
    pub otlp_endpoint: String,
    /// Service name when `OTEL_SERVICE_NAME` is unset.
    pub service_name: String,
    /// Address of the metrics and health server; empty for none.
    pub http_addr: String,
}

/// Where and how to reach the database.
#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    /// Connection URL; it may hold a password, hence a secret. Empty: the
    /// SQLite file at `sqlite_path`.
    pub url: SecretString,
    /// The SQLite file used when `url` is empty.
    pub sqlite_path: PathBuf,
    /// Pool size.
    pub max_connections: u32,
    /// Wait for a pooled connection, in milliseconds.
    pub acquire_timeout_ms: u64,
}

/// How to reach NATS.
#[derive(Debug, Clone, Deserialize)]
pub struct NatsSettings {
    /// Server URL(s), comma separated.
    pub url: String,
    /// Credentials file, empty for none.
    pub creds_file: String,
    /// Connection name.
    pub client_name: String,
}

/// Where events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ingest {
    /// A durable JetStream consumer.
    Jetstream,
    /// A core NATS queue subscription.
    Core,
}

/// The worker's settings; `config/default.toml` explains each.
#[derive(Debug, Clone, Deserialize)]
#[allow(missing_docs)]
pub struct WorkerSettings {
    pub ingest: Ingest,
    pub stream: String,
    pub consumer: String,
    pub results_stream: String,
    pub results_duplicate_window_secs: u64,
    pub results_max_age_hours: u64,
    pub dlq_stream: String,
    pub queue_group: String,
    pub max_in_flight: usize,
    pub lanes: usize,
    pub max_batch: usize,
    pub ack_wait_secs: u64,
    pub max_deliver: i64,
    pub retry_min_delay_ms: u64,
    pub retry_max_delay_ms: u64,
    pub retry_budget_ms: u64,
    pub nak_delay_ms: u64,
    pub nak_max_delay_ms: u64,
    pub shutdown_grace_ms: u64,
    pub dedupe_retention_hours: u64,
    pub max_clock_skew_secs: u64,
    pub stream_max_bytes: i64,
    pub results_max_bytes: i64,
    pub dlq_max_bytes: i64,
}

/// The key ring.
#[derive(Debug, Clone, Deserialize)]
pub struct EncryptionSettings {
    /// Key id -> base64 key.
    pub keys: BTreeMap<String, SecretString>,
    /// Key used for encryption; empty when the ring has a single key.
    pub active_key: Option<String>,
    /// The fallback key file.
    pub key_file: PathBuf,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    /// Filter used when `RUST_LOG` is unset.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration error, its message cleared of every value that could
/// be a secret (see [`Settings::load`]).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

/// Environment variables whose values never appear in an error.
fn is_settings_variable(name: &str) -> bool {
    name.starts_with(ENV_PREFIX) || matches!(name, "DATABASE_URL" | "NATS_URL")
}

/// Clears `message` of the values of the settings' environment variables
/// and of every quoted value (the config crate quotes the value it could
/// not read, which may be a key or a password from a file).
fn redact(message: &str) -> String {
    let mut text = message.to_owned();
    for (name, value) in std::env::vars() {
        if is_settings_variable(&name) && value.trim().len() >= 3 {
            text = text.replace(value.trim(), "[redacted]");
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut parts = text.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        // Odd pieces are inside quotes.
        out.push('"');
        out.push_str(if i % 2 == 0 { "[redacted]" } else { part });
    }
    out
}

impl Settings {
    /// Reads the layers described in the module docs. The error never
    /// shows a value: keys and passwords may be among them.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_layers(file).map_err(|e| ConfigError(redact(&e.to_string())))
    }

    fn load_layers(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        use config::{Config, Environment, File, FileFormat};
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(file) = file {
            builder = builder.add_source(File::from(file).required(true));
        }
        builder = builder
            .add_source(
                Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .set_override_option("database.url", std::env::var("DATABASE_URL").ok())?
            .set_override_option("nats.url", std::env::var("NATS_URL").ok())?;
        builder.build()?.try_deserialize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn defaults_parse() {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("default.toml parses");
        assert_eq!(settings.database.max_connections, 8);
        // No database named: the embedded SQLite file (the store's test
        // checks that this is what the default means).
        assert!(settings.database.url.expose_secret().is_empty());
        assert_eq!(
            settings.database.sqlite_path,
            PathBuf::from("data/rotation-worker.db")
        );
        assert!(settings.encryption.keys.is_empty());
        assert_eq!(settings.log.format, LogFormat::Text);
        assert_eq!(settings.worker.max_clock_skew_secs, 300);
    }

    #[test]
    fn errors_are_cleared_of_quoted_values() {
        let message =
            r#"invalid type: string "c2VjcmV0LWtleQ==", expected a map for key `encryption.keys`"#;
        let redacted = redact(message);
        assert!(!redacted.contains("c2VjcmV0"), "{redacted}");
        assert!(redacted.contains("`encryption.keys`"), "{redacted}");
        assert_eq!(redact("no quotes"), "no quotes");
    }
}
