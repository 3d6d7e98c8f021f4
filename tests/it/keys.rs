//! The key check and key files (data safety): a wrong or missing key is
//! refused before anything is written; key files are created only for an
//! empty store; errors never show a key or a password.
//!
//! Why: a secret sealed under one key and read with another is lost for
//! good. Before the key check, a replaced key file sealed new secrets under
//! a second key beside the old ones, and a lost key file was silently
//! replaced by a new one, so the worker kept running on a store it could
//! no longer read. Every command that writes or opens secrets now compares
//! its key ring with the store first (the check values in `key_checks` and
//! one sealed secret per key id) and refuses to start on a mismatch, so
//! each refusal here is checked with a dump of the whole database: equal
//! before and after means nothing was written.

use rotation_worker::crypto::generate_key;
use secrecy::ExposeSecret;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Backend, TestEnv, contains_secret, create_with_cli as create};

const SECRET: &str = "s.Qm7v-key-check-secret-3b9d41a2";

/// The refusal of a key file whose key is not the one the store's secrets
/// were sealed under (a key file's key is always `local`).
const MISMATCH_LOCAL: &str =
    "encryption key `local` is not the key this store's secrets were sealed under";

/// The refusal of a missing key file for a store that holds secrets.
const LOST_KEY_FILE: &str =
    "does not exist, but the store already holds sealed secrets or a recorded key";

/// The id of a record a command printed.
fn id_of(record: &serde_json::Value) -> String {
    record["id"].as_str().expect("id").to_owned()
}

/// Points the CLI's NATS at a port nothing listens on, so that the `dlq`
/// commands fail rather than wait should they ever get past the key check.
fn without_nats(env: &mut TestEnv) {
    env.env
        .insert("NATS_URL".into(), "nats://127.0.0.1:1".into());
}

/// Every command that writes or opens secrets, with its stdin. `id` is an
/// existing integration's id. `run` is left out: past the key check it
/// would wait for NATS instead of failing.
fn writing_commands(id: &str) -> Vec<(Vec<String>, String)> {
    let unknown = Uuid::new_v4().to_string();
    let args = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    vec![
        (
            args(&[
                "integration",
                "create",
                "--owner",
                "acme",
                "--name",
                "second",
                "--address",
                "https://vault.prod.example.com:8200",
                "--role-id",
                "role-2",
            ]),
            "s.another-secret\n".to_owned(),
        ),
        (args(&["integration", "delete", id]), String::new()),
        (args(&["reencrypt"]), String::new()),
        (args(&["migrate"]), String::new()),
        (
            args(&["api-key", "create", "--owner", "acme"]),
            String::new(),
        ),
        (
            args(&["api-key", "revoke", "--id", &unknown]),
            String::new(),
        ),
        (args(&["dlq", "replay"]), String::new()),
        (args(&["dlq", "reencrypt"]), String::new()),
    ]
}

/// Runs every writing command and asserts that each one fails with `message`.
async fn assert_every_writer_fails_with(env: &TestEnv, id: &str, message: &str) {
    for (args, stdin) in writing_commands(id) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.cli(&args, &stdin).await;
        assert_eq!(out.code, 1, "{args:?} did not fail: {out:?}");
        assert!(
            out.stderr.contains(message),
            "{args:?} failed otherwise: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{args:?} printed: {}", out.stdout);
    }
}

