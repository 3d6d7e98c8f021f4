//! Encryption at rest of stored `secret_id`s, and the key ring it uses.
//!
//! Each secret is sealed with AES-256-GCM under the ring's active key, with a
//! fresh random 96-bit nonce, and with the integration id bound in as
//! associated data: a ciphertext copied onto another row does not open. The
//! stored form is the key id (a column of its own) and `nonce || ciphertext
//! || tag`. Older keys stay in the ring for decryption until `reencrypt` has
//! moved every row to the active key.
//!
//! Each key also yields, through HMAC-SHA256, a MAC key of its own: it
//! gives the keyed digests that let the store recognise a repeated secret
//! without keeping it ([`KeyRing::digest`]), and the *check value* that the
//! store records per key id, so that a wrong key under a known id is refused
//! at start instead of sealing new rows beside unreadable old ones.
//!
//! When no key is configured at all, the ring is a single key kept in a key
//! file (mode 0600). A new key file is only proposed here
//! ([`KeySource::Unsaved`]); the caller writes it with [`save_key_file`]
//! once it knows the store is empty, so a command that fails never leaves
//! one behind.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use uuid::Uuid;

use crate::config::EncryptionSettings;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// Domain separation for the associated data, so that these ciphertexts can
/// never be confused with any other use of the same key.
const AAD_PREFIX: &[u8] = b"rotation-worker/secret-id/v1:";
/// The id of the key kept in the key file.
pub const KEY_FILE_KEY_ID: &str = "local";
/// Derives a key's MAC key, kept apart from its encryption use.
const MAC_KEY_LABEL: &[u8] = b"rotation-worker/mac-key/v1";
/// What a check value is the MAC of.
const CHECK_LABEL: &[u8] = b"rotation-worker/key-check/v1";

type HmacSha256 = Hmac<Sha256>;

/// Why a key ring could not be built, or a secret could not be opened.
/// Messages name keys by id and files by path, never by value.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A configured or stored key is not 32 bytes of base64.
    #[error(
        "encryption key `{0}` is malformed: expected 32 random bytes in base64 (generate one with `openssl rand -base64 32`)"
    )]
    MalformedKey(String),
    /// A key id has characters outside `[A-Za-z0-9_.-]`.
    #[error("encryption key id `{0}` is invalid: use letters, digits, `_`, `.` or `-`")]
    InvalidKeyId(String),
    /// The configured active key is not in the ring.
    #[error("the active encryption key `{0}` is not among the configured keys")]
    UnknownActiveKey(String),
    /// Several keys are configured and none is marked active.
    #[error("several encryption keys are configured: set encryption.active_key to one of them")]
    NoActiveKey,
    /// A ciphertext names a key the ring does not hold.
    #[error(
        "secret of integration {integration} is encrypted under key `{key_id}`, which is not configured"
    )]
    UnknownKey {
        /// The integration whose secret it is.
        integration: Uuid,
        /// The key id stored with the ciphertext.
        key_id: String,
    },
    /// A ciphertext failed authentication.
    #[error(
        "secret of integration {integration} does not decrypt under key `{key_id}`: it was altered, copied from another row, or the key is wrong"
    )]
    Undecryptable {
        /// The integration whose secret it is.
        integration: Uuid,
        /// The key id stored with the ciphertext.
        key_id: String,
    },
    /// The key file path is a symbolic link.
    #[error(
        "key file {0} is a symbolic link; refusing to follow it: point encryption.key_file at the file itself"
    )]
    KeyFileSymlink(PathBuf),
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A sealed secret as stored: the key id and `nonce || ciphertext || tag`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The id of the key it was sealed under.
    pub key_id: String,
    /// Nonce, ciphertext and tag.
    pub blob: Vec<u8>,
}

impl fmt::Debug for Sealed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealed")
            .field("key_id", &self.key_id)
            .field("len", &self.blob.len())
            .finish()
    }
}

