//! `--vault`, second part: renewals (`vault.approle.renew`), the worker
//! minting, testing and storing each integration's next secret_id in the
//! benchmark's OpenBao, beside what OpenBao alone does for the same calls.
//!
//! A role `renewer` may renew its own secret_ids (the policy of
//! `docs/security.md`); `--renewal-concurrency` integrations each hold a
//! secret_id of it. The worker keeps no previous secret, so each renewal
//! also destroys the one it replaced: the steady state of a role renewed
//! again and again. Renewals are timed one at a time over the integrations
//! in turn, then with one in flight per integration. OpenBao alone is
//! asked the calls a renewal needs (login; the old secret's lookup; the
//! wrapped mint; the wrapping lookup; the unwrap; the new secret's
//! accessor lookup, for its expiry; its login and revocation; the old
//! one's destroy; the session's revocation), as many chains at once. The
//! worker's sweep for what an interrupted renewal left (a LIST of the
//! role's secret_ids and a lookup of each, done only after a renewal that
//! may have been interrupted) is not among them. With that LIST, OpenBao
//! 2.7's dev server refuses a share of concurrent mints on the role
//! ("transaction commit failed") even when called alone.

use std::time::Instant;

use anyhow::{Context, bail};
use rotation_worker::domain::{Name, NewIntegration, Owner, RoleId, SecretId, VaultAddress};
use rotation_worker::store::Store;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::vault::{Bao, Setup, Tally, ratio, us_per_call};
use super::{Latency, MachineCpu, Worker, latency, latency_row, round_trip_on};

/// The role the renewing integrations log in as.
const ROLE: &str = "renewer";

/// Its policy: what a renewal asks of OpenBao with the role's own token.
const POLICY: &str = r#"
path "auth/approle/role/renewer/secret-id" {
  capabilities = ["update"]
  min_wrapping_ttl = "1s"
  max_wrapping_ttl = "300s"
}
path "auth/approle/role/renewer/secret-id/" { capabilities = ["list"] }
path "auth/approle/role/renewer/secret-id/lookup" { capabilities = ["update"] }
path "auth/approle/role/renewer/secret-id-accessor/lookup" { capabilities = ["update"] }
path "auth/approle/role/renewer/secret-id-accessor/destroy" { capabilities = ["update"] }
"#;

/// The figures of renewals.
#[derive(Debug, Serialize)]
pub(crate) struct Renewals {
    sequential: Latency,
    sequential_per_second: f64,
    concurrent: Latency,
    concurrent_per_second: f64,
    concurrency: usize,
    /// OpenBao alone, the same calls per renewal, `concurrency` chains.
    bao_renewal_ceiling_per_second: f64,
    /// `concurrent_per_second / bao_renewal_ceiling_per_second`.
    concurrent_to_ceiling: f64,
    /// CPU time per renewal with `concurrency` in flight, in µs: the
    /// worker's, and every process's of the machine (OpenBao, the worker,
    /// the database, NATS, this benchmark).
    concurrent_worker_cpu_us: f64,
    concurrent_machine_cpu_us: f64,
    /// Every process's CPU time per renewal of OpenBao alone, in µs.
    bao_renewal_machine_cpu_us: f64,
    /// OpenBao's own CPU time per renewal, in µs: with `concurrency` in
    /// flight through the worker, and making the same calls alone.
    concurrent_bao_cpu_us: f64,
    bao_renewal_bao_cpu_us: f64,
    failures: usize,
}

impl Renewals {
    /// Fails unless every renewal succeeded.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        if self.failures > 0 {
            bail!("{} renewal(s) failed", self.failures);
        }
        Ok(())
    }

    pub(crate) fn print_rows(&self) {
        let c = self.concurrency;
        latency_row("renewal: one at a time", &self.sequential);
        latency_row(&format!("renewal: {c} in flight"), &self.concurrent);
        println!(
            "| renewals                           | {:.0}/s one at a time, {:.0}/s {c} in flight, {} failed |",
            self.sequential_per_second, self.concurrent_per_second, self.failures
        );
        println!(
            "| OpenBao alone: a renewal's calls, {c} chains | {:.0}/s; worker / OpenBao = {:.2}x |",
            self.bao_renewal_ceiling_per_second, self.concurrent_to_ceiling
        );
        println!(
            "| CPU per renewal, {c} in flight       | machine {:.0} µs (worker {:.0} µs); OpenBao alone, machine {:.0} µs |",
            self.concurrent_machine_cpu_us,
            self.concurrent_worker_cpu_us,
            self.bao_renewal_machine_cpu_us
        );
        println!(
            "| OpenBao's own CPU per renewal      | {:.0} µs through the worker, {:.0} µs alone ({:.2}x) |",
            self.concurrent_bao_cpu_us,
            self.bao_renewal_bao_cpu_us,
            ratio(self.concurrent_bao_cpu_us, self.bao_renewal_bao_cpu_us)
        );
    }
}