/// A key file replaced by another key (a restore from the wrong backup, a
/// second host's file copied over) is refused by every writing command,
/// and nothing is written until the original key is back. The old code
/// sealed new secrets under the new key beside the old ones.
async fn a_replaced_key_file_is_refused_and_nothing_is_written(backend: Backend) {
    let mut env = TestEnv::on(backend);
    without_nats(&mut env);
    let created = create(&env, "acme", "prod", SECRET).await.json();
    let id = id_of(&created);
    let original = std::fs::read_to_string(env.key_file()).expect("key file written");
    let before = env.dump().await;

    let replacement = format!("{}\n", generate_key().expose_secret());
    std::fs::write(env.key_file(), &replacement).unwrap();
    assert_every_writer_fails_with(&env, &id, MISMATCH_LOCAL).await;
    assert_eq!(
        env.dump().await,
        before,
        "a command with the wrong key changed the database"
    );
    assert_eq!(
        std::fs::read_to_string(env.key_file()).unwrap(),
        replacement,
        "the key file was rewritten"
    );

    // With the original key back, everything works again, and the stored
    // secret is intact.
    std::fs::write(env.key_file(), &original).unwrap();
    let second = create(&env, "acme", "second", "s.second").await.json();
    let store = env.store().await;
    assert_eq!(store.key_ids().await, ["local"]);
    assert_eq!(
        store
            .reveal_secret(Uuid::parse_str(&id).unwrap())
            .await
            .unwrap()
            .unwrap()
            .expose_secret(),
        SECRET
    );
    assert_eq!(
        env.cli(&["integration", "list"], "").await.json(),
        json!([created, second])
    );
    // One check value, the key file's, recorded by the first command.
    // (`count` takes a table expression, so it can filter too.)
    assert_eq!(store.count("key_checks").await, 1);
    assert_eq!(store.count("key_checks WHERE key_id = 'local'").await, 1);
}

/// A store that holds no secret yet still remembers its key: the check
/// value recorded by the first command refuses a replaced key file, where
/// no sealed secret could have shown the mismatch.
async fn a_replaced_key_file_is_refused_before_the_first_secret(backend: Backend) {
    let mut env = TestEnv::on(backend);
    without_nats(&mut env);
    assert_eq!(
        env.cli(&["migrate"], "").await.json(),
        json!({ "migrated": true })
    );
    let original = std::fs::read_to_string(env.key_file()).expect("key file written");
    let before = env.dump().await;

    std::fs::write(
        env.key_file(),
        format!("{}\n", generate_key().expose_secret()),
    )
    .unwrap();
    assert_every_writer_fails_with(&env, &Uuid::new_v4().to_string(), MISMATCH_LOCAL).await;
    assert_eq!(env.dump().await, before, "the database changed");

    std::fs::write(env.key_file(), &original).unwrap();
    create(&env, "acme", "prod", SECRET).await.json();
    assert_eq!(env.store().await.count("integrations").await, 1);
}

/// Configured keys: a key id the store's secrets use but the ring lacks, or
/// another key under that id, is refused; key ids match whatever their
/// case.
const K1: &str = "ROTATION_WORKER_ENCRYPTION__KEYS__K1";
const K2: &str = "ROTATION_WORKER_ENCRYPTION__KEYS__K2";
const MISSING_K1: &str =
    "stored secrets are sealed under encryption key `k1`, which is not configured";

/// An environment without NATS whose one integration (its id returned) is
/// sealed under the configured key `k1`; and a second key, not configured.
async fn one_integration_under_k1(
    backend: Backend,
) -> (
    TestEnv,
    String,
    secrecy::SecretString,
    secrecy::SecretString,
) {
    let mut env = TestEnv::on(backend);
    without_nats(&mut env);
    let (k1, k2) = (generate_key(), generate_key());
    env.env.insert(K1.into(), k1.expose_secret().into());
    let created = create(&env, "acme", "prod", SECRET).await.json();
    let id = id_of(&created);
    (env, id, k1, k2)
}

