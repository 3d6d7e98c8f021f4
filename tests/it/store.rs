//! The store and the admin CLI: happy paths, bad input, encryption at rest,
//! key files and key rotation.

use rotation_worker::crypto::generate_key;
use secrecy::ExposeSecret;
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{Backend, TestEnv, contains_secret};

const SECRET: &str = "s.Zk3q-initial-secret-8f2e1c0c";

async fn create(env: &TestEnv, owner: &str, name: &str, secret: &str) -> serde_json::Value {
    crate::helpers::create_with_cli(env, owner, name, secret)
        .await
        .json()
}

async fn count(env: &TestEnv, table: &str) -> i64 {
    env.store().await.count(table).await
}

async fn integration_create_get_list_delete(backend: Backend) {
    let env = TestEnv::on(backend);
    let created = create(&env, "acme", "prod-vault", SECRET).await;

    let id = created["id"].as_str().expect("id").to_owned();
    Uuid::parse_str(&id).expect("id is a UUID");
    let keys: Vec<&str> = created
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        [
            "address",
            "authMethod",
            "createdAt",
            "id",
            "name",
            "namespace",
            "roleId",
            "type",
            "updatedAt"
        ]
    );
    assert_eq!(created["name"], "prod-vault");
    assert_eq!(created["type"], "hashicorp");
    assert_eq!(created["authMethod"], "approle");
    assert_eq!(created["address"], "https://vault.prod.example.com:8200");
    assert_eq!(created["namespace"], serde_json::Value::Null);
    assert_eq!(created["roleId"], "8f2e1c0c-0e4a-4b58-8b2e-4a9e1c8a4a11");
    let created_at = created["createdAt"].as_str().expect("createdAt");
    assert_eq!(
        created_at.len(),
        20,
        "second precision with Z: {created_at}"
    );
    assert!(created_at.ends_with('Z'));
    assert_eq!(created["updatedAt"], created["createdAt"]);

    let got = env.cli(&["integration", "get", &id], "").await.json();
    assert_eq!(got, created);

    // A Vault on a private network over http: admitted only when the
    // operator says so.
    let admitted = [
        ("ROTATION_WORKER_VAULT__ALLOW_HTTP", "true"),
        ("ROTATION_WORKER_VAULT__ALLOWED_NETWORKS", "10.0.0.0/8"),
    ];
    let with_ns = env
        .cli_with(
            &[
                "integration",
                "create",
                "--owner",
                "other",
                "--name",
                "eu",
                "--address",
                "http://10.0.0.5:8200",
                "--namespace",
                "team-a",
                "--role-id",
                "role-2",
            ],
            "s.other\r\n",
            &admitted,
        )
        .await
        .json();
    assert_eq!(with_ns["namespace"], "team-a");

    assert_eq!(
        env.cli(&["integration", "list"], "").await.json(),
        json!([created, with_ns])
    );
    assert_eq!(
        env.cli(&["integration", "list", "--owner", "acme"], "")
            .await
            .json(),
        json!([created])
    );

    // The secret is kept exactly as given, minus the line ending.
    let store = env.store().await;
    let secret = store
        .reveal_secret(Uuid::parse_str(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(secret.expose_secret(), SECRET);
    let other = Uuid::parse_str(with_ns["id"].as_str().unwrap()).unwrap();
    assert_eq!(
        store
            .reveal_secret(other)
            .await
            .unwrap()
            .unwrap()
            .expose_secret(),
        "s.other"
    );

    assert_eq!(
        env.cli(&["integration", "delete", &id], "").await.json(),
        json!({ "deleted": id })
    );
    env.cli(&["integration", "get", &id], "")
        .await
        .assert_fails_with(&format!("no integration with id {id}"));
    assert_eq!(count(&env, "integrations").await, 1);
}

async fn bad_input_is_refused_and_changes_nothing(backend: Backend) {
    let env = TestEnv::on(backend);
    let created = create(&env, "acme", "prod", SECRET).await;
    let before = env.dump().await;

    let base = |name: &'static str, address: &'static str| {
        vec![
            "integration",
            "create",
            "--owner",
            "acme",
            "--name",
            name,
            "--address",
            address,
            "--role-id",
            "role-1",
        ]
    };
    let oversized = "x".repeat(5000);
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (base("", "https://v:8200"), "s.x", "name must not be empty"),
        (
            base("   ", "https://v:8200"),
            "s.x",
            "name must not be empty",
        ),
        (
            base("n", "vault.example.com"),
            "s.x",
            "address must be an http(s) URL",
        ),
        (
            base("n", "ftp://vault.example.com"),
            "s.x",
            "address must be an http(s) URL",
        ),
        (base("n", "https://v:8200"), "", "must not be empty"),
        (base("n", "https://v:8200"), "   \n", "must not be empty"),
        (
            base("n", "https://v:8200"),
            &oversized,
            "secretId must be at most 4096 bytes",
        ),
        (
            vec![
                "integration",
                "create",
                "--owner",
                "",
                "--name",
                "n",
                "--address",
                "https://v",
                "--role-id",
                "r",
            ],
            "s.x",
            "owner must not be empty",
        ),
    ];
    for (args, stdin, message) in &cases {
        env.cli(args, stdin).await.assert_fails_with(message);
    }

    let unknown = Uuid::new_v4().to_string();
    env.cli(&["integration", "get", &unknown], "")
        .await
        .assert_fails_with("no integration with id");
    env.cli(&["integration", "delete", &unknown], "")
        .await
        .assert_fails_with("no integration with id");
    let not_uuid = env.cli(&["integration", "get", "not-a-uuid"], "").await;
    assert_eq!(not_uuid.code, 2, "{not_uuid:?}");
    assert!(not_uuid.stderr.contains("invalid value 'not-a-uuid'"));

    env.cli(&["api-key", "create", "--owner", " "], "")
        .await
        .assert_fails_with("owner must not be empty");
    env.cli(&["api-key", "revoke", "--id", &unknown], "")
        .await
        .assert_fails_with("no such API key");
    env.cli(&["api-key", "revoke"], "")
        .await
        .assert_fails_with("must not be empty");

    assert_eq!(
        env.dump().await,
        before,
        "a refused command changed the database"
    );
    assert_eq!(
        env.cli(&["integration", "list"], "").await.json(),
        json!([created])
    );
}

