//! Opening the store: which backend a URL names, opening and migrating
//! it, and the key check that keeps a wrong key from sealing anything
//! beside rows it cannot read.

use std::path::PathBuf;
use std::sync::Arc;

use secrecy::ExposeSecret;
use uuid::Uuid;

use super::{PgStore, SqliteStore, Store, StoreError};
use crate::config::DatabaseSettings;
use crate::crypto::{KeyRing, Sealed};

/// What [`verify_keys`] checks a key ring against.
#[derive(Debug, Default)]
pub struct KeyUsage {
    /// One integration per key id its secret is sealed under.
    pub samples: Vec<(Uuid, Sealed)>,
    /// Recorded `(key id, check value)` pairs.
    pub checks: Vec<(String, Vec<u8>)>,
}

impl KeyUsage {
    /// No secret is stored and no key has been recorded: any key will do.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty() && self.checks.is_empty()
    }
}

/// Why a key ring does not fit the store. Every message names the key id
/// and what to do, and never a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyCheckError {
    /// Stored secrets are sealed under a key the ring lacks.
    #[error(
        "stored secrets are sealed under encryption key `{0}`, which is not configured: add it to \
         encryption.keys (or restore the key file it came from) and start again; nothing was written"
    )]
    Missing(String),
    /// A configured key is not the one that sealed the stored rows.
    #[error(
        "encryption key `{0}` is not the key this store's secrets were sealed under (its check \
         value differs): configure the original key `{0}` and start again; nothing was written"
    )]
    Mismatch(String),
}

/// Checks a key ring against what the store holds: every key id that
/// stored secrets use must be in the ring, and every key of the ring with a
/// recorded check value must give that value (or, where none is recorded
/// yet, open a stored secret). Returns the check values to record: those of
/// keys proven here and of the active key, where none is recorded.
pub fn verify_keys(
    usage: &KeyUsage,
    keys: &KeyRing,
) -> Result<Vec<(String, Vec<u8>)>, KeyCheckError> {
    let recorded = |id: &str| usage.checks.iter().find(|(k, _)| k == id).map(|(_, v)| v);
    for (key_id, value) in &usage.checks {
        if keys.check_value(key_id).is_some_and(|mine| &mine != value) {
            return Err(KeyCheckError::Mismatch(key_id.clone()));
        }
    }
    let mut proven = Vec::new();
    for (id, sealed) in &usage.samples {
        if !keys.has_key(&sealed.key_id) {
            return Err(KeyCheckError::Missing(sealed.key_id.clone()));
        }
        if recorded(&sealed.key_id).is_some() {
            // The check value proved the key; a row that does not open
            // under it was damaged, and is reported when it is read.
            continue;
        }
        if keys.open(*id, sealed).is_err() {
            return Err(KeyCheckError::Mismatch(sealed.key_id.clone()));
        }
        proven.push(sealed.key_id.clone());
    }
    proven.push(keys.active_key_id().to_owned());
    proven.sort();
    proven.dedup();
    Ok(proven
        .into_iter()
        .filter(|id| recorded(id).is_none())
        .filter_map(|id| Some((id.clone(), keys.check_value(&id)?)))
        .collect())
}

/// Which database the settings name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file: the default, for one worker.
    Sqlite(PathBuf),
    /// PostgreSQL at `database.url`: for several workers and production.
    Postgres,
}

impl Backend {
    /// The store as it may be logged: the SQLite file's absolute path, or
    /// the PostgreSQL URL with its password replaced.
    pub fn describe(&self, settings: &DatabaseSettings) -> String {
        match self {
            Self::Sqlite(path) => {
                let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                format!("sqlite:{}", path.display())
            }
            Self::Postgres => match url::Url::parse(settings.url.expose_secret().trim()) {
                Ok(mut url) => {
                    if url.password().is_some() {
                        let _ = url.set_password(Some("***"));
                    }
                    url.set_query(None);
                    url.to_string()
                }
                Err(_) => "PostgreSQL".into(),
            },
        }
    }

    /// An empty `database.url` means the SQLite file at
    /// `database.sqlite_path`; `sqlite:PATH` (or `sqlite://PATH`) names
    /// another file; `postgres://` and `postgresql://` name PostgreSQL.
    /// Errors never echo the URL, which may hold a password.
    pub fn of(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        let url = settings.url.expose_secret().trim();
        if url.is_empty() {
            return Ok(Self::Sqlite(settings.sqlite_path.clone()));
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if path.is_empty() || path.contains('?') || path == ":memory:" {
                return Err(StoreError::Url(
                    "an sqlite: URL names a file and takes no parameters".into(),
                ));
            }
            return Ok(Self::Sqlite(path.into()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Self::Postgres);
        }
        Err(StoreError::Url(
            "expected postgres://, postgresql:// or sqlite:, or nothing for the SQLite default"
                .into(),
        ))
    }
}

/// Whether opening a store may create its database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Create the database (and the SQLite file's directory) if missing.
    IfMissing,
    /// Fail with [`StoreError::Missing`] instead: commands that only read
    /// must not leave a database behind a typo.
    Never,
}

