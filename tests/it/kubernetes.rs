//! The Kubernetes manifests (`deploy/kubernetes/`), checked without a
//! cluster: every file parses and is listed by the kustomization, the
//! probes point at the worker's real endpoints on the port it is told to
//! listen on, every variable they set is one the worker reads, the Secret
//! holds only placeholders, and the pod runs locked down. Last, a real
//! worker started with the manifests' settings answers the probes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use rotation_worker::config::{LogFormat, Settings};
use rotation_worker::crypto::{KeyRing, generate_key};
use rotation_worker::store::Backend as StoreBackend;
use secrecy::ExposeSecret;
use serde_yaml_ng::Value;

use crate::helpers::{NatsServer, TestEnv, http_get, known_variable, repo_root};

fn dir() -> PathBuf {
    repo_root().join("deploy/kubernetes")
}

/// Every manifest of the directory by kind, and the kustomization.
struct Manifests {
    by_kind: BTreeMap<String, Value>,
    files: BTreeSet<String>,
    kustomization: Value,
    /// The Secret's values written as files, where the test's worker reads
    /// them (the pod reads them at the Secret's mount path).
    secret_files: tempfile::TempDir,
}

impl Manifests {
    fn load() -> Self {
        let mut by_kind = BTreeMap::new();
        let mut files = BTreeSet::new();
        let mut kustomization = Value::Null;
        for entry in std::fs::read_dir(dir()).expect("deploy/kubernetes") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            assert!(
                name.ends_with(".yaml"),
                "{name}: only manifests belong here"
            );
            let text = std::fs::read_to_string(&path).unwrap();
            let doc: Value =
                serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            if name == "kustomization.yaml" {
                kustomization = doc;
                continue;
            }
            for field in ["apiVersion", "kind"] {
                assert!(doc[field].is_string(), "{name} has no {field}");
            }
            assert_eq!(doc["metadata"]["name"], "rotation-worker", "{name}");
            let kind = doc["kind"].as_str().unwrap().to_owned();
            assert!(by_kind.insert(kind, doc).is_none(), "{name}: a second one");
            files.insert(name);
        }
        let secret_files = tempfile::tempdir().unwrap();
        let manifests = Self {
            by_kind,
            files,
            kustomization,
            secret_files,
        };
        for (name, value) in manifests.strings("Secret", "stringData") {
            std::fs::write(manifests.secret_files.path().join(name), value).unwrap();
        }
        manifests
    }

    /// Where the container mounts the Secret.
    fn secret_mount(&self) -> String {
        let volume = self.pod()["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["secret"]["secretName"] == self.kind("Secret")["metadata"]["name"])
            .expect("the Secret is a volume");
        let mount = self.container()["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume["name"])
            .expect("the Secret's volume is mounted");
        assert_eq!(mount["readOnly"], true);
        mount["mountPath"].as_str().unwrap().to_owned()
    }

    fn kind(&self, kind: &str) -> &Value {
        self.by_kind
            .get(kind)
            .unwrap_or_else(|| panic!("no {kind} manifest"))
    }

    fn pod(&self) -> &Value {
        &self.kind("Deployment")["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        let containers = self.pod()["containers"].as_sequence().unwrap();
        assert_eq!(containers.len(), 1, "one container");
        &containers[0]
    }

    /// A string map of a manifest (`data`, `stringData`).
    fn strings(&self, kind: &str, field: &str) -> BTreeMap<String, String> {
        let map = self.kind(kind)[field]
            .as_mapping()
            .unwrap_or_else(|| panic!("{kind} has no {field}"));
        map.iter()
            .map(|(k, v)| {
                let value = v
                    .as_str()
                    .unwrap_or_else(|| panic!("{kind} {k:?}: quote it, it must be a string"));
                (k.as_str().unwrap().to_owned(), value.to_owned())
            })
            .collect()
    }

    /// The environment a worker pod gets: the ConfigMap (through
    /// `envFrom`; no Secret is), then the container's own `env`, whose
    /// `_FILE` variables name files of the mounted Secret (here: the same
    /// files, written where the test can read them).
    fn environment(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for from in self.container()["envFrom"].as_sequence().unwrap() {
            assert!(
                from["secretRef"].is_null(),
                "secrets are files, not variables"
            );
            let reference = &from["configMapRef"];
            assert_eq!(
                reference["name"],
                self.kind("ConfigMap")["metadata"]["name"]
            );
            env.extend(self.strings("ConfigMap", "data"));
        }
        let mount = self.secret_mount();
        for var in self.container()["env"].as_sequence().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_owned();
            let mut value = var["value"].as_str().expect("plain values only").to_owned();
            if name.ends_with("_FILE") {
                let file = value
                    .strip_prefix(&format!("{mount}/"))
                    .unwrap_or_else(|| panic!("{name} names no file of the Secret"));
                assert!(
                    self.strings("Secret", "stringData").contains_key(file),
                    "{name}: the Secret has no {file}"
                );
                value = self.secret_files.path().join(file).display().to_string();
            }
            env.insert(name, value);
        }
        env
    }

    /// What the worker reads from that environment.
    fn settings(&self) -> Settings {
        Settings::load_with_env(None, self.environment())
            .unwrap_or_else(|e| panic!("the manifests' settings: {e}"))
    }

    /// The container port a probe (or anything else) names, by name or
    /// number.
    fn port(&self, port: &Value) -> u64 {
        let ports = self.container()["ports"].as_sequence().unwrap();
        let found = ports.iter().find(|p| match port {
            Value::String(name) => p["name"].as_str() == Some(name),
            number => &p["containerPort"] == number,
        });
        found
            .unwrap_or_else(|| panic!("no container port {port:?}"))
            .get("containerPort")
            .and_then(Value::as_u64)
            .unwrap()
    }
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let m = Manifests::load();
    let listed: BTreeSet<String> = m.kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, m.files);
    let kinds: BTreeSet<&str> = m.by_kind.keys().map(String::as_str).collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Secret"
        ])
    );
    // The image the kustomization pins is the container's.
    let image = m.container()["image"].as_str().unwrap();
    assert_eq!(m.kustomization["images"][0]["name"], image);
}

