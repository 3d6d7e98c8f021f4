//! Test helpers: a fresh database (PostgreSQL or SQLite) and a private
//! directory per test, the real worker run as a subprocess (for tests of
//! signals, crashes and exit codes) or in the test's own process (the rest),
//! and the real store opened in-process on the same database.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, LazyLock};

use rotation_worker::cli;
use rotation_worker::config::{DatabaseSettings, EncryptionSettings, Settings};
use rotation_worker::crypto::{KeyRing, KeySource, save_key_file};
use rotation_worker::store::{PgStore, SqliteStore, Store};
use rotation_worker::telemetry::{LogOutput, Telemetry};
use secrecy::SecretString;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use uuid::Uuid;

/// The repository's root: where the deployment files are.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether an environment variable is one the worker (or a library it
/// uses) reads: a setting of `config/default.toml` as
/// `ROTATION_WORKER_<SECTION>__<KEY>` (or an entry of one of its maps,
/// such as `ROTATION_WORKER_ENCRYPTION__KEYS__<ID>`), the configuration
/// file's `ROTATION_WORKER_CONFIG`, or a name its ecosystem gives
/// (`DATABASE_URL`, `NATS_URL`, `RUST_LOG`, `OTEL_*`). The deployment
/// files and the help text are checked against it.
pub fn known_variable(name: &str) -> bool {
    static DEFAULTS: LazyLock<config::Config> = LazyLock::new(|| {
        config::Config::builder()
            .add_source(config::File::from_str(
                rotation_worker::config::DEFAULT_TOML,
                config::FileFormat::Toml,
            ))
            .build()
            .expect("default.toml")
    });
    if [
        "DATABASE_URL",
        "NATS_URL",
        "RUST_LOG",
        "ROTATION_WORKER_CONFIG",
    ]
    .contains(&name)
        || name.starts_with("OTEL_")
    {
        return true;
    }
    let Some(path) = name.strip_prefix("ROTATION_WORKER_") else {
        // `<VARIABLE>_FILE`: the file a variable's value is read from.
        return name
            .strip_suffix("_FILE")
            .is_some_and(|v| matches!(v, "DATABASE_URL" | "NATS_URL"));
    };
    if let Some(variable) = name.strip_suffix("_FILE")
        && known_variable(variable)
    {
        return true;
    }
    let parts: Vec<String> = path.split("__").map(str::to_lowercase).collect();
    match parts.as_slice() {
        [section, key] => DEFAULTS
            .get::<serde_json::Value>(&format!("{section}.{key}"))
            .is_ok(),
        // A map entry such as encryption.keys.<id>.
        [section, map, _] => matches!(
            DEFAULTS.get::<serde_json::Value>(&format!("{section}.{map}")),
            Ok(serde_json::Value::Object(_))
        ),
        _ => false,
    }
}

/// The two stores every store and worker test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Defines each listed `async fn name(backend: Backend)` as two tests,
/// `postgres::name` and `sqlite::name`.
#[macro_export]
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::helpers::Backend::Postgres).await
            })*
        }
        mod sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name($crate::helpers::Backend::Sqlite).await
            })*
        }
    };
}

/// Where the tests' databases live: `ROTATION_WORKER_TEST_DATABASE_URL`, else
/// the local server's `postgres` database as the `postgres` role.
pub fn server_url() -> String {
    std::env::var("ROTATION_WORKER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@localhost:5432/postgres".to_owned())
}

/// A PostgreSQL database of its own, dropped when the test ends.
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

/// One test's world: a database and a directory for the key file, the
/// SQLite file and logs. Commands run in that directory, so on SQLite they
/// use the default file, `data/rotation-worker.db`, exactly as a user's
/// first run does.
pub struct TestEnv {
    /// The PostgreSQL database; `None` on SQLite.
    pub db: Option<TestDb>,
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

/// The real store of a test, with the few direct table operations tests
/// need to set up a state or look behind the interface.
pub struct TestStore {
    store: Arc<dyn Store>,
    raw: Raw,
}

enum Raw {
    Postgres(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl std::ops::Deref for TestStore {
    type Target = dyn Store;

    fn deref(&self) -> &(dyn Store + 'static) {
        self.store.as_ref()
    }
}

fn micros(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000) as i64
}

/// Runs `$body` on the test store's pool, with `$id` and `$time` turning a
/// UUID and a time into that store's column types (SQLite keeps ids as
/// text and times as microseconds).
macro_rules! on_pool {
    ($raw:expr, |$pool:ident, $id:ident, $time:ident| $body:expr) => {
        match $raw {
            Raw::Postgres($pool) => {
                #[allow(unused_variables)]
                let ($id, $time) = (|u: Uuid| u, |t: OffsetDateTime| t);
                $body
            }
            Raw::Sqlite($pool) => {
                #[allow(unused_variables)]
                let ($id, $time) = (|u: Uuid| u.hyphenated(), micros);
                $body
            }
        }
    };
}

impl TestStore {
    /// The store as the worker's code holds it.
    pub fn shared(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Rows in `table`.
    pub async fn count(&self, table: &str) -> i64 {
        let sql = || sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}"));
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_scalar(sql()).fetch_one(pool).await
        })
        .expect("count")
    }

