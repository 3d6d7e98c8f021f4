//! What the database alone does: pgbench with the worker's per-event SQL
//! (the ceiling) and a bare one-row commit (the floor), on each store.

use super::*;

/// Runs pgbench with a script; returns (tps, average latency in ms).
pub(super) fn pgbench(
    url: &str,
    script: &str,
    clients: usize,
    seconds: u32,
) -> anyhow::Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("script.sql");
    std::fs::write(&path, script)?;
    let out = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-c",
            &clients.to_string(),
            "-j",
            &clients.min(2).to_string(),
        ])
        .args(["-T", &seconds.to_string(), "-f"])
        .arg(&path)
        .arg(url)
        .output()
        .context("cannot run pgbench (install PostgreSQL's client tools)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let number = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Ok((number("tps = "), number("latency average = ")))
}

/// The fewest clients of the per-event ceiling: the worker's lane count
/// before its default became 2.
pub(super) const CEILING_MIN_CLIENTS: usize = 4;

/// The PostgreSQL baseline: `pgbench` with the worker's per-event SQL at
/// `clients` (the ceiling), and a bare one-row commit with one client (the
/// floor). Returns (tps, floor in ms).
pub(super) async fn postgres_baseline(
    pg: &PgStore,
    args: &Args,
    hash: &[u8],
    integrations: usize,
    clients: usize,
) -> anyhow::Result<(f64, f64)> {
    // Without the worker's statement timeout: numbering a million
    // integrations takes seconds on a slow machine.
    let mut setup = pg.pool().begin().await?;
    sqlx::raw_sql(
        "SET LOCAL statement_timeout = 0; \
         CREATE TABLE bench_ids AS SELECT row_number() OVER (ORDER BY id) AS n, id FROM integrations; \
         CREATE UNIQUE INDEX ON bench_ids (n); \
         CREATE TABLE bench_floor (id int PRIMARY KEY, v int NOT NULL); \
         INSERT INTO bench_floor SELECT g, 0 FROM generate_series(1, 1000) g;",
    )
    .execute(&mut *setup)
    .await?;
    setup.commit().await?;
    let hash: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let record = "x".repeat(330);
    let per_event = format!(
        "\\set n random(1, {integrations})\n\
         BEGIN;\n\
         SELECT key_hash, owner FROM api_keys WHERE key_hash = '\\x{hash}'::bytea AND revoked_at IS NULL FOR SHARE;\n\
         SELECT id, owner, name, address, namespace, role_id, secret_ciphertext, secret_key_id, created_at, updated_at, last_rotated_at, rotation_count \
           FROM integrations WHERE (id, owner) = ((SELECT id FROM bench_ids WHERE n = :n), 'bench') FOR UPDATE;\n\
         INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, digest_key_id, secret_digest, processed_at) \
           VALUES ('bench', gen_random_uuid()::text, (SELECT id FROM bench_ids WHERE n = :n), 'applied', '{record}', 'bench', '\\x{digest}'::bytea, now()) ON CONFLICT DO NOTHING;\n\
         UPDATE integrations SET secret_ciphertext = '\\x{blob}'::bytea, secret_key_id = 'bench', updated_at = now(), \
           last_rotated_at = GREATEST(last_rotated_at, now()), rotation_count = rotation_count + 1 \
           WHERE id = (SELECT id FROM bench_ids WHERE n = :n);\n\
         COMMIT;\n",
        blob = "ab".repeat(60),
        digest = "cd".repeat(32),
    );
    let (ceiling, _) = pgbench(
        &args.database_url,
        &per_event,
        clients,
        args.pgbench_seconds,
    )?;
    let floor_script = "\\set n random(1, 1000)\nUPDATE bench_floor SET v = v + 1 WHERE id = :n;\n";
    let (_, floor_ms) = pgbench(&args.database_url, floor_script, 1, args.pgbench_seconds)?;
    Ok((ceiling, floor_ms))
}

/// The SQLite baseline, in-process on the benchmark's file with the
/// worker's settings: the worker's per-event statements, one transaction
/// per event (SQLite has one writer, so one loop is its ceiling), and a
/// bare one-row commit (the floor). Returns (tps, floor in ms, version).
pub(super) async fn sqlite_baseline(
    path: &Path,
    hash: &[u8],
    ids: &[Uuid],
    seconds: u32,
) -> anyhow::Result<(f64, f64, String)> {
    use sqlx::ConnectOptions;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let mut conn = SqliteConnectOptions::new()
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .connect()
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE bench_floor (id INTEGER PRIMARY KEY, v INTEGER NOT NULL); \
         INSERT INTO bench_floor (id, v) VALUES (1, 0);",
    )
    .execute(&mut conn)
    .await?;
    let budget = Duration::from_secs(u64::from(seconds.max(1)));
    let record = "x".repeat(330);
    let blob = vec![0xab_u8; 60];
    let (started, mut n) = (Instant::now(), 0usize);
    while started.elapsed() < budget {
        let id = ids[n % ids.len()].hyphenated().to_string();
        let mut tx = sqlx::Connection::begin_with(&mut conn, "BEGIN IMMEDIATE").await?;
        sqlx::query("SELECT owner FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL")
            .bind(hash)
            .fetch_optional(&mut *tx)
            .await?;
        sqlx::query("SELECT * FROM integrations WHERE id = $1 AND owner = 'bench'")
            .bind(&id)
            .fetch_optional(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO processed_events (owner, event_id, integration_id, outcome, record, \
             digest_key_id, secret_digest, processed_at) VALUES ('bench', $1, $2, 'applied', $3, 'bench', $4, 0)",
        )
        .bind(Uuid::new_v4().to_string())
        .bind(&id)
        .bind(&record)
        .bind(&[0xcd_u8; 32][..])
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE integrations SET secret_ciphertext = $2, updated_at = updated_at + 1, \
             rotation_count = rotation_count + 1 WHERE id = $1",
        )
        .bind(&id)
        .bind(&blob)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        n += 1;
    }
    let ceiling = n as f64 / started.elapsed().as_secs_f64();
    let (started, mut commits) = (Instant::now(), 0u32);
    while started.elapsed() < budget {
        sqlx::query("UPDATE bench_floor SET v = v + 1 WHERE id = 1")
            .execute(&mut conn)
            .await?;
        commits += 1;
    }
    let floor_ms = started.elapsed().as_secs_f64() * 1000.0 / f64::from(commits.max(1));
    let version: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(&mut conn)
        .await?;
    Ok((ceiling, floor_ms, format!("SQLite {version}")))
}
