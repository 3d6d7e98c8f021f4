//! Connecting to NATS the way secured deployments expect: one server or a
//! seed list, TLS with private roots and client certificates, and exactly
//! one way to authenticate (user and password, token, nkey seed or creds
//! file, from the settings or from the URL).
//!
//! Credentials written into a URL (`nats://user:pass@host`,
//! `nats://token@host`) are taken out of it here: the client library would
//! ignore them, and an address without them can be logged and debug-printed
//! anywhere. The worker's client uses an inbox prefix of its own, so that
//! what it receives (pull deliveries carry API keys and secrets) never
//! travels on the `_INBOX.>` subjects publishers may read.

use std::path::PathBuf;

use async_nats::{Client, ConnectOptions, ServerAddr};
use secrecy::{ExposeSecret, SecretString};

use crate::config::NatsSettings;

/// Why the NATS settings cannot be used. Messages name settings, never
/// their values.
#[derive(Debug, thiserror::Error)]
pub enum NatsConfigError {
    /// An entry of `nats.url` does not parse.
    #[error(
        "nats.url: server {0} of the list is not a NATS URL (nats://, tls://, ws:// or wss://)"
    )]
    Url(usize),
    /// `nats.url` names no server.
    #[error("nats.url names no server")]
    NoServer,
    /// The servers of one list carry different credentials.
    #[error("nats.url: the servers of the list carry different credentials")]
    MixedUrlCredentials,
    /// More than one way to authenticate is configured.
    #[error("NATS: configure one way to authenticate, found {0}")]
    SeveralAuthMethods(String),
    /// `nats.user` without `nats.password`, or the reverse.
    #[error("nats.user and nats.password go together")]
    UserWithoutPassword,
    /// A client certificate without its key, or the reverse.
    #[error("nats.tls_cert_file and nats.tls_key_file go together")]
    CertWithoutKey,
    /// The inbox prefix is not a plain subject prefix.
    #[error("nats.inbox_prefix must be a subject without wildcards or spaces")]
    InboxPrefix,
    /// A file named in the settings cannot be read.
    #[error("{setting}: cannot read {}: {source}", path.display())]
    File {
        /// The setting.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// How the worker authenticates to NATS.
enum Auth {
    UserPassword(String, SecretString),
    Token(SecretString),
    NkeySeed(PathBuf),
    CredsFile(PathBuf),
}

impl Auth {
    fn name(&self, from_url: bool) -> &'static str {
        match (self, from_url) {
            (Self::UserPassword(..), true) => "user and password in nats.url",
            (Self::Token(_), true) => "a token in nats.url",
            (Self::UserPassword(..), false) => "nats.user and nats.password",
            (Self::Token(_), false) => "nats.token",
            (Self::NkeySeed(_), _) => "nats.nkey_seed_file",
            (Self::CredsFile(_), _) => "nats.creds_file",
        }
    }
}

/// The servers of `nats.url`, their credentials taken out.
pub struct Servers {
    addrs: Vec<ServerAddr>,
    auth: Option<Auth>,
}

impl Servers {
    /// Parses a comma-separated list of server URLs. A URL may carry
    /// `user:password@` or `token@`; every URL that carries any must carry
    /// the same.
    pub fn parse(list: &str) -> Result<Self, NatsConfigError> {
        let mut addrs = Vec::new();
        let mut auth: Option<(String, Option<String>)> = None;
        let entries = list.split(',').map(str::trim).filter(|s| !s.is_empty());
        for (index, entry) in entries.enumerate() {
            let bad = || NatsConfigError::Url(index + 1);
            let with_scheme = if entry.contains("://") {
                entry.to_owned()
            } else {
                format!("nats://{entry}")
            };
            let mut url = url::Url::parse(&with_scheme).map_err(|_| bad())?;
            if !url.username().is_empty() {
                let found = (
                    percent_decoded(url.username()),
                    url.password().map(percent_decoded),
                );
                if auth.as_ref().is_some_and(|known| known != &found) {
                    return Err(NatsConfigError::MixedUrlCredentials);
                }
                auth = Some(found);
                url.set_username("").map_err(|_| bad())?;
                url.set_password(None).map_err(|_| bad())?;
            }
            addrs.push(ServerAddr::from_url(url).map_err(|_| bad())?);
        }
        if addrs.is_empty() {
            return Err(NatsConfigError::NoServer);
        }
        let auth = auth.map(|(user, password)| match password {
            Some(password) => Auth::UserPassword(user, password.into()),
            None => Auth::Token(user.into()),
        });
        Ok(Self { addrs, auth })
    }