/// Where the ring's keys came from, for the start-up log line.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// From the configuration (file or environment).
    Config,
    /// From an existing key file.
    KeyFile(PathBuf),
    /// A new key for a key file that does not exist yet: nothing is
    /// written until [`save_key_file`].
    Unsaved {
        /// Where the key file goes.
        path: PathBuf,
        /// The proposed key.
        key: SecretString,
    },
}

/// The ring of data keys: one active key for encryption, every key for
/// decryption. `Debug` shows key ids only.
pub struct KeyRing {
    active: String,
    keys: BTreeMap<String, RingKey>,
}

/// One key of the ring: its cipher and the MAC key derived from it.
struct RingKey {
    cipher: Aes256Gcm,
    mac: HmacSha256,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn parse_key(id: &str, encoded: &str) -> Result<RingKey, CryptoError> {
    let malformed = || CryptoError::MalformedKey(id.to_owned());
    // The decoded bytes live in a `SecretBox`, which wipes them when dropped.
    let bytes =
        secrecy::SecretBox::new(Box::new(BASE64.decode(encoded.trim()).unwrap_or_default()));
    let bytes = bytes.expose_secret();
    if bytes.len() != KEY_LEN {
        return Err(malformed());
    }
    let cipher = Aes256Gcm::new_from_slice(bytes).map_err(|_| malformed())?;
    let mut derive =
        <HmacSha256 as hmac::KeyInit>::new_from_slice(bytes).map_err(|_| malformed())?;
    derive.update(MAC_KEY_LABEL);
    let mac_key =
        secrecy::SecretBox::new(Box::new(<[u8; 32]>::from(derive.finalize().into_bytes())));
    let mac = <HmacSha256 as hmac::KeyInit>::new_from_slice(mac_key.expose_secret())
        .map_err(|_| malformed())?;
    Ok(RingKey { cipher, mac })
}

/// HMAC-SHA256 of `purpose || data` under a key's MAC key.
fn mac_of(key: &RingKey, purpose: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = key.mac.clone();
    mac.update(purpose);
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Key ids are compared in lower case wherever they appear (configuration
/// keys arrive lower-cased from environment variables).
fn normalise_key_id(id: &str) -> String {
    id.trim().to_ascii_lowercase()
}

/// Generates a fresh random 256-bit key, base64-encoded.
pub fn generate_key() -> SecretString {
    let mut key = [0u8; KEY_LEN];
    fill_random(&mut key);
    let encoded = BASE64.encode(key);
    key.fill(0);
    SecretString::from(encoded)
}

/// Fills `buf` from the operating system's random source. Failing to read
/// it leaves no safe way on, so this is the one place that panics.
pub(crate) fn fill_random(buf: &mut [u8]) {
    #[allow(clippy::expect_used)]
    getrandom::fill(buf).expect("the operating system's random source is unavailable");
}

/// Bytes of the operating system's random source read at once for nonces.
const NONCE_POOL_LEN: usize = 4096;

/// Random bytes read ahead for nonces, per thread, and how many of them
/// are used.
struct NoncePool {
    bytes: [u8; NONCE_POOL_LEN],
    used: usize,
}

thread_local! {
    static NONCE_POOL: std::cell::RefCell<NoncePool> = const {
        std::cell::RefCell::new(NoncePool { bytes: [0; NONCE_POOL_LEN], used: NONCE_POOL_LEN })
    };
}

/// Fills `nonce` with bytes of the operating system's random source, read
/// ahead 4 KiB at a time per thread: one system call per 341 seals instead
/// of one per seal (a seal per applied event). Each byte is handed out
/// once and then cleared. A nonce must never repeat under one key but is no
/// secret (it is stored beside its ciphertext), so reading ahead costs
/// nothing in safety; keys are read straight from the source.
fn fill_nonce(nonce: &mut [u8; NONCE_LEN]) {
    let pooled = NONCE_POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.used + NONCE_LEN > NONCE_POOL_LEN {
            fill_random(&mut pool.bytes);
            pool.used = 0;
        }
        let at = pool.used;
        let taken = &mut pool.bytes[at..at + NONCE_LEN];
        nonce.copy_from_slice(taken);
        taken.fill(0);
        pool.used = at + NONCE_LEN;
    });
    // A thread being torn down has no pool left: read the source directly.
    if pooled.is_err() {
        fill_random(nonce);
    }
}

impl KeyRing {
    /// Builds a ring from `(id, base64 key)` pairs and the active id.
    pub fn new<'a>(
        keys: impl IntoIterator<Item = (&'a str, &'a SecretString)>,
        active: Option<&str>,
    ) -> Result<Self, CryptoError> {
        let mut ring = BTreeMap::new();
        for (id, key) in keys {
            let id = normalise_key_id(id);
            if !valid_key_id(&id) {
                return Err(CryptoError::InvalidKeyId(id));
            }
            let key = parse_key(&id, key.expose_secret())?;
            ring.insert(id, key);
        }
        let active = match active.map(normalise_key_id) {
            Some(id) if ring.contains_key(&id) => id,
            Some(id) => return Err(CryptoError::UnknownActiveKey(id)),
            None if ring.len() == 1 => ring.keys().next().cloned().unwrap_or_default(),
            None => return Err(CryptoError::NoActiveKey),
        };
        Ok(Self { active, keys: ring })
    }