    /// The stored ciphertext of an integration.
    pub async fn ciphertext(&self, integration: Uuid) -> Vec<u8> {
        let sql = "SELECT secret_ciphertext FROM integrations WHERE id = $1";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_scalar(sql)
                .bind(id(integration))
                .fetch_one(pool)
                .await
        })
        .expect("ciphertext")
    }

    /// Whether an integration's next renewal is marked to sweep first (an
    /// integration without a renewal row is).
    pub async fn sweep_due(&self, integration: Uuid) -> bool {
        let sql = "SELECT CAST(COALESCE((SELECT CASE WHEN sweep_due THEN 1 ELSE 0 END \
                   FROM renewal_state WHERE integration_id = $1), 1) AS BIGINT)";
        let due = on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(id(integration))
                .fetch_one(pool)
                .await
        })
        .expect("sweep mark");
        due == 1
    }

    /// Overwrites the stored ciphertext of an integration.
    pub async fn set_ciphertext(&self, integration: Uuid, blob: &[u8]) {
        let sql = "UPDATE integrations SET secret_ciphertext = $2 WHERE id = $1";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query(sql)
                .bind(id(integration))
                .bind(blob)
                .execute(pool)
                .await
                .map(drop)
        })
        .expect("set ciphertext");
    }

    /// The distinct key ids secrets are sealed under.
    pub async fn key_ids(&self) -> Vec<String> {
        let sql = "SELECT DISTINCT secret_key_id FROM integrations ORDER BY 1";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_scalar(sql).fetch_all(pool).await
        })
        .expect("key ids")
    }

    /// Records the last applied rotation of an integration as `at`.
    pub async fn set_last_rotated_at(&self, integration: Uuid, at: OffsetDateTime) {
        let sql = "UPDATE integrations SET last_rotated_at = $2 WHERE id = $1";
        self.set_time(sql, integration, at).await;
    }

    /// Makes the previous secret of an integration expire a second ago.
    pub async fn expire_previous(&self, integration: Uuid) {
        let sql = "UPDATE integrations SET previous_expires_at = $2 \
                   WHERE id = $1 AND previous_expires_at IS NOT NULL";
        let past = OffsetDateTime::now_utc() - time::Duration::seconds(1);
        self.set_time(sql, integration, past).await;
    }

    /// `(previous_key_id, has ciphertext, has expiry)` of an integration.
    pub async fn previous_columns(&self, integration: Uuid) -> (Option<String>, bool, bool) {
        let sql = "SELECT previous_key_id, previous_ciphertext IS NOT NULL, \
                   previous_expires_at IS NOT NULL FROM integrations WHERE id = $1";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_as(sql)
                .bind(id(integration))
                .fetch_one(pool)
                .await
        })
        .expect("previous columns")
    }

    /// Moves an integration's creation and update times `by` into the past.
    pub async fn backdate(&self, integration: Uuid, by: time::Duration) {
        let sql = "UPDATE integrations SET created_at = $2, updated_at = $2 WHERE id = $1";
        let owned = self.get_integration(integration).await.unwrap().unwrap();
        self.set_time(sql, integration, owned.integration.created_at - by)
            .await;
    }

    /// Forgets an integration's secret digest, as a row written before
    /// digests were kept: its next rotation takes the batch path.
    pub async fn forget_digest(&self, integration: Uuid) {
        let sql = "UPDATE integrations SET secret_digest = NULL, secret_digest_key_id = NULL \
                   WHERE id = $1";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query(sql)
                .bind(id(integration))
                .execute(pool)
                .await
                .map(drop)
        })
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Runs `sql` with the integration's id as `$1` and `at` as `$2`.
    async fn set_time(&self, sql: &'static str, integration: Uuid, at: OffsetDateTime) {
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query(sql)
                .bind(id(integration))
                .bind(time(at))
                .execute(pool)
                .await
                .map(drop)
        })
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// How many applied rotations `processed_events` records for an integration.
    pub async fn applied_events(&self, integration: Uuid) -> i64 {
        let sql = "SELECT count(*) FROM processed_events \
                   WHERE integration_id = $1 AND outcome = 'applied'";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_scalar(sql)
                .bind(id(integration))
                .fetch_one(pool)
                .await
        })
        .expect("applied events")
    }

    /// The ids of every event `processed_events` records as applied.
    pub async fn applied_event_ids(&self) -> HashSet<String> {
        let sql = "SELECT event_id FROM processed_events WHERE outcome = 'applied'";
        let ids: Vec<String> = on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_scalar(sql).fetch_all(pool).await
        })
        .expect("applied event ids");
        ids.into_iter().collect()
    }

    /// How many unwrapped secret_ids the store keeps for `integration`.
    pub async fn unwrapped_rows(&self, integration: Uuid) -> i64 {
        let sql = "SELECT count(*) FROM unwrapped_secrets WHERE integration_id = $1";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_scalar(sql)
                .bind(id(integration))
                .fetch_one(pool)
                .await
        })
        .expect("unwrapped secrets")
    }

    /// The PostgreSQL pool behind the store; `None` on SQLite.
    pub fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        match &self.raw {
            Raw::Postgres(pool) => Some(pool),
            Raw::Sqlite(_) => None,
        }
    }

    /// The SQLite store's write pool (its one connection); `None` on
    /// PostgreSQL.
    pub fn sqlite_pool(&self) -> Option<&sqlx::SqlitePool> {
        match &self.raw {
            Raw::Sqlite(pool) => Some(pool),
            Raw::Postgres(_) => None,
        }
    }

    /// Records a processed event whose outcome this code cannot read (a
    /// damaged row): any batch that meets it fails as a whole.
    pub async fn insert_unreadable_processed_event(
        &self,
        owner: &str,
        event_id: &str,
        integration: Uuid,
    ) {
        let sql = "INSERT INTO processed_events (owner, event_id, integration_id, outcome, processed_at) \
                   VALUES ($1, $2, $3, 'no-such-outcome', $4)";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query(sql)
                .bind(owner)
                .bind(event_id)
                .bind(id(integration))
                .bind(time(OffsetDateTime::now_utc()))
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .expect("insert processed event");
    }

    /// The key id and digest kept with a processed event.
    pub async fn processed_digest(&self, event_id: &str) -> (String, Vec<u8>) {
        let sql = "SELECT digest_key_id, secret_digest FROM processed_events WHERE event_id = $1";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_as(sql).bind(event_id).fetch_one(pool).await
        })
        .expect("processed digest")
    }

    pub async fn processed_record(&self, event_id: &str) -> String {
        let sql = "SELECT record FROM processed_events WHERE event_id = $1";
        on_pool!(&self.raw, |pool, id, time| {
            sqlx::query_scalar(sql).bind(event_id).fetch_one(pool).await
        })
        .expect("processed record")
    }
}

impl TestEnv {
    /// A world on PostgreSQL.
    pub fn new() -> Self {
        Self::on(Backend::Postgres)
    }

    /// A world on `backend`.
    pub fn on(backend: Backend) -> Self {
        Self {
            db: (backend == Backend::Postgres).then(TestDb::new),
            dir: tempfile::tempdir().expect("tempdir"),
            env: BTreeMap::new(),
        }
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("data/rotation-worker.key")
    }

    /// The SQLite file the commands use on SQLite (the default path).
    pub fn sqlite_file(&self) -> PathBuf {
        self.dir.path().join("data/rotation-worker.db")
    }

    /// A command for the real binary in this world: its directory, its
    /// database, its key file, and none of the caller's settings.
    fn command(&self) -> tokio::process::Command {
        self.command_of(env!("CARGO_BIN_EXE_rotation-worker"))
    }

    /// [`TestEnv::command`] with another program in front, which runs the
    /// binary (such as `setsid`).
    pub fn command_of(&self, program: &str) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(program);
        command
            .current_dir(self.dir.path())
            .env_remove("NATS_URL")
            .env_remove("DATABASE_URL")
            .env_remove("ROTATION_WORKER_CONFIG")
            .env("ROTATION_WORKER_ENCRYPTION__KEY_FILE", self.key_file());
        for (key, _) in std::env::vars() {
            if key.starts_with("ROTATION_WORKER_") || key.starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        if let Some(db) = &self.db {
            command.env("DATABASE_URL", &db.url);
        }
        command
    }

