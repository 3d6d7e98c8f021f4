//! The command line: the worker itself (`run`) and the admin commands.
//!
//! Admin commands print JSON on stdout and human-readable errors on stderr,
//! and exit non-zero on failure (1 for a refused or failed command, 2 for a
//! command line clap cannot parse). Secrets are read from stdin, never from
//! arguments, so they stay out of process lists and shell history.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;
use serde::Serialize;
use uuid::Uuid;

use crate::auth::{ApiKey, MAX_KEY_LEN};
use crate::config::Settings;
use crate::crypto::{self, KeyRing, KeySource};
use crate::domain::{
    MAX_SECRET_ID_BYTES, Name, Namespace, NewIntegration, Owner, RoleId, SecretId, VaultAddress,
};
use crate::rotator::StatusReport;
use crate::store::{self, ApiKeySelector, Store};
use crate::telemetry::Telemetry;
use crate::wire::Publisher;
use crate::worker::{App, Deps, ProbeServer};
use tokio_util::sync::CancellationToken;

/// Keeps vault integrations' AppRole secret_ids in sync with rotations
/// announced on NATS.
#[derive(Debug, Parser)]
#[command(name = "rotation-worker", version, about)]
pub struct Cli {
    /// A TOML file laid over the built-in defaults (see config/default.toml).
    #[arg(
        long,
        global = true,
        env = "ROTATION_WORKER_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker until SIGTERM or SIGINT.
    #[command(long_about = RUN_ABOUT, after_help = RUN_SETTINGS)]
    Run,
    /// Create and migrate the database, then exit.
    Migrate,
    /// Re-encrypt every stored secret under the active key.
    Reencrypt,
    /// Manage API keys.
    #[command(subcommand)]
    ApiKey(ApiKeyCommand),
    /// Manage vault integrations.
    #[command(subcommand)]
    Integration(IntegrationCommand),
    /// Inspect and replay the dead-letter stream.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

/// `run --help`: what the worker connects to and serves. The defaults named
/// here are those of `config/default.toml` (a test holds them equal).
const RUN_ABOUT: &str = "\
Run the worker until SIGTERM or SIGINT.

It connects to NATS at nats.url (NATS_URL; default nats://localhost:4222),
takes rotation events from the JetStream stream VAULT_ROTATIONS through the
durable consumer rotation-worker (worker.ingest = \"core\": a queue
subscription on vault.approle.rotated) and answers requests on
vault.approle.rotate.

It keeps its data in the database at database.url (DATABASE_URL): a
postgres:// URL for PostgreSQL, needed when several workers share the
consumer; empty (the default), the SQLite file data/rotation-worker.db
(database.sqlite_path) under the working directory. Either is created if
missing and migrated.

It serves /metrics, /healthz and /readyz on telemetry.http_addr (default
127.0.0.1:9464; 0.0.0.0:9464 in a container).";

/// `run --help`, after the options: where settings come from.
const RUN_SETTINGS: &str = "\
Settings, each layer over the one before:
  1. the built-in defaults (config/default.toml: every setting, with a comment)
  2. a TOML file: --config PATH or ROTATION_WORKER_CONFIG
  3. ROTATION_WORKER_<SECTION>__<KEY>, a double underscore between section and key,
     e.g. ROTATION_WORKER_WORKER__MAX_IN_FLIGHT=128, ROTATION_WORKER_NATS__PASSWORD,
     ROTATION_WORKER_ENCRYPTION__KEYS__K1=<32 bytes in base64>
  4. DATABASE_URL and NATS_URL
Logs: RUST_LOG (else log.level). Traces and metrics: OTEL_EXPORTER_OTLP_ENDPOINT,
OTEL_SERVICE_NAME.";

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead-lettered messages (never their secrets).
    List,
    /// Apply dead-lettered messages again; those that reach an outcome
    /// other than 503 are removed.
    Replay {
        /// Only the entry at this stream position.
        #[arg(long)]
        seq: Option<u64>,
    },
    /// Re-seal entries under the active encryption key (run after
    /// `reencrypt`, before an old key leaves the ring).
    Reencrypt,
}

/// `api-key` subcommands.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key for an owner; the key is printed once and never stored.
    Create {
        /// The owner (account) the key acts for.
        #[arg(long)]
        owner: String,
    },
    /// Revoke a key: by --id, or by the key itself read from stdin.
    Revoke {
        /// The key's id, as `api-key list` shows it.
        #[arg(long)]
        id: Option<Uuid>,
    },
    /// List keys (ids and times, never the keys).
    List {
        /// Only this owner's keys.
        #[arg(long)]
        owner: Option<String>,
    },
}

