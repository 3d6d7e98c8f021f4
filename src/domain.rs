//! The domain's values, parsed once at the edge so that the rest of the code
//! cannot hold an invalid one: owners, names, Vault addresses, role ids,
//! secret ids, and the integration record that replies and events show.
//!
//! Every constructor returns a [`DomainError`] whose message is safe to show
//! to a caller: it names the field and the rule, never the rejected value of
//! a secret.

use secrecy::{ExposeSecret, SecretString};
use serde::{Serialize, Serializer};
use time::OffsetDateTime;
use uuid::Uuid;

/// The longest `secretId` accepted, in bytes (Vault's own are 36).
pub const MAX_SECRET_ID_BYTES: usize = 4096;
/// The longest owner, name, namespace or role id accepted, in bytes.
const MAX_TEXT_BYTES: usize = 256;

/// A value that breaks one of the domain's rules; the message is for humans.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DomainError(pub String);

fn invalid(message: impl Into<String>) -> DomainError {
    DomainError(message.into())
}

/// Checks the rules shared by every short text field: not blank, bounded,
/// no control characters (they would let a value forge log lines).
fn short_text(field: &str, value: &str) -> Result<String, DomainError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(format!("{field} must not be empty")));
    }
    if value.len() > MAX_TEXT_BYTES {
        return Err(invalid(format!(
            "{field} must be at most {MAX_TEXT_BYTES} bytes"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} must not contain control characters"
        )));
    }
    Ok(value.to_owned())
}

macro_rules! text_newtype {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Parses and validates the value.
            pub fn parse(value: &str) -> Result<Self, DomainError> {
                short_text($field, value).map(Self)
            }

            /// The validated text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_newtype!(
    /// The account an integration or API key belongs to.
    Owner,
    "owner"
);
impl Owner {
    /// Wraps an owner read back from the store, which only ever holds
    /// owners that were parsed on the way in.
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }
}

text_newtype!(
    /// The human-readable name of an integration.
    Name,
    "name"
);
text_newtype!(
    /// A Vault Enterprise namespace.
    Namespace,
    "namespace"
);

/// An AppRole `role_id`: printable, no whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RoleId(String);

impl RoleId {
    /// Parses and validates a role id.
    pub fn parse(value: &str) -> Result<Self, DomainError> {
        let value = short_text("roleId", value)?;
        if value.chars().any(char::is_whitespace) {
            return Err(invalid("roleId must not contain whitespace"));
        }
        Ok(Self(value))
    }

    /// The role id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The address of a Vault server: `https://host[:port]` (or `http://`),
/// with no path but `/`, no query, fragment or credentials. Kept as written
/// (not normalised), because it is shown back to the platform exactly as
/// it was given. Which schemes and hosts the worker may call is the egress
/// policy's ([`crate::vault::Egress`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct VaultAddress(String);

impl VaultAddress {
    /// Parses and validates an address.
    pub fn parse(value: &str) -> Result<Self, DomainError> {
        let value = short_text("address", value)?;
        let url = url::Url::parse(&value).map_err(|_| {
            invalid("address must be an http(s) URL such as https://vault.example.com:8200")
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(invalid(
                "address must be an http(s) URL such as https://vault.example.com:8200",
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid("address must not contain credentials"));
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "address must be scheme, host and port only, such as https://vault.example.com:8200",
            ));
        }
        Ok(Self(value))
    }

    /// The address.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A new AppRole `secret_id`. Its `Debug` is redacted and it is never
/// serialised; code that needs the value calls [`SecretId::expose`].
#[derive(Debug, Clone)]
pub struct SecretId(SecretString);

impl SecretId {
    /// Parses a secret id: a non-blank string of at most
    /// [`MAX_SECRET_ID_BYTES`] bytes. It is kept exactly as given.
    pub fn parse(value: String) -> Result<Self, DomainError> {
        if value.trim().is_empty() {
            return Err(invalid("secretId must be a non-empty string"));
        }
        if value.len() > MAX_SECRET_ID_BYTES {
            return Err(Self::too_long());
        }
        Ok(Self(SecretString::from(value)))
    }