/// A connection idle at least this long is pinged before it is lent out.
const PING_AFTER_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Pool options that ping a connection before lending it only when it has
/// been idle a while (sqlx's default pings every time: one more round trip
/// per transaction). A connection that broke while busy fails its
/// statement with an I/O error, which is transient: the attempt is retried
/// on another connection.
pub(crate) fn ping_when_idle<DB: sqlx::Database>(
    options: sqlx::pool::PoolOptions<DB>,
) -> sqlx::pool::PoolOptions<DB> {
    use sqlx::Connection;
    options
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}

/// Opens (and migrates) the store the settings name, and says once which
/// one: the SQLite file's absolute path, or the PostgreSQL URL without its
/// password.
pub async fn open(
    settings: &DatabaseSettings,
    keys: Arc<KeyRing>,
    create: Create,
) -> Result<Arc<dyn Store>, StoreError> {
    let backend = Backend::of(settings)?;
    let shown = backend.describe(settings);
    let store: Arc<dyn Store> = match backend {
        Backend::Sqlite(path) => {
            if create == Create::Never && !path.exists() {
                return Err(StoreError::Missing(shown));
            }
            Arc::new(SqliteStore::open(&path, settings, keys).await?)
        }
        Backend::Postgres => Arc::new(
            PgStore::connect_with(settings, keys, create)
                .await
                .map_err(|e| match e {
                    StoreError::Missing(_) => StoreError::Missing(shown.clone()),
                    e => e,
                })?,
        ),
    };
    tracing::info!(store = %shown, "store opened");
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn ring() -> KeyRing {
        let k = crate::crypto::generate_key();
        KeyRing::new([("k1", &k)], None).expect("ring")
    }

    #[test]
    fn the_key_check_refuses_a_missing_or_wrong_key_and_records_the_rest() {
        let keys = ring();
        let other = {
            let k = crate::crypto::generate_key();
            KeyRing::new([("k1", &k)], None).expect("ring")
        };
        let id = Uuid::new_v4();
        let sealed = keys.seal(id, "s");
        let sample = vec![(id, sealed.clone())];
        // An empty store: the active key's check value is to be recorded.
        let checks = verify_keys(&KeyUsage::default(), &keys).expect("empty store");
        assert_eq!(
            checks,
            vec![("k1".to_owned(), keys.check_value("k1").unwrap())]
        );
        // Rows but no check value yet: a stored secret proves the key.
        let usage = KeyUsage {
            samples: sample.clone(),
            checks: vec![],
        };
        assert_eq!(verify_keys(&usage, &keys).expect("right key"), checks);
        assert_eq!(
            verify_keys(&usage, &other),
            Err(KeyCheckError::Mismatch("k1".into()))
        );
        // A recorded check value decides, and nothing more is to record.
        let usage = KeyUsage {
            samples: sample.clone(),
            checks: checks.clone(),
        };
        assert_eq!(verify_keys(&usage, &keys), Ok(vec![]));
        let usage = KeyUsage {
            samples: vec![],
            checks: checks.clone(),
        };
        let err = verify_keys(&usage, &other).expect_err("wrong key");
        assert_eq!(err, KeyCheckError::Mismatch("k1".into()));
        assert!(err.to_string().contains("configure the original key `k1`"));
        // Rows under a key the ring lacks.
        let mut elsewhere = sealed.clone();
        elsewhere.key_id = "k0".into();
        let usage = KeyUsage {
            samples: vec![(id, elsewhere)],
            checks: vec![],
        };
        assert_eq!(
            verify_keys(&usage, &keys),
            Err(KeyCheckError::Missing("k0".into()))
        );
    }

    #[test]
    fn the_url_picks_the_backend() {
        let of = |url: &str| {
            Backend::of(&DatabaseSettings {
                url: SecretString::from(url.to_owned()),
                sqlite_path: "data/default.db".into(),
                max_connections: 1,
                acquire_timeout: std::time::Duration::from_millis(1),
                lock_timeout: std::time::Duration::from_secs(2),
            })
        };
        assert_eq!(of("").unwrap(), Backend::Sqlite("data/default.db".into()));
        assert_eq!(of("  ").unwrap(), Backend::Sqlite("data/default.db".into()));
        assert_eq!(
            of("sqlite:/var/lib/rw.db").unwrap(),
            Backend::Sqlite("/var/lib/rw.db".into())
        );
        assert_eq!(
            of("sqlite://rw.db").unwrap(),
            Backend::Sqlite("rw.db".into())
        );
        assert_eq!(of("postgres://u:p@h/db").unwrap(), Backend::Postgres);
        assert_eq!(of("postgresql://h/db").unwrap(), Backend::Postgres);
        for bad in [
            "mysql://u:hunter2@h/db",
            "sqlite:",
            "sqlite::memory:",
            "sqlite:x.db?mode=ro",
        ] {
            let err = of(bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid database URL"), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "the URL was echoed: {err}");
        }
    }
}