/// `integration` subcommands.
#[derive(Debug, Subcommand)]
pub enum IntegrationCommand {
    /// Create an integration; the initial secret_id is read from stdin.
    Create {
        /// The owner (account) it belongs to.
        #[arg(long)]
        owner: String,
        /// A human-readable name.
        #[arg(long)]
        name: String,
        /// The Vault address, an http(s) URL.
        #[arg(long)]
        address: String,
        /// The Vault Enterprise namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// The AppRole role_id.
        #[arg(long)]
        role_id: String,
    },
    /// Show one integration.
    Get {
        /// Integration id.
        id: Uuid,
    },
    /// Show one integration's rotation status: the reply of
    /// `vault.approle.status`, for any owner.
    Status {
        /// Integration id.
        #[arg(long)]
        id: Uuid,
    },
    /// Renew one integration's secret_id now: the worker mints, tests and
    /// stores the next one in the integration's Vault, as
    /// `vault.approle.renew` does, for any owner; the outcome event is
    /// published.
    Renew {
        /// Integration id.
        #[arg(long)]
        id: Uuid,
    },
    /// List integrations, oldest first.
    List {
        /// Only this owner's integrations.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Delete an integration.
    Delete {
        /// Integration id.
        id: Uuid,
    },
}

/// Parses the command line, runs the command and maps the result to an
/// exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before anything opens a TLS connection (NATS, PostgreSQL, OTLP).
    crate::worker::install_crypto_provider();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = Arc::new(crate::telemetry::init(&settings.log, &settings.telemetry));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(execute(cli.command, settings, telemetry.clone()));
    // Flushes spans still buffered for export.
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, leaving out a cause whose text its
/// parent already shows (sqlx and others repeat their source in `Display`).
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

/// What a command may do to the store and the key file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads records; opens no secret, writes nothing, creates no key file.
    Read,
    /// Writes, or opens secrets: the key ring must fit the store.
    Write,
}

impl Command {
    /// Checks the arguments that need no store, so that a typo fails
    /// before anything (a database, a key file) is created. The handlers
    /// parse them again into their types; it costs nothing.
    fn check_arguments(&self, settings: &Settings) -> anyhow::Result<()> {
        let owner = |o: &Option<String>| o.as_deref().map(Owner::parse).transpose().map(drop);
        match self {
            Self::Integration(IntegrationCommand::Create {
                owner,
                name,
                address,
                namespace,
                role_id,
            }) => {
                Owner::parse(owner)?;
                Name::parse(name)?;
                VaultAddress::parse(address)?;
                // The worker will send this address tokens and secrets:
                // one it would refuse to call is refused here.
                let v = &settings.vault;
                crate::vault::Egress::new(v.allow_http, &v.allowed_networks)
                    .check(address)
                    .map_err(|e| anyhow::anyhow!("address: {e}"))?;
                namespace.as_deref().map(Namespace::parse).transpose()?;
                RoleId::parse(role_id)?;
            }
            Self::ApiKey(ApiKeyCommand::Create { owner }) => drop(Owner::parse(owner)?),
            Self::ApiKey(ApiKeyCommand::List { owner: o })
            | Self::Integration(IntegrationCommand::List { owner: o }) => owner(o)?,
            _ => {}
        }
        Ok(())
    }

    fn access(&self) -> Access {
        match self {
            Self::Integration(
                IntegrationCommand::Get { .. }
                | IntegrationCommand::Status { .. }
                | IntegrationCommand::List { .. },
            )
            | Self::ApiKey(ApiKeyCommand::List { .. }) => Access::Read,
            _ => Access::Write,
        }
    }
}

/// Says where the ring's keys came from (never what they are).
fn log_key_source(ring: &KeyRing, source: &KeySource) {
    match source {
        KeySource::Config => {
            tracing::info!(
                active_key = ring.active_key_id(),
                "encryption keys from configuration"
            );
        }
        KeySource::KeyFile(path) => {
            tracing::info!(path = %path.display(), "encryption key from key file");
        }
        KeySource::Unsaved { .. } => {}
    }
}

