//! The compose stack and the image, checked without a Docker engine: every
//! service, port, environment variable, file and volume that
//! `docker-compose.yml` and the `Dockerfile` name exists and matches the
//! configuration the worker reads.

use std::collections::BTreeSet;

use serde_yaml_ng::Value;

use crate::helpers::{known_variable, repo_root};

fn compose() -> Value {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml"))
        .expect("docker-compose.yml");
    serde_yaml_ng::from_str(&text).expect("docker-compose.yml is YAML")
}

fn port_of(url_or_addr: &str) -> u16 {
    url_or_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {url_or_addr}"))
}

#[test]
fn compose_names_only_what_exists() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["jaeger", "nats", "postgres", "worker"])
    );

    // Every environment variable of the worker is one it reads.
    let worker = &c["services"]["worker"];
    let env = worker["environment"]
        .as_mapping()
        .expect("worker environment");
    assert!(
        worker["command"].is_null() && worker["entrypoint"].is_null(),
        "the worker's settings are all in its environment, for `compose exec`"
    );
    let variables: Vec<String> = env
        .keys()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    assert!(variables.contains(&"DATABASE_URL_FILE".to_owned()));
    for name in &variables {
        // `<VARIABLE>_FILE` reads a setting from a mounted secret.
        let setting = name
            .strip_suffix("_FILE")
            .filter(|v| !known_variable(name) && known_variable(v));
        assert!(
            known_variable(name) || setting.is_some(),
            "the worker does not read {name}"
        );
        if setting.is_some() {
            let path = env[&Value::from(name.as_str())].as_str().unwrap();
            let secret = path.strip_prefix("/run/secrets/").expect("a secret");
            assert!(
                worker["secrets"]
                    .as_sequence()
                    .unwrap()
                    .contains(&Value::from(secret)),
                "{name} reads {secret}, which the worker does not mount"
            );
        }
    }

    // Hosts in URLs are services; ports match what those services listen on.
    let nats_url = env[&Value::from("NATS_URL")].as_str().unwrap();
    assert!(nats_url.starts_with("nats://nats:"));
    let nats_conf =
        std::fs::read_to_string(repo_root().join("config/nats.conf")).expect("config/nats.conf");
    assert!(nats_conf.contains(&format!("listen: 127.0.0.1:{}", port_of(nats_url))));
    assert!(nats_conf.contains("jetstream"));
    let otlp = env[&Value::from("OTEL_EXPORTER_OTLP_ENDPOINT")]
        .as_str()
        .unwrap();
    assert_eq!(otlp, "http://jaeger:4318");
    // The worker's database is created, owned by its role, by the
    // postgres service's init script.
    let role_sql = std::fs::read_to_string(repo_root().join("deploy/postgres/worker-role.sql"))
        .expect("deploy/postgres/worker-role.sql");
    assert!(role_sql.contains("CREATE DATABASE rotation_worker OWNER rotation_worker"));

    // The metrics and health port: config, compose and image agree.
    let http = env[&Value::from("ROTATION_WORKER_TELEMETRY__HTTP_ADDR")]
        .as_str()
        .unwrap();
    let port = port_of(http);
    assert_eq!(
        worker["ports"][0].as_str().unwrap(),
        format!("127.0.0.1:{port}:{port}")
    );
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    assert!(dockerfile.contains(&format!("EXPOSE {port}")));
    assert!(dockerfile.contains(&format!("http://127.0.0.1:{port}/readyz")));
    assert!(dockerfile.contains("USER rotation-worker"));
    assert!(dockerfile.contains("--locked"));

    // Files it mounts exist; named volumes are declared; secrets are files
    // kept out of the repository.
    let declared: BTreeSet<&str> = c["volumes"]
        .as_mapping()
        .unwrap()
        .keys()
        .filter_map(Value::as_str)
        .collect();
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with("./") {
                assert!(
                    repo_root().join(source).exists(),
                    "{name:?} mounts missing {source}"
                );
            } else {
                assert!(
                    declared.contains(source),
                    "{name:?} uses undeclared volume {source}"
                );
            }
        }
        // Published on the host's loopback only, and restarted after a crash.
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().unwrap();
            assert!(port.starts_with("127.0.0.1:"), "{name:?} publishes {port}");
        }
        assert_eq!(service["restart"], "unless-stopped", "{name:?}");
        for secret in service["secrets"].as_sequence().into_iter().flatten() {
            assert!(
                !c["secrets"][secret].is_null(),
                "{name:?} uses undeclared secret {secret:?}"
            );
        }
        if name.as_str() != Some("jaeger") && name.as_str() != Some("worker") {
            assert!(
                !service["healthcheck"].is_null(),
                "{name:?} has no health check"
            );
        }
    }
    let ignore = std::fs::read_to_string(repo_root().join(".gitignore")).unwrap();
    for (_, secret) in c["secrets"].as_mapping().unwrap() {
        let file = secret["file"].as_str().unwrap();
        assert!(file.starts_with("./secrets/") && ignore.contains("/secrets"));
    }
    assert!(worker["build"].as_str() == Some(".") && repo_root().join("Dockerfile").exists());

    // NATS runs the shipped configuration, with every variable it reads
    // from a secret, and the worker connects as its `worker` user.
    let nats = c["services"]["nats"]["command"][0].as_str().unwrap();
    assert!(nats.contains("nats-server -c /etc/nats/nats.conf"));
    for variable in [
        "NATS_WORKER_PASSWORD",
        "NATS_PUBLISHER_PASSWORD",
        "NATS_OPERATOR_PASSWORD",
        "NATS_CONSUMER_PASSWORD",
        "NATS_JETSTREAM_KEY",
    ] {
        assert!(nats_conf.contains(&format!("${variable}")), "{variable}");
        assert!(
            nats.contains(&format!("{variable}=\"$$(cat /run/secrets/")),
            "{variable}"
        );
    }
    assert_eq!(env[&Value::from("ROTATION_WORKER_NATS__USER")], "worker");
    assert_eq!(
        env[&Value::from("ROTATION_WORKER_NATS__PASSWORD_FILE")],
        "/run/secrets/nats_worker_password"
    );
}