async fn api_keys_are_shown_once_stored_hashed_and_revocable(backend: Backend) {
    let env = TestEnv::on(backend);
    let created = env
        .cli(&["api-key", "create", "--owner", "acme"], "")
        .await
        .json();
    let keys: Vec<&str> = created
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["apiKey", "owner"]);
    assert_eq!(created["owner"], "acme");
    let key = created["apiKey"].as_str().unwrap().to_owned();
    let api_key = rotation_worker::auth::ApiKey::parse(&key).unwrap();

    let store = env.store().await;
    assert_eq!(
        store
            .authenticate(&api_key.hash())
            .await
            .unwrap()
            .unwrap()
            .as_str(),
        "acme"
    );
    assert!(
        !contains_secret(&env.at_rest().await, &key),
        "API key stored in plain text"
    );

    let second = env
        .cli(&["api-key", "create", "--owner", "acme"], "")
        .await
        .json();
    let second_key =
        rotation_worker::auth::ApiKey::parse(second["apiKey"].as_str().unwrap()).unwrap();
    assert_ne!(second_key.hash(), api_key.hash());

    let listed = env
        .cli(&["api-key", "list", "--owner", "acme"], "")
        .await
        .json();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert!(
        listed
            .iter()
            .all(|k| k["revokedAt"].is_null() && k["owner"] == "acme")
    );
    assert!(!serde_json::to_string(listed).unwrap().contains(&key));

    // Revoke the first by the key itself (stdin), the second by id.
    let revoked = env
        .cli(&["api-key", "revoke"], &format!("{key}\n"))
        .await
        .json();
    assert_eq!(revoked["owner"], "acme");
    assert!(revoked["revokedAt"].is_string());
    assert_eq!(store.authenticate(&api_key.hash()).await.unwrap(), None);
    assert!(
        store
            .authenticate(&second_key.hash())
            .await
            .unwrap()
            .is_some()
    );

    let second_id = listed
        .iter()
        .map(|k| k["id"].as_str().unwrap())
        .find(|id| *id != revoked["id"].as_str().unwrap())
        .unwrap();
    env.cli(&["api-key", "revoke", "--id", second_id], "")
        .await
        .json();
    assert_eq!(store.authenticate(&second_key.hash()).await.unwrap(), None);
}