/// Opens the store with a key ring that fits it. A command that writes or
/// opens secrets refuses to start when a configured key is not the one the
/// store's rows were sealed under, or when the ring lacks a key they use;
/// it then records the check values of its keys. A missing key file is
/// created only for an empty store, after the store has opened, and never
/// by a command that only reads. `rotation-worker run` opens its store
/// this way with [`Access::Write`], and so does a test that runs the worker
/// in its own process.
pub async fn open_store(
    settings: &Settings,
    access: Access,
) -> anyhow::Result<(Arc<dyn Store>, Arc<KeyRing>)> {
    // A bad database URL is reported before anything is created for it.
    store::Backend::of(&settings.database).context("cannot open the store")?;
    let (ring, source) = KeyRing::load(&settings.encryption)?;
    log_key_source(&ring, &source);
    let mut keys = Arc::new(ring);
    let create = match access {
        Access::Read => store::Create::Never,
        Access::Write => store::Create::IfMissing,
    };
    let mut store = store::open(&settings.database, keys.clone(), create)
        .await
        .context("cannot open the store")?;
    if access == Access::Read {
        return Ok((store, keys));
    }
    let usage = store
        .key_usage()
        .await
        .context("cannot read which keys the store uses")?;
    let mut created = None;
    if let KeySource::Unsaved { path, key } = &source {
        let in_file = key_file_for(path, key, &usage)?;
        if in_file.expose_secret() == key.expose_secret() {
            created = Some(path.clone());
        } else {
            // Another process created it a moment earlier: use its key.
            keys = Arc::new(KeyRing::from_key_file(&in_file)?);
            log_key_source(&keys, &KeySource::KeyFile(path.clone()));
            store = store::open(&settings.database, keys.clone(), create)
                .await
                .context("cannot open the store")?;
        }
    }
    if let Err(e) = record_key_checks(store.as_ref(), &usage, &keys).await {
        if let Some(path) = &created {
            // Our new key sealed nothing: take it back.
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    if let Some(path) = &created {
        tracing::warn!(
            path = %path.display(),
            "no encryption key configured: created a new key file; back it up, \
             secrets cannot be read without it"
        );
    }
    Ok((store, keys))
}

/// The key a missing key file should hold: `key`, written now, for an
/// empty store; for a store with secrets, only the key another process
/// starting at the same moment wrote. Otherwise the store's key is lost
/// here, and a new one must not seal rows beside the old.
fn key_file_for(
    path: &std::path::Path,
    key: &secrecy::SecretString,
    usage: &store::KeyUsage,
) -> anyhow::Result<secrecy::SecretString> {
    if usage.is_empty() {
        return Ok(crypto::save_key_file(path, key)?);
    }
    crypto::read_key_file(path)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no encryption key is configured and the key file {} does not exist, but the \
             store already holds sealed secrets or a recorded key: restore the key file (or \
             configure encryption.keys) and start again; nothing was written",
            path.display()
        )
    })
}

/// Checks the ring against the store and records its check values. Hosts
/// with different keys starting together on an empty store each find it
/// empty; the first check value recorded decides, so what was recorded is
/// checked again.
async fn record_key_checks(
    store: &dyn Store,
    usage: &store::KeyUsage,
    keys: &KeyRing,
) -> anyhow::Result<()> {
    let checks = store::verify_keys(usage, keys)?;
    let recorded = store
        .record_key_checks(&checks)
        .await
        .context("cannot record the encryption keys' check values")?;
    let agreed = store::KeyUsage {
        samples: Vec::new(),
        checks: recorded,
    };
    store::verify_keys(&agreed, keys)?;
    Ok(())
}

async fn execute(
    command: Command,
    settings: Settings,
    telemetry: Arc<Telemetry>,
) -> anyhow::Result<()> {
    command.check_arguments(&settings)?;
    if let Command::Run = command {
        return run(&settings, telemetry).await;
    }
    if let Command::Dlq(DlqCommand::List) = command {
        // What an operator needs during a database outage: NATS only.
        let client = crate::worker::connect(&settings.nats).await?;
        let js = async_nats::jetstream::new(client);
        return print(&crate::dlq::list(&js, &settings.worker.dlq_stream).await?);
    }
    let (store, keys) = open_store(&settings, command.access()).await?;
    match command {
        // Started above, with its probe server first.
        Command::Run => Ok(()),
        Command::Dlq(command) => dlq(&settings, store, &keys, command).await,
        Command::Migrate => print(&serde_json::json!({ "migrated": true })),
        Command::Reencrypt => print(&store.reencrypt().await?),
        Command::ApiKey(command) => api_key(store.as_ref(), command).await,
        Command::Integration(IntegrationCommand::Renew { id }) => {
            renew(&settings, store, &keys, id).await
        }
        Command::Integration(command) => {
            integration(store.as_ref(), &settings.renewal, command).await
        }
    }
}