/// Runs the renewals against `bao`, with a worker of their own.
pub(crate) async fn measure(setup: &Setup<'_>, bao: &Bao) -> anyhow::Result<Renewals> {
    let role_id = renewing_role(bao).await?;
    let slots = setup.renewal_concurrency.max(1);
    let ids = seed(setup.store, bao, &role_id, slots).await?;
    let mut env = super::vault::worker_env(setup, slots);
    env.push((
        "ROTATION_WORKER_WORKER__PREVIOUS_SECRET_RETENTION_HOURS".into(),
        "0".into(),
    ));
    let worker = Worker::start(setup.worker_bin, &env, setup.worker_log).await?;
    let (sequential, sequential_time) = one_at_a_time(setup, &ids).await;
    let (worker_cpu, bao_cpu, machine) =
        (worker.cpu_seconds(), bao.cpu_seconds(), MachineCpu::now());
    let (concurrent, concurrent_time) = in_flight(setup, &ids).await;
    let (worker_cpu, bao_cpu, machine_cpu) = (
        worker.cpu_seconds() - worker_cpu,
        bao.cpu_seconds() - bao_cpu,
        MachineCpu::now().since(&machine).busy,
    );
    worker.stop().await?;
    let (machine, alone_cpu) = (MachineCpu::now(), bao.cpu_seconds());
    let (ceiling, renewed) = bao_alone(bao, &role_id, slots, setup.requests).await?;
    let ceiling_cpu = MachineCpu::now().since(&machine).busy;
    let alone_cpu = bao.cpu_seconds() - alone_cpu;

    let sequential_per_second = sequential.ms.len() as f64 / sequential_time;
    let done = concurrent.ms.len();
    let concurrent_per_second = done as f64 / concurrent_time;
    Ok(Renewals {
        failures: sequential.failures + concurrent.failures,
        sequential: latency(sequential.ms),
        sequential_per_second,
        concurrent: latency(concurrent.ms),
        concurrent_per_second,
        concurrency: slots,
        bao_renewal_ceiling_per_second: ceiling,
        concurrent_to_ceiling: ratio(concurrent_per_second, ceiling),
        concurrent_worker_cpu_us: us_per_call(worker_cpu, done),
        concurrent_machine_cpu_us: us_per_call(machine_cpu, done),
        bao_renewal_machine_cpu_us: us_per_call(ceiling_cpu, renewed),
        concurrent_bao_cpu_us: us_per_call(bao_cpu, done),
        bao_renewal_bao_cpu_us: us_per_call(alone_cpu, renewed),
    })
}

/// Role [`ROLE`] with its policy; returns its role_id.
async fn renewing_role(bao: &Bao) -> anyhow::Result<String> {
    bao.call(
        "sys/policies/acl/renewer",
        Some(json!({ "policy": POLICY })),
    )
    .await?;
    let role = format!("auth/approle/role/{ROLE}");
    let settings = json!({ "token_ttl": "5m", "token_policies": ["renewer"] });
    bao.call(&role, Some(settings)).await?;
    let answer = bao.call(&format!("{role}/role-id"), None).await?;
    answer["data"]["role_id"]
        .as_str()
        .map(str::to_owned)
        .context("no role_id in OpenBao's answer")
}

/// `n` integrations of role [`ROLE`], each holding a secret_id of it.
async fn seed(store: &dyn Store, bao: &Bao, role_id: &str, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut ids = Vec::with_capacity(n);
    for (i, secret) in bao.secret_ids_of(ROLE, n).await?.into_iter().enumerate() {
        let created = store
            .create_integration(&NewIntegration {
                owner: Owner::parse("bench")?,
                name: Name::parse(&format!("renewing-{i}"))?,
                address: VaultAddress::parse(&bao.addr)?,
                namespace: None,
                role_id: RoleId::parse(role_id)?,
                secret_id: SecretId::parse(secret)?,
            })
            .await?;
        ids.push(created.id);
    }
    Ok(ids)
}

