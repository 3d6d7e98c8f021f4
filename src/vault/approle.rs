//! The AppRole calls of a renewal, made with a client token the worker
//! obtains by logging in with the integration's own stored secret: mint the
//! next secret_id (wrapped, tagged with the renewal that minted it), look a
//! secret_id up by its accessor (its expiry, its tag), destroy one, list
//! the role's accessors, and end the session.
//!
//! The role's own token does all of this, so the role's policy decides
//! what a renewal may do (`docs/security.md` has the policy); a 403 is the
//! role saying no, never retried.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::{Call, Target, Vault, VaultError};
use crate::domain::{SecretId, WrappingToken};

/// The metadata key a renewal tags the secret_ids it mints with.
pub const RENEWAL_TAG: &str = "rotation_worker_renewal";
/// The metadata key naming the accessor of the secret_id a minted one
/// replaces, so that a renewal interrupted after its commit can still
/// destroy it.
pub const REPLACES_TAG: &str = "rotation_worker_replaces";

/// A client token of the integration's role, and the role's name (from
/// the login's `auth.metadata.role_name`). End it with [`Vault::end`].
pub struct Session {
    token: SecretString,
    /// The role the stored secret logs in as.
    pub role_name: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("token", &"[redacted]")
            .field("role_name", &self.role_name)
            .finish()
    }
}

/// A secret_id a renewal minted and unwrapped: the secret and its
/// accessor (by which it is looked up and destroyed without the secret).
#[derive(Debug)]
pub struct Minted {
    /// The new secret_id.
    pub secret: SecretId,
    /// Its accessor.
    pub accessor: String,
}

/// What Vault says of a secret_id, looked up by its accessor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretIdInfo {
    /// When it expires; `None`: never.
    pub expires_at: Option<OffsetDateTime>,
    /// The renewal that minted it, if one did.
    pub renewal: Option<String>,
    /// The accessor of the secret_id it was minted to replace.
    pub replaces: Option<String>,
}

