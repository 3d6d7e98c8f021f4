//! Typed settings, read once at start-up.
//!
//! Layers, later wins: `config/default.toml` (compiled in, so the binary
//! runs from any directory), an optional file (`--config` or
//! `ROTATION_WORKER_CONFIG`), `ROTATION_WORKER_<SECTION>__<KEY>` environment
//! variables, and finally `DATABASE_URL` / `NATS_URL`.
//!
//! The keys are a public contract and keep their units in their names
//! (`retry_budget_ms`, `ack_wait_secs`); in here they are read into
//! [`Duration`]s, empty optional values into `None`, and
//! [`Settings::validate`] enforces the rules `config/default.toml` states,
//! so that the rest of the code never sees a setting it cannot use.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Deserializer};

/// The compiled-in defaults; the file documents every setting.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");
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
    /// Calls to the integrations' Vaults.
    pub vault: VaultSettings,
    /// Renewals: secret_ids the worker mints itself.
    pub renewal: RenewalSettings,
    /// Traces, metrics and health.
    pub telemetry: TelemetrySettings,
    /// Logging.
    pub log: LogSettings,
}

/// Traces, metrics and health endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct TelemetrySettings {
    /// OTLP/HTTP base endpoint (an http or https URL); `None` (empty): no
    /// export.
    #[serde(deserialize_with = "non_empty")]
    pub otlp_endpoint: Option<String>,
    /// Service name when `OTEL_SERVICE_NAME` is unset.
    pub service_name: String,
    /// Address of the metrics and health server; `None` (empty): not
    /// served.
    #[serde(deserialize_with = "non_empty_parsed")]
    pub http_addr: Option<SocketAddr>,
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
    /// `acquire_timeout_ms`: the wait for a pooled connection (SQLite: for
    /// the write lock too).
    #[serde(rename = "acquire_timeout_ms", deserialize_with = "millis")]
    pub acquire_timeout: Duration,
    /// `lock_timeout_ms`: PostgreSQL's lock and statement timeouts.
    #[serde(rename = "lock_timeout_ms", deserialize_with = "millis")]
    pub lock_timeout: Duration,
}

/// How to reach NATS.
#[derive(Debug, Clone, Deserialize)]
pub struct NatsSettings {
    /// Server URL(s), comma separated; a URL may carry credentials, hence
    /// a secret.
    pub url: SecretString,
    /// Credentials file (JWT and nkey seed); `None` (empty): none.
    #[serde(deserialize_with = "non_empty_parsed")]
    pub creds_file: Option<PathBuf>,
    /// Connection name.
    pub client_name: String,
    /// User name, with `password`.
    #[serde(deserialize_with = "non_empty")]
    pub user: Option<String>,
    /// Password, with `user`.
    #[serde(deserialize_with = "non_empty_secret")]
    pub password: Option<SecretString>,
    /// Token.
    #[serde(deserialize_with = "non_empty_secret")]
    pub token: Option<SecretString>,
    /// File holding an nkey seed.
    #[serde(deserialize_with = "non_empty_parsed")]
    pub nkey_seed_file: Option<PathBuf>,
    /// PEM roots added to the trust store.
    #[serde(deserialize_with = "non_empty_parsed")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `tls_key_file`.
    #[serde(deserialize_with = "non_empty_parsed")]
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[serde(deserialize_with = "non_empty_parsed")]
    pub tls_key_file: Option<PathBuf>,
    /// Connect over TLS only.
    pub tls_required: bool,
    /// Prefix of the client's inbox subjects.
    pub inbox_prefix: String,
    /// The subject prefixes a request's reply subject must start with
    /// (a whole token or more); a request naming another is refused.
    #[serde(deserialize_with = "comma_list")]
    pub reply_prefixes: Vec<String>,
}

/// Where events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingest {
    /// A durable JetStream consumer.
    Jetstream,
    /// A core NATS queue subscription.
    Core,
}

impl Choice for Ingest {
    const NAMES: &'static [(&'static str, Self)] =
        &[("jetstream", Self::Jetstream), ("core", Self::Core)];
}