    /// Builds the ring the settings describe: the configured keys, or, when
    /// there are none, the key file. A missing key file is not created
    /// here: the ring holds a new key and the source says
    /// [`KeySource::Unsaved`], for the caller to save once it is sure.
    pub fn load(settings: &EncryptionSettings) -> Result<(Self, KeySource), CryptoError> {
        if !settings.keys.is_empty() {
            let ring = Self::new(
                settings.keys.iter().map(|(id, key)| (id.as_str(), key)),
                settings
                    .active_key
                    .as_deref()
                    .filter(|s| !s.trim().is_empty()),
            )?;
            return Ok((ring, KeySource::Config));
        }
        let path = &settings.key_file;
        let (key, source) = match read_key_file(path)? {
            Some(key) => (key, KeySource::KeyFile(path.clone())),
            None => {
                let key = generate_key();
                let source = KeySource::Unsaved {
                    path: path.clone(),
                    key: key.clone(),
                };
                (key, source)
            }
        };
        Ok((Self::from_key_file(&key)?, source))
    }

    /// The ring of a key file's one key.
    pub fn from_key_file(key: &SecretString) -> Result<Self, CryptoError> {
        Self::new([(KEY_FILE_KEY_ID, key)], Some(KEY_FILE_KEY_ID))
    }

    /// Whether the ring holds a key with this id.
    pub fn has_key(&self, key_id: &str) -> bool {
        self.keys.contains_key(&normalise_key_id(key_id))
    }

    /// The ids of the ring's keys.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// A keyed digest (HMAC-SHA256) of `data` for `purpose` under the active
    /// key's MAC key; the id of that key goes with it.
    pub fn digest(&self, purpose: &[u8], data: &[u8]) -> (String, Vec<u8>) {
        // The active key is in the ring: `new` refuses a ring without it.
        let mac = mac_of(&self.keys[&self.active], purpose, data);
        (self.active.clone(), mac)
    }

    /// Whether `expected` is the digest of `data` under key `key_id`, in
    /// constant time; `None` when the ring lacks that key.
    pub fn digest_matches(
        &self,
        key_id: &str,
        purpose: &[u8],
        data: &[u8],
        expected: &[u8],
    ) -> Option<bool> {
        let mut mac = self.keys.get(&normalise_key_id(key_id))?.mac.clone();
        mac.update(purpose);
        mac.update(data);
        Some(mac.verify_slice(expected).is_ok())
    }

    /// The check value of key `key_id`: the MAC of a fixed label, which
    /// shows whether a key is the one that sealed a store's rows without
    /// revealing anything of it.
    pub fn check_value(&self, key_id: &str) -> Option<Vec<u8>> {
        let key = self.keys.get(&normalise_key_id(key_id))?;
        Some(mac_of(key, CHECK_LABEL, &[]))
    }