    /// The refusal of a secret id over [`MAX_SECRET_ID_BYTES`] bytes: one
    /// limit and one message wherever a secret id arrives (an event, a
    /// request, the CLI's stdin, which stops reading past the limit).
    pub fn too_long() -> DomainError {
        invalid(format!(
            "secretId must be at most {MAX_SECRET_ID_BYTES} bytes"
        ))
    }

    /// The plain secret, for encryption and comparison only.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

/// A rotation's target when it names the role instead of the integration:
/// the caller's one integration with this `role_id`, and this address and
/// namespace when given (compared as stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleTarget {
    /// The AppRole role_id.
    pub role_id: String,
    /// The Vault address, if the caller gave it.
    pub address: Option<String>,
    /// The Vault namespace, if the caller gave it.
    pub namespace: Option<String>,
}

/// A Vault response-wrapping token that wraps a new `secret_id`. It is a
/// secret like the secret_id itself (whoever holds it can unwrap it, once):
/// `Debug` is redacted, it is never serialised, and [`WrappingToken::expose`]
/// is the only way to the value.
#[derive(Debug, Clone)]
pub struct WrappingToken(SecretString);

impl WrappingToken {
    /// Parses a wrapping token: a non-blank string of at most
    /// [`MAX_SECRET_ID_BYTES`] bytes without control characters (it travels
    /// in an HTTP header).
    pub fn parse(value: String) -> Result<Self, DomainError> {
        if value.trim().is_empty() {
            return Err(invalid("wrappedSecretId must be a non-empty string"));
        }
        if value.len() > MAX_SECRET_ID_BYTES || value.chars().any(char::is_control) {
            return Err(invalid(format!(
                "wrappedSecretId must be at most {MAX_SECRET_ID_BYTES} bytes without control characters"
            )));
        }
        Ok(Self(SecretString::from(value)))
    }

    /// The plain token, for the calls to Vault only.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

/// Fields given when an integration is created.
#[derive(Debug, Clone)]
pub struct NewIntegration {
    /// Account the integration belongs to.
    pub owner: Owner,
    /// Human-readable name.
    pub name: Name,
    /// Vault address.
    pub address: VaultAddress,
    /// Vault Enterprise namespace, if any.
    pub namespace: Option<Namespace>,
    /// AppRole role id.
    pub role_id: RoleId,
    /// The initial secret id.
    pub secret_id: SecretId,
}

/// The integration record: the documented `200` shape that every reply and
/// completion event carries. It has no secret field, so it cannot leak one.
/// Its times are whole seconds (see [`whole_seconds`]), so a record read
/// back from JSON equals the one written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Integration {
    /// Integration id.
    pub id: Uuid,
    /// Human-readable name.
    pub name: String,
    /// Backend type, always `hashicorp` in v1.
    #[serde(rename = "type")]
    pub kind: String,
    /// Vault address.
    pub address: String,
    /// Vault Enterprise namespace or `null`.
    pub namespace: Option<String>,
    /// Auth method, always `approle` in v1.
    pub auth_method: String,
    /// AppRole role id.
    pub role_id: String,
    /// Creation time, UTC, second precision.
    #[serde(
        serialize_with = "utc_seconds",
        deserialize_with = "time::serde::rfc3339::deserialize"
    )]
    pub created_at: OffsetDateTime,
    /// Time of the last change, UTC, second precision.
    #[serde(
        serialize_with = "utc_seconds",
        deserialize_with = "time::serde::rfc3339::deserialize"
    )]
    pub updated_at: OffsetDateTime,
}

/// The backend type of every v1 integration.
pub const KIND_HASHICORP: &str = "hashicorp";
/// The auth method of every v1 integration.
pub const AUTH_APPROLE: &str = "approle";

/// Formats a time as `2026-04-24T09:18:11Z`: UTC, whole seconds, a `Z`.
pub fn format_utc_seconds(t: OffsetDateTime) -> String {
    match UtcSeconds::of(t) {
        Some(text) => text.as_str().to_owned(),
        None => padded_utc_seconds(t),
    }
}