    /// Runs the real binary with `args`, feeding `stdin`.
    pub async fn cli(&self, args: &[&str], stdin: &str) -> CliOutput {
        self.cli_with(args, stdin, &[]).await
    }

    /// Runs the real binary with `args`, feeding `stdin`, with `extra`
    /// environment over this world's.
    pub async fn cli_with(&self, args: &[&str], stdin: &str, extra: &[(&str, &str)]) -> CliOutput {
        let mut command = self.command();
        command
            .args(args)
            .env("RUST_LOG", "trace")
            .envs(&self.env)
            .envs(extra.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
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
        let (ring, source) = KeyRing::load(&settings).expect("key ring");
        match source {
            // As the CLI would: the key file is written before first use.
            KeySource::Unsaved { path, key } => {
                let saved = save_key_file(&path, &key).expect("key file");
                Arc::new(KeyRing::from_key_file(&saved).expect("key ring"))
            }
            _ => Arc::new(ring),
        }
    }

    /// The real store on this test's database, with this environment's keys.
    pub async fn store(&self) -> TestStore {
        self.store_with(self.keys()).await
    }

    pub async fn store_with(&self, keys: Arc<KeyRing>) -> TestStore {
        match &self.db {
            Some(db) => postgres_store(&db.url, keys).await,
            None => {
                let store = SqliteStore::open(&self.sqlite_file(), &settings(""), keys)
                    .await
                    .expect("store");
                TestStore {
                    raw: Raw::Sqlite(store.pool().clone()),
                    store: Arc::new(store),
                }
            }
        }
    }

    /// The real PostgreSQL store on another database (e.g. a private cluster's).
    pub async fn store_with_url(&self, url: &str) -> TestStore {
        postgres_store(url, self.keys()).await
    }

    /// Every table's schema and rows, in a stable order: equal before and
    /// after means nothing changed. `pg_dump` on PostgreSQL; on SQLite, the
    /// schema and each row as SQL literals.
    pub async fn dump(&self) -> Vec<u8> {
        match &self.db {
            Some(db) => pg_dump(&db.url).await,
            None => sqlite_dump(&self.sqlite_file()).await,
        }
    }

    /// What lies at rest: the dump and, on SQLite, the raw bytes of the
    /// database file and its write-ahead log.
    pub async fn at_rest(&self) -> Vec<u8> {
        let mut bytes = self.dump().await;
        if self.db.is_none() {
            for suffix in ["", "-wal"] {
                let mut path = self.sqlite_file().into_os_string();
                path.push(suffix);
                if let Ok(raw) = std::fs::read(path) {
                    bytes.extend(raw);
                }
            }
        }
        bytes
    }
}

async fn postgres_store(url: &str, keys: Arc<KeyRing>) -> TestStore {
    let store = PgStore::connect(&settings(url), keys).await.expect("store");
    TestStore {
        raw: Raw::Postgres(store.pool().clone()),
        store: Arc::new(store),
    }
}

fn settings(url: &str) -> DatabaseSettings {
    DatabaseSettings {
        url: SecretString::from(url.to_owned()),
        sqlite_path: PathBuf::new(),
        max_connections: 4,
        acquire_timeout: std::time::Duration::from_secs(5),
        lock_timeout: std::time::Duration::from_secs(2),
    }
}

/// A `pg_dump` of a database: schema and every row, without the random
/// `\restrict` keys that recent pg_dump versions add.
async fn pg_dump(url: &str) -> Vec<u8> {
    let out = tokio::process::Command::new("pg_dump")
        .arg("--dbname")
        .arg(url)
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

/// The SQLite counterpart of `pg_dump`, on a connection of its own.
async fn sqlite_dump(path: &std::path::Path) -> Vec<u8> {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true);
    let mut conn = options.connect().await.expect("open SQLite file");
    let schema: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY type, name",
    )
    .fetch_all(&mut conn)
    .await
    .expect("schema");
    let mut out = Vec::new();
    for (name, sql) in &schema {
        out.extend_from_slice(format!("{sql};\n").as_bytes());
        if !sql.starts_with("CREATE TABLE") {
            continue;
        }
        let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info($1)")
            .bind(name)
            .fetch_all(&mut conn)
            .await
            .expect("columns");
        let row = columns
            .iter()
            .map(|c| format!("quote(\"{c}\")"))
            .collect::<Vec<_>>()
            .join(" || ',' || ");
        let sql = format!("SELECT {row} FROM \"{name}\" ORDER BY 1");
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(&mut conn)
            .await
            .expect("rows");
        for row in rows {
            out.extend_from_slice(format!("INSERT INTO {name} VALUES ({row});\n").as_bytes());
        }
    }
    let _ = conn.close().await;
    out
}

/// Whether `haystack` contains `needle` in any of the encodings a dump or a
/// log might show it in: raw, hex (PostgreSQL bytea, SQLite quote()) or
/// base64, in any letter case.
pub fn contains_secret(haystack: &[u8], needle: &str) -> bool {
    leaked_secret(haystack, [needle]).is_some()
}

/// The first of `secrets` that `haystack` contains, as [`contains_secret`]
/// decides, in one pass however many secrets there are.
pub fn leaked_secret<'a>(
    haystack: &[u8],
    secrets: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    use base64::Engine;
    let secrets: Vec<&str> = secrets.into_iter().collect();
    let patterns: Vec<String> = secrets
        .iter()
        .flat_map(|s| {
            let hex: String = s.bytes().map(|b| format!("{b:02x}")).collect();
            let b64 = base64::engine::general_purpose::STANDARD.encode(s);
            [s.to_string(), hex, b64.trim_end_matches('=').to_owned()]
        })
        .collect();
    let matcher = aho_corasick::AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(&patterns)
        .expect("secret patterns");
    matcher
        .find(haystack)
        .map(|m| secrets[m.pattern().as_usize() / 3])
}

/// A nats-server of the test's own, with JetStream, on a free port and a
/// store directory of its own; killed when dropped.
pub struct NatsServer {
    pub url: String,
    pub port: u16,
    pub store_dir: tempfile::TempDir,
    /// Arguments before the port and store options: a config file, say.
    args: Vec<String>,
    /// Environment for `$VAR` references in a config file.
    env: Vec<(String, String)>,
    /// The server's log file.
    pub log: PathBuf,
    /// How the test's own clients connect (credentials, TLS roots).
    pub client_options: fn(&NatsServer) -> async_nats::ConnectOptions,
    /// Files the client options read (a CA, a client certificate).
    pub client_files: Option<PathBuf>,
    /// Whether the test's clients may send service discovery requests
    /// (`$SRV.PING`); a server with least-privilege users allows nobody.
    pub discoverable: bool,
    child: Option<std::process::Child>,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The nats-server binary: `NATS_SERVER_BIN`, else `nats-server` on PATH,
/// else Debian's `/usr/sbin/nats-server`.
pub fn nats_server_bin() -> String {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return bin;
    }
    let on_path = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|dir| std::path::Path::new(dir).join("nats-server").exists());
    if on_path {
        "nats-server".into()
    } else {
        "/usr/sbin/nats-server".into()
    }
}