async fn secrets_never_reach_the_database_or_the_logs_in_plain_text(backend: Backend) {
    let env = TestEnv::on(backend);
    let out = env
        .cli(
            &[
                "integration",
                "create",
                "--owner",
                "acme",
                "--name",
                "prod",
                "--address",
                "https://vault:8200",
                "--role-id",
                "role-1",
            ],
            SECRET,
        )
        .await;
    let record = out.json();
    assert!(
        out.stderr.contains("TRACE") || out.stderr.contains("DEBUG") || out.stderr.contains("INFO"),
        "logs were not captured: {}",
        out.stderr
    );
    for (what, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(
            !contains_secret(text.as_bytes(), SECRET),
            "secret in {what}"
        );
    }
    let dump = env.at_rest().await;
    assert!(
        String::from_utf8_lossy(&dump).contains(record["id"].as_str().unwrap()),
        "dump lacks the row"
    );
    assert!(!contains_secret(&dump, SECRET), "secret at rest");

    // The key file's key is not logged either.
    let key = std::fs::read_to_string(env.key_file()).unwrap();
    assert!(!out.stderr.contains(key.trim()));
}

async fn ciphertexts_are_bound_to_their_row(backend: Backend) {
    let env = TestEnv::on(backend);
    let a = create(&env, "acme", "a", "s.secret-a").await;
    let b = create(&env, "acme", "b", "s.secret-b").await;
    let (a, b) = (
        Uuid::parse_str(a["id"].as_str().unwrap()).unwrap(),
        Uuid::parse_str(b["id"].as_str().unwrap()).unwrap(),
    );
    let store = env.store().await;
    let stored = store.ciphertext(a).await;
    assert_ne!(stored, store.ciphertext(b).await);
    store.set_ciphertext(b, &stored).await;
    let err = store
        .reveal_secret(b)
        .await
        .expect_err("a copied ciphertext must not open");
    assert!(
        err.to_string().contains(&format!(
            "secret of integration {b} does not decrypt under key `local`"
        )),
        "{err}"
    );
    assert_eq!(
        store
            .reveal_secret(a)
            .await
            .unwrap()
            .unwrap()
            .expose_secret(),
        "s.secret-a"
    );
}