    /// The id of the key new secrets are sealed under.
    pub fn active_key_id(&self) -> &str {
        &self.active
    }

    fn aad(purpose: &[u8], id: Uuid) -> Vec<u8> {
        let mut aad = Vec::with_capacity(purpose.len() + 16);
        aad.extend_from_slice(purpose);
        aad.extend_from_slice(id.as_bytes());
        aad
    }

    /// Seals a secret for the given integration under the active key.
    pub fn seal(&self, integration: Uuid, secret: &str) -> Sealed {
        self.seal_bytes(AAD_PREFIX, integration, secret.as_bytes())
    }

    /// Opens a sealed secret of the given integration.
    pub fn open(&self, integration: Uuid, sealed: &Sealed) -> Result<SecretString, CryptoError> {
        let plain = self.open_bytes(AAD_PREFIX, integration, sealed)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| CryptoError::Undecryptable {
                integration,
                key_id: sealed.key_id.clone(),
            })
    }

    /// Seals any bytes under the active key, bound to `purpose` (a domain
    /// separation prefix) and `id` as associated data.
    pub fn seal_bytes(&self, purpose: &[u8], id: Uuid, plaintext: &[u8]) -> Sealed {
        // The active key is in the ring: `new` refuses a ring without it.
        let cipher = &self.keys[&self.active].cipher;
        let mut nonce = [0u8; NONCE_LEN];
        fill_nonce(&mut nonce);
        let aad = Self::aad(purpose, id);
        // Encrypted in place, in the blob that is stored.
        let mut blob = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(plaintext);
        // AES-GCM fails only for inputs over 64 GiB, and every input here is
        // bounded far below that (a message is at most a few hundred KiB).
        // Storing an empty ciphertext instead would lose the secret while
        // reporting success, so an impossible failure stops the process.
        #[allow(clippy::expect_used)]
        let tag = cipher
            .encrypt_inout_detached((&nonce).into(), &aad, (&mut blob[NONCE_LEN..]).into())
            .expect("AES-GCM encryption of a bounded input cannot fail");
        blob.extend_from_slice(&tag);
        Sealed {
            key_id: self.active.clone(),
            blob,
        }
    }

    /// Opens bytes sealed by [`KeyRing::seal_bytes`] with the same
    /// `purpose` and `id`.
    pub fn open_bytes(
        &self,
        purpose: &[u8],
        id: Uuid,
        sealed: &Sealed,
    ) -> Result<Vec<u8>, CryptoError> {
        let cipher = &self
            .keys
            .get(&normalise_key_id(&sealed.key_id))
            .ok_or_else(|| CryptoError::UnknownKey {
                integration: id,
                key_id: sealed.key_id.clone(),
            })?
            .cipher;
        let undecryptable = || CryptoError::Undecryptable {
            integration: id,
            key_id: sealed.key_id.clone(),
        };
        if sealed.blob.len() < NONCE_LEN + TAG_LEN {
            return Err(undecryptable());
        }
        let (nonce, ciphertext) = sealed.blob.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| undecryptable())?;
        cipher
            .decrypt(
                nonce.into(),
                Payload {
                    msg: ciphertext,
                    aad: &Self::aad(purpose, id),
                },
            )
            .map_err(|_| undecryptable())
    }

    /// Whether a sealed secret is under a key other than the active one.
    pub fn is_stale(&self, sealed: &Sealed) -> bool {
        sealed.key_id != self.active
    }
}

fn key_file_error(path: &Path) -> impl FnOnce(std::io::Error) -> CryptoError + '_ {
    move |source| CryptoError::KeyFile {
        path: path.to_owned(),
        source,
    }
}

/// Refuses a key file path that is a symbolic link: a link could point
/// the worker's key at a file someone else controls, and a dangling one
/// would be "missing" and "present" at once.
fn refuse_symlink(path: &Path) -> Result<(), CryptoError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            Err(CryptoError::KeyFileSymlink(path.to_owned()))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(key_file_error(path)(e)),
    }
}