fn renew_body(id: Uuid) -> bytes::Bytes {
    bytes::Bytes::from(json!({ "integrationId": id }).to_string())
}

/// `requests` renewals one at a time, over the integrations in turn.
async fn one_at_a_time(setup: &Setup<'_>, ids: &[Uuid]) -> (Tally, f64) {
    let mut tally = Tally::default();
    let started = Instant::now();
    for n in 0..setup.requests {
        let payload = renew_body(ids[n % ids.len()]);
        let reply = round_trip_on(setup.client, RENEW, setup.api_key, payload).await;
        tally.add(reply);
    }
    (tally, started.elapsed().as_secs_f64())
}

const RENEW: &str = "vault.approle.renew";

/// `requests` renewals, one in flight per integration.
async fn in_flight(setup: &Setup<'_>, ids: &[Uuid]) -> (Tally, f64) {
    let each = setup.requests.div_ceil(ids.len());
    let slots = ids.iter().map(|&id| async move {
        let mut tally = Tally::default();
        for _ in 0..each {
            let reply = round_trip_on(setup.client, RENEW, setup.api_key, renew_body(id)).await;
            tally.add(reply);
        }
        tally
    });
    Tally::timed(slots).await
}

/// OpenBao alone: `slots` chains, each renewing its own secret_id of
/// [`ROLE`] with the calls a renewal makes, `requests` renewals in all;
/// returns renewals per second and how many were made.
async fn bao_alone(
    bao: &Bao,
    role_id: &str,
    slots: usize,
    requests: usize,
) -> anyhow::Result<(f64, usize)> {
    let each = requests.div_ceil(slots);
    let firsts = bao.secret_ids_of(ROLE, slots).await?;
    let started = Instant::now();
    let chains = firsts.into_iter().map(|first| async move {
        let mut secret = first;
        for _ in 0..each {
            secret = renew_directly(bao, role_id, &secret).await?;
        }
        anyhow::Ok(())
    });
    for chain in futures::future::join_all(chains).await {
        chain?;
    }
    let renewed = each * slots;
    Ok((
        ratio(renewed as f64, started.elapsed().as_secs_f64()),
        renewed,
    ))
}

/// One renewal's calls, straight to OpenBao; returns the new secret_id.
async fn renew_directly(bao: &Bao, role_id: &str, secret: &str) -> anyhow::Result<String> {
    let role = format!("auth/approle/role/{ROLE}");
    let login = json!({ "role_id": role_id, "secret_id": secret });
    let token = bao.login(&login).await?;
    let found = bao
        .call_as(
            &token,
            &format!("{role}/secret-id/lookup"),
            Some(json!({ "secret_id": secret })),
            None,
        )
        .await?;
    let old = found["data"]["secret_id_accessor"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let minted = bao
        .call_as(
            &token,
            &format!("{role}/secret-id"),
            Some(json!({ "metadata": "{}" })),
            Some("60s"),
        )
        .await?;
    let wrapping = minted["wrap_info"]["token"]
        .as_str()
        .context("no wrapping token")?
        .to_owned();
    bao.call_as(
        &token,
        "sys/wrapping/lookup",
        Some(json!({ "token": wrapping })),
        None,
    )
    .await?;
    let unwrapped = bao
        .call_as(&wrapping, "sys/wrapping/unwrap", None::<Value>, None)
        .await?;
    let new = unwrapped["data"]["secret_id"]
        .as_str()
        .context("no secret_id")?
        .to_owned();
    let accessor = unwrapped["data"]["secret_id_accessor"]
        .as_str()
        .context("no secret_id_accessor")?;
    bao.call_as(
        &token,
        &format!("{role}/secret-id-accessor/lookup"),
        Some(json!({ "secret_id_accessor": accessor })),
        None,
    )
    .await?;
    let tested = bao
        .login(&json!({ "role_id": role_id, "secret_id": new }))
        .await?;
    bao.call_as(&tested, "auth/token/revoke-self", None::<Value>, None)
        .await?;
    bao.call_as(
        &token,
        &format!("{role}/secret-id-accessor/destroy"),
        Some(json!({ "secret_id_accessor": old })),
        None,
    )
    .await?;
    bao.call_as(&token, "auth/token/revoke-self", None::<Value>, None)
        .await?;
    Ok(new)
}