/// [`format_utc_seconds`] for any year (a sign, more digits).
fn padded_utc_seconds(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// [`format_utc_seconds`] on the stack, for the years 0 to 9999: every
/// record an outcome event or a reply carries has two of these, and
/// `format!` with its padding took longer than the rest of the record's
/// JSON together.
struct UtcSeconds([u8; 20]);

impl UtcSeconds {
    fn of(t: OffsetDateTime) -> Option<Self> {
        let t = t.to_offset(time::UtcOffset::UTC);
        let (year, month, day) = t.to_calendar_date();
        let (hour, minute, second) = t.to_hms();
        let year = u16::try_from(year).ok().filter(|y| *y <= 9999)?;
        let mut text = *b"0000-00-00T00:00:00Z";
        let digits = |at: &mut [u8], mut value: u16| {
            for d in at.iter_mut().rev() {
                *d = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        digits(&mut text[0..4], year);
        digits(&mut text[5..7], u8::from(month).into());
        digits(&mut text[8..10], day.into());
        digits(&mut text[11..13], hour.into());
        digits(&mut text[14..16], minute.into());
        digits(&mut text[17..19], second.into());
        Some(Self(text))
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits and separators were written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

fn utc_seconds<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
    match UtcSeconds::of(*t) {
        Some(text) => s.serialize_str(text.as_str()),
        None => s.serialize_str(&padded_utc_seconds(*t)),
    }
}

/// A time cut to whole seconds: the precision of the record.
pub fn whole_seconds(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(0).unwrap_or(t)
}

/// The current time, truncated to the microsecond precision that both
/// stores keep, so that a value read back equals the value written.
pub fn now_micros() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000 * 1_000)
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_must_be_http_urls_with_a_host() {
        assert!(VaultAddress::parse("https://vault.example.com:8200").is_ok());
        assert!(VaultAddress::parse("http://127.0.0.1:8200").is_ok());
        for bad in [
            "",
            "vault.example.com",
            "ftp://vault.example.com",
            "https://",
            "https://user:pw@vault",
            "javascript:alert(1)",
            "http://127.0.0.1:9464/metrics#",
            "http://169.254.169.254/latest/meta-data?x=",
            "https://vault.example.com/v1",
            "https://vault.example.com?x",
            "https://vault.example.com#",
        ] {
            assert!(VaultAddress::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn secret_ids_are_bounded_and_never_blank() {
        assert!(SecretId::parse("s.abc".into()).is_ok());
        assert!(SecretId::parse(String::new()).is_err());
        assert!(SecretId::parse(" \t\n".into()).is_err());
        assert!(SecretId::parse("x".repeat(MAX_SECRET_ID_BYTES)).is_ok());
        assert!(SecretId::parse("x".repeat(MAX_SECRET_ID_BYTES + 1)).is_err());
    }

    #[test]
    fn secret_id_debug_is_redacted() {
        let secret = SecretId::parse("s.very-secret".into()).expect("valid");
        assert!(!format!("{secret:?}").contains("very-secret"));
    }

    #[test]
    fn text_fields_reject_blank_and_control_characters() {
        assert_eq!(Name::parse("  prod  ").expect("valid").as_str(), "prod");
        assert!(Name::parse("   ").is_err());
        assert!(Owner::parse("a\nb").is_err());
        assert!(RoleId::parse("has space").is_err());
    }

    #[test]
    fn timestamps_are_formatted_as_the_padded_format_would() {
        use time::macros::datetime;
        let offset = time::UtcOffset::from_hms(-3, -30, 0).unwrap();
        for t in [
            datetime!(0000-01-01 00:00:00 UTC),
            datetime!(0999-12-31 23:59:59 UTC),
            datetime!(2026-04-24 07:18:11.999 UTC),
            datetime!(2026-12-31 22:00:00 UTC).to_offset(offset),
            datetime!(9999-12-31 23:59:59 UTC),
            datetime!(-0001-06-01 12:00:00 UTC),
        ] {
            assert_eq!(format_utc_seconds(t), padded_utc_seconds(t), "{t}");
        }
        assert_eq!(
            format_utc_seconds(datetime!(2026-01-02 03:04:05 UTC)),
            "2026-01-02T03:04:05Z"
        );
    }

    #[test]
    fn timestamps_are_utc_seconds_with_z() {
        let t = time::macros::datetime!(2026-04-24 09:18:11.987 +02:00);
        assert_eq!(format_utc_seconds(t), "2026-04-24T07:18:11Z");
    }
}
