//! The worker's calls to an integration's Vault, over its HTTP API: look a
//! response-wrapping token up, unwrap it, and try a new secret_id with an
//! AppRole login.
//!
//! Every tenant controls the Vault at its integration's address, so each
//! call is made as to a hostile server: only to an address the egress
//! policy admits ([`egress`]), through a bulkhead per address ([`guard`]:
//! a few calls at once, a circuit breaker), within the message's deadline,
//! reading at most `vault.max_response_bytes`, following no redirect.
//!
//! One call is one HTTP request: the retry decision
//! ([`VaultError::is_transient`]) is made here, the retrying is the
//! rotator's, within the message's deadline. Tokens and secrets travel in
//! request bodies and headers only; no error carries a body Vault sent or
//! anything the worker sent, so none can leak a secret into a log line or
//! an outcome.

mod approle;
mod egress;
mod guard;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::config::VaultSettings;
use crate::domain::{SecretId, WrappingToken};
pub use approle::{Minted, RENEWAL_TAG, REPLACES_TAG, SecretIdInfo, Session};
pub use egress::{Egress, Network, Refused};
use guard::{Guard, Shut};

/// The header that names an integration's Vault namespace.
const HEADER_NAMESPACE: &str = "X-Vault-Namespace";
/// The header of the token a call is made with.
const HEADER_TOKEN: &str = "X-Vault-Token";
/// The calls that name a secret_id by its accessor end so.
const ACCESSOR_CALL: &str = "/secret-id-accessor/destroy";
/// What Vault says of an accessor it does not hold.
const UNKNOWN_ACCESSOR: &str = "failed to find accessor entry";
/// The header that asks for an answer wrapped, and for how long.
const HEADER_WRAP_TTL: &str = "X-Vault-Wrap-TTL";
/// What Vault says of a wrapping token it does not hold (OpenBao and
/// Vault alike, with 400).
const INVALID_WRAPPING_TOKEN: &str = "wrapping token is not valid or does not exist";

/// Why a call to Vault did not give what the rotation needs. The messages
/// are the contract's, safe to show to callers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// The wrapping token wraps something else than an AppRole secret_id
    /// (its `creation_path` is not `auth/<mount>/role/<name>/secret-id`).
    #[error("wrapping token was not created by an AppRole secret-id endpoint")]
    WrongPath,
    /// Vault does not know the wrapping token: invalid, expired, or
    /// unwrapped already (possibly by someone else).
    #[error("wrapping token is invalid, expired or already used")]
    InvalidToken,
    /// A login with the integration's role_id and the new secret_id failed.
    #[error("Vault rejected the secret_id")]
    Rejected,
    /// Vault refused the call with another 4xx.
    #[error("Vault refused the request (HTTP {0})")]
    Refused(u16),
    /// Vault answered with a redirect, which is never followed.
    #[error("Vault answered with a redirect")]
    Redirected,
    /// Vault's answer is longer than `vault.max_response_bytes`.
    #[error("Vault's answer is too large")]
    TooLarge,
    /// The address is not one the egress policy lets the worker reach.
    #[error("Vault address not allowed")]
    NotAllowed,
    /// The address's circuit breaker is open, or no call to it could start
    /// before the message's deadline: answered 503 without waiting.
    #[error("Vault unavailable: {0}")]
    Shut(&'static str),
    /// Vault could not be reached, did not answer in time, answered 5xx,
    /// 429 or 412, or with something that is not Vault's answer: worth
    /// retrying.
    #[error("Vault unavailable: {0}")]
    Unavailable(String),
}

impl VaultError {
    /// Whether the message may succeed later (a 503, redelivered).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Shut(_))
    }

    /// Whether trying again within the same delivery may help: not while
    /// the address's breaker is open.
    pub fn retry_now(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Where one integration's Vault is: its address and namespace.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The base URL, such as `https://vault.example.com:8200`.
    pub address: &'a str,
    /// The namespace, sent as `X-Vault-Namespace` on every call.
    pub namespace: Option<&'a str>,
}