/// The worker's settings; `config/default.toml` explains each, under the
/// key named beside it.
#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    /// `ingest`: where events come from.
    #[serde(deserialize_with = "one_of")]
    pub ingest: Ingest,
    /// `stream`: the inbound stream.
    pub stream: String,
    /// `consumer`: the durable pull consumer the workers share.
    pub consumer: String,
    /// `results_stream`: the stream of outcome events.
    pub results_stream: String,
    /// `results_duplicate_window_secs`: how long the results stream drops
    /// a repeated outcome.
    #[serde(rename = "results_duplicate_window_secs", deserialize_with = "secs")]
    pub results_duplicate_window: Duration,
    /// `results_max_age_hours`: how long the results stream keeps events
    /// (zero: forever).
    #[serde(rename = "results_max_age_hours", deserialize_with = "hours")]
    pub results_max_age: Duration,
    /// `dlq_stream`: the dead-letter stream.
    pub dlq_stream: String,
    /// `queue_group`: of the request-reply endpoint and of core ingest.
    pub queue_group: String,
    /// `replicas`: the replica count of every stream the worker creates.
    pub replicas: usize,
    /// `max_in_flight`: messages held and not yet acknowledged.
    pub max_in_flight: usize,
    /// `lanes`: transactions run in parallel.
    pub lanes: usize,
    /// `max_batch`: most messages applied in one transaction.
    pub max_batch: usize,
    /// `request_timeout_ms`: a request is answered within it.
    #[serde(rename = "request_timeout_ms", deserialize_with = "millis")]
    pub request_timeout: Duration,
    /// `ack_wait_secs`: how long JetStream waits for an ack.
    #[serde(rename = "ack_wait_secs", deserialize_with = "secs")]
    pub ack_wait: Duration,
    /// Retrying a failing store within one delivery.
    #[serde(flatten)]
    pub retry: RetrySettings,
    /// Redelivery of a message that failed, and its last delivery.
    #[serde(flatten)]
    pub delivery: DeliverySettings,
    /// `shutdown_grace_ms`: how long in-flight messages may take to finish
    /// on shutdown.
    #[serde(rename = "shutdown_grace_ms", deserialize_with = "millis")]
    pub shutdown_grace: Duration,
    /// `dedupe_retention_hours`: how long processed event ids are
    /// remembered.
    #[serde(rename = "dedupe_retention_hours", deserialize_with = "hours")]
    pub dedupe_retention: Duration,
    /// `previous_secret_retention_hours`: how long the secret a rotation
    /// replaced is kept (sealed) for a rollback; zero keeps none.
    #[serde(rename = "previous_secret_retention_hours", deserialize_with = "hours")]
    pub previous_secret_retention: Duration,
    /// `max_clock_skew_secs`: how far a `rotatedAt` may lie ahead.
    #[serde(rename = "max_clock_skew_secs", deserialize_with = "secs")]
    pub max_clock_skew: Duration,
    /// `stream_max_bytes`: the inbound stream's byte limit.
    pub stream_max_bytes: i64,
    /// `results_max_bytes`: the results stream's byte limit.
    pub results_max_bytes: i64,
    /// `dlq_max_bytes`: the dead-letter stream's byte limit.
    pub dlq_max_bytes: i64,
}

/// Retrying a failing store (or publish) within one delivery, with
/// exponential backoff and jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RetrySettings {
    /// `worker.retry_min_delay_ms`: the first delay.
    #[serde(rename = "retry_min_delay_ms", deserialize_with = "millis")]
    pub min_delay: Duration,
    /// `worker.retry_max_delay_ms`: the largest delay.
    #[serde(rename = "retry_max_delay_ms", deserialize_with = "millis")]
    pub max_delay: Duration,
    /// `worker.retry_budget_ms`: the total time a batch may take.
    #[serde(rename = "retry_budget_ms", deserialize_with = "millis")]
    pub budget: Duration,
}

/// Redelivery: a stream message whose delivery failed is NAK'd with a
/// delay that doubles per delivery, up to a cap, and set aside at its last
/// delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct DeliverySettings {
    /// `worker.max_deliver`: deliveries before a message is dead-lettered.
    pub max_deliver: i64,
    /// `worker.nak_delay_ms`: the first NAK delay.
    #[serde(rename = "nak_delay_ms", deserialize_with = "millis")]
    pub nak_delay: Duration,
    /// `worker.nak_max_delay_ms`: the largest NAK delay.
    #[serde(rename = "nak_max_delay_ms", deserialize_with = "millis")]
    pub nak_max_delay: Duration,
}

/// Calls to the integrations' Vaults (unwrapping, verification).
#[derive(Debug, Clone, Deserialize)]
pub struct VaultSettings {
    /// The AppRole auth method's mount path.
    pub approle_mount: String,
    /// Whether a new secret_id is tried before it is stored.
    #[serde(deserialize_with = "one_of")]
    pub verify: Verify,
    /// `vault.timeout_ms`: how long one call may take.
    #[serde(rename = "timeout_ms", deserialize_with = "millis")]
    pub timeout: Duration,
    /// PEM roots beyond the system's; `None` (empty): none.
    #[serde(deserialize_with = "non_empty_parsed")]
    pub ca_file: Option<PathBuf>,
    /// The largest answer read from a Vault, in bytes.
    pub max_response_bytes: u64,
    /// Whether `http://` Vault addresses are admitted.
    pub allow_http: bool,
    /// Networks a Vault address may resolve to although they are
    /// loopback, link-local, private or otherwise internal.
    #[serde(deserialize_with = "networks")]
    pub allowed_networks: Vec<crate::vault::Network>,
    /// Calls to one Vault address at once, at most.
    pub max_concurrent_per_address: usize,
    /// Consecutive transient failures of one address that open its
    /// circuit breaker.
    pub breaker_failures: u32,
    /// `breaker_cooldown_ms`: how long an open breaker answers 503 at once.
    #[serde(rename = "breaker_cooldown_ms", deserialize_with = "millis")]
    pub breaker_cooldown: Duration,
}