/// An unwrapped secret is sealed once per (owner, event id), found only
/// by its owner and for its integration, and pruned with old event ids.
async fn unwrapped_secrets_are_sealed_once_and_pruned(backend: Backend) {
    use rotation_worker::domain::{Owner, SecretId, WrappingToken};
    use rotation_worker::store::{UnwrapKey, UnwrapSlot};
    let env = TestEnv::on(backend);
    let store = env.store().await;
    let (acme, globex) = (
        Owner::parse("acme").unwrap(),
        Owner::parse("globex").unwrap(),
    );
    // Unwrapped secrets belong to integrations that exist (and go with
    // them).
    let mut ids = Vec::new();
    for name in ["one", "two"] {
        let created = store
            .create_integration(&rotation_worker::domain::NewIntegration {
                owner: acme.clone(),
                name: rotation_worker::domain::Name::parse(name).unwrap(),
                address: rotation_worker::domain::VaultAddress::parse("https://v.example.com")
                    .unwrap(),
                namespace: None,
                role_id: rotation_worker::domain::RoleId::parse("r").unwrap(),
                secret_id: SecretId::parse("s.stored".to_owned()).unwrap(),
            })
            .await
            .unwrap();
        ids.push(created.id);
    }
    let (it, other) = (ids[0], ids[1]);
    let secret = |s: &str| SecretId::parse(s.to_owned()).unwrap();
    let token = WrappingToken::parse("s.a-wrapping-token".into()).unwrap();
    let keys = [UnwrapKey::Event("ev-1"), UnwrapKey::Token(&token)];
    let slot = |owner, key, integration| UnwrapSlot {
        owner,
        key,
        integration,
    };
    for key in keys {
        store
            .put_unwrapped(slot(&acme, key, it), &secret("s.first"))
            .await
            .unwrap();
        store
            .put_unwrapped(slot(&acme, key, it), &secret("s.second"))
            .await
            .unwrap();
        let got = store.get_unwrapped(slot(&acme, key, it)).await.unwrap();
        assert_eq!(got.unwrap().expose(), "s.first", "a repeat keeps the first");
        assert!(
            store
                .get_unwrapped(slot(&globex, key, it))
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .get_unwrapped(slot(&acme, key, other))
                .await
                .unwrap()
                .is_none()
        );
    }
    assert_eq!(store.count("unwrapped_secrets").await, 2);
    let dump = env.at_rest().await;
    for plain in ["s.first", "s.a-wrapping-token"] {
        assert!(!contains_secret(&dump, plain), "{plain} at rest");
    }
    let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(1);
    store.prune_processed(later).await.unwrap();
    assert_eq!(store.count("unwrapped_secrets").await, 0);
}

async fn key_file_is_created_once_and_its_path_logged(backend: Backend) {
    let env = TestEnv::on(backend);
    assert!(!env.key_file().exists());
    let first = env.cli(&["migrate"], "").await;
    assert_eq!(first.json(), json!({ "migrated": true }));
    let path = env.key_file();
    assert!(path.exists(), "no key file was written");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let key = std::fs::read_to_string(&path).unwrap();
    assert!(
        first.stderr.contains("created a new key file"),
        "{}",
        first.stderr
    );
    assert!(first.stderr.contains(&path.display().to_string()));

    let second = env.cli(&["integration", "list"], "").await;
    assert_eq!(second.json(), json!([]));
    assert!(
        second.stderr.contains("encryption key from key file"),
        "{}",
        second.stderr
    );
    assert!(second.stderr.contains(&path.display().to_string()));
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        key,
        "the key file was replaced"
    );
    for out in [&first, &second] {
        assert!(!out.stderr.contains(key.trim()), "key value logged");
    }
}

async fn malformed_keys_are_clear_start_up_errors(backend: Backend) {
    let mut env = TestEnv::on(backend);
    env.env.insert(
        "ROTATION_WORKER_ENCRYPTION__KEYS__K1".into(),
        "bm90LWEta2V5".into(),
    );
    let out = env.cli(&["migrate"], "").await;
    out.assert_fails_with("encryption key `k1` is malformed");
    assert!(!out.stderr.contains("bm90LWEta2V5"));

    let mut env = TestEnv::on(backend);
    std::fs::create_dir_all(env.key_file().parent().unwrap()).unwrap();
    std::fs::write(env.key_file(), "garbage\n").unwrap();
    env.cli(&["migrate"], "")
        .await
        .assert_fails_with("encryption key `local` is malformed");

    let k1 = generate_key();
    env.env.insert(
        "ROTATION_WORKER_ENCRYPTION__KEYS__K1".into(),
        k1.expose_secret().into(),
    );
    env.env
        .insert("ROTATION_WORKER_ENCRYPTION__ACTIVE_KEY".into(), "k2".into());
    env.cli(&["migrate"], "")
        .await
        .assert_fails_with("the active encryption key `k2` is not among the configured keys");
}