/// The README's first run: a directory with nothing in it, no database
/// configured, only a NATS server with JetStream. The worker starts on the
/// SQLite default, creates its files privately, and applies a rotation
/// published the README's way.
#[tokio::test]
async fn the_first_run_needs_only_a_nats_server() {
    use futures::StreamExt;
    use sqlx::ConnectOptions;

    use crate::helpers::{Backend, NatsServer, TestEnv};
    use crate::worker::{body, headers};

    let env = TestEnv::on(Backend::Sqlite);
    let nats = NatsServer::start().await;
    let worker = env.worker(&nats, &[]).await;
    worker.wait_for_log("store=\"sqlite\"").await;

    let data = env.dir.path().join("data");
    for file in [
        "rotation-worker.db",
        "rotation-worker.db-wal",
        "rotation-worker.key",
    ] {
        let meta = std::fs::metadata(data.join(file))
            .unwrap_or_else(|e| panic!("{file} was not created: {e}"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
        }
    }
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(env.sqlite_file())
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(mode, "wal");

    let key = env
        .cli(&["api-key", "create", "--owner", "acme"], "")
        .await
        .json()["apiKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let args = [
        "integration",
        "create",
        "--owner",
        "acme",
        "--name",
        "prod-vault",
        "--address",
        "https://vault.example.com:8200",
        "--role-id",
        "my-role",
    ];
    let id = env.cli(&args, "s.initial-secret").await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let client = nats.client().await;
    let mut outcomes = client.subscribe("vault.approle.rotation.*").await.unwrap();
    client.flush().await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    js.publish_with_headers(
        "vault.approle.rotated",
        headers(Some(&key), Some("rot-1")),
        body(serde_json::json!({"integrationId": id, "secretId": "s.rotated-secret"})),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let done = tokio::time::timeout(std::time::Duration::from_secs(20), outcomes.next())
        .await
        .expect("an outcome in time")
        .unwrap();
    assert_eq!(done.subject.as_str(), "vault.approle.rotation.completed");
    let record: serde_json::Value = serde_json::from_slice(&done.payload).unwrap();
    assert_eq!(record["id"], id.as_str());

    let (code, _) = worker.terminate().await;
    assert_eq!(code, Some(0));
    let store = env.store().await;
    let id = uuid::Uuid::parse_str(&id).unwrap();
    assert_eq!(
        crate::helpers::secret_of(&store, id).await,
        "s.rotated-secret"
    );
}

/// `docker-compose.cluster.yml` over `docker-compose.yml`: three NATS
/// nodes of one cluster, each running the shipped configuration through
/// `deploy/nats-cluster/cluster.conf` with a name and a store of its own,
/// and the worker seeded with all three at three replicas.
#[test]
fn the_cluster_override_names_three_nodes_and_only_what_exists() {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.cluster.yml"))
        .expect("docker-compose.cluster.yml");
    let mut over: Value = serde_yaml_ng::from_str(&text).expect("YAML");
    over.apply_merge().expect("merge keys");
    let base = compose();
    let nodes = ["nats", "nats-2", "nats-3"];
    let services = over["services"].as_mapping().expect("services");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from(["nats", "nats-2", "nats-3", "worker"])
    );

    let cluster_conf =
        std::fs::read_to_string(repo_root().join("deploy/nats-cluster/cluster.conf"))
            .expect("cluster.conf");
    assert!(cluster_conf.contains("include \"nats.conf\""));
    assert!(cluster_conf.contains("server_name: $NATS_SERVER_NAME"));
    let server_names: BTreeSet<&str> = nodes
        .iter()
        .map(|node| {
            assert!(
                cluster_conf.contains(&format!("\"nats://{node}:6222\"")),
                "{node} is not a route"
            );
            check_cluster_node(&over, &base, node)
        })
        .collect();
    assert_eq!(server_names, BTreeSet::from(["n1", "n2", "n3"]));

    // The worker: every node on the port nats.conf listens on, at R3.
    let env = &over["services"]["worker"]["environment"];
    let nats_conf = std::fs::read_to_string(repo_root().join("config/nats.conf")).unwrap();
    let urls: Vec<&str> = env["NATS_URL"].as_str().unwrap().split(',').collect();
    assert_eq!(urls.len(), nodes.len());
    for (url, node) in urls.iter().zip(nodes) {
        assert!(url.starts_with(&format!("nats://{node}:")), "{url}");
        assert!(nats_conf.contains(&format!("listen: 127.0.0.1:{}", port_of(url))));
    }
    assert!(known_variable("ROTATION_WORKER_WORKER__REPLICAS"));
    assert_eq!(env["ROTATION_WORKER_WORKER__REPLICAS"], "3");
}

/// Durable by default (docs/deployment.md, "NATS durability"): the shipped
/// `config/nats.conf` syncs every JetStream write, the cluster's nodes get
/// that through their include (no JetStream block of their own to replace
/// it), and every nats-server the compose files run knows the setting
/// (2.10 or later; 2.9 refuses to start on it).
#[test]
fn the_shipped_nats_configuration_syncs_every_write() {
    let nats_conf = std::fs::read_to_string(repo_root().join("config/nats.conf")).unwrap();
    let (_, block) = nats_conf
        .split_once("\njetstream {")
        .expect("a jetstream block");
    let (block, _) = block.split_once("\n}").expect("its end");
    let settings: Vec<&str> = block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(settings.contains(&"sync_interval: always"), "{settings:?}");

    let cluster_conf =
        std::fs::read_to_string(repo_root().join("deploy/nats-cluster/cluster.conf")).unwrap();
    assert!(cluster_conf.contains("include \"nats.conf\""));
    let overrides = |l: &&str| l.starts_with("jetstream") || l.starts_with("sync_interval");
    let own: Vec<&str> = cluster_conf
        .lines()
        .map(str::trim)
        .filter(overrides)
        .collect();
    assert_eq!(own, Vec::<&str>::new());

    for file in ["docker-compose.yml", "docker-compose.cluster.yml"] {
        let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
        let images: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: nats:"))
            .collect();
        assert!(!images.is_empty(), "{file} runs no nats image");
        for tag in images {
            let mut version = tag.split(['.', '-']).map(|p| p.parse::<u32>());
            let (Some(Ok(major)), Some(Ok(minor))) = (version.next(), version.next()) else {
                panic!("{file}: nats:{tag} names no version");
            };
            assert!(
                (major, minor) >= (2, 10),
                "{file}: nats:{tag} refuses sync_interval"
            );
        }
    }
}

/// One node of the cluster override: the cluster configuration, restarts,
/// a health check, secrets the base file declares, mounts that exist, the
/// host's loopback only. Returns its server name.
fn check_cluster_node<'a>(over: &'a Value, base: &Value, node: &str) -> &'a str {
    let service = &over["services"][node];
    let command = service["command"][0].as_str().expect(node);
    assert!(
        command.contains("nats-server -c /etc/nats/cluster.conf"),
        "{node}"
    );
    assert_eq!(service["restart"], "unless-stopped", "{node}");
    assert!(
        !service["healthcheck"].is_null(),
        "{node} has no health check"
    );
    for secret in service["secrets"].as_sequence().expect(node) {
        assert!(!base["secrets"][secret].is_null(), "{node}: {secret:?}");
    }
    let declared = |volume: &str| {
        [over, base].iter().any(|c| {
            c["volumes"]
                .as_mapping()
                .is_some_and(|v| v.contains_key(volume))
        })
    };
    let mounts: Vec<&str> = service["volumes"]
        .as_sequence()
        .expect(node)
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for target in ["/etc/nats/nats.conf", "/etc/nats/cluster.conf", "/data"] {
        let mount = mounts
            .iter()
            .find(|m| m.split(':').nth(1) == Some(target))
            .unwrap_or_else(|| panic!("{node} mounts nothing at {target}"));
        let source = mount.split(':').next().unwrap();
        assert!(
            repo_root().join(source).exists() || declared(source),
            "{node} mounts missing {source}"
        );
    }
    for port in service["ports"].as_sequence().into_iter().flatten() {
        assert!(port.as_str().unwrap().starts_with("127.0.0.1:"), "{node}");
    }
    service["environment"]["NATS_SERVER_NAME"]
        .as_str()
        .expect(node)
}