/// The `(major, minor)` version of [`nats_server_bin`], asked once.
pub fn nats_server_version() -> (u32, u32) {
    static VERSION: LazyLock<(u32, u32)> = LazyLock::new(|| {
        let out = std::process::Command::new(nats_server_bin())
            .arg("--version")
            .output()
            .expect("nats-server --version");
        // `nats-server: v2.9.10`
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let version = text.trim().rsplit('v').next().unwrap_or_default();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) => (major, minor),
            _ => panic!("nats-server --version said {text:?}"),
        }
    });
    *VERSION
}

/// Whether the server under test knows JetStream's `sync_interval` (added
/// in nats-server 2.10; 2.9 refuses to start on a configuration that sets
/// it).
pub fn nats_server_syncs_always() -> bool {
    nats_server_version() >= (2, 10)
}

/// A shipped nats-server configuration (a path under the repository) as
/// the server under test can read it: the file itself, or on a server
/// without `sync_interval` (2.9) a copy with that line deleted, which is
/// what docs/deployment.md tells a 2.9 deployment to do. The copy is
/// written once per server version under the target's temporary
/// directory; a file with no such line is refused, so that the adaptation
/// cannot silently stop doing anything.
pub fn shipped_config_for_server(relative: &str) -> PathBuf {
    let path = repo_root().join(relative);
    if nats_server_syncs_always() {
        return path;
    }
    let text = std::fs::read_to_string(&path).expect("shipped configuration");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("sync_interval:"))
        .collect();
    assert_eq!(
        kept.len() + 1,
        text.lines().count(),
        "{relative}: exactly one sync_interval line to delete for nats-server 2.9"
    );
    let name = relative.replace('/', "-");
    target_file(
        &format!("without-sync-interval-{name}"),
        &(kept.join("\n") + "\n"),
    )
}

/// Writes `text` to `name` under the target's temporary directory
/// (atomically: tests running in parallel may write the same file) and
/// returns its path.
fn target_file(name: &str, text: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(name);
    let mut staged = tempfile::NamedTempFile::new_in(dir).expect("temporary file");
    std::io::Write::write_all(&mut staged, text.as_bytes()).expect("write");
    staged.persist(&path).expect("rename into place");
    path
}

impl NatsServer {
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// A plain server on `port`.
    pub async fn start_on(port: u16) -> Self {
        let mut server = Self::configured(&["-a", "127.0.0.1", "-js", "-sd", "jetstream"], &[]);
        server.port = port;
        server.spawn().await;
        server
    }

    /// A server started with `args` (say, `-c FILE`) and `env`, on a free
    /// port, with a log file of its own, in a directory of its own (where
    /// relative store directories land).
    pub async fn start_with(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut server = Self::configured(args, env);
        server.spawn().await;
        server
    }

    fn configured(args: &[&str], env: &[(&str, &str)]) -> Self {
        let store_dir = tempfile::tempdir().expect("tempdir");
        let log = store_dir.path().join("nats-server.log");
        Self {
            url: String::new(),
            port: free_port(),
            store_dir,
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log,
            client_options: |_| async_nats::ConnectOptions::new(),
            client_files: None,
            discoverable: true,
            child: None,
        }
    }