impl Default for VaultSettings {
    fn default() -> Self {
        Self {
            approle_mount: "approle".into(),
            verify: Verify::Off,
            timeout: Duration::from_secs(5),
            ca_file: None,
            max_response_bytes: 65536,
            allow_http: false,
            allowed_networks: Vec::new(),
            max_concurrent_per_address: 4,
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

/// Renewals: the worker mints, tests and stores an integration's next
/// secret_id (`vault.approle.renew`).
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct RenewalSettings {
    /// `wrap_ttl_secs`: how long the wrapping token of a minted secret_id
    /// lives before the worker unwraps it.
    #[serde(rename = "wrap_ttl_secs", deserialize_with = "secs")]
    pub wrap_ttl: Duration,
    /// `before_expiry_secs`: renew a secret this long before it expires
    /// (zero: not by expiry).
    #[serde(rename = "before_expiry_secs", deserialize_with = "secs")]
    pub before_expiry: Duration,
    /// `max_age_secs`: renew a secret this long after it last changed
    /// (zero: not by age).
    #[serde(rename = "max_age_secs", deserialize_with = "secs")]
    pub max_age: Duration,
    /// `check_interval_secs`: how often the schedule looks for due
    /// renewals.
    #[serde(rename = "check_interval_secs", deserialize_with = "secs")]
    pub check_interval: Duration,
    /// Whether the schedule also looks up the expiry of secrets it does
    /// not know (a login: one use of a use-limited secret_id).
    pub discover_expiry: bool,
    /// Such lookups per second across the worker, at most.
    pub max_lookups_per_sec: u32,
}

impl RenewalSettings {
    /// Whether the schedule renews anything.
    pub fn scheduled(&self) -> bool {
        !self.before_expiry.is_zero() || !self.max_age.is_zero()
    }
}

impl Default for RenewalSettings {
    fn default() -> Self {
        Self {
            wrap_ttl: Duration::from_secs(60),
            before_expiry: Duration::ZERO,
            max_age: Duration::ZERO,
            check_interval: Duration::from_secs(60),
            discover_expiry: false,
            max_lookups_per_sec: 10,
        }
    }
}

/// `vault.verify`: what the worker does with a new secret_id before it
/// stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Nothing: it is stored as it came.
    Off,
    /// A login with the integration's role_id and the new secret_id.
    Login,
}

impl Choice for Verify {
    const NAMES: &'static [(&'static str, Self)] = &[("off", Self::Off), ("login", Self::Login)];
}

/// The key ring.
#[derive(Debug, Clone, Deserialize)]
pub struct EncryptionSettings {
    /// Key id -> base64 key.
    pub keys: BTreeMap<String, SecretString>,
    /// Key used for encryption; `None` (empty) when the ring has a single
    /// key.
    #[serde(deserialize_with = "non_empty")]
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
    #[serde(deserialize_with = "one_of")]
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Choice for LogFormat {
    const NAMES: &'static [(&'static str, Self)] = &[("text", Self::Text), ("json", Self::Json)];
}

/// A setting with a fixed set of values, named in lower case.
trait Choice: Copy + 'static {
    /// Every value, by name.
    const NAMES: &'static [(&'static str, Self)];
}

/// One of a [`Choice`]'s names (in any case); the error lists them all.
fn one_of<'de, D: Deserializer<'de>, T: Choice>(d: D) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    T::NAMES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text.trim()))
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<&str> = T::NAMES.iter().map(|(name, _)| *name).collect();
            serde::de::Error::custom(format!("expected one of {}", names.join(", ")))
        })
}

/// A whole number of milliseconds.
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_millis)
}

/// A whole number of seconds.
fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    u64::deserialize(d).map(Duration::from_secs)
}

/// A whole number of hours.
fn hours<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let hours = u64::deserialize(d)?;
    hours
        .checked_mul(3600)
        .map(Duration::from_secs)
        .ok_or_else(|| serde::de::Error::custom("too many hours"))
}

/// A list of strings: a TOML array, or one string of comma-separated
/// items (as an environment variable gives it); blanks are dropped.
pub(crate) fn comma_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Items {
        One(String),
        Many(Vec<String>),
    }
    let items = match Items::deserialize(d)? {
        Items::One(text) => text.split(',').map(str::to_owned).collect(),
        Items::Many(items) => items,
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .collect())
}

