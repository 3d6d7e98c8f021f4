//! API keys: how they are made, carried and recognised.
//!
//! A key is 32 random bytes, shown once as `rwk_<base64url>`. The store keeps
//! only its SHA-256 digest: the key has full entropy, so a fast digest is as
//! strong as a slow password hash here, and a lookup by digest costs one
//! index probe per message.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

const KEY_PREFIX: &str = "rwk_";
/// The MAC purpose of the schedule's keys.
const SCHEDULE_KEY_PURPOSE: &[u8] = b"rotation-worker/schedule-key/v1:";
/// Longest credential accepted before any work is done with it.
pub const MAX_KEY_LEN: usize = 512;

/// A plaintext API key. `Debug` is redacted.
#[derive(Debug, Clone)]
pub struct ApiKey(SecretString);

/// The stored form of an API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyHash(pub [u8; 32]);

/// Why a credential was refused. Every variant is a 401; the message says
/// which rule failed without echoing the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("missing Authorization header: send `Authorization: Bearer <apiKey>`")]
    Missing,
    /// A header that is not `Bearer <token>`.
    #[error("malformed Authorization header: expected `Bearer <apiKey>`")]
    Malformed,
    /// A well-formed key the store does not know, or a revoked one.
    #[error("unknown or revoked API key")]
    Unknown,
}

impl ApiKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        crate::crypto::fill_random(&mut bytes);
        let key = Self::from_bytes(&bytes);
        bytes.fill(0);
        key
    }

    /// The key the renewal schedule (and `integration renew`) acts for
    /// `owner` with: derived from the key ring's active key, the same in
    /// every worker that holds it and across restarts. Whoever holds the
    /// ring can read every secret anyway.
    pub fn for_schedule(keys: &crate::crypto::KeyRing, owner: &crate::domain::Owner) -> Self {
        let (_, mac) = keys.digest(SCHEDULE_KEY_PURPOSE, owner.as_str().as_bytes());
        Self::from_bytes(&mac)
    }

    /// The key of these bytes (32 of full entropy: random, or a MAC).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(SecretString::from(format!(
            "{KEY_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(bytes)
        )))
    }

    /// A key as given by a person (for example on stdin): trimmed, bounded,
    /// printable ASCII.
    pub fn parse(value: &str) -> Result<Self, AuthError> {
        let value = value.trim();
        if value.is_empty()
            || value.len() > MAX_KEY_LEN
            || !value.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(AuthError::Malformed);
        }
        Ok(Self(SecretString::from(value.to_owned())))
    }

    /// The key carried by an `Authorization` header value: `Bearer <key>`,
    /// the scheme matched case-insensitively (RFC 9110).
    pub fn from_authorization(header: Option<&str>) -> Result<Self, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = header.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.starts_with(' ') {
            return Err(AuthError::Malformed);
        }
        Self::parse(token)
    }

    /// The plaintext key, to be shown once to whoever created it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// The digest under which the store keeps the key.
    pub fn hash(&self) -> ApiKeyHash {
        ApiKeyHash(Sha256::digest(self.0.expose_secret().as_bytes()).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_distinct_and_parse_back() {
        let a = ApiKey::generate();
        let b = ApiKey::generate();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with("rwk_"));
        let header = format!("Bearer {}", a.expose());
        let parsed = ApiKey::from_authorization(Some(&header)).expect("parses");
        assert_eq!(parsed.hash(), a.hash());
        assert!(!format!("{a:?}").contains(&a.expose()[4..]));
    }

    #[test]
    fn authorization_headers_are_checked() {
        assert_eq!(
            ApiKey::from_authorization(None).map(|_| ()),
            Err(AuthError::Missing)
        );
        for bad in [
            "",
            "Bearer",
            "Bearer ",
            "Basic abc",
            "Bearer  two-spaces",
            "Bearer a b",
            "Bearer a\r\nX: y",
            "bearer\tabc",
        ] {
            assert_eq!(
                ApiKey::from_authorization(Some(bad)).map(|_| ()),
                Err(AuthError::Malformed),
                "{bad:?}"
            );
        }
        assert!(ApiKey::from_authorization(Some("bEaReR rwk_abc")).is_ok());
    }
}