/// Runs the worker until SIGTERM or SIGINT. The probe server comes first,
/// so that `/healthz` answers and `/readyz` says what the worker waits for
/// (the store, NATS, the streams); a signal at any point of start-up ends
/// the process at once.
async fn run(settings: &Settings, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
    });
    let probes = match settings.telemetry.http_addr {
        Some(addr) => Some(ProbeServer::start(addr, telemetry.clone()).await?),
        None => None,
    };
    let started = tokio::select! {
        app = start(settings, telemetry, probes) => app?,
        () = shutdown.cancelled() => {
            tracing::info!("stopped during start-up");
            return Ok(());
        }
    };
    started.run_until(shutdown.cancelled_owned()).await
}

/// The worker's start-up: the store, NATS (waited for), the streams.
/// The worker's one start-up, for `rotation-worker run` and for tests that
/// run it in their own process: the store opened with a key ring that fits
/// it, NATS connected (retried until a server answers), and the [`App`]
/// built on them; `probes`, when given, says what it is waiting for.
pub async fn start(
    settings: &Settings,
    telemetry: Arc<Telemetry>,
    probes: Option<ProbeServer>,
) -> anyhow::Result<App> {
    let starting = |why: &str| {
        if let Some(probes) = &probes {
            probes.starting(why);
        }
    };
    starting("opening the store");
    let (store, keys) = open_store(settings, Access::Write).await?;
    let client = crate::worker::connect_until_up(&settings.nats, starting).await?;
    starting("setting up streams and subscriptions");
    let deps = Deps {
        client,
        store,
        keys,
        telemetry,
        probes,
    };
    App::build(settings, deps).await
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn dlq(
    settings: &Settings,
    store: Arc<dyn Store>,
    keys: &KeyRing,
    command: DlqCommand,
) -> anyhow::Result<()> {
    let client = crate::worker::connect(&settings.nats).await?;
    let js = async_nats::jetstream::new(client.clone());
    let stream = &settings.worker.dlq_stream;
    let result = match command {
        // Answered without a store, in `execute`.
        DlqCommand::List => print(&crate::dlq::list(&js, stream).await?),
        DlqCommand::Replay { seq } => {
            let rotator = crate::worker::rotator(settings, store)?;
            let publisher = Publisher::new(settings.worker.ingest, &client, &js);
            let replayed = crate::dlq::replay(&js, stream, keys, &rotator, &publisher, seq).await?;
            print(&replayed)
        }
        DlqCommand::Reencrypt => print(&crate::dlq::reencrypt(&js, stream, keys).await?),
    };
    client.flush().await.ok();
    result
}

/// `integration renew --id`: a renewal acting for the integration's owner
/// with the schedule's key, handled here and its outcome event published.
async fn renew(
    settings: &Settings,
    store: Arc<dyn Store>,
    keys: &KeyRing,
    id: Uuid,
) -> anyhow::Result<()> {
    let Some(found) = store.get_integration(id).await? else {
        bail!("no integration with id {id}");
    };
    let schedule = crate::worker::schedule::registered_key(store.as_ref(), keys, &found.owner);
    let Some(key) = schedule.await? else {
        bail!("the renewal key of owner {} is revoked", found.owner);
    };
    let client = crate::worker::connect(&settings.nats).await?;
    let js = async_nats::jetstream::new(client.clone());
    let publisher = Publisher::new(settings.worker.ingest, &client, &js);
    let rotator = crate::worker::rotator(settings, store)?;
    let msg_id = format!("renewal-cli-{}", Uuid::now_v7());
    let now = time::OffsetDateTime::now_utc();
    let message = crate::worker::schedule::renewal_message(id, &key, msg_id, now);
    let handled = rotator
        .handle(std::slice::from_ref(&message))
        .await?
        .into_iter()
        .next()
        .context("the renewal came to nothing")?;
    let published = publisher.outcome(&handled).await;
    client.flush().await.ok();
    if let Err(e) = published {
        tracing::warn!(error = %e, "publishing the outcome event failed");
    }
    match handled.result {
        Ok(done) => print(&done.record),
        Err(failure) => bail!("{} {}", failure.status.code(), failure.message),
    }
}

async fn api_key(store: &dyn Store, command: ApiKeyCommand) -> anyhow::Result<()> {
    match command {
        ApiKeyCommand::Create { owner } => {
            let owner = Owner::parse(&owner)?;
            let key = ApiKey::generate();
            store.create_api_key(&owner, &key.hash()).await?;
            print(&serde_json::json!({ "owner": owner, "apiKey": key.expose() }))
        }
        ApiKeyCommand::Revoke { id } => {
            let selector = match id {
                Some(id) => ApiKeySelector::Id(id),
                None => {
                    let not_a_key = || anyhow::anyhow!("stdin does not hold an API key");
                    let key = read_stdin("the API key to revoke", MAX_KEY_LEN, not_a_key)?;
                    ApiKeySelector::Hash(ApiKey::parse(&key).map_err(|_| not_a_key())?.hash())
                }
            };
            match store.revoke_api_key(&selector).await? {
                Some(info) => print(&info),
                None => bail!("no such API key"),
            }
        }
        ApiKeyCommand::List { owner } => {
            let owner = owner.as_deref().map(Owner::parse).transpose()?;
            print(&store.list_api_keys(owner.as_ref()).await?)
        }
    }
}

async fn integration(
    store: &dyn Store,
    schedule: &crate::config::RenewalSettings,
    command: IntegrationCommand,
) -> anyhow::Result<()> {
    match command {
        IntegrationCommand::Create {
            owner,
            name,
            address,
            namespace,
            role_id,
        } => create_integration(store, &owner, &name, &address, namespace, &role_id).await,
        IntegrationCommand::Get { id } => match store.get_integration(id).await? {
            Some(found) => print(&found.integration),
            None => bail!("no integration with id {id}"),
        },
        IntegrationCommand::Status { id } => match store.get_integration(id).await? {
            Some(found) => {
                let renewal = store.renewal_state(id).await?;
                let now = time::OffsetDateTime::now_utc();
                print(&StatusReport::of(found, &renewal, schedule, now))
            }
            None => bail!("no integration with id {id}"),
        },
        IntegrationCommand::List { owner } => {
            let owner = owner.as_deref().map(Owner::parse).transpose()?;
            print(&store.list_integrations(owner.as_ref()).await?)
        }
        // Handled in `execute`: it needs NATS and the key ring.
        IntegrationCommand::Renew { .. } => Ok(()),
        IntegrationCommand::Delete { id } => {
            if store.delete_integration(id).await? {
                print(&serde_json::json!({ "deleted": id }))
            } else {
                bail!("no integration with id {id}")
            }
        }
    }
}

/// `integration create`: every argument is checked before the secret is
/// read, so that a typo does not cost the operator a paste.
async fn create_integration(
    store: &dyn Store,
    owner: &str,
    name: &str,
    address: &str,
    namespace: Option<String>,
    role_id: &str,
) -> anyhow::Result<()> {
    let owner = Owner::parse(owner)?;
    let name = Name::parse(name)?;
    let address = VaultAddress::parse(address)?;
    let namespace = namespace.as_deref().map(Namespace::parse).transpose()?;
    let role_id = RoleId::parse(role_id)?;
    let secret = read_stdin("the AppRole secret_id", MAX_SECRET_ID_BYTES, || {
        SecretId::too_long().into()
    })?;
    let secret_id = SecretId::parse(secret)?;
    let new = NewIntegration {
        owner,
        name,
        address,
        namespace,
        role_id,
        secret_id,
    };
    print(&store.create_integration(&new).await?)
}

/// Reads a secret from stdin. Typed at a terminal: one line, not echoed
/// (the secret stays off the screen, its scrollback and any recording of
/// the session). Piped: everything up to EOF, one trailing line ending
/// dropped. Either way at most `limit` bytes, else the error `too_long`
/// makes: the refusal the secret's own parser gives, so that one limit
/// and one message hold for the CLI and the wire alike.
fn read_stdin(
    what: &str,
    limit: usize,
    too_long: impl FnOnce() -> anyhow::Error,
) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    let raw = if stdin.is_terminal() {
        rpassword::prompt_password(format!("Enter {what} and press Enter: "))
            .with_context(|| format!("cannot read {what} from the terminal"))?
            .into_bytes()
    } else {
        // The limit, a CRLF, and one byte more to notice an oversized input.
        let mut raw = Vec::new();
        stdin
            .lock()
            .take(limit as u64 + 3)
            .read_to_end(&mut raw)
            .with_context(|| format!("cannot read {what} from stdin"))?;
        if raw.ends_with(b"\n") {
            raw.pop();
            if raw.ends_with(b"\r") {
                raw.pop();
            }
        }
        raw
    };
    if raw.len() > limit {
        return Err(too_long());
    }
    let text =
        String::from_utf8(raw).map_err(|_| anyhow::anyhow!("{what} on stdin is not UTF-8"))?;
    if text.trim().is_empty() {
        bail!("{what} must be given on stdin and must not be empty");
    }
    Ok(text)
}

fn print<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
