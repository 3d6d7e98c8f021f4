//! The worker's calls to an integration's Vault, over its HTTP API: look a
//! response-wrapping token up, unwrap it, and try a new secret_id with an
//! AppRole login.
//!
//! One call is one HTTP request: the retry decision
//! ([`VaultError::is_transient`]) is made here, the retrying is the
//! rotator's, within the message's deadline. Tokens and secrets travel in
//! request bodies and headers only; no error carries a body Vault sent or
//! anything the worker sent, so none can leak a secret into a log line or
//! an outcome.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::config::VaultSettings;
use crate::domain::{SecretId, WrappingToken};

/// The header that names an integration's Vault namespace.
const HEADER_NAMESPACE: &str = "X-Vault-Namespace";
/// The header of the token a call is made with.
const HEADER_TOKEN: &str = "X-Vault-Token";

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
    /// Vault could not be reached, did not answer in time, answered 5xx or
    /// with something that is not Vault's answer: worth retrying.
    #[error("Vault unavailable: {0}")]
    Unavailable(String),
}

impl VaultError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
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
}

impl Vault {
    /// A client as the settings describe. Fails when `ca_file` cannot be
    /// read or holds no PEM certificate.
    pub fn new(settings: &VaultSettings) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
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
        })
    }

    /// Checks that `token` wraps an AppRole secret_id: its creation path
    /// is `auth/<mount>/role/<name>/secret-id`. Nothing is unwrapped.
    pub async fn lookup(
        &self,
        target: Target<'_>,
        token: &WrappingToken,
    ) -> Result<(), VaultError> {
        let body = json!({ "token": token.expose() });
        let (status, answer) = self
            .post(target, "sys/wrapping/lookup", None, Some(&body))
            .await?;
        if status.is_client_error() {
            return Err(VaultError::InvalidToken);
        }
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
    ) -> Result<SecretId, VaultError> {
        let (status, answer) = self
            .post(target, "sys/wrapping/unwrap", Some(token.expose()), None)
            .await?;
        if status.is_client_error() {
            return Err(VaultError::InvalidToken);
        }
        match &answer["data"]["secret_id"] {
            Value::String(secret) => SecretId::parse(secret.clone())
                .map_err(|_| VaultError::Unavailable("Vault unwrapped an empty secret_id".into())),
            _ => Err(VaultError::Unavailable(
                "the unwrapped response holds no secret_id".into(),
            )),
        }
    }

    /// Logs in with `role_id` and `secret`, then revokes the token it got
    /// (a failed revocation is only logged: the token expires by its TTL).
    pub async fn login(
        &self,
        target: Target<'_>,
        role_id: &str,
        secret: &SecretId,
    ) -> Result<(), VaultError> {
        let body = json!({ "role_id": role_id, "secret_id": secret.expose() });
        let path = format!("auth/{}/login", self.mount);
        let (status, answer) = self.post(target, &path, None, Some(&body)).await?;
        if status.is_client_error() {
            return Err(VaultError::Rejected);
        }
        let Some(token) = answer["auth"]["client_token"].as_str() else {
            return Err(VaultError::Unavailable(
                "the login answer holds no token".into(),
            ));
        };
        match self
            .post(target, "auth/token/revoke-self", Some(token), None)
            .await
        {
            Ok((status, _)) if status.is_success() => {}
            Ok((status, _)) => {
                tracing::warn!(
                    status = status.as_u16(),
                    "revoking the verification token failed"
                )
            }
            Err(e) => tracing::warn!(error = %e, "revoking the verification token failed"),
        }
        Ok(())
    }

    /// One POST to `/v1/<path>`; a 5xx or an unreachable Vault is an
    /// error, any other status is returned with the JSON body (`null` when
    /// there is none).
    async fn post(
        &self,
        target: Target<'_>,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), VaultError> {
        let url = format!("{}/v1/{path}", target.address.trim_end_matches('/'));
        let mut request = self.http.post(&url);
        if let Some(namespace) = target.namespace {
            request = request.header(HEADER_NAMESPACE, namespace);
        }
        if let Some(token) = token {
            request = request.header(HEADER_TOKEN, token);
        }
        if let Some(body) = body {
            let bytes = serde_json::to_vec(body).unwrap_or_default();
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        // reqwest's errors name the URL (address and path), never a body
        // or a header.
        let response = request
            .send()
            .await
            .map_err(|e| VaultError::Unavailable(e.without_url().to_string()))?;
        let status = response.status();
        if status.is_server_error() {
            return Err(VaultError::Unavailable(format!("Vault answered {status}")));
        }
        let bytes = response
            .bytes()
            .await
            .map_err(|e| VaultError::Unavailable(e.without_url().to_string()))?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
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
        assert!(!VaultError::InvalidToken.is_transient());
        assert!(!VaultError::WrongPath.is_transient());
        assert!(!VaultError::Rejected.is_transient());
    }
}