/// Compose connects the worker as a PostgreSQL role that owns its database
/// and is not a superuser: the image's init script creates it from a
/// secret, and the worker's URL names it. The script's SQL, run on a
/// PostgreSQL of the test's own as the image runs it, gives a role that
/// can migrate and use its database and nothing more.
#[tokio::test]
async fn compose_connects_the_worker_as_an_owner_that_is_not_a_superuser() {
    use crate::helpers::{PgCluster, TestEnv};
    let compose: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap(),
    )
    .unwrap();
    let postgres = &compose["services"]["postgres"];
    assert!(
        postgres["environment"]["POSTGRES_USER"].is_null(),
        "the superuser is the image's own, not the worker's"
    );
    let mounts: Vec<&str> = postgres["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(mounts.iter().any(|m| {
        m.starts_with("./deploy/postgres/init-worker-role.sh:/docker-entrypoint-initdb.d/")
    }));
    let secrets = compose["secrets"].as_mapping().unwrap();
    assert!(secrets.contains_key("postgres_worker_password"));
    let comment = std::fs::read_to_string(repo_root().join("docker-compose.yml")).unwrap();
    assert!(comment.contains("postgres://rotation_worker:$(cat secrets/postgres_worker_password)"));

    let cluster = PgCluster::start().await;
    let sql = repo_root().join("deploy/postgres/worker-role.sql");
    let out = tokio::process::Command::new("psql")
        .args(["-v", "ON_ERROR_STOP=1", "-v", "password=role-pw-51c2"])
        .arg("-f")
        .arg(&sql)
        .arg(cluster.url("postgres"))
        .output()
        .await
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!(
        "postgres://rotation_worker:role-pw-51c2@127.0.0.1:{}/rotation_worker",
        cluster.port
    );
    let env = TestEnv::new();
    let migrated = env
        .cli_with(&["migrate"], "", &[("DATABASE_URL", &url)])
        .await;
    assert_eq!(migrated.code, 0, "{}", migrated.stderr);
    let created = env
        .cli_with(
            &[
                "integration",
                "create",
                "--owner",
                "acme",
                "--name",
                "v",
                "--address",
                "https://vault.example.com",
                "--role-id",
                "r",
            ],
            "s.role-test\n",
            &[("DATABASE_URL", &url)],
        )
        .await;
    assert_eq!(created.code, 0, "{}", created.stderr);
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.url("postgres"))
        .await
        .unwrap();
    let rights: (bool, bool, bool) = sqlx::query_as(
        "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = 'rotation_worker'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(rights, (false, false, false));
}