    /// The servers as they may be logged: no credentials.
    pub fn shown(&self) -> String {
        let shown: Vec<String> = self
            .addrs
            .iter()
            .map(|a| format!("{}://{}:{}", a.scheme(), a.host(), a.port()))
            .collect();
        shown.join(",")
    }

    /// Whether a URL of the list asks for TLS (`tls://`, `wss://`).
    fn tls_required(&self) -> bool {
        self.addrs.iter().any(ServerAddr::tls_required)
    }
}

fn percent_decoded(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// The one way to authenticate the settings and the URL give, if any.
fn auth(settings: &NatsSettings, url_auth: Option<Auth>) -> Result<Option<Auth>, NatsConfigError> {
    let mut found: Vec<(Auth, bool)> = url_auth.into_iter().map(|a| (a, true)).collect();
    match (&settings.user, &settings.password) {
        (Some(user), Some(password)) => {
            found.push((Auth::UserPassword(user.clone(), password.clone()), false));
        }
        (None, None) => {}
        _ => return Err(NatsConfigError::UserWithoutPassword),
    }
    let others = [
        settings.token.clone().map(Auth::Token),
        settings.nkey_seed_file.clone().map(Auth::NkeySeed),
        settings.creds_file.clone().map(Auth::CredsFile),
    ];
    found.extend(others.into_iter().flatten().map(|a| (a, false)));
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(a, url)| a.name(*url)).collect();
        return Err(NatsConfigError::SeveralAuthMethods(names.join(" and ")));
    }
    Ok(found.pop().map(|(a, _)| a))
}

fn read(setting: &'static str, path: &PathBuf) -> Result<SecretString, NatsConfigError> {
    std::fs::read_to_string(path)
        .map(SecretString::from)
        .map_err(|source| NatsConfigError::File {
            setting,
            path: path.clone(),
            source,
        })
}

/// The client options the settings describe (authentication, TLS, inbox
/// prefix), and the servers to connect to.
pub(super) fn options(
    settings: &NatsSettings,
) -> Result<(ConnectOptions, Servers), NatsConfigError> {
    let mut servers = Servers::parse(settings.url.expose_secret())?;
    let prefix = &settings.inbox_prefix;
    if prefix.is_empty() || prefix.contains(['*', '>', ' ', '\t']) || prefix.ends_with('.') {
        return Err(NatsConfigError::InboxPrefix);
    }
    let mut options = ConnectOptions::new()
        .name(&settings.client_name)
        .custom_inbox_prefix(prefix);
    options = match auth(settings, servers.auth.take())? {
        None => options,
        Some(Auth::UserPassword(user, password)) => {
            options.user_and_password(user, password.expose_secret().to_owned())
        }
        Some(Auth::Token(token)) => options.token(token.expose_secret().to_owned()),
        Some(Auth::NkeySeed(path)) => {
            let seed = read("nats.nkey_seed_file", &path)?;
            options.nkey(seed.expose_secret().trim().to_owned())
        }
        Some(Auth::CredsFile(path)) => {
            let creds = read("nats.creds_file", &path)?;
            options
                .credentials(creds.expose_secret())
                .map_err(|source| NatsConfigError::File {
                    setting: "nats.creds_file",
                    path,
                    source,
                })?
        }
    };
    Ok((tls(options, settings, &servers)?, servers))
}

/// TLS: private roots, a client certificate, and whether it is required
/// (`nats.tls_required`, a `tls://` URL, or any TLS file configured).
fn tls(
    mut options: ConnectOptions,
    settings: &NatsSettings,
    servers: &Servers,
) -> Result<ConnectOptions, NatsConfigError> {
    if let Some(ca) = &settings.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    match (&settings.tls_cert_file, &settings.tls_key_file) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => return Err(NatsConfigError::CertWithoutKey),
    }
    let required = settings.tls_required
        || servers.tls_required()
        || settings.tls_ca_file.is_some()
        || settings.tls_cert_file.is_some();
    Ok(options.require_tls(required))
}