async fn a_missing_configured_key_is_refused(backend: Backend) {
    let (mut env, id, k1, k2) = one_integration_under_k1(backend).await;
    let before = env.dump().await;

    // k1 left the ring (k2 took its place without a `reencrypt`).
    env.env.remove(K1);
    env.env.insert(K2.into(), k2.expose_secret().into());
    assert_every_writer_fails_with(&env, &id, MISSING_K1).await;
    assert_eq!(env.dump().await, before, "the database changed");

    // Another key under the id `k1`.
    env.env.remove(K2);
    env.env
        .insert(K1.into(), generate_key().expose_secret().into());
    assert_every_writer_fails_with(
        &env,
        &id,
        "encryption key `k1` is not the key this store's secrets were sealed under",
    )
    .await;
    assert_eq!(env.dump().await, before, "the database changed");
    assert!(
        !env.key_file().exists(),
        "a key file was written although keys are configured"
    );

    // The right k1, named in upper case as the active key beside k2: the
    // ids match, and new secrets are sealed under k1.
    env.env.insert(K1.into(), k1.expose_secret().into());
    env.env.insert(K2.into(), k2.expose_secret().into());
    env.env
        .insert("ROTATION_WORKER_ENCRYPTION__ACTIVE_KEY".into(), "K1".into());
    let second = create(&env, "acme", "second", "s.second").await.json();
    assert_eq!(
        env.cli(&["reencrypt"], "").await.json(),
        json!({ "reencrypted": 0, "activeKey": "k1" })
    );
    let store = env.store().await;
    assert_eq!(store.key_ids().await, ["k1"]);
    assert_eq!(
        store
            .reveal_secret(Uuid::parse_str(&id_of(&second)).unwrap())
            .await
            .unwrap()
            .unwrap()
            .expose_secret(),
        "s.second"
    );
    assert!(!env.key_file().exists());
}

/// A key kept only by a previous secret (the integration was rotated after
/// a key change) is checked at start-up like any other: without it, every
/// writer refuses. Such a row is the only kind whose `previous_key_id` is
/// set, and the only kind its index holds.
async fn a_key_kept_only_by_a_previous_secret_is_checked(backend: Backend) {
    let (mut env, id, _, k2) = one_integration_under_k1(backend).await;
    env.env.insert(K2.into(), k2.expose_secret().into());
    env.env
        .insert("ROTATION_WORKER_ENCRYPTION__ACTIVE_KEY".into(), "k2".into());
    let uuid = Uuid::parse_str(&id).unwrap();
    crate::store::rotate_to(&env, uuid, "s.rotated-under-k2").await;
    assert_eq!(
        env.store().await.previous_columns(uuid).await,
        (Some("k1".into()), true, true)
    );
    let before = env.dump().await;

    env.env.remove(K1);
    assert_every_writer_fails_with(&env, &id, MISSING_K1).await;
    assert_eq!(env.dump().await, before, "the database changed");
}

/// A key file lost from a store that holds secrets is not replaced by a
/// new one: the old code did exactly that, and sealed new secrets under a
/// key unrelated to the stored ones. Reading records still works.
async fn a_lost_key_file_is_not_silently_replaced(backend: Backend) {
    let mut env = TestEnv::on(backend);
    without_nats(&mut env);
    let created = create(&env, "acme", "prod", SECRET).await.json();
    let id = id_of(&created);
    let before = env.dump().await;

    std::fs::remove_file(env.key_file()).unwrap();
    let message = format!(
        "no encryption key is configured and the key file {} {LOST_KEY_FILE}",
        env.key_file().display()
    );
    assert_every_writer_fails_with(&env, &id, &message).await;
    assert!(!env.key_file().exists(), "the key file was recreated");
    assert_eq!(env.dump().await, before, "the database changed");

    // Commands that only read need no key, and create none.
    assert_eq!(
        env.cli(&["integration", "list"], "").await.json(),
        json!([created])
    );
    assert_eq!(
        env.cli(&["integration", "get", &id], "").await.json(),
        created
    );
    assert!(!env.key_file().exists(), "a read created a key file");

    // Another host on the same database (or a worker started in another
    // directory) has no key file of its own: it is refused too, and writes
    // none. On PostgreSQL this is the scale-out path.
    let elsewhere = tempfile::tempdir().unwrap();
    let other_key_file = elsewhere.path().join("data/rotation-worker.key");
    env.env.insert(
        "ROTATION_WORKER_ENCRYPTION__KEY_FILE".into(),
        other_key_file.display().to_string(),
    );
    for args in [&["migrate"][..], &["reencrypt"]] {
        env.cli(args, "").await.assert_fails_with(&format!(
            "the key file {} {LOST_KEY_FILE}",
            other_key_file.display()
        ));
    }
    create(&env, "acme", "second", "s.second")
        .await
        .assert_fails_with(LOST_KEY_FILE);
    assert!(!other_key_file.exists(), "a second key file was written");
    assert!(!env.key_file().exists());
    assert_eq!(env.dump().await, before, "the database changed");
}