/// Reads the key file; `None` when there is none.
pub fn read_key_file(path: &Path) -> Result<Option<SecretString>, CryptoError> {
    refuse_symlink(path)?;
    match std::fs::read_to_string(path) {
        Ok(key) => Ok(Some(SecretString::from(key.trim().to_owned()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(key_file_error(path)(e)),
    }
}

/// Writes a new key file holding `key` and returns the key the file holds:
/// `key`, or the key of another process that created the file first.
/// Creation writes a temporary file with mode 0600 and links it into place,
/// so that two processes starting together agree on one key and neither
/// reads a half-written file.
pub fn save_key_file(path: &Path, key: &SecretString) -> Result<SecretString, CryptoError> {
    refuse_symlink(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(key_file_error(path))?;
    }
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(key.expose_secret().as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    };
    let written = write().and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match written {
        Ok(()) => Ok(key.clone()),
        // Another process created it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_key_file(path)?
            .ok_or_else(|| key_file_error(path)(std::io::ErrorKind::NotFound.into())),
        Err(e) => Err(key_file_error(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[(&str, &SecretString)], active: &str) -> KeyRing {
        KeyRing::new(keys.iter().map(|(id, k)| (*id, *k)), Some(active)).expect("valid ring")
    }

    #[test]
    fn seal_then_open_round_trips_and_nonces_differ() {
        let k = generate_key();
        let ring = ring(&[("k1", &k)], "k1");
        let id = Uuid::new_v4();
        let a = ring.seal(id, "s.secret");
        let b = ring.seal(id, "s.secret");
        assert_ne!(a.blob, b.blob, "two encryptions of one secret must differ");
        assert_eq!(
            ring.open(id, &a).expect("opens").expose_secret(),
            "s.secret"
        );
        assert_eq!(
            ring.open(id, &b).expect("opens").expose_secret(),
            "s.secret"
        );
        assert!(!a.blob.windows(8).any(|w| w == b"s.secret"));
        assert_eq!(a.blob.len(), NONCE_LEN + "s.secret".len() + TAG_LEN);
    }

    #[test]
    fn nonces_read_ahead_never_repeat_across_refills() {
        let k = generate_key();
        let ring = ring(&[("k1", &k)], "k1");
        let id = Uuid::new_v4();
        // Three refills of the pool, on one thread.
        let seals = 3 * NONCE_POOL_LEN / NONCE_LEN + 1;
        let mut nonces = std::collections::HashSet::new();
        for n in 0..seals {
            let secret = format!("s.secret-{n}");
            let sealed = ring.seal(id, &secret);
            assert_eq!(
                ring.open(id, &sealed).expect("opens").expose_secret(),
                secret
            );
            assert!(
                nonces.insert(sealed.blob[..NONCE_LEN].to_vec()),
                "nonce repeated at seal {n}"
            );
        }
        // Consumed bytes are cleared: the pool holds no nonce it gave out.
        NONCE_POOL.with(|pool| {
            let pool = pool.borrow();
            assert!(pool.bytes[..pool.used].iter().all(|b| *b == 0));
        });
    }

    #[test]
    fn tampered_moved_or_unknown_key_ciphertexts_fail_clearly() {
        let k = generate_key();
        let ring = ring(&[("k1", &k)], "k1");
        let id = Uuid::new_v4();
        let sealed = ring.seal(id, "s.secret");

        let mut tampered = sealed.clone();
        let last = tampered.blob.len() - 1;
        tampered.blob[last] ^= 1;
        let err = ring.open(id, &tampered).expect_err("tampered must fail");
        assert!(matches!(err, CryptoError::Undecryptable { .. }));
        assert!(err.to_string().contains("does not decrypt under key `k1`"));

        let moved = ring
            .open(Uuid::new_v4(), &sealed)
            .expect_err("moved must fail");
        assert!(matches!(moved, CryptoError::Undecryptable { .. }));

        let mut renamed = sealed.clone();
        renamed.key_id = "k9".into();
        let unknown = ring.open(id, &renamed).expect_err("unknown key must fail");
        assert!(
            unknown
                .to_string()
                .contains("key `k9`, which is not configured")
        );

        let other = generate_key();
        let wrong = KeyRing::new([("k1", &other)], None).expect("valid ring");
        assert!(matches!(
            wrong.open(id, &sealed),
            Err(CryptoError::Undecryptable { .. })
        ));

        let short = Sealed {
            key_id: "k1".into(),
            blob: vec![0; 5],
        };
        assert!(ring.open(id, &short).is_err());
    }

    #[test]
    fn malformed_keys_and_rings_are_rejected_without_echoing_the_key() {
        let short = SecretString::from("c2hvcnQ=".to_owned());
        let err = KeyRing::new([("k1", &short)], None).expect_err("short key");
        assert!(matches!(err, CryptoError::MalformedKey(_)));
        assert!(!err.to_string().contains("c2hvcnQ="));

        let k = generate_key();
        assert!(matches!(
            KeyRing::new([("k1", &k)], Some("k2")),
            Err(CryptoError::UnknownActiveKey(_))
        ));
        assert!(matches!(
            KeyRing::new([("k1", &k), ("k2", &k)], None),
            Err(CryptoError::NoActiveKey)
        ));
        assert!(matches!(
            KeyRing::new([("bad id", &k)], None),
            Err(CryptoError::InvalidKeyId(_))
        ));
    }

    #[test]
    fn key_ring_debug_shows_ids_only() {
        let k = generate_key();
        let ring = ring(&[("k1", &k)], "k1");
        let debug = format!("{ring:?}");
        assert!(debug.contains("k1"));
        assert!(!debug.contains(k.expose_secret()));
    }

    #[test]
    fn key_file_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/rotation-worker.key");
        assert!(read_key_file(&path).expect("no file yet").is_none());
        let first = save_key_file(&path, &generate_key()).expect("created");
        // A second writer loses the race and gets the first key.
        let again = save_key_file(&path, &generate_key()).expect("read");
        assert_eq!(first.expose_secret(), again.expose_secret());
        let read = read_key_file(&path).expect("read").expect("exists");
        assert_eq!(first.expose_secret(), read.expose_secret());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_symlinked_key_file_is_refused_even_when_dangling() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rotation-worker.key");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("nowhere"), &path).expect("symlink");
            let err = read_key_file(&path).expect_err("dangling link");
            assert!(matches!(err, CryptoError::KeyFileSymlink(_)), "{err}");
            let err = save_key_file(&path, &generate_key()).expect_err("dangling link");
            assert!(matches!(err, CryptoError::KeyFileSymlink(_)), "{err}");
            assert!(!dir.path().join("nowhere").exists());
        }
    }

    #[test]
    fn digests_and_check_values_depend_on_the_key() {
        let (a, b) = (generate_key(), generate_key());
        let ring_a = ring(&[("k1", &a)], "k1");
        let ring_b = ring(&[("k1", &b)], "k1");
        let (id, digest) = ring_a.digest(b"p", b"s.secret");
        assert_eq!(id, "k1");
        assert_eq!(digest.len(), 32);
        assert_eq!(
            ring_a.digest_matches("k1", b"p", b"s.secret", &digest),
            Some(true)
        );
        assert_eq!(
            ring_a.digest_matches("k1", b"p", b"s.other", &digest),
            Some(false)
        );
        assert_eq!(
            ring_b.digest_matches("k1", b"p", b"s.secret", &digest),
            Some(false)
        );
        assert_eq!(
            ring_a.digest_matches("k9", b"p", b"s.secret", &digest),
            None
        );
        assert_ne!(ring_a.check_value("k1"), ring_b.check_value("k1"));
        assert_eq!(ring_a.check_value("K1"), ring_a.check_value("k1"));
        assert_eq!(ring_a.check_value("k9"), None);
        // Neither shows the key.
        let shown = format!("{digest:?}{:?}", ring_a.check_value("k1"));
        assert!(!shown.contains(a.expose_secret()));
    }
}