#[test]
fn the_probes_ask_the_worker_on_the_port_it_listens_on() {
    let m = Manifests::load();
    let c = m.container();
    let addr: SocketAddr = m.settings().telemetry.http_addr.expect("http_addr set");
    // On every interface: the kubelet probes the pod's address.
    assert!(addr.ip().is_unspecified(), "{addr}");
    let ports = c["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["containerPort"], u64::from(addr.port()));

    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(m.port(&get["port"]), u64::from(addr.port()), "{probe}");
    }
    let annotations = &m.kind("Deployment")["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], addr.port().to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
}

#[test]
fn every_variable_is_one_the_worker_reads() {
    let m = Manifests::load();
    let env = m.environment();
    for name in env.keys() {
        assert!(known_variable(name), "the worker does not read {name}");
    }
    for name in [
        "DATABASE_URL_FILE",
        "NATS_URL",
        "ROTATION_WORKER_NATS__USER",
        "ROTATION_WORKER_NATS__PASSWORD_FILE",
        "ROTATION_WORKER_ENCRYPTION__ACTIVE_KEY",
        "ROTATION_WORKER_TELEMETRY__HTTP_ADDR",
    ] {
        assert!(env.contains_key(name), "{name} is not set");
    }
    // And they mean what the comments say.
    let settings = m.settings();
    assert_eq!(settings.log.format, LogFormat::Json);
    assert_eq!(settings.nats.user.as_deref(), Some("worker"));
    assert_eq!(
        StoreBackend::of(&settings.database).unwrap(),
        StoreBackend::Postgres
    );
    // Stopping takes at most the grace plus a drain: well inside the
    // pod's termination grace period.
    let grace = m.pod()["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(settings.worker.shutdown_grace.as_secs() * 2 <= grace);
}

#[test]
fn the_secret_holds_only_placeholders() {
    let m = Manifests::load();
    let secret = m.kind("Secret");
    assert!(secret["data"].is_null(), "placeholders go in stringData");
    // `kubectl apply -k` skips it: the real Secret is never overwritten.
    assert_eq!(
        secret["metadata"]["annotations"]["config.kubernetes.io/local-config"],
        "true"
    );
    let values = m.strings("Secret", "stringData");
    for (name, value) in &values {
        assert!(value.contains("REPLACE_ME"), "{name} is not a placeholder");
    }
    // The ring's one key is the active one.
    let env = m.environment();
    let keys: Vec<String> = env
        .keys()
        .filter_map(|name| {
            name.strip_prefix("ROTATION_WORKER_ENCRYPTION__KEYS__")?
                .strip_suffix("_FILE")
                .map(str::to_lowercase)
        })
        .collect();
    assert_eq!(
        keys,
        [env["ROTATION_WORKER_ENCRYPTION__ACTIVE_KEY"].clone()],
        "the active key is the ring's one key"
    );
    // Nothing secret is in the ConfigMap.
    for name in m.strings("ConfigMap", "data").keys() {
        assert!(!name.contains("PASSWORD") && !name.contains("KEYS__") && name != "DATABASE_URL");
    }
    // A worker started with the placeholders refuses to start, naming the
    // key id and never the value.
    let error = KeyRing::load(&m.settings().encryption)
        .map(drop)
        .expect_err("the placeholder key is refused")
        .to_string();
    assert!(error.contains(&keys[0]), "{error}");
    assert!(!error.contains("REPLACE_ME"), "{error}");
}

#[test]
fn the_pod_runs_locked_down() {
    let m = Manifests::load();
    let pod = &m.pod()["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true);
    // The image names its user; Kubernetes needs the number to know it
    // is not root, and it must be the image's.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let uid = pod["runAsUser"].as_u64().expect("runAsUser");
    assert!(
        uid != 0 && dockerfile.contains(&format!("--uid {uid} ")),
        "{uid}"
    );
    assert_eq!(m.pod()["automountServiceAccountToken"], false);

    let c = m.container();
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_ne!(sc["privileged"], true);
    assert_eq!(sc["capabilities"]["drop"], Value::from(vec!["ALL"]));
    assert!(sc["capabilities"]["add"].is_null());
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "no {resource} {kind}"
            );
        }
    }
    // Anything mounted writable is an emptyDir (today nothing is: the
    // worker writes no file on PostgreSQL).
    let volumes: Vec<&Value> = m.pod()["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .collect();
    for mount in c["volumeMounts"].as_sequence().into_iter().flatten() {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == mount["name"])
            .expect("a mounted volume is declared");
        assert!(
            volume["emptyDir"].is_mapping() || mount["readOnly"] == true,
            "{volume:?}"
        );
    }
}