async fn key_rotation_reencrypts_every_secret(backend: Backend) {
    let mut env = TestEnv::on(backend);
    let (k1, k2) = (generate_key(), generate_key());
    env.env.insert(
        "ROTATION_WORKER_ENCRYPTION__KEYS__K1".into(),
        k1.expose_secret().into(),
    );
    let mut expected = Vec::new();
    for i in 0..5 {
        let secret = format!("s.secret-{i}");
        let record = create(&env, "acme", &format!("n{i}"), &secret).await;
        expected.push((
            Uuid::parse_str(record["id"].as_str().unwrap()).unwrap(),
            secret,
        ));
    }
    assert!(
        !env.key_file().exists(),
        "a key file was written although keys are configured"
    );
    // A rotation under k1 keeps the replaced secret, sealed under k1 too:
    // its key id is written NULL, "the current one's".
    let rotated = expected[0].0;
    rotate_to(&env, rotated, "s.secret-0-rotated").await;
    expected[0].1 = "s.secret-0-rotated".into();
    assert_eq!(
        env.store().await.previous_columns(rotated).await,
        (None, true, true)
    );

    // Add k2 and make it active; new secrets use it at once.
    env.env.insert(
        "ROTATION_WORKER_ENCRYPTION__KEYS__K2".into(),
        k2.expose_secret().into(),
    );
    env.env
        .insert("ROTATION_WORKER_ENCRYPTION__ACTIVE_KEY".into(), "k2".into());
    let record = create(&env, "acme", "n5", "s.secret-5").await;
    expected.push((
        Uuid::parse_str(record["id"].as_str().unwrap()).unwrap(),
        "s.secret-5".into(),
    ));

    let report = env.cli(&["reencrypt"], "").await.json();
    assert_eq!(report, json!({ "reencrypted": 5, "activeKey": "k2" }));
    assert_eq!(
        env.cli(&["reencrypt"], "").await.json(),
        json!({ "reencrypted": 0, "activeKey": "k2" })
    );

    // Remove k1: every secret, the previous one included, still opens
    // under k2 alone (and the start-up key check, which covers previous
    // secrets too, passes).
    env.env.remove("ROTATION_WORKER_ENCRYPTION__KEYS__K1");
    let store = env.store().await;
    assert_eq!(store.key_ids().await, ["k2"]);
    assert_eq!(store.previous_columns(rotated).await, (None, true, true));
    let previous = store
        .reveal_previous(rotated, time::OffsetDateTime::now_utc())
        .await
        .unwrap()
        .expect("the previous secret is kept");
    assert_eq!(previous.expose_secret(), "s.secret-0");
    for (id, secret) in &expected {
        assert_eq!(
            store
                .reveal_secret(*id)
                .await
                .unwrap()
                .unwrap()
                .expose_secret(),
            secret
        );
    }
}

/// Rotates `id` to `secret` through the store, as the worker would.
pub(crate) async fn rotate_to(env: &TestEnv, id: Uuid, secret: &str) {
    use rotation_worker::store::Outcome;
    let store = env.store().await;
    let key = crate::helpers::create_api_key(&store, "acme").await;
    let results = store.rotate(&[new_secret(&key, id, secret)]).await.unwrap();
    assert!(
        matches!(results[..], [ref r] if matches!(r.outcome, Outcome::Applied(_))),
        "{results:?}"
    );
}

async fn environment_overrides_the_defaults(backend: Backend) {
    let mut env = TestEnv::on(backend);
    env.env
        .insert("ROTATION_WORKER_LOG__FORMAT".into(), "json".into());
    let out = env.cli(&["migrate"], "").await;
    out.json();
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("key file"))
        .expect("a key file log line");
    let parsed: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(parsed["path"], env.key_file().display().to_string());
}

/// Processes starting together on a new database (a worker and admin
/// commands) all come up: it is created and migrated once.
async fn concurrent_first_starts_all_succeed(backend: Backend) {
    let env = TestEnv::on(backend);
    let starts = futures::future::join_all((0..6).map(|_| env.cli(&["migrate"], ""))).await;
    for out in &starts {
        assert_eq!(out.json(), json!({ "migrated": true }), "{}", out.stderr);
    }
    let created = create(&env, "acme", "prod", SECRET).await;
    assert_eq!(
        env.cli(&["integration", "list"], "").await.json(),
        json!([created])
    );
}