/// A client for the integrations' Vaults.
#[derive(Debug, Clone)]
pub struct Vault {
    http: reqwest::Client,
    mount: String,
    timeout: Duration,
    max_response: u64,
    egress: Egress,
    guard: std::sync::Arc<Guard>,
}

impl Vault {
    /// A client as the settings describe. Fails when `ca_file` cannot be
    /// read or holds no PEM certificate.
    pub fn new(settings: &VaultSettings) -> anyhow::Result<Self> {
        let egress = Egress::new(settings.allow_http, &settings.allowed_networks);
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            // A redirect could carry a token or a secret_id to another
            // host: it is answered, never followed.
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(egress.resolver())
            .no_proxy();
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("cannot read vault.ca_file {}: {e}", path.display())
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("vault.ca_file {}: {e}", path.display()))?;
            builder = builder.tls_certs_merge(certs);
        }
        Ok(Self {
            http: builder.build()?,
            mount: settings.approle_mount.trim_matches('/').to_owned(),
            timeout: settings.timeout,
            max_response: settings.max_response_bytes,
            egress,
            guard: std::sync::Arc::new(Guard::new(
                settings.max_concurrent_per_address,
                settings.breaker_failures,
                settings.breaker_cooldown,
            )),
        })
    }

    /// How long one call may take (`vault.timeout_ms`).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The egress policy this client enforces.
    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    /// Checks that `token` wraps an AppRole secret_id: its creation path
    /// is `auth/<mount>/role/<name>/secret-id`. Nothing is unwrapped.
    pub async fn lookup(
        &self,
        target: Target<'_>,
        token: &WrappingToken,
        deadline: Instant,
    ) -> Result<(), VaultError> {
        let body = json!({ "token": token.expose() });
        let answer = self
            .post(target, "sys/wrapping/lookup", None, Some(&body), deadline)
            .await?;
        let answer = answer.wrapping()?;
        let path = answer["data"]["creation_path"].as_str().unwrap_or_default();
        if is_secret_id_path(path, &self.mount) {
            Ok(())
        } else {
            Err(VaultError::WrongPath)
        }
    }

    /// Unwraps `token`: Vault hands out what it wraps once, and only once.
    pub async fn unwrap(
        &self,
        target: Target<'_>,
        token: &WrappingToken,
        deadline: Instant,
    ) -> Result<SecretId, VaultError> {
        secret_of(&self.unwrapped_data(target, token, deadline).await?)
    }

    /// What `token` wraps, as the `data` of the unwrapped answer.
    async fn unwrapped_data(
        &self,
        target: Target<'_>,
        token: &WrappingToken,
        deadline: Instant,
    ) -> Result<Value, VaultError> {
        let answer = self
            .post(
                target,
                "sys/wrapping/unwrap",
                Some(token.expose()),
                None,
                deadline,
            )
            .await?;
        let mut answer = answer.wrapping()?;
        Ok(answer["data"].take())
    }

    /// Logs in with `role_id` and `secret`, then revokes the token it got
    /// (a failed revocation is only logged: the token expires by its TTL).
    pub async fn login(
        &self,
        target: Target<'_>,
        role_id: &str,
        secret: &SecretId,
        deadline: Instant,
    ) -> Result<(), VaultError> {
        let session = self.open(target, role_id, secret, deadline).await?;
        self.end(target, session).await;
        Ok(())
    }

    /// One call, answered by `deadline` (and within `vault.timeout_ms`),
    /// through the address's bulkhead. A transient failure (unreachable,
    /// timed out, 5xx, 429, 412) and a redirect, an oversized answer or a
    /// refused address are errors; any other status is returned with its
    /// JSON body (`null` when there is none).
    async fn call(
        &self,
        target: Target<'_>,
        call: Call<'_>,
        deadline: Instant,
    ) -> Result<Answer, VaultError> {
        let base = self
            .egress
            .check(target.address)
            .map_err(|_| VaultError::NotAllowed)?;
        let origin = base.origin().ascii_serialization();
        let pass = match self.guard.enter(&origin, deadline).await {
            Ok(pass) => pass,
            Err(Shut::Open) => return Err(VaultError::Shut("circuit breaker open")),
            Err(Shut::Busy) => return Err(VaultError::Shut("too many calls to this address")),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let sent = self.send(&origin, target.namespace, call);
        let result = match tokio::time::timeout(left.min(self.timeout), sent).await {
            Ok(result) => result,
            Err(_) => Err(VaultError::Unavailable(
                "Vault did not answer in time".into(),
            )),
        };
        match &result {
            Err(e) if e.retry_now() => pass.failed(),
            _ => pass.succeeded(),
        }
        result
    }

    /// A POST to `/v1/<path>` (see [`Vault::call`]).
    async fn post(
        &self,
        target: Target<'_>,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        deadline: Instant,
    ) -> Result<Answer, VaultError> {
        let call = Call {
            path,
            token,
            body,
            ..Call::default()
        };
        self.call(target, call, deadline).await
    }

    async fn send(
        &self,
        origin: &str,
        namespace: Option<&str>,
        call: Call<'_>,
    ) -> Result<Answer, VaultError> {
        let mut request = if call.list {
            self.http
                .get(format!("{origin}/v1/{}?list=true", call.path))
        } else {
            self.http.post(format!("{origin}/v1/{}", call.path))
        };
        if let Some(namespace) = namespace {
            request = request.header(HEADER_NAMESPACE, namespace);
        }
        if let Some(token) = call.token {
            request = request.header(HEADER_TOKEN, token);
        }
        if let Some(ttl) = call.wrap_ttl {
            request = request.header(HEADER_WRAP_TTL, format!("{}s", ttl.as_secs().max(1)));
        }
        if let Some(body) = call.body {
            let bytes = serde_json::to_vec(body).unwrap_or_default();
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        // reqwest's errors name the URL (address and path), never a body
        // or a header.
        let mut response = request.send().await.map_err(|e| {
            if egress::refused_in(&e) {
                VaultError::NotAllowed
            } else {
                VaultError::Unavailable(e.without_url().to_string())
            }
        })?;
        let status = response.status();
        if status == StatusCode::INTERNAL_SERVER_ERROR
            && call.path.ends_with(ACCESSOR_CALL)
            && let Some(gone) = self.unknown_accessor(&mut response).await?
        {
            return Ok(gone);
        }
        if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::PRECONDITION_FAILED
        {
            return Err(VaultError::Unavailable(format!("Vault answered {status}")));
        }
        if status.is_redirection() {
            return Err(VaultError::Redirected);
        }
        let bytes = read_bounded(&mut response, self.max_response).await?;
        Ok(Answer {
            status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        })
    }
}

impl Vault {
    /// Vault and OpenBao answer a destroy of an accessor they do not hold
    /// with a 500 naming it: that one is a 404, not an outage.
    async fn unknown_accessor(
        &self,
        response: &mut reqwest::Response,
    ) -> Result<Option<Answer>, VaultError> {
        let bytes = read_bounded(response, self.max_response).await?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(errors_hold(&body, UNKNOWN_ACCESSOR).then_some(Answer {
            status: StatusCode::NOT_FOUND,
            body,
        }))
    }
}

/// The body of `response`, refused once it grows past `max` bytes (as
/// announced, or as read).
async fn read_bounded(response: &mut reqwest::Response, max: u64) -> Result<Vec<u8>, VaultError> {
    if response.content_length().is_some_and(|n| n > max) {
        return Err(VaultError::TooLarge);
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| VaultError::Unavailable(e.without_url().to_string()))?
    {
        if (bytes.len() + chunk.len()) as u64 > max {
            return Err(VaultError::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(bytes)
}

/// One HTTP call to Vault: a POST unless `list`.
#[derive(Default)]
struct Call<'a> {
    path: &'a str,
    /// The token it is made with.
    token: Option<&'a str>,
    body: Option<&'a Value>,
    /// Asks for the answer wrapped, for this long.
    wrap_ttl: Option<Duration>,
    /// A LIST (`GET ?list=true`) instead of a POST.
    list: bool,
}

/// A status and JSON body Vault answered with.
struct Answer {
    status: StatusCode,
    body: Value,
}

impl Answer {
    /// The body of a wrapping call (lookup, unwrap): a refusal of the token
    /// as invalid is [`VaultError::InvalidToken`] (an interception alarm);
    /// any other 4xx a plain refusal.
    fn wrapping(self) -> Result<Value, VaultError> {
        if !self.status.is_client_error() {
            return Ok(self.body);
        }
        let invalid = matches!(self.status.as_u16(), 400 | 403)
            && errors_hold(&self.body, INVALID_WRAPPING_TOKEN);
        if invalid {
            Err(VaultError::InvalidToken)
        } else {
            Err(VaultError::Refused(self.status.as_u16()))
        }
    }
}

/// Whether one of the `errors` of a Vault answer says `what`.
fn errors_hold(body: &Value, what: &str) -> bool {
    body["errors"].as_array().is_some_and(|errors| {
        errors
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains(what)))
    })
}

/// The `secret_id` of an unwrapped answer's data.
fn secret_of(data: &Value) -> Result<SecretId, VaultError> {
    match &data["secret_id"] {
        Value::String(secret) => SecretId::parse(secret.clone())
            .map_err(|_| VaultError::Unavailable("Vault unwrapped an empty secret_id".into())),
        _ => Err(VaultError::Unavailable(
            "the unwrapped response holds no secret_id".into(),
        )),
    }
}

/// Whether `path` is `auth/<mount>/role/<name>/secret-id` for some role
/// name.
fn is_secret_id_path(path: &str, mount: &str) -> bool {
    path.strip_prefix("auth/")
        .and_then(|rest| rest.strip_prefix(mount))
        .and_then(|rest| rest.strip_prefix("/role/"))
        .and_then(|rest| rest.strip_suffix("/secret-id"))
        .is_some_and(|name| !name.is_empty() && !name.contains('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_approle_secret_id_path_is_accepted() {
        assert!(is_secret_id_path(
            "auth/approle/role/ci/secret-id",
            "approle"
        ));
        assert!(is_secret_id_path(
            "auth/corp/approle/role/ci/secret-id",
            "corp/approle"
        ));
        for path in [
            "sys/wrapping/wrap",
            "auth/approle/role//secret-id",
            "auth/approle/role/ci/secret-id-accessor/lookup",
            "auth/other/role/ci/secret-id",
            "auth/approle/role/a/b/secret-id",
            "auth/approle/role/ci/custom-secret-id",
            "",
        ] {
            assert!(!is_secret_id_path(path, "approle"), "{path}");
        }
    }

    #[test]
    fn only_unavailability_is_retried() {
        assert!(VaultError::Unavailable("x".into()).is_transient());
        assert!(VaultError::Unavailable("x".into()).retry_now());
        // An open breaker is a 503, but not tried again in the delivery.
        assert!(VaultError::Shut("open").is_transient());
        assert!(!VaultError::Shut("open").retry_now());
        for last in [
            VaultError::InvalidToken,
            VaultError::WrongPath,
            VaultError::Rejected,
            VaultError::Refused(403),
            VaultError::Redirected,
            VaultError::TooLarge,
            VaultError::NotAllowed,
        ] {
            assert!(!last.is_transient(), "{last}");
            assert!(!last.retry_now(), "{last}");
        }
    }

    #[test]
    fn only_a_token_refused_as_invalid_is_an_interception() {
        let answer = |status: u16, body: Value| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body,
        };
        let invalid = json!({"errors": [INVALID_WRAPPING_TOKEN]});
        assert_eq!(
            answer(400, invalid.clone()).wrapping(),
            Err(VaultError::InvalidToken)
        );
        assert_eq!(
            answer(403, json!({"errors": ["permission denied"]})).wrapping(),
            Err(VaultError::Refused(403))
        );
        assert_eq!(
            answer(404, invalid).wrapping(),
            Err(VaultError::Refused(404))
        );
        assert_eq!(answer(200, json!({"a": 1})).wrapping(), Ok(json!({"a": 1})));
    }
}