impl Vault {
    /// Logs in with `role_id` and `secret`: a refusal (4xx) is
    /// [`VaultError::Rejected`].
    pub async fn open(
        &self,
        target: Target<'_>,
        role_id: &str,
        secret: &SecretId,
        deadline: Instant,
    ) -> Result<Session, VaultError> {
        let body = json!({ "role_id": role_id, "secret_id": secret.expose() });
        let path = format!("auth/{}/login", self.mount);
        let answer = self
            .post(target, &path, None, Some(&body), deadline)
            .await?;
        if answer.status.is_client_error() {
            return Err(VaultError::Rejected);
        }
        let auth = &answer.body["auth"];
        let Some(token) = auth["client_token"].as_str() else {
            return Err(VaultError::Unavailable(
                "the login answer holds no token".into(),
            ));
        };
        Ok(Session {
            token: SecretString::from(token.to_owned()),
            role_name: auth["metadata"]["role_name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        })
    }

    /// Revokes the session's token. It is given its own time, as a token
    /// is worth ending even when the message's deadline is near; a failure
    /// is only logged (the token expires by its TTL).
    pub async fn end(&self, target: Target<'_>, session: Session) {
        let by = Instant::now() + self.timeout;
        let token = Some(session.token.expose_secret());
        match self
            .post(target, "auth/token/revoke-self", token, None, by)
            .await
        {
            Ok(answer) if answer.status.is_success() => {}
            Ok(answer) => {
                tracing::warn!(
                    status = answer.status.as_u16(),
                    "revoking the worker's Vault token failed"
                );
            }
            Err(e) => tracing::warn!(error = %e, "revoking the worker's Vault token failed"),
        }
    }

    /// Mints the role's next secret_id, wrapped for `wrap_ttl`, tagged
    /// with `renewal` and the accessor it `replaces`. A 403 (the role may
    /// not mint its own secret_ids) is [`VaultError::Refused`].
    pub async fn mint(
        &self,
        target: Target<'_>,
        session: &Session,
        renewal: &str,
        replaces: Option<&str>,
        wrap_ttl: Duration,
        deadline: Instant,
    ) -> Result<WrappingToken, VaultError> {
        let mut metadata = json!({ RENEWAL_TAG: renewal });
        if let Some(replaces) = replaces {
            metadata[REPLACES_TAG] = json!(replaces);
        }
        let metadata = metadata.to_string();
        let body = json!({ "metadata": metadata });
        let path = self.role_path(session, "secret-id");
        let call = Call {
            path: &path,
            token: Some(session.token.expose_secret()),
            body: Some(&body),
            wrap_ttl: Some(wrap_ttl),
            list: false,
        };
        let answer = self.call(target, call, deadline).await?;
        if answer.status.is_client_error() {
            return Err(VaultError::Refused(answer.status.as_u16()));
        }
        answer.body["wrap_info"]["token"]
            .as_str()
            .and_then(|t| WrappingToken::parse(t.to_owned()).ok())
            .ok_or_else(|| VaultError::Unavailable("the answer holds no wrapping token".into()))
    }

    /// Unwraps a secret_id this worker minted: the secret and its
    /// accessor.
    pub async fn unwrap_minted(
        &self,
        target: Target<'_>,
        token: &WrappingToken,
        deadline: Instant,
    ) -> Result<Minted, VaultError> {
        let data = self.unwrapped_data(target, token, deadline).await?;
        let secret = super::secret_of(&data)?;
        let accessor = data["secret_id_accessor"]
            .as_str()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                VaultError::Unavailable("the unwrapped answer holds no accessor".into())
            })?;
        Ok(Minted {
            secret,
            accessor: accessor.to_owned(),
        })
    }

    /// What Vault says of the secret_id behind `accessor`; `None` when it
    /// holds none (destroyed, expired).
    pub async fn secret_id_info(
        &self,
        target: Target<'_>,
        session: &Session,
        accessor: &str,
        deadline: Instant,
    ) -> Result<Option<SecretIdInfo>, VaultError> {
        let body = json!({ "secret_id_accessor": accessor });
        let path = self.role_path(session, "secret-id-accessor/lookup");
        let token = Some(session.token.expose_secret());
        let answer = self
            .post(target, &path, token, Some(&body), deadline)
            .await?;
        match answer.status.as_u16() {
            // An accessor Vault does not hold (some versions say 400).
            404 | 400 => return Ok(None),
            403 => return Err(VaultError::Refused(403)),
            _ => {}
        }
        Ok(Some(info_of(&answer.body["data"])))
    }

    /// The accessor of `secret`, a secret_id of the session's role, and
    /// what Vault says of it; `None` when Vault holds no such secret_id.
    pub async fn look_up_secret(
        &self,
        target: Target<'_>,
        session: &Session,
        secret: &SecretId,
        deadline: Instant,
    ) -> Result<Option<(String, SecretIdInfo)>, VaultError> {
        let body = json!({ "secret_id": secret.expose() });
        let path = self.role_path(session, "secret-id/lookup");
        let token = Some(session.token.expose_secret());
        let answer = self
            .post(target, &path, token, Some(&body), deadline)
            .await?;
        if answer.status.as_u16() == 403 {
            return Err(VaultError::Refused(403));
        }
        let data = &answer.body["data"];
        Ok(data["secret_id_accessor"]
            .as_str()
            .filter(|a| !a.is_empty())
            .map(|accessor| (accessor.to_owned(), info_of(data))))
    }

    /// Destroys the secret_id behind `accessor`; one Vault no longer holds
    /// is destroyed already.
    pub async fn destroy(
        &self,
        target: Target<'_>,
        session: &Session,
        accessor: &str,
        deadline: Instant,
    ) -> Result<(), VaultError> {
        let body = json!({ "secret_id_accessor": accessor });
        let path = self.role_path(session, "secret-id-accessor/destroy");
        let token = Some(session.token.expose_secret());
        let answer = self
            .post(target, &path, token, Some(&body), deadline)
            .await?;
        match answer.status.as_u16() {
            403 => Err(VaultError::Refused(403)),
            _ => Ok(()),
        }
    }

    /// The accessors of every secret_id of the session's role.
    pub async fn accessors(
        &self,
        target: Target<'_>,
        session: &Session,
        deadline: Instant,
    ) -> Result<Vec<String>, VaultError> {
        let path = self.role_path(session, "secret-id");
        let call = Call {
            path: &path,
            token: Some(session.token.expose_secret()),
            list: true,
            ..Call::default()
        };
        let answer = self.call(target, call, deadline).await?;
        match answer.status.as_u16() {
            // No secret_id at all.
            404 => return Ok(Vec::new()),
            403 => return Err(VaultError::Refused(403)),
            _ => {}
        }
        Ok(answer.body["data"]["keys"]
            .as_array()
            .map(|keys| {
                keys.iter()
                    .filter_map(|k| k.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn role_path(&self, session: &Session, rest: &str) -> String {
        format!("auth/{}/role/{}/{rest}", self.mount, session.role_name)
    }
}

/// A secret_id's lookup: `expiration_time` (Vault writes the zero time for
/// none) and the renewal tag of its metadata.
fn info_of(data: &Value) -> SecretIdInfo {
    let expires_at = data["expiration_time"]
        .as_str()
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .filter(|t| t.year() > 1);
    let metadata: HashMap<String, String> =
        serde_json::from_value(data["metadata"].clone()).unwrap_or_default();
    SecretIdInfo {
        expires_at,
        renewal: metadata.get(RENEWAL_TAG).cloned(),
        replaces: metadata.get(REPLACES_TAG).cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_reads_the_expiry_and_the_renewal_tag() {
        let info = info_of(&json!({
            "expiration_time": "2026-12-07T10:00:05.123456789Z",
            "metadata": { RENEWAL_TAG: "r-1", REPLACES_TAG: "acc-0", "other": "x" },
        }));
        assert_eq!(info.replaces.as_deref(), Some("acc-0"));
        assert_eq!(
            info.expires_at,
            Some(time::macros::datetime!(2026-12-07 10:00:05.123456789 UTC))
        );
        assert_eq!(info.renewal.as_deref(), Some("r-1"));
        let never = info_of(&json!({
            "expiration_time": "0001-01-01T00:00:00Z",
            "metadata": null,
        }));
        assert_eq!(
            never,
            SecretIdInfo {
                expires_at: None,
                renewal: None,
                replaces: None,
            }
        );
        assert_eq!(info_of(&Value::Null).expires_at, None);
    }

    #[test]
    fn a_session_never_shows_its_token() {
        let session = Session {
            token: SecretString::from("s.very-secret".to_owned()),
            role_name: "ci".into(),
        };
        let shown = format!("{session:?}");
        assert!(!shown.contains("very-secret") && shown.contains("ci"));
    }
}