/// On a new store, commands that only read answer without creating a key
/// file: a key file written by `list` would be a key nobody backs up.
async fn read_only_commands_create_no_key_file(backend: Backend) {
    let env = TestEnv::on(backend);
    // No store yet: each fails, naming it, and writes nothing.
    for args in [
        &["integration", "list"][..],
        &["api-key", "list"],
        &["integration", "get", &Uuid::new_v4().to_string()],
    ] {
        env.cli(args, "").await.assert_fails_with("no store at ");
        assert!(!env.key_file().exists(), "{args:?} wrote a key file");
    }

    // The first writing command creates it.
    assert_eq!(
        env.cli(&["migrate"], "").await.json(),
        json!({ "migrated": true })
    );
    assert!(env.key_file().exists());
}

/// A command whose store does not open writes no key file: the key file is
/// written only once the store is known to be empty.
#[tokio::test]
async fn a_failing_command_leaves_no_key_file() {
    let mut env = TestEnv::on(Backend::Sqlite);
    // PostgreSQL where nothing listens (port 1).
    env.env.insert(
        "DATABASE_URL".into(),
        "postgres://postgres@127.0.0.1:1/nowhere".into(),
    );
    env.cli(&["migrate"], "")
        .await
        .assert_fails_with("cannot open the store");
    assert!(!env.key_file().exists(), "a key file was written");

    // An SQLite file whose directory cannot be created: a file is in the way.
    env.env.remove("DATABASE_URL");
    std::fs::write(env.dir.path().join("blocker"), "").unwrap();
    env.env.insert(
        "ROTATION_WORKER_DATABASE__SQLITE_PATH".into(),
        "blocker/x.db".into(),
    );
    env.cli(&["migrate"], "")
        .await
        .assert_fails_with("cannot create the SQLite file blocker/x.db");
    assert!(!env.key_file().exists(), "a key file was written");
    assert!(
        !env.dir.path().join("data").exists(),
        "the key file's directory was created"
    );

    // A typo in an argument fails before the store or a key is touched.
    env.env.remove("ROTATION_WORKER_DATABASE__SQLITE_PATH");
    let typo = env
        .cli(
            &[
                "integration",
                "create",
                "--owner",
                "acme",
                "--name",
                "prod",
                "--address",
                "vault.example.com",
                "--role-id",
                "r-1",
            ],
            "s.never-read\n",
        )
        .await;
    typo.assert_fails_with("address must be an http(s) URL");
    env.cli(&["api-key", "create", "--owner", " "], "")
        .await
        .assert_fails_with("owner must not be empty");
    assert!(!env.key_file().exists(), "a key file was written");
    assert!(
        !env.dir.path().join("data").exists(),
        "the database or the key file was created"
    );
}

/// A key file path that is a symbolic link is refused, dangling or not: a
/// link can point the worker's key at a file someone else controls, and
/// following a dangling one would create the key where the link says.
async fn a_symlinked_key_file_is_refused(backend: Backend) {
    #[cfg(unix)]
    {
        let env = TestEnv::on(backend);
        let target = env.dir.path().join("elsewhere.key");
        std::fs::create_dir_all(env.key_file().parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, env.key_file()).unwrap();
        let refused = format!(
            "key file {} is a symbolic link; refusing to follow it",
            env.key_file().display()
        );
        env.cli(&["migrate"], "").await.assert_fails_with(&refused);
        assert!(!target.exists(), "the link's target was created");
        assert!(
            std::fs::symlink_metadata(env.key_file())
                .unwrap()
                .file_type()
                .is_symlink(),
            "the link was replaced"
        );

        // A link to a real key file is refused as well.
        std::fs::write(&target, format!("{}\n", generate_key().expose_secret())).unwrap();
        env.cli(&["migrate"], "").await.assert_fails_with(&refused);
        create(&env, "acme", "prod", SECRET)
            .await
            .assert_fails_with(&refused);
    }
    #[cfg(not(unix))]
    let _ = backend;
}