/// Networks in CIDR notation (`10.0.0.0/8`, `fd00::/8`), as [`comma_list`].
fn networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<crate::vault::Network>, D::Error> {
    comma_list(d)?
        .iter()
        .map(|text| text.parse().map_err(serde::de::Error::custom))
        .collect()
}

/// A string, or `None` when it is empty (or only blanks).
fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    Ok((!text.trim().is_empty()).then_some(text))
}

/// A secret, or `None` when it is empty.
fn non_empty_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
    Ok(non_empty(d)?.map(SecretString::from))
}

/// A value parsed from a string, or `None` when the string is empty. The
/// parser's message never holds the value.
fn non_empty_parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    non_empty(d)?
        .map(|text| text.trim().parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// Replaces each `<VARIABLE>_FILE` of a settings variable by `<VARIABLE>`
/// holding the file's content (trailing newlines dropped): secrets mounted
/// as files (compose and Kubernetes secrets) stay out of the environment.
fn from_files(
    mut env: config::Map<String, String>,
) -> Result<config::Map<String, String>, ConfigError> {
    // Settings named `..._file` (nats.creds_file, ...) are themselves
    // variables ending in `_FILE`: those are read as they are.
    let known = default_variables().map_err(|e| ConfigError(e.to_string()))?;
    let files: Vec<(String, String)> = env
        .iter()
        .filter(|(name, _)| !known.contains(*name))
        .filter_map(|(name, path)| {
            let variable = name.strip_suffix("_FILE")?;
            is_settings_variable(variable).then(|| (name.clone(), path.clone()))
        })
        .collect();
    for (name, path) in files {
        env.remove(&name);
        let variable = &name[..name.len() - "_FILE".len()];
        if env.contains_key(variable) {
            return Err(ConfigError(format!(
                "{variable} and {name} are both set: set one"
            )));
        }
        let value = std::fs::read_to_string(&path)
            .map_err(|e| ConfigError(format!("{name}: cannot read {path}: {e}")))?;
        env.insert(
            variable.to_owned(),
            value.trim_end_matches(['\n', '\r']).to_owned(),
        );
    }
    Ok(env)
}

/// The variable of every setting `config/default.toml` lists.
fn default_variables() -> Result<Vec<String>, config::ConfigError> {
    Ok(default_keys()?
        .iter()
        .map(|key| format!("{ENV_PREFIX}_{}", key.replace('.', "__").to_uppercase()))
        .collect())
}

/// Every key `config/default.toml` lists, dotted.
fn default_keys() -> Result<Vec<String>, config::ConfigError> {
    Ok(default_values()?.into_iter().map(|(key, _)| key).collect())
}

/// Every key `config/default.toml` lists, dotted, with its default value.
fn default_values() -> Result<Vec<(String, config::Value)>, config::ConfigError> {
    use config::Source;
    let defaults = config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .build()?;
    let mut keys = Vec::new();
    dotted_keys(defaults.collect()?, "", &mut keys);
    Ok(keys)
}

/// The settings whose default is a number or a truth value, read from
/// their variables as that type. Every other variable stays the string it
/// was written as: a password `007` is not the number 7.
fn typed_overrides(
    env: &config::Map<String, String>,
) -> Result<Vec<(String, config::Value)>, config::ConfigError> {
    use config::ValueKind;
    let mut typed = Vec::new();
    for (key, default) in default_values()? {
        let variable = format!("{ENV_PREFIX}_{}", key.replace('.', "__").to_uppercase());
        let Some(text) = env.get(&variable) else {
            continue;
        };
        let text = text.trim();
        let value = match default.kind {
            ValueKind::I64(_) | ValueKind::U64(_) | ValueKind::I128(_) | ValueKind::U128(_) => {
                let n: i64 = text.parse().map_err(|_| {
                    config::ConfigError::Message(format!(
                        "`{key}` (variable {variable}) must be a whole number"
                    ))
                })?;
                config::Value::from(n)
            }
            ValueKind::Boolean(_) => {
                let b: bool = text.parse().map_err(|_| {
                    config::ConfigError::Message(format!(
                        "`{key}` (variable {variable}) must be true or false"
                    ))
                })?;
                config::Value::from(b)
            }
            _ => continue,
        };
        typed.push((key, value));
    }
    Ok(typed)
}

/// Variables with the settings' prefix that are not settings.
const NOT_SETTINGS: &[&str] = &["config", "crashpoint", "test_database_url"];

/// Every key of a configuration, dotted; open maps (`encryption.keys`)
/// count as one key.
fn dotted_keys(
    table: config::Map<String, config::Value>,
    prefix: &str,
    out: &mut Vec<(String, config::Value)>,
) {
    for (key, value) in table {
        let key = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match value.kind {
            config::ValueKind::Table(table) if key != "encryption.keys" => {
                dotted_keys(table, &key, out);
            }
            _ => out.push((key, value)),
        }
    }
}

/// Refuses a key `config/default.toml` does not have: a misspelt setting
/// in a file or a variable would otherwise be ignored without a word.
fn refuse_unknown_keys(config: &config::Config) -> Result<(), config::ConfigError> {
    use config::Source;
    let known = |config: &config::Config| -> Result<_, config::ConfigError> {
        let mut keys = Vec::new();
        dotted_keys(config.collect()?, "", &mut keys);
        Ok(keys)
    };
    let defaults = config::Config::builder()
        .add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ))
        .build()?;
    let defaults: Vec<String> = known(&defaults)?.into_iter().map(|(k, _)| k).collect();
    let unknown: Vec<String> = known(config)?
        .into_iter()
        .filter(|(key, _)| !defaults.contains(key) && !NOT_SETTINGS.contains(&key.as_str()))
        .map(|(key, value)| match value.origin() {
            Some("the environment") => format!(
                "`{key}` (variable {ENV_PREFIX}_{})",
                key.replace('.', "__").to_uppercase()
            ),
            Some(origin) => format!("`{key}` (in {origin})"),
            None => format!("`{key}`"),
        })
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(config::ConfigError::Message(format!(
        "unknown setting {}; config/default.toml lists every setting",
        unknown.join(", ")
    )))
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
/// in `env` and of every quoted value (the config crate quotes the value
/// it could not read, which may be a key or a password from a file).
fn redact(message: &str, env: &config::Map<String, String>) -> String {
    let mut text = message.to_owned();
    for (name, value) in env {
        if is_settings_variable(name) && value.trim().len() >= 3 {
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
    /// Reads the layers described in the module docs, with this process's
    /// environment, and validates the result. The error never shows a
    /// value: keys and passwords may be among them.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// [`Settings::load`] with `env` in place of the process's
    /// environment: what a process started with exactly these variables
    /// would read (tests start workers in-process this way).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let env = from_files(env.into_iter().collect())?;
        let settings =
            Self::load_layers(file, &env).map_err(|e| ConfigError(redact(&e.to_string(), &env)))?;
        settings.validate()?;
        Ok(settings)
    }

    fn load_layers(
        file: Option<&Path>,
        env: &config::Map<String, String>,
    ) -> Result<Self, config::ConfigError> {
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
                    // Every value stays the string it was written as
                    // (`007` is not 7); a number is parsed where a
                    // setting declares one.
                    .try_parsing(false)
                    .source(Some(env.clone())),
            )
            .set_override_option("database.url", env.get("DATABASE_URL").cloned())?
            .set_override_option("nats.url", env.get("NATS_URL").cloned())?;
        for (key, value) in typed_overrides(env)? {
            builder = builder.set_override(key, value)?;
        }
        let config = builder.build()?;
        refuse_unknown_keys(&config)?;
        config.try_deserialize()
    }
}