#[test]
fn replicas_share_postgres_and_a_drain_keeps_one_running() {
    let m = Manifests::load();
    let deployment = &m.kind("Deployment")["spec"];
    let replicas = deployment["replicas"].as_u64().unwrap();
    let url = &m.strings("Secret", "stringData")["database_url"];
    assert!(
        replicas == 1 || url.starts_with("postgres://"),
        "several replicas need PostgreSQL"
    );
    assert_eq!(deployment["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let labels = &deployment["template"]["metadata"]["labels"];
    assert_eq!(deployment["selector"]["matchLabels"], *labels);
    let pdb = &m.kind("PodDisruptionBudget")["spec"];
    assert_eq!(pdb["selector"]["matchLabels"], *labels);
    // At most one down at a time, and never a budget that blocks a drain.
    assert_eq!(pdb["maxUnavailable"], 1);
    assert!(pdb["minAvailable"].is_null());
}

/// The worker, set up as the manifests set it up (JSON logs, PostgreSQL,
/// the NATS user and password, a key ring in the environment), answers
/// every probe path the Deployment asks on; only the addresses are this
/// test's own, and the placeholder key is replaced by a real one.
#[tokio::test]
async fn the_probes_answer_on_a_worker_set_up_like_the_manifests() {
    let m = Manifests::load();
    let env = TestEnv::new();
    let nats = NatsServer::start().await;
    let key = generate_key();
    let mut vars = m.environment();
    vars.retain(|name, _| !["NATS_URL", "DATABASE_URL"].contains(&name.as_str()));
    vars.insert(
        "ROTATION_WORKER_TELEMETRY__HTTP_ADDR".into(),
        "127.0.0.1:0".into(),
    );
    vars.retain(|name, _| name != "DATABASE_URL_FILE");
    for (name, value) in vars.iter_mut() {
        if name.starts_with("ROTATION_WORKER_ENCRYPTION__KEYS__") {
            std::fs::write(&*value, key.expose_secret()).unwrap();
        }
    }
    let extra: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let worker = env.worker(&nats, &extra).await;
    let addr = worker.http_addr().await;
    let text = worker.logs.text();
    assert!(
        text.lines().next().is_some_and(|l| l.starts_with('{')),
        "JSON log lines"
    );
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = m.container()[probe]["httpGet"]["path"].as_str().unwrap();
        let (status, body) = http_get(&addr, path).await;
        assert_eq!(status, 200, "{probe} {path}: {body}");
    }
    let (code, _) = worker.terminate().await;
    assert_eq!(code, Some(0));
}

/// The worker's egress in the cluster: DNS, NATS, PostgreSQL, and HTTPS to
/// public addresses only (the cluster's and the cloud's private ranges and
/// the metadata address closed); in, only its metrics and probe port.
#[test]
fn the_network_policy_lets_the_worker_out_only_where_it_must_go() {
    let m = Manifests::load();
    let policy = &m.kind("NetworkPolicy")["spec"];
    let labels = &m.kind("Deployment")["spec"]["template"]["metadata"]["labels"];
    assert_eq!(policy["podSelector"]["matchLabels"], *labels);
    assert_eq!(
        policy["policyTypes"],
        Value::from(vec!["Ingress", "Egress"])
    );
    let ports = |rule: &Value| -> BTreeSet<u64> {
        rule["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_u64().unwrap())
            .collect()
    };
    let egress = policy["egress"].as_sequence().unwrap();
    let all: BTreeSet<u64> = egress.iter().flat_map(ports).collect();
    assert_eq!(all, BTreeSet::from([53, 443, 4222, 5432, 8200]));
    let public = egress
        .iter()
        .find(|rule| ports(rule).contains(&443))
        .expect("an HTTPS rule");
    let blocks = public["to"].as_sequence().unwrap();
    let v4 = blocks
        .iter()
        .find(|b| b["ipBlock"]["cidr"] == "0.0.0.0/0")
        .expect("IPv4 out");
    let except: BTreeSet<&str> = v4["ipBlock"]["except"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for closed in [
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
    ] {
        assert!(except.contains(closed), "{closed} is reachable");
    }
    let ingress = policy["ingress"].as_sequence().unwrap();
    let port = m.settings().telemetry.http_addr.unwrap().port();
    assert_eq!(
        ingress.iter().flat_map(ports).collect::<Vec<_>>(),
        [u64::from(port)]
    );
}