/// Start-up errors name what is wrong, never the value: a key in a
/// malformed setting and a database password stay out of stderr.
#[tokio::test]
async fn errors_never_show_a_key_or_a_password() {
    // A key where the map of keys is expected: the config crate quotes the
    // value it could not read.
    let mut env = TestEnv::on(Backend::Sqlite);
    let key = generate_key();
    env.env.insert(
        "ROTATION_WORKER_ENCRYPTION__KEYS".into(),
        key.expose_secret().into(),
    );
    let out = env.cli(&["migrate"], "").await;
    out.assert_fails_with(
        "error: configuration: invalid type: string \"[redacted]\", expected a map for key \
         `encryption.keys`",
    );
    assert!(
        !contains_secret(out.stderr.as_bytes(), key.expose_secret()),
        "the key was printed: {}",
        out.stderr
    );
    assert!(!env.dir.path().join("data").exists(), "files were created");

    // A password in a URL whose server does not answer, and in one that
    // does not parse.
    let mut env = TestEnv::on(Backend::Sqlite);
    for (url, message) in [
        (
            "postgres://postgres:hunter2-secret@127.0.0.1:1/db",
            "cannot open the store: database unavailable",
        ),
        (
            "postgres://postgres:hunter2-secret@127.0.0.1:notaport/db",
            "cannot open the store: invalid database URL",
        ),
    ] {
        env.env.insert("DATABASE_URL".into(), url.into());
        let out = env.cli(&["migrate"], "").await;
        out.assert_fails_with(message);
        assert!(
            !contains_secret(out.stderr.as_bytes(), "hunter2-secret"),
            "the password was printed: {}",
            out.stderr
        );
        assert!(!env.key_file().exists(), "a key file was written");
    }
}

/// Hosts with different key files starting together on a new store all
/// find it empty; the first check value recorded decides, and every other
/// host refuses and takes back the key file it had just written.
async fn hosts_racing_with_different_keys_agree_on_one(backend: Backend) {
    let env = TestEnv::on(backend);
    let files: Vec<String> = (0..6)
        .map(|i| {
            env.dir
                .path()
                .join(format!("host-{i}/key"))
                .display()
                .to_string()
        })
        .collect();
    let extras: Vec<[(&str, &str); 1]> = files
        .iter()
        .map(|file| [("ROTATION_WORKER_ENCRYPTION__KEY_FILE", file.as_str())])
        .collect();
    let starts = futures::future::join_all(
        extras
            .iter()
            .map(|extra| env.cli_with(&["migrate"], "", extra)),
    )
    .await;
    let won: Vec<usize> = (0..starts.len()).filter(|&i| starts[i].code == 0).collect();
    assert_eq!(won.len(), 1, "{starts:#?}");
    for (i, out) in starts.iter().enumerate() {
        let exists = std::path::Path::new(&files[i]).exists();
        assert_eq!(exists, out.code == 0, "host {i}: {out:?}");
        if out.code != 0 {
            assert!(
                out.stderr.contains(MISMATCH_LOCAL) || out.stderr.contains(LOST_KEY_FILE),
                "host {i}: {}",
                out.stderr
            );
        }
    }
}

crate::on_both_stores!(
    hosts_racing_with_different_keys_agree_on_one,
    a_replaced_key_file_is_refused_and_nothing_is_written,
    a_replaced_key_file_is_refused_before_the_first_secret,
    a_missing_configured_key_is_refused,
    a_key_kept_only_by_a_previous_secret_is_checked,
    a_lost_key_file_is_not_silently_replaced,
    read_only_commands_create_no_key_file,
    a_symlinked_key_file_is_refused,
);
