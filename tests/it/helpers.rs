//! Test helpers: a fresh PostgreSQL database and a private directory per
//! test, the real binary run as a subprocess, and the real store opened
//! in-process on the same database.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use rotation_worker::config::{DatabaseSettings, EncryptionSettings};
use rotation_worker::crypto::KeyRing;
use rotation_worker::store::PgStore;
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use tokio::io::AsyncWriteExt;

/// Where the tests' databases live: `ROTATION_WORKER_TEST_DATABASE_URL`, else
/// the local server's `postgres` database as the `postgres` role.
pub fn server_url() -> String {
    std::env::var("ROTATION_WORKER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost:5432/postgres".to_owned())
}

/// A database of its own, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Names a new database; the code under test creates it on first use.
    pub fn new() -> Self {
        let name = format!("rwtest_{}", uuid::Uuid::new_v4().simple());
        let mut url = url::Url::parse(&server_url()).expect("test database URL");
        url.set_path(&name);
        let url = url.to_string();
        Self { name, url }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime's async context: use a thread with
        // a runtime of its own.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let options: PgConnectOptions = server_url().parse().expect("URL");
                if let Ok(mut conn) = options.connect().await {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// One test's world: a database and a directory for the key file and logs.
pub struct TestEnv {
    pub db: TestDb,
    pub dir: tempfile::TempDir,
    /// Extra environment for every CLI call, e.g. a configured key ring.
    pub env: BTreeMap<String, String>,
}

/// What a CLI call printed and how it ended.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// The stdout as JSON, asserting that the command succeeded.
    pub fn json(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "command failed: {}", self.stderr);
        serde_json::from_str(&self.stdout).expect("stdout is JSON")
    }

    /// Asserts a failure whose stderr contains `message` and whose stdout is empty.
    pub fn assert_fails_with(&self, message: &str) {
        assert_eq!(self.code, 1, "expected exit code 1: {self:?}");
        assert!(self.stdout.is_empty(), "stdout on failure: {self:?}");
        assert!(
            self.stderr.contains(message),
            "stderr lacks {message:?}: {}",
            self.stderr
        );
    }
}

impl TestEnv {
    pub fn new() -> Self {
        Self {
            db: TestDb::new(),
            dir: tempfile::tempdir().expect("tempdir"),
            env: BTreeMap::new(),
        }
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("data/rotation-worker.key")
    }

    /// Runs the real binary with `args`, feeding `stdin`.
    pub async fn cli(&self, args: &[&str], stdin: &str) -> CliOutput {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_rotation-worker"));
        command
            .args(args)
            .env_remove("NATS_URL")
            .env_remove("ROTATION_WORKER_CONFIG")
            .env("DATABASE_URL", &self.db.url)
            .env("ROTATION_WORKER_ENCRYPTION__KEY_FILE", self.key_file())
            .env("RUST_LOG", "trace")
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars() {
            if key.starts_with("ROTATION_WORKER_") || key.starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        let mut child = command.spawn().expect("spawn rotation-worker");
        let mut input = child.stdin.take().expect("stdin");
        input
            .write_all(stdin.as_bytes())
            .await
            .expect("write stdin");
        drop(input);
        let out = child.wait_with_output().await.expect("wait");
        CliOutput {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The key ring the CLI uses with this environment's settings.
    pub fn keys(&self) -> Arc<KeyRing> {
        let keys: BTreeMap<String, SecretString> = self
            .env
            .iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("ROTATION_WORKER_ENCRYPTION__KEYS__")
                    .map(|id| (id.to_lowercase(), SecretString::from(v.clone())))
            })
            .collect();
        let settings = EncryptionSettings {
            keys,
            active_key: self
                .env
                .get("ROTATION_WORKER_ENCRYPTION__ACTIVE_KEY")
                .cloned(),
            key_file: self.key_file(),
        };
        Arc::new(KeyRing::load(&settings).expect("key ring").0)
    }

    /// The real store on this test's database, with this environment's keys.
    pub async fn store(&self) -> PgStore {
        self.store_with(self.keys()).await
    }

    pub async fn store_with(&self, keys: Arc<KeyRing>) -> PgStore {
        let settings = DatabaseSettings {
            url: SecretString::from(self.db.url.clone()),
            max_connections: 4,
            acquire_timeout_ms: 5_000,
        };
        PgStore::connect(&settings, keys).await.expect("store")
    }

    /// A `pg_dump` of this test's database: schema and every row, without
    /// the random `\restrict` keys that recent pg_dump versions add.
    pub async fn pg_dump(&self) -> Vec<u8> {
        let out = tokio::process::Command::new("pg_dump")
            .arg("--dbname")
            .arg(&self.db.url)
            .output()
            .await
            .expect("run pg_dump");
        assert!(
            out.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
            .split(|&b| b == b'\n')
            .filter(|line| !line.starts_with(b"\\restrict") && !line.starts_with(b"\\unrestrict"))
            .flat_map(|line| line.iter().copied().chain([b'\n']))
            .collect()
    }
}

/// Whether `haystack` contains `needle` in any of the encodings a dump or a
/// log might show it in: raw, hex (PostgreSQL bytea) or base64.
pub fn contains_secret(haystack: &[u8], needle: &str) -> bool {
    use base64::Engine;
    let hex: String = needle.bytes().map(|b| format!("{b:02x}")).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(needle);
    let text = String::from_utf8_lossy(haystack).to_lowercase();
    [
        needle.to_lowercase(),
        hex,
        b64.trim_end_matches('=').to_lowercase(),
    ]
    .iter()
    .any(|n| text.contains(n.as_str()))
}