    async fn spawn(&mut self) {
        let child = std::process::Command::new(nats_server_bin())
            .args(&self.args)
            .args(["-p", &self.port.to_string(), "-l"])
            .arg(&self.log)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(self.store_dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        self.url = format!("nats://127.0.0.1:{}", self.port);
        // Up to 30 s: a node restarted after a SIGKILL recovers its streams
        // before it takes clients, which on a loaded machine may take
        // seconds.
        for _ in 0..1200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!(
                    "nats-server exited ({status}) before it took clients on port {}; its log \
                     ends:\n{}",
                    self.port,
                    self.log_tail()
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!(
            "nats-server did not take clients on port {} within 30 s; its log ends:\n{}",
            self.port,
            self.log_tail()
        );
    }

    /// The last lines of the server's log.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Stops the server (keeping its store) and starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn client(&self) -> async_nats::Client {
        (self.client_options)(self)
            .connect(&self.url)
            .await
            .expect("connect to test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three nats-servers, `n1`, `n2` and `n3`, in one JetStream cluster on
/// free loopback ports, each with a store directory and a monitoring port
/// of its own; killed when dropped.
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    /// Each node's monitoring address (`/connz`, `/jsz`).
    monitors: Vec<String>,
}

impl NatsCluster {
    /// Starts the three nodes and waits until JetStream answers.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// [`NatsCluster::start`] with JetStream writing every message to disk
    /// before it is acknowledged (`sync_interval: always`, as the shipped
    /// configuration sets it) where the server knows the setting; a 2.9
    /// server cannot (`nats_server_syncs_always`).
    pub async fn start_durable() -> Self {
        if !nats_server_syncs_always() {
            return Self::start().await;
        }
        let conf = target_file("sync-always.conf", "jetstream { sync_interval: always }\n");
        Self::start_with(&["-c", conf.to_str().expect("UTF-8 path")]).await
    }

    /// The three nodes, each with `extra` arguments before its own.
    async fn start_with(extra: &[&str]) -> Self {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_url = |port: &u16| format!("nats://127.0.0.1:{port}");
        let monitor_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (i, own) in routes.iter().enumerate() {
            let others: Vec<String> = routes.iter().filter(|p| *p != own).map(route_url).collect();
            let (name, cluster, routes) = (format!("n{}", i + 1), route_url(own), others.join(","));
            let monitor = monitor_ports[i].to_string();
            let args = [
                "-a",
                "127.0.0.1",
                "-n",
                &name,
                "--cluster_name",
                "rw",
                "-cluster",
                &cluster,
                "-routes",
                &routes,
                "-m",
                &monitor,
                "-js",
                "-sd",
                "jetstream",
            ];
            let args: Vec<&str> = extra.iter().chain(&args).copied().collect();
            let mut node = NatsServer::configured(&args, &[]);
            node.spawn().await;
            nodes.push(node);
        }
        let monitors = monitor_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let cluster = Self { nodes, monitors };
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// The seed list of every node, as `NATS_URL` takes it.
    pub fn url(&self) -> String {
        let urls: Vec<&str> = self.nodes.iter().map(|n| n.url.as_str()).collect();
        urls.join(",")
    }

    /// A client that fails over between the nodes.
    pub async fn client(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url.parse().expect("server address"))
            .collect();
        async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(addrs)
            .await
            .expect("connect to the test cluster")
    }

    /// SIGKILLs node `i` (its store stays).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again on its ports, with its store.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].restart().await;
    }

    /// Waits (up to 30 s) until a meta leader answers JetStream requests,
    /// then (up to 30 s) until the cluster places a stream of three replicas.
    pub async fn wait_for_jetstream(&self) {
        // `$JS.API.INFO` by hand: the client's account type does not read
        // every reply of nats-server 2.9 (a clustered server's among them).
        let client = self.client().await;
        let mut last = String::new();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if let Ok(reply) = client.request("$JS.API.INFO", "".into()).await {
                    last = String::from_utf8_lossy(&reply.payload).into_owned();
                    let info: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
                    if info.get("error").is_none() && info.get("type").is_some() {
                        return;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            answered.is_ok(),
            "the cluster elected no JetStream leader: {last}"
        );
        // A meta leader elected by two nodes answers before the third has
        // joined, and until then refuses to place three replicas ("no
        // suitable peers for placement"): wait until a stream of three can
        // be placed, as the tests' workers will ask.
        let js = async_nats::jetstream::new(client);
        let mut last = String::new();
        let placed = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let probe = async_nats::jetstream::stream::Config {
                    name: "CLUSTER_PROBE".into(),
                    subjects: vec!["cluster.probe".into()],
                    num_replicas: 3,
                    storage: async_nats::jetstream::stream::StorageType::Memory,
                    ..Default::default()
                };
                match js.create_stream(probe).await {
                    Ok(_) => {
                        js.delete_stream("CLUSTER_PROBE")
                            .await
                            .expect("delete the probe stream");
                        return;
                    }
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(
            placed.is_ok(),
            "the cluster placed no stream of three replicas: {last}"
        );
    }

    /// The index of the node that leads `stream`, once it has a leader
    /// (waits up to 30 s).
    pub async fn leader_of(&self, js: &async_nats::jetstream::Context, stream: &str) -> usize {
        let found = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                if let Ok(mut s) = js.get_stream(stream).await
                    && let Ok(info) = s.info().await
                    && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
                    && let Some(i) = leader
                        .strip_prefix('n')
                        .and_then(|n| n.parse::<usize>().ok())
                {
                    return i - 1;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("stream {stream} has no leader"))
    }

    /// Moves the leadership of `stream` off node `from` (a leader step-down,
    /// asked again until another node leads) and returns the new leader.
    pub async fn leader_other_than(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
        from: usize,
    ) -> usize {
        let client = self.client().await;
        let moved = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let leader = self.leader_of(js, stream).await;
                if leader != from {
                    return leader;
                }
                let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
                let _ = client.request(subject, bytes::Bytes::new()).await;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        })
        .await;
        moved.unwrap_or_else(|_| panic!("the leadership of {stream} stays on node {from}"))
    }

    /// The index of the node the client named `name` is connected to.
    pub async fn node_serving(&self, name: &str) -> usize {
        for (i, monitor) in self.monitors.iter().enumerate() {
            if self.nodes[i].child.is_none() {
                continue;
            }
            let (_, body) = http_get(monitor, "/connz").await;
            let connz: serde_json::Value = serde_json::from_str(&body).expect("connz is JSON");
            let connections = connz["connections"].as_array().cloned().unwrap_or_default();
            if connections.iter().any(|c| c["name"] == name) {
                return i;
            }
        }
        panic!("no node serves a client named {name}")
    }
}

/// What every test worker runs with, in a process of its own or in the
/// test's: short retries and NAK delays, few deliveries, a probe port of
/// its own.
const TEST_WORKER: &[(&str, &str)] = &[
    ("ROTATION_WORKER_WORKER__RETRY_BUDGET_MS", "300"),
    ("ROTATION_WORKER_WORKER__NAK_DELAY_MS", "100"),
    ("ROTATION_WORKER_WORKER__NAK_MAX_DELAY_MS", "400"),
    ("ROTATION_WORKER_WORKER__ACK_WAIT_SECS", "5"),
    ("ROTATION_WORKER_WORKER__MAX_DELIVER", "3"),
    ("ROTATION_WORKER_TELEMETRY__HTTP_ADDR", "127.0.0.1:0"),
];

/// The lines a worker logged, as they come.
pub struct Logs {
    lines: std::sync::Mutex<Vec<String>>,
    /// Moves with every line; dropped when no more can come.
    added: std::sync::Mutex<Option<tokio::sync::watch::Sender<usize>>>,
    seen: tokio::sync::watch::Receiver<usize>,
}

impl Logs {
    fn new() -> Arc<Self> {
        let (added, seen) = tokio::sync::watch::channel(0);
        Arc::new(Self {
            lines: std::sync::Mutex::new(Vec::new()),
            added: std::sync::Mutex::new(Some(added)),
            seen,
        })
    }

    fn push(&self, line: String) {
        let n = {
            let mut lines = self.lines.lock().unwrap();
            lines.push(line);
            lines.len()
        };
        if let Some(added) = &*self.added.lock().unwrap() {
            let _ = added.send(n);
        }
    }

    /// No more lines come: a waiter gives up at once.
    fn close(&self) {
        self.added.lock().unwrap().take();
    }

    /// Resolves once no more lines can come.
    async fn closed(&self) {
        let mut seen = self.seen.clone();
        while seen.changed().await.is_ok() {}
    }

    /// The lines so far that contain `needle`.
    fn count(&self, needle: &str) -> usize {
        let lines = self.lines.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Every line so far.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (up to 30 s) for `count` lines containing `needle`.
    pub async fn wait_for(&self, needle: &str, count: usize) {
        if let Err(why) = self
            .try_wait_for(needle, count, std::time::Duration::from_secs(30))
            .await
        {
            panic!("{why}: {:#?}", self.lines.lock().unwrap());
        }
    }

    /// Waits up to `within` for `count` lines containing `needle`; says
    /// why not when the worker exits first or the time runs out.
    pub async fn try_wait_for(
        &self,
        needle: &str,
        count: usize,
        within: std::time::Duration,
    ) -> Result<(), String> {
        let mut seen = self.seen.clone();
        let found = tokio::time::timeout(within, async {
            loop {
                if self.count(needle) >= count {
                    return Ok(());
                }
                if seen.changed().await.is_err() {
                    return Err(format!("worker exited before logging {needle:?}"));
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| Err(format!("no log line {needle:?} within {within:?}")))
    }
}

/// A running `rotation-worker run`, its stderr captured line by line.
pub struct Worker {
    child: tokio::process::Child,
    pub logs: Arc<Logs>,
    reader: tokio::task::JoinHandle<()>,
}

impl TestEnv {
    /// Starts the real worker against this test's database and `nats`, with
    /// short retry and NAK delays, and waits until it says it is ready.
    pub async fn worker(&self, nats: &NatsServer, extra: &[(&str, &str)]) -> Worker {
        let worker = self.start_worker(&nats.url, extra);
        worker.wait_for_log("rotation-worker ready").await;
        // The service answers discovery from the test's side too, unless
        // the worker has already exited (a crash-point test may abort it
        // on its first message, right after it said it was ready).
        if !nats.discoverable {
            return worker;
        }
        let client = nats.client().await;
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            let pinged = async {
                loop {
                    let ping = client.request("$SRV.PING.rotation-worker", bytes::Bytes::new());
                    if ping.await.is_ok() {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            };
            tokio::select! {
                () = pinged => {}
                () = worker.logs.closed() => {}
            }
        })
        .await;
        assert!(
            answered.is_ok(),
            "the worker's service never answered $SRV.PING"
        );
        worker
    }

    /// Starts the real worker against NATS at `nats_url` (which need not
    /// answer yet) without waiting for anything.
    pub fn start_worker(&self, nats_url: &str, extra: &[(&str, &str)]) -> Worker {
        let mut command = self.command();
        command
            .arg("run")
            .env("NATS_URL", nats_url)
            .env("RUST_LOG", "info")
            .envs(TEST_WORKER.iter().copied())
            .envs(&self.env)
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn worker");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Logs::new();
        let sink = logs.clone();
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.push(line);
            }
            sink.close();
        });
        Worker {
            child,
            logs,
            reader,
        }
    }
}

impl Worker {
    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the worker is running")
    }

    /// The address of `/metrics`, `/healthz` and `/readyz`, once the worker
    /// has said where it serves them.
    pub async fn http_addr(&self) -> String {
        let needle = "serving /metrics, /healthz and /readyz";
        self.wait_for_log(needle).await;
        let text = self.logs.text();
        let line = text.lines().find(|l| l.contains(needle)).expect("the line");
        // `addr=…` in text lines, `"addr":"…"` in JSON ones.
        let (at, skip) = match line.find("addr=") {
            Some(at) => (at, "addr=".len()),
            None => (
                line.find("\"addr\":\"").expect("an address"),
                "\"addr\":\"".len(),
            ),
        };
        let rest = &line[at + skip..];
        rest.split(|c: char| c.is_whitespace() || c == '"')
            .next()
            .expect("address")
            .to_owned()
    }

    /// Sends `signal` and returns at once (`STOP` and `CONT` pause and
    /// resume the process).
    pub fn send(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).expect("a pid");
        rustix::process::kill_process(pid, signal).expect("signal the worker");
    }

    /// Sends `signal` (`TERM`, `INT`) and returns how long the process
    /// took to exit, and its exit code.
    pub async fn signal(&mut self, signal: &str) -> (std::time::Duration, Option<i32>) {
        let pid = self.pid().to_string();
        let sent = std::time::Instant::now();
        let status = tokio::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .await;
        assert!(status.expect("kill").success());
        let code = tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait())
            .await
            .expect("the worker exits after a signal")
            .expect("wait")
            .code();
        (sent.elapsed(), code)
    }