mod rules;

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    /// The settings a process with exactly `vars` in its environment reads.
    fn load(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_with_env(
            None,
            vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    fn defaults() -> Settings {
        load(&[]).expect("the defaults load and are valid")
    }

    #[test]
    fn defaults_parse() {
        let settings = defaults();
        assert_eq!(settings.database.max_connections, 8);
        // No database named: the embedded SQLite file (the store's test
        // checks that this is what the default means).
        assert!(settings.database.url.expose_secret().is_empty());
        assert_eq!(
            settings.database.sqlite_path,
            PathBuf::from("data/rotation-worker.db")
        );
        assert!(settings.encryption.keys.is_empty());
        assert_eq!(settings.encryption.active_key, None);
        assert_eq!(settings.log.format, LogFormat::Text);
        let w = &settings.worker;
        assert_eq!(w.max_clock_skew, Duration::from_secs(300));
        assert_eq!(w.results_max_age, Duration::from_secs(168 * 3600));
        assert_eq!(w.dedupe_retention, Duration::from_secs(168 * 3600));
        assert_eq!(w.ack_wait, Duration::from_secs(30));
        assert_eq!(w.shutdown_grace, Duration::from_secs(10));
        assert_eq!(
            w.retry,
            RetrySettings {
                min_delay: Duration::from_millis(50),
                max_delay: Duration::from_secs(2),
                budget: Duration::from_secs(5),
            }
        );
        assert_eq!(
            w.delivery,
            DeliverySettings {
                max_deliver: 5,
                nak_delay: Duration::from_secs(1),
                nak_max_delay: Duration::from_secs(60),
            }
        );
        assert_eq!(settings.nats.creds_file, None);
        assert_eq!(settings.telemetry.otlp_endpoint, None);
        assert_eq!(
            settings.telemetry.http_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
    }

    /// A misspelt variable or file key is an error that names it; an enum
    /// error lists the values; the variables that are not settings pass.
    #[test]
    fn unknown_keys_and_values_are_named() {
        let error = |vars: &[(&str, &str)]| load(vars).expect_err("an error").to_string();
        assert_eq!(
            error(&[("ROTATION_WORKER_WORKER__MAX_INFLIGHT", "3")]),
            "unknown setting `worker.max_inflight` (variable \
             ROTATION_WORKER_WORKER__MAX_INFLIGHT); config/default.toml lists every setting"
        );
        assert!(
            error(&[("ROTATION_WORKER_WORKR__LANES", "3")])
                .contains("`workr.lanes` (variable ROTATION_WORKER_WORKR__LANES)")
        );
        assert_eq!(
            error(&[("ROTATION_WORKER_WORKER__INGEST", "bogus")]),
            "expected one of jetstream, core for key `worker.ingest`"
        );
        assert_eq!(
            error(&[("ROTATION_WORKER_LOG__FORMAT", "xml")]),
            "expected one of text, json for key `log.format`"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("settings.toml");
        std::fs::write(&file, "[nats]\nurll = \"nats://elsewhere:4222\"\n").expect("file");
        let message = Settings::load_with_env(Some(&file), []).expect_err("an error");
        assert!(
            message
                .to_string()
                .starts_with("unknown setting `nats.urll` (in ")
        );
        let fine = load(&[
            ("ROTATION_WORKER_CONFIG", "elsewhere.toml"),
            ("ROTATION_WORKER_CRASHPOINT", "after_commit"),
            ("ROTATION_WORKER_WORKER__INGEST", "Core"),
            ("ROTATION_WORKER_ENCRYPTION__KEYS__K1", "a2V5"),
        ])
        .expect("not settings, or known ones");
        assert_eq!(fine.worker.ingest, Ingest::Core);
    }

    /// `<VARIABLE>_FILE` reads a setting from a file, as mounted secrets
    /// are; setting both is an error.
    #[test]
    fn settings_are_read_from_files_named_by_file_variables() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("file");
            path.display().to_string()
        };
        let url = write("database_url", "postgres://u:pw@db:5432/rw\n");
        let password = write("nats_password", "s3cret\n");
        let key = write("key", "a2V5\n");
        let settings = load(&[
            ("DATABASE_URL_FILE", url.as_str()),
            ("ROTATION_WORKER_NATS__PASSWORD_FILE", password.as_str()),
            (
                "ROTATION_WORKER_ENCRYPTION__KEYS__COMPOSE_FILE",
                key.as_str(),
            ),
        ])
        .expect("settings");
        assert_eq!(
            settings.database.url.expose_secret(),
            "postgres://u:pw@db:5432/rw"
        );
        let nats_password = settings.nats.password.as_ref().expect("a password");
        assert_eq!(nats_password.expose_secret(), "s3cret");
        assert_eq!(settings.encryption.keys["compose"].expose_secret(), "a2V5");
        let both = load(&[("DATABASE_URL", "x"), ("DATABASE_URL_FILE", url.as_str())]);
        assert_eq!(
            both.expect_err("both").to_string(),
            "DATABASE_URL and DATABASE_URL_FILE are both set: set one"
        );
    }

    /// The variable names are the contract; the nested retry and delivery
    /// settings read theirs from the flat `worker` keys.
    #[test]
    fn environment_variables_reach_the_typed_settings() {
        let settings = load(&[
            ("ROTATION_WORKER_WORKER__RETRY_MIN_DELAY_MS", "10"),
            ("ROTATION_WORKER_WORKER__RETRY_MAX_DELAY_MS", "20"),
            ("ROTATION_WORKER_WORKER__RETRY_BUDGET_MS", "300"),
            ("ROTATION_WORKER_WORKER__NAK_DELAY_MS", "100"),
            ("ROTATION_WORKER_WORKER__NAK_MAX_DELAY_MS", "400"),
            ("ROTATION_WORKER_WORKER__MAX_DELIVER", "3"),
            ("ROTATION_WORKER_WORKER__ACK_WAIT_SECS", "5"),
            ("ROTATION_WORKER_WORKER__SHUTDOWN_GRACE_MS", "250"),
            ("ROTATION_WORKER_WORKER__RESULTS_MAX_AGE_HOURS", "0"),
            ("ROTATION_WORKER_WORKER__INGEST", "core"),
            ("ROTATION_WORKER_TELEMETRY__HTTP_ADDR", ""),
            (
                "ROTATION_WORKER_TELEMETRY__OTLP_ENDPOINT",
                "http://collector:4318",
            ),
            (
                "ROTATION_WORKER_NATS__CREDS_FILE",
                "/run/secrets/nats.creds",
            ),
            ("ROTATION_WORKER_ENCRYPTION__ACTIVE_KEY", "k2"),
            ("NATS_URL", "nats://elsewhere:4222"),
            ("DATABASE_URL", "postgres://db/rw"),
        ])
        .expect("valid");
        let w = &settings.worker;
        assert_eq!(
            w.retry,
            RetrySettings {
                min_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(20),
                budget: Duration::from_millis(300),
            }
        );
        assert_eq!(
            w.delivery,
            DeliverySettings {
                max_deliver: 3,
                nak_delay: Duration::from_millis(100),
                nak_max_delay: Duration::from_millis(400),
            }
        );
        assert_eq!(w.ack_wait, Duration::from_secs(5));
        assert_eq!(w.shutdown_grace, Duration::from_millis(250));
        assert_eq!(w.results_max_age, Duration::ZERO);
        assert_eq!(w.ingest, Ingest::Core);
        assert_eq!(settings.telemetry.http_addr, None);
        assert_eq!(
            settings.telemetry.otlp_endpoint.as_deref(),
            Some("http://collector:4318")
        );
        assert_eq!(
            settings.nats.creds_file,
            Some(PathBuf::from("/run/secrets/nats.creds"))
        );
        assert_eq!(settings.encryption.active_key.as_deref(), Some("k2"));
        assert_eq!(settings.nats.url.expose_secret(), "nats://elsewhere:4222");
        assert_eq!(settings.database.url.expose_secret(), "postgres://db/rw");
    }

    #[test]
    fn a_value_that_does_not_read_is_named_by_its_setting_never_shown() {
        let error = load(&[("ROTATION_WORKER_TELEMETRY__HTTP_ADDR", "host-secret:x")])
            .expect_err("not an address")
            .to_string();
        assert!(error.contains("telemetry.http_addr"), "{error}");
        assert!(!error.contains("host-secret"), "{error}");
        // A nested setting is named by its section.
        let error = load(&[("ROTATION_WORKER_WORKER__RETRY_BUDGET_MS", "soon-secret")])
            .expect_err("not a number")
            .to_string();
        assert!(error.contains("`worker"), "{error}");
        assert!(!error.contains("soon-secret"), "{error}");
    }

    fn password(settings: &Settings) -> Option<String> {
        let password = settings.nats.password.as_ref()?;
        Some(password.expose_secret().to_owned())
    }

    /// Item 8 of the boundary issue: a value is read as written; only a
    /// setting declared a number is parsed as one.
    #[test]
    fn a_string_setting_keeps_its_leading_zeros_from_a_variable_or_a_file() {
        let settings = load(&[
            ("ROTATION_WORKER_NATS__USER", "0042"),
            ("ROTATION_WORKER_NATS__PASSWORD", "007"),
            ("ROTATION_WORKER_NATS__CLIENT_NAME", "1e3"),
            ("ROTATION_WORKER_NATS__TLS_REQUIRED", "false"),
            ("ROTATION_WORKER_WORKER__MAX_DELIVER", "007"),
        ])
        .expect("valid");
        assert_eq!(settings.nats.user.as_deref(), Some("0042"));
        assert_eq!(password(&settings).as_deref(), Some("007"));
        assert_eq!(settings.nats.client_name, "1e3");
        assert_eq!(settings.worker.delivery.max_deliver, 7);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "007\n").unwrap();
        let settings = load(&[(
            "ROTATION_WORKER_NATS__PASSWORD_FILE",
            file.to_str().unwrap(),
        )])
        .expect("valid");
        assert_eq!(password(&settings).as_deref(), Some("007"));
        let toml = dir.path().join("settings.toml");
        std::fs::write(&toml, "[nats]\npassword = \"007\"\n").unwrap();
        let settings = Settings::load_with_env(Some(&toml), Vec::new()).expect("valid");
        assert_eq!(password(&settings).as_deref(), Some("007"));
    }

    #[test]
    fn lists_read_from_a_variable_or_a_toml_array() {
        let settings = load(&[
            (
                "ROTATION_WORKER_NATS__REPLY_PREFIXES",
                "_INBOX, app.replies",
            ),
            (
                "ROTATION_WORKER_VAULT__ALLOWED_NETWORKS",
                "127.0.0.0/8,fd00::/8",
            ),
        ])
        .expect("valid");
        assert_eq!(settings.nats.reply_prefixes, ["_INBOX", "app.replies"]);
        assert_eq!(settings.vault.allowed_networks.len(), 2);
        let error = load(&[("ROTATION_WORKER_VAULT__ALLOWED_NETWORKS", "10.0.0.0/99")])
            .expect_err("not a network")
            .to_string();
        assert!(error.contains("vault"), "{error}");
        let error = load(&[("ROTATION_WORKER_NATS__REPLY_PREFIXES", "_INBOX.>")])
            .expect_err("a wildcard")
            .to_string();
        assert!(error.contains("nats.reply_prefixes"), "{error}");
        let dir = tempfile::tempdir().unwrap();
        let toml = dir.path().join("settings.toml");
        std::fs::write(&toml, "[nats]\nreply_prefixes = [\"_INBOX\", \"x.y\"]\n").unwrap();
        let settings = Settings::load_with_env(Some(&toml), Vec::new()).expect("valid");
        assert_eq!(settings.nats.reply_prefixes, ["_INBOX", "x.y"]);
    }

    /// A way to break a rule, and the rule.
    type Breaker = (fn(&mut Settings), &'static str);

    /// One broken rule of `default.toml` per entry.
    const BROKEN_RULES: [Breaker; 16] = [
        (|s| s.nats.url = " ".into(), "nats.url must name a server"),
        (
            |s| s.worker.stream.clear(),
            "worker.stream must not be empty",
        ),
        (
            |s| s.worker.queue_group.clear(),
            "worker.queue_group must not be empty",
        ),
        (
            |s| s.worker.max_in_flight = 0,
            "worker.max_in_flight must be at least 1",
        ),
        (|s| s.worker.lanes = 0, "worker.lanes must be at least 1"),
        (
            |s| s.worker.max_batch = 0,
            "worker.max_batch must be at least 1",
        ),
        (
            |s| s.worker.lanes = 9,
            "worker.lanes must be at most database.max_connections",
        ),
        (
            |s| s.worker.delivery.max_deliver = 0,
            "worker.max_deliver must be at least 1",
        ),
        (
            |s| s.worker.dlq_max_bytes = -1,
            "worker.dlq_max_bytes must be positive",
        ),
        (
            |s| s.worker.ack_wait = Duration::ZERO,
            "worker.ack_wait_secs must be at least 1",
        ),
        (
            |s| s.worker.retry.min_delay = Duration::from_secs(3),
            "worker.retry_min_delay_ms must be at most worker.retry_max_delay_ms",
        ),
        (
            |s| s.worker.retry.budget = Duration::from_secs(30),
            "worker.retry_budget_ms must be less than worker.ack_wait_secs",
        ),
        (
            |s| s.worker.delivery.nak_delay = Duration::from_secs(61),
            "worker.nak_delay_ms must be at most worker.nak_max_delay_ms",
        ),
        (
            |s| s.worker.dedupe_retention = Duration::ZERO,
            "worker.dedupe_retention_hours must be at least 1",
        ),
        (
            |s| s.telemetry.otlp_endpoint = Some("ftp://user:hunter2@host".into()),
            "telemetry.otlp_endpoint must be empty or an http:// or https:// URL",
        ),
        (
            |s| s.log.level = "info,=hunter2=[".into(),
            "log.level must be a filter in RUST_LOG syntax",
        ),
    ];

    /// Breaks one rule at a time; each is reported by its setting and its
    /// rule, and two at once are both reported.
    #[test]
    fn validate_enforces_each_rule_of_the_defaults_file() {
        for (breaks, rule) in BROKEN_RULES {
            let mut settings = defaults();
            breaks(&mut settings);
            let error = settings.validate().expect_err(rule).to_string();
            assert!(error.contains(rule), "{rule}: {error}");
            assert!(!error.contains("hunter2"), "a value was shown: {error}");
        }
        let mut settings = defaults();
        settings.worker.lanes = 0;
        settings.nats.url = SecretString::from(String::new());
        let error = settings.validate().expect_err("two rules").to_string();
        assert!(
            error.contains("nats.url") && error.contains("worker.lanes"),
            "{error}"
        );
    }

    #[test]
    fn load_refuses_settings_that_break_a_rule() {
        let error = load(&[("ROTATION_WORKER_WORKER__RETRY_BUDGET_MS", "60000")])
            .expect_err("budget over the ack wait")
            .to_string();
        assert_eq!(
            error,
            "invalid settings: worker.retry_budget_ms must be less than worker.ack_wait_secs"
        );
    }

    #[test]
    fn errors_are_cleared_of_quoted_values() {
        let message =
            r#"invalid type: string "c2VjcmV0LWtleQ==", expected a map for key `encryption.keys`"#;
        let redacted = redact(message, &config::Map::new());
        assert!(!redacted.contains("c2VjcmV0"), "{redacted}");
        assert!(redacted.contains("`encryption.keys`"), "{redacted}");
        assert_eq!(redact("no quotes", &config::Map::new()), "no quotes");
        let env = config::Map::from([("NATS_URL".to_owned(), "nats://pw@x".to_owned())]);
        assert_eq!(redact("bad nats://pw@x here", &env), "bad [redacted] here");
    }
}