/// A new secret for `id`, as a request brings it.
fn new_secret(key: &str, id: Uuid, secret: &str) -> rotation_worker::store::Rotation {
    use rotation_worker::store::{Change, Rotation};
    let now = time::OffsetDateTime::now_utc();
    Rotation {
        key: rotation_worker::auth::ApiKey::parse(key).unwrap().hash(),
        integration_id: id,
        change: Change::Secret(rotation_worker::domain::SecretId::parse(secret.into()).unwrap()),
        role_id: None,
        rotated_at: now,
        event_id: None,
        own_event_id: None,
        keep_previous_until: now + time::Duration::hours(24),
    }
}

/// Polls `future` once (a store call hands its batch over on its first
/// poll); whether it is still pending.
fn pending_after_one_poll<F: std::future::Future + Unpin>(future: &mut F) -> bool {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    std::pin::Pin::new(future).poll(&mut cx).is_pending()
}

/// SQLite: the batches several callers hand the store at once are applied
/// as one transaction (one `last_applied_at` for all its rows), and each caller
/// gets its own results, in its own order.
#[tokio::test]
async fn sqlite_commits_waiting_batches_together_and_answers_each_its_own() {
    use rotation_worker::store::Outcome;
    let env = TestEnv::on(Backend::Sqlite);
    let store = env.store().await;
    let key = crate::helpers::create_api_key(&store, "acme").await;
    let mut ids = Vec::new();
    for n in 0..6 {
        let name = format!("vault-{n}");
        ids.push(
            crate::helpers::create_integration(&store, "acme", &name, SECRET)
                .await
                .id,
        );
    }
    // Each caller: two new secrets of an integration of its own.
    let batches: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| {
            vec![
                new_secret(&key, *id, &format!("s.{n}-first")),
                new_secret(&key, *id, &format!("s.{n}-second")),
            ]
        })
        .collect();
    // The writer's one connection is held, so that every batch is handed
    // over (the first poll) before any is applied.
    let pool = store.sqlite_pool().unwrap();
    let held = pool.acquire().await.unwrap();
    let mut all = Box::pin(futures::future::join_all(
        batches.iter().map(|batch| store.rotate(batch)),
    ));
    assert!(pending_after_one_poll(&mut all));
    drop(held);
    for (n, (id, results)) in ids.iter().zip(all.await).enumerate() {
        let results = results.unwrap();
        let applied: Vec<_> = results
            .iter()
            .map(|r| match &r.outcome {
                Outcome::Applied(record) => record.id,
                other => panic!("caller {n}: {other:?}"),
            })
            .collect();
        assert_eq!(applied, vec![*id, *id], "caller {n}");
        assert_eq!(
            crate::helpers::secret_of(&store, *id).await,
            format!("s.{n}-second")
        );
    }
    let counts: Vec<i64> = sqlx::query_scalar("SELECT rotation_count FROM integrations")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(counts, vec![2; 6]);
    // The writer may have taken the first batch alone before the others
    // were handed over; the rest went in one transaction.
    let stamps: Vec<i64> = sqlx::query_scalar("SELECT DISTINCT last_applied_at FROM integrations")
        .fetch_all(pool)
        .await
        .unwrap();
    assert!(stamps.len() <= 2, "{} transactions", stamps.len());
}