    /// Waits (up to 30 s) for a log line containing `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        self.logs.wait_for(needle, 1).await;
    }

    /// Sends SIGTERM and returns the exit code.
    pub async fn terminate(mut self) -> (Option<i32>, String) {
        let pid = self.pid().to_string();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await;
        assert!(status.expect("kill").success());
        let code = tokio::time::timeout(std::time::Duration::from_secs(30), self.child.wait())
            .await
            .expect("worker exits after SIGTERM")
            .expect("wait")
            .code();
        (code, self.finish_logs().await)
    }

    /// SIGKILL, no goodbye.
    pub async fn kill(mut self) -> String {
        let _ = self.child.kill().await;
        self.finish_logs().await
    }

    /// Every line, once the process has closed its stderr.
    async fn finish_logs(self) -> String {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.reader).await;
        self.logs.text()
    }
}

/// The in-process workers' log lines: the global subscriber of a test
/// process (nextest runs each test in a process of its own) writes every
/// line to each worker running in it.
static CAPTURING: std::sync::Mutex<Vec<Arc<Logs>>> = std::sync::Mutex::new(Vec::new());

/// One formatted log line on its way to [`CAPTURING`].
struct CapturedLine(Vec<u8>);

impl std::io::Write for CapturedLine {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for CapturedLine {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let capturing = CAPTURING.lock().unwrap_or_else(|e| e.into_inner());
        for line in text.lines() {
            for logs in capturing.iter() {
                logs.push(line.to_owned());
            }
        }
    }
}

/// The test process's telemetry, installed by its first in-process worker
/// with that worker's log settings, as `rotation-worker run` installs its
/// own once. Its filter is `RUST_LOG` when the tests run with one, else
/// `log.level` (`info`, which the binary is given).
fn telemetry(settings: &Settings) -> Arc<Telemetry> {
    static TELEMETRY: std::sync::OnceLock<Arc<Telemetry>> = std::sync::OnceLock::new();
    TELEMETRY
        .get_or_init(|| {
            let output = LogOutput::Writer(BoxMakeWriter::new(|| CapturedLine(Vec::new())));
            Arc::new(rotation_worker::telemetry::init_with(
                &settings.log,
                &settings.telemetry,
                output,
            ))
        })
        .clone()
}