/// Connects to NATS as the settings say, once: a command that needs NATS
/// fails at once when it is not there. Once connected, the client
/// reconnects by itself, forever, when the server goes away.
pub async fn connect(settings: &NatsSettings) -> anyhow::Result<Client> {
    let (options, servers) = options(settings)?;
    tracing::info!(servers = %servers.shown(), "connecting to NATS");
    Ok(reconnecting(options).connect(servers.addrs).await?)
}

/// Connects to NATS as the settings say, retrying with backoff until a
/// server answers: one WARN line per failed attempt, naming the servers
/// (never their credentials). `unreachable` is told why the worker waits,
/// for `/readyz`. Cancel the future to give up.
pub async fn connect_until_up(
    settings: &NatsSettings,
    unreachable: impl Fn(&str),
) -> anyhow::Result<Client> {
    let shown = Servers::parse(settings.url.expose_secret())?.shown();
    tracing::info!(servers = %shown, "connecting to NATS");
    unreachable(&format!("NATS unreachable: {shown}"));
    let mut delays = start_delays();
    loop {
        // The options are built afresh for each attempt: they hold the
        // credentials' files as read now.
        let (options, servers) = options(settings)?;
        match reconnecting(options).connect(servers.addrs).await {
            Ok(client) => return Ok(client),
            Err(e) => {
                let delay = delays.next().unwrap_or(START_DELAY_MAX);
                tracing::warn!(servers = %shown, error = %e, retry_in_ms = delay.as_millis() as u64,
                    "NATS unreachable");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// The longest wait between two tries of a start-up step.
pub(super) const START_DELAY_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// The waits between tries of a start-up step that waits for NATS: from a
/// quarter of a second, doubling, up to [`START_DELAY_MAX`], forever.
pub(super) fn start_delays() -> impl Iterator<Item = std::time::Duration> {
    backon::BackoffBuilder::build(
        backon::ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(250))
            .with_max_delay(START_DELAY_MAX)
            .without_max_times(),
    )
}

/// Options that reconnect forever once connected, and say so in one line
/// per connection event.
fn reconnecting(options: ConnectOptions) -> ConnectOptions {
    options
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::info!(event = %other, "NATS client event"),
            }
        })
}

/// Chooses the process's TLS crypto provider (ring): several are linked
/// in, and rustls refuses to guess. Call once at start; later calls are
/// harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_taken_out_and_never_shown() {
        let servers = Servers::parse("nats://svc:p%40ss@a:4222, tls://svc:p%40ss@b:4223").unwrap();
        assert_eq!(servers.shown(), "nats://a:4222,tls://b:4223");
        assert!(servers.tls_required());
        match servers.auth {
            Some(Auth::UserPassword(user, password)) => {
                assert_eq!(user, "svc");
                assert_eq!(password.expose_secret(), "p@ss");
            }
            _ => panic!("expected user and password"),
        }
        for addr in &servers.addrs {
            assert!(!format!("{addr:?}").contains("p%40ss"));
        }
        let token = Servers::parse("nats://s3cr3t@a:4222").unwrap();
        assert!(matches!(token.auth, Some(Auth::Token(t)) if t.expose_secret() == "s3cr3t"));
        let plain = Servers::parse("localhost:4222,nats://b").unwrap();
        assert_eq!(plain.shown(), "nats://localhost:4222,nats://b:4222");
        assert!(plain.auth.is_none());
    }

    #[test]
    fn bad_lists_are_refused_without_echoing_them() {
        let err = |list: &str| Servers::parse(list).err().map(|e| e.to_string());
        assert_eq!(
            err("nats://a:4222,http://u:hunter2@b").unwrap(),
            "nats.url: server 2 of the list is not a NATS URL (nats://, tls://, ws:// or wss://)"
        );
        assert_eq!(err(" , ").unwrap(), "nats.url names no server");
        assert_eq!(
            err("nats://u:one@a,nats://u:two@b").unwrap(),
            "nats.url: the servers of the list carry different credentials"
        );
    }
}