/// SQLite: what a group commit adds to the WAL is copied into the
/// database file beside the writer, long before the writer's own bound
/// (10,000 pages) would make it do so.
#[tokio::test]
async fn sqlite_a_group_commit_is_copied_into_the_database_file() {
    use rotation_worker::store::Outcome;
    let env = TestEnv::on(Backend::Sqlite);
    let store = env.store().await;
    let key = crate::helpers::create_api_key(&store, "acme").await;
    let id = crate::helpers::create_integration(&store, "acme", "vault", SECRET)
        .await
        .id;
    let results = store
        .rotate(&[new_secret(&key, id, "s.copied")])
        .await
        .unwrap();
    assert!(matches!(results[0].outcome, Outcome::Applied(_)));
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT secret_ciphertext FROM integrations")
        .fetch_one(store.sqlite_pool().unwrap())
        .await
        .unwrap();
    // The new ciphertext is in the file itself, not only in its WAL.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read(env.sqlite_file())
        .unwrap()
        .windows(sealed.len())
        .any(|w| w == sealed.as_slice())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the commit is still only in the WAL"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// SQLite: a caller that gives up while its batch waits for the writer
/// changes nothing, and the caller beside it is applied.
#[tokio::test]
async fn sqlite_a_caller_that_gives_up_changes_nothing_and_the_others_are_applied() {
    let env = TestEnv::on(Backend::Sqlite);
    let store = env.store().await;
    let key = crate::helpers::create_api_key(&store, "acme").await;
    let kept_id = crate::helpers::create_integration(&store, "acme", "kept", SECRET)
        .await
        .id;
    let left_id = crate::helpers::create_integration(&store, "acme", "left", SECRET)
        .await
        .id;
    let pool = store.sqlite_pool().unwrap();
    let held = pool.acquire().await.unwrap();
    let kept_batch = [new_secret(&key, kept_id, "s.kept-new")];
    let left_batch = [new_secret(&key, left_id, "s.left-new")];
    let mut kept = Box::pin(store.rotate(&kept_batch));
    let mut left = Box::pin(store.rotate(&left_batch));
    assert!(pending_after_one_poll(&mut kept));
    assert!(pending_after_one_poll(&mut left));
    drop(left);
    drop(held);
    let results = kept.await.unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(
        crate::helpers::secret_of(&store, kept_id).await,
        "s.kept-new"
    );
    assert_eq!(crate::helpers::secret_of(&store, left_id).await, SECRET);
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, rotation_count FROM integrations ORDER BY name")
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(counts, vec![("kept".into(), 1), ("left".into(), 0)]);
}

#[tokio::test]
async fn an_unusable_database_is_a_clear_error_that_creates_nothing() {
    let mut env = TestEnv::on(Backend::Sqlite);
    env.env.insert(
        "DATABASE_URL".into(),
        "mysql://admin:hunter2@db.internal/rw".into(),
    );
    let out = env.cli(&["migrate"], "").await;
    out.assert_fails_with(
        "invalid database URL: expected postgres://, postgresql:// or sqlite:, \
         or nothing for the SQLite default",
    );
    assert!(!out.stderr.contains("hunter2"), "the URL was echoed");
    assert!(
        !env.dir.path().join("data").exists(),
        "files were created for an unusable URL"
    );

    // The SQLite file's directory cannot be created: a file is in the way.
    std::fs::write(env.dir.path().join("blocker"), "").unwrap();
    env.env.remove("DATABASE_URL");
    env.env.insert(
        "ROTATION_WORKER_DATABASE__SQLITE_PATH".into(),
        "blocker/rotation-worker.db".into(),
    );
    env.cli(&["migrate"], "")
        .await
        .assert_fails_with("cannot create the SQLite file blocker/rotation-worker.db");
}

crate::on_both_stores!(
    concurrent_first_starts_all_succeed,
    integration_create_get_list_delete,
    bad_input_is_refused_and_changes_nothing,
    api_keys_are_shown_once_stored_hashed_and_revocable,
    secrets_never_reach_the_database_or_the_logs_in_plain_text,
    ciphertexts_are_bound_to_their_row,
    unwrapped_secrets_are_sealed_once_and_pruned,
    key_file_is_created_once_and_its_path_logged,
    malformed_keys_are_clear_start_up_errors,
    key_rotation_reencrypts_every_secret,
    environment_overrides_the_defaults,
);