/// The worker run in the test's own process (zero2prod's `spawn_app`):
/// the real `App`, built on this world's database and a nats-server with
/// the settings [`TestEnv::worker`] gives the real binary.
pub struct TestApp {
    /// The store the worker uses.
    pub store: Arc<dyn Store>,
    /// What the worker logged while it ran.
    pub logs: Arc<Logs>,
    http_addr: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestEnv {
    /// The environment a worker process of this world reads its settings
    /// from (see [`TestEnv::command`] and [`TestEnv::worker`]), with the
    /// SQLite file named in full: the test's process does not run in this
    /// world's directory.
    fn worker_env(&self, nats: &NatsServer, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let path = |p: PathBuf| p.display().to_string();
        let mut env = vec![
            (
                "ROTATION_WORKER_ENCRYPTION__KEY_FILE".into(),
                path(self.key_file()),
            ),
            (
                "ROTATION_WORKER_DATABASE__SQLITE_PATH".into(),
                path(self.sqlite_file()),
            ),
            ("NATS_URL".into(), nats.url.clone()),
        ];
        if let Some(db) = &self.db {
            env.push(("DATABASE_URL".into(), db.url.clone()));
        }
        // Later wins: this world's environment over the test settings,
        // `extra` over both, as for the binary.
        let world = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        let pairs = TEST_WORKER
            .iter()
            .copied()
            .chain(world)
            .chain(extra.iter().copied());
        env.extend(pairs.map(|(k, v)| (k.to_owned(), v.to_owned())));
        env
    }

    /// Starts the worker in this process against this world's database and
    /// `nats` through the CLI's own start-up (`cli::start`: the store opened
    /// and its keys checked, the App built), and runs it; `extra` settings
    /// go over this world's.
    /// Every subscription is in place when it returns.
    pub async fn spawn_worker(&self, nats: &NatsServer, extra: &[(&str, &str)]) -> TestApp {
        let env = self.worker_env(nats, extra);
        let settings = Settings::load_with_env(None, env).expect("settings");
        let telemetry = telemetry(&settings);
        let logs = Logs::new();
        CAPTURING.lock().unwrap().push(logs.clone());
        // The CLI's own start-up: the same store, key check and App.
        let app = cli::start(&settings, telemetry, None)
            .await
            .expect("the worker starts");
        let store = app.store();
        let http_addr = app.http_addr();
        let shutdown = CancellationToken::new();
        let (stop, ended) = (shutdown.clone(), logs.clone());
        let task = tokio::spawn(async move {
            let ran = app.run_until(stop.cancelled_owned()).await;
            ended.close();
            ran
        });
        TestApp {
            store,
            logs,
            http_addr,
            shutdown,
            task: Some(task),
        }
    }
}

impl TestApp {
    /// Waits (up to 30 s) for a log line containing `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        self.logs.wait_for(needle, 1).await;
    }

    /// Waits (up to 30 s) for `count` log lines containing `needle`.
    pub async fn wait_for_logs(&self, needle: &str, count: usize) {
        self.logs.wait_for(needle, count).await;
    }

    /// The address of `/metrics`, `/healthz` and `/readyz`.
    pub fn http_addr(&self) -> String {
        self.http_addr
            .expect("the worker serves probes")
            .to_string()
    }

    /// Shuts the worker down as SIGTERM would (stop taking messages,
    /// finish, drain) and returns every line logged while it ran.
    pub async fn stop(mut self) -> String {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        let ran = tokio::time::timeout(std::time::Duration::from_secs(30), task)
            .await
            .expect("the worker stops within 30 s")
            .expect("the worker's task");
        ran.expect("the worker ran and stopped cleanly");
        self.logs.text()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.logs.close();
        CAPTURING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|logs| !Arc::ptr_eq(logs, &self.logs));
    }
}

/// A PostgreSQL cluster of the test's own (initdb in a temporary directory,
/// a free port), for tests that stop and start the server, kill it, or
/// replicate it to a standby. Run as the `postgres` user when the tests run
/// as root, as PostgreSQL requires.
pub struct PgCluster {
    pub port: u16,
    dir: tempfile::TempDir,
    bindir: PathBuf,
    /// Settings of this server alone (`name=value`), given on its command
    /// line: a standby's copy of the data directory does not inherit them.
    settings: Vec<String>,
}

/// PostgreSQL's server programs: `PG_BINDIR`, else where `pg_config` says
/// (when `initdb` is there: a client-only `pg_config` may name a version
/// whose server is not installed), else the newest version under Debian's
/// `/usr/lib/postgresql/<version>/bin`, else those on PATH.
fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("PG_BINDIR") {
        return dir.into();
    }
    let has_initdb = |dir: &Path| dir.join("initdb").exists();
    let out = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output();
    if let Ok(out) = out
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_initdb(&dir) {
            return dir;
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            has_initdb(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    // An empty directory: the bare program names, found on PATH.
    versions.pop().map(|(_, bin)| bin).unwrap_or_default()
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    fn command(&self, program: &str) -> std::process::Command {
        let path = self.bindir.join(program);
        if is_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            std::process::Command::new(path)
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `command` to its end, failing the test with its stderr if it fails.
    fn run(what: &str, command: &mut std::process::Command) {
        let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A cluster not yet created: a directory the server's user owns, a
    /// free port.
    fn unstarted(settings: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        if is_root() {
            Self::run(
                "chown",
                std::process::Command::new("chown")
                    .arg("postgres")
                    .arg(dir.path()),
            );
        }
        Self {
            port: free_port(),
            dir,
            bindir: pg_bindir(),
            settings: settings.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// A new cluster whose server runs with `settings` (`name=value`, no
    /// spaces), on top of the test defaults.
    pub async fn start_with(settings: &[&str]) -> Self {
        let cluster = Self::unstarted(settings);
        Self::run(
            "initdb",
            cluster
                .command("initdb")
                .arg("-D")
                .arg(cluster.data())
                .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"]),
        );
        cluster.resume().await;
        cluster
    }

    /// A streaming standby of `primary`: a base backup of it (`-R`: it
    /// starts in standby mode and follows the primary), its server named
    /// `name` (`cluster_name`: the application name the primary lists it
    /// under in `pg_stat_replication` and matches against
    /// `synchronous_standby_names`). Returns once it accepts connections.
    pub async fn standby_of(primary: &PgCluster, name: &str) -> Self {
        let cluster = Self::unstarted(&[&format!("cluster_name={name}")]);
        Self::run(
            "pg_basebackup",
            cluster
                .command("pg_basebackup")
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args(["-U", "postgres", "-D"])
                .arg(cluster.data())
                .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]),
        );
        cluster.resume().await;
        cluster
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn resume(&self) {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        for setting in &self.settings {
            options.push_str(&format!(" -c {setting}"));
        }
        Self::run(
            "pg_ctl start",
            self.command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-l"])
                .arg(self.dir.path().join("log"))
                .args(["-o", &options, "start"]),
        );
    }

    /// Stops the server (fast shutdown: sessions are cut).
    pub fn stop(&self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "fast", "stop"])
            .output();
    }

    /// SIGKILLs the server as a lost machine goes: every process of it at
    /// one moment, none told. The postmaster is stopped first (it forks no
    /// more), then its children; then all are killed.
    pub fn kill(&self) {
        use rustix::process::{Pid, Signal, kill_process};
        let pidfile = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .expect("postmaster.pid: the server runs");
        let postmaster: i32 = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("the postmaster's pid");
        let pid = |raw| Pid::from_raw(raw).expect("a pid");
        kill_process(pid(postmaster), Signal::STOP).expect("stop the postmaster");
        // Its children: the processes whose parent it is (the fourth field
        // of /proc/PID/stat, after the parenthesised command name).
        let children: Vec<i32> = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|entry| {
                let raw: i32 = entry.file_name().to_str()?.parse().ok()?;
                let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
                let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
                (parent.parse() == Ok(postmaster)).then_some(raw)
            })
            .collect();
        for &child in &children {
            let _ = kill_process(pid(child), Signal::STOP);
        }
        for &raw in children.iter().chain([&postmaster]) {
            let _ = kill_process(pid(raw), Signal::KILL);
        }
    }

    /// Promotes a standby and waits until it takes writes
    /// (`pg_is_in_recovery()` false).
    pub async fn promote(&self) {
        let mut promote = self.command("pg_ctl");
        promote.arg("-D").arg(self.data()).args(["-w", "promote"]);
        // Off the runtime's thread: the test's worker runs on it meanwhile.
        tokio::task::spawn_blocking(move || Self::run("pg_ctl promote", &mut promote))
            .await
            .expect("pg_ctl promote");
        self.wait_until("SELECT NOT pg_is_in_recovery()").await;
    }

    /// Asks `sql` (one boolean) of the `postgres` database until it answers
    /// true: a state of the server, polled. Fails the test after 60 s with
    /// the last answer.
    pub async fn wait_until(&self, sql: &str) {
        let options: PgConnectOptions = self.url("postgres").parse().expect("URL");
        let mut last = String::new();
        let done = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            loop {
                let answer = async {
                    let mut conn = options.connect().await?;
                    let yes: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                        .fetch_one(&mut conn)
                        .await?;
                    let _ = conn.close().await;
                    Ok::<_, sqlx::Error>(yes)
                };
                match answer.await {
                    Ok(true) => return,
                    Ok(false) => last = "false".into(),
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(done.is_ok(), "{sql} still answers {last} after 60 s");
    }

    /// The URL of a database on this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}

/// Asks JetStream until it answers: while a stream's leader is being
/// elected (the cluster tests kill leaders), its API answers 503 for a
/// while. Fails the test after 30 s, with the last error.
pub async fn answered<T, E, F>(mut ask: impl FnMut() -> F) -> T
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match ask().await {
            Ok(answer) => return answer,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                panic!("JetStream did not answer within 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// What a stream holds, read one sequence at a time.
pub struct StreamContents {
    /// Every message, in sequence order.
    pub messages: Vec<async_nats::jetstream::message::StreamMessage>,
    /// Sequences between the first and the last that the server says hold
    /// no message (deleted, or dropped by a limit): counted, never skipped
    /// silently.
    pub absent: Vec<u64>,
}

/// Reads every message of stream `name`. A read that fails for any reason
/// but "no message at this sequence" is retried (a leader election makes
/// the API answer 503 for a while) for up to 30 s; then the test fails,
/// naming the sequence and the error. A caller that counts what it reads
/// can therefore not mistake a slow read for a missing message.
pub async fn read_stream(js: &async_nats::jetstream::Context, name: &str) -> StreamContents {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as Kind;
    let stream = answered(|| js.get_stream(name)).await;
    let state = answered(|| {
        let mut stream = stream.clone();
        async move { stream.info().await.map(|i| i.state.clone()) }
    })
    .await;
    let mut contents = StreamContents {
        messages: Vec::new(),
        absent: Vec::new(),
    };
    if state.messages == 0 {
        return contents;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match stream.get_raw_message(seq).await {
                Ok(m) => contents.messages.push(m),
                Err(e) if e.kind() == Kind::NoMessageFound => contents.absent.push(seq),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("reading {name} sequence {seq} failed, trying again: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => panic!("{name}: sequence {seq} could not be read within 30 s: {e}"),
            }
            break;
        }
    }
    contents
}

/// A plain HTTP/1.0 GET; returns the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Creates an integration through the store, with a fixed address and role.
pub async fn create_integration(
    store: &TestStore,
    owner: &str,
    name: &str,
    secret: &str,
) -> rotation_worker::domain::Integration {
    use rotation_worker::domain::{Name, NewIntegration, Owner, RoleId, SecretId, VaultAddress};
    store
        .create_integration(&NewIntegration {
            owner: Owner::parse(owner).unwrap(),
            name: Name::parse(name).unwrap(),
            address: VaultAddress::parse("https://vault:8200").unwrap(),
            namespace: None,
            role_id: RoleId::parse("role-1").unwrap(),
            secret_id: SecretId::parse(secret.to_owned()).unwrap(),
        })
        .await
        .unwrap()
}

/// `integration create` through the CLI with `secret` on stdin, a fixed
/// address and role; the caller decides whether it must succeed.
pub async fn create_with_cli(env: &TestEnv, owner: &str, name: &str, secret: &str) -> CliOutput {
    create_with_stdin(env, owner, name, &format!("{secret}\n")).await
}

/// [`create_with_cli`] with exactly `stdin` as the input.
pub async fn create_with_stdin(env: &TestEnv, owner: &str, name: &str, stdin: &str) -> CliOutput {
    env.cli(
        &[
            "integration",
            "create",
            "--owner",
            owner,
            "--name",
            name,
            "--address",
            "https://vault.prod.example.com:8200",
            "--role-id",
            "8f2e1c0c-0e4a-4b58-8b2e-4a9e1c8a4a11",
        ],
        stdin,
    )
    .await
}

/// A transaction of the test's own that holds integration `id`'s row
/// (`FOR UPDATE`) until it is rolled back or dropped.
pub async fn hold_row(
    pool: &sqlx::PgPool,
    id: uuid::Uuid,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM integrations WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// Creates an API key for `owner` through the store; returns the key.
pub async fn create_api_key(store: &TestStore, owner: &str) -> String {
    let key = rotation_worker::auth::ApiKey::generate();
    let owner = rotation_worker::domain::Owner::parse(owner).unwrap();
    store.create_api_key(&owner, &key.hash()).await.unwrap();
    key.expose().to_owned()
}

/// The decrypted secret of an integration.
pub async fn secret_of(store: &TestStore, id: uuid::Uuid) -> String {
    use secrecy::ExposeSecret;
    let secret = store
        .reveal_secret(id)
        .await
        .unwrap()
        .expect("integration exists");
    secret.expose_secret().to_owned()
}

#[test]
fn leak_detection_sees_every_encoding() {
    let secrets = ["s.alpha-1", "s.beta-2"];
    assert_eq!(leaked_secret(b"nothing here", secrets), None);
    assert_eq!(
        leaked_secret(b"log: S.BETA-2 end", secrets),
        Some("s.beta-2")
    );
    // hex, as bytea and SQLite's quote() show it, in either case.
    assert_eq!(
        leaked_secret(b"X'732E616C7068612D31'", secrets),
        Some("s.alpha-1")
    );
    assert_eq!(leaked_secret(b"cy5hbHBoYS0x", secrets), Some("s.alpha-1"));
}
