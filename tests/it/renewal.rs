//! Renewal against a real OpenBao: the AppRole calls a renewal makes with
//! the role's own token (login, mint wrapped and tagged, unwrap with its
//! accessor, look up, list, destroy, end the session), under the policy
//! `docs/security.md` gives the role; then `vault.approle.renew` end to
//! end, on both stores: the new secret logs in, the old one is destroyed
//! (or kept for a rollback), a repeat mints nothing, a role without the
//! policy or a stored secret Vault rejects is a 422 that leaves nothing
//! behind in Vault. Vault's own list of the role's accessors is the
//! judge.

use std::str::FromStr;
use std::time::{Duration, Instant};

use rotation_worker::config::VaultSettings;
use rotation_worker::domain::SecretId;
use rotation_worker::store::RenewalRecord;
use rotation_worker::vault::{Network, RENEWAL_TAG, Session, Target, Vault, VaultError};
use serde_json::json;

use crate::helpers::{Backend, TestApp};
use crate::vault::{Bao, Issued, admit_loopback, integration_with, keeping_previous_for};
use crate::worker::{Fixture, Seen, body, headers};

/// The policy a role needs to renew its own secret_ids (the one
/// `docs/security.md` gives), for role `ci` of the mount `approle`.
pub const RENEWER_POLICY: &str = r#"
path "auth/approle/role/ci/secret-id" {
  capabilities = ["update"]
  min_wrapping_ttl = "1s"
  max_wrapping_ttl = "300s"
}
path "auth/approle/role/ci/secret-id/" {
  capabilities = ["list"]
}
path "auth/approle/role/ci/secret-id/lookup" {
  capabilities = ["update"]
}
path "auth/approle/role/ci/secret-id-accessor/lookup" {
  capabilities = ["update"]
}
path "auth/approle/role/ci/secret-id-accessor/destroy" {
  capabilities = ["update"]
}
"#;

/// Gives role `ci` the renewer policy; with `renew = false`, a role whose
/// tokens may do nothing of the kind.
pub async fn allow_renewal(bao: &Bao, renew: bool) {
    allow_renewal_in(bao, None, renew).await;
}

/// [`allow_renewal`] in namespace `ns`.
async fn allow_renewal_in(bao: &Bao, ns: Option<&str>, renew: bool) {
    bao.call(
        ns,
        "sys/policies/acl/renewer",
        json!({ "policy": RENEWER_POLICY }),
        false,
    )
    .await;
    let policies = if renew { json!(["renewer"]) } else { json!([]) };
    bao.call(
        ns,
        "auth/approle/role/ci",
        json!({ "token_policies": policies }),
        false,
    )
    .await;
}

/// A Vault client that may call a Bao on loopback over http.
fn client() -> Vault {
    Vault::new(&VaultSettings {
        allow_http: true,
        allowed_networks: vec![Network::from_str("127.0.0.0/8").unwrap()],
        ..VaultSettings::default()
    })
    .unwrap()
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// A Bao whose role `ci` may (or may not) renew, one secret_id of it, and
/// a client.
struct Role {
    bao: Bao,
    role_id: String,
    current: Issued,
    vault: Vault,
}

impl Role {
    async fn new(renew: bool) -> Self {
        let bao = Bao::start().await;
        let role_id = bao.approle(None).await;
        allow_renewal(&bao, renew).await;
        let current = bao.secret_id().await;
        Self {
            bao,
            role_id,
            current,
            vault: client(),
        }
    }

    fn target(&self) -> Target<'_> {
        Target {
            address: &self.bao.addr,
            namespace: None,
        }
    }

    fn secret(&self) -> SecretId {
        SecretId::parse(self.current.secret_id.clone()).unwrap()
    }

    async fn session(&self) -> Session {
        let (target, secret) = (self.target(), self.secret());
        self.vault
            .open(target, &self.role_id, &secret, soon())
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn the_role_mints_looks_up_lists_and_destroys_its_own_secret_ids() {
    let role = Role::new(true).await;
    let (vault, target, current) = (&role.vault, role.target(), &role.current);
    let session = role.session().await;
    assert_eq!(session.role_name, "ci");
    let token = vault
        .mint(
            target,
            &session,
            "r-1",
            Some("acc-0"),
            Duration::from_secs(60),
            soon(),
        )
        .await
        .unwrap();
    let minted = vault.unwrap_minted(target, &token, soon()).await.unwrap();
    assert_ne!(minted.secret.expose(), current.secret_id);

    let info = vault
        .secret_id_info(target, &session, &minted.accessor, soon())
        .await
        .unwrap()
        .expect("the minted secret_id is known");
    assert_eq!(info.renewal.as_deref(), Some("r-1"));
    assert_eq!(info.replaces.as_deref(), Some("acc-0"));
    assert_eq!(info.expires_at, None, "role ci sets no secret_id_ttl");
    let mut listed = vault.accessors(target, &session, soon()).await.unwrap();
    listed.sort();
    let mut expected = vec![current.accessor.clone(), minted.accessor.clone()];
    expected.sort();
    assert_eq!(listed, expected);

    // The new secret logs in; the old one is destroyed and no longer does.
    vault
        .login(target, &role.role_id, &minted.secret, soon())
        .await
        .unwrap();
    vault
        .destroy(target, &session, &current.accessor, soon())
        .await
        .unwrap();
    assert_eq!(
        vault
            .secret_id_info(target, &session, &current.accessor, soon())
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        vault.accessors(target, &session, soon()).await.unwrap(),
        vec![minted.accessor.clone()]
    );
    // Destroying it again is no error.
    vault
        .destroy(target, &session, &current.accessor, soon())
        .await
        .unwrap();
    vault.end(target, session).await;
    assert_eq!(
        vault
            .open(target, &role.role_id, &role.secret(), soon())
            .await
            .err(),
        Some(VaultError::Rejected)
    );
    // The tag is the one documented for operators.
    assert_eq!(RENEWAL_TAG, "rotation_worker_renewal");
}

#[tokio::test]
async fn a_role_without_the_policy_may_not_mint() {
    let role = Role::new(false).await;
    let (vault, target) = (&role.vault, role.target());
    let session = role.session().await;
    let refused = vault
        .mint(
            target,
            &session,
            "r-1",
            None,
            Duration::from_secs(60),
            soon(),
        )
        .await;
    assert_eq!(refused.err(), Some(VaultError::Refused(403)));
    vault.end(target, session).await;
}

const RENEW: &str = "vault.approle.renew";

/// The accessors of every live secret_id of role `ci`, sorted, as root
/// sees them.
async fn live_accessors(bao: &Bao) -> Vec<String> {
    live_accessors_in(bao, None).await
}

/// [`live_accessors`] in namespace `ns`.
async fn live_accessors_in(bao: &Bao, ns: Option<&str>) -> Vec<String> {
    let answer = reqwest::Client::new()
        .get(format!(
            "{}/v1/auth/approle/role/ci/secret-id?list=true",
            bao.addr
        ))
        .header("X-Vault-Token", "root")
        .header("X-Vault-Namespace", ns.unwrap_or(""))
        .send()
        .await
        .unwrap();
    if answer.status() == reqwest::StatusCode::NOT_FOUND {
        return Vec::new();
    }
    let body: serde_json::Value = serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap();
    let mut keys: Vec<String> = body["data"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_owned())
        .collect();
    keys.sort();
    keys
}

/// The leak search of `f` over `logs`, covering every secret_id the test
/// used and every token Bao handed out (the worker's client tokens, the
/// wrapping tokens of what it minted).
async fn assert_nothing_leaked(f: &mut Fixture, bao: &Bao, logs: &str) {
    let tokens = bao.tokens();
    assert!(!tokens.is_empty(), "Bao's audit log names its tokens");
    for token in &tokens {
        f.remember_secret(token);
    }
    f.assert_no_secret_leaked(logs).await;
}

/// A renewing world on `backend`: a Bao whose role `ci` may renew (or
/// not), an integration holding secret_id `a` of it, and a worker keeping
/// a replaced secret `retention_hours`.
async fn world(
    backend: Backend,
    renew: bool,
    retention_hours: &str,
) -> (Fixture, Bao, Issued, uuid::Uuid, TestApp) {
    let (f, bao, a, id, _) = no_worker_yet(backend, renew).await;
    let app = keeping_previous_for(&f, retention_hours).await;
    (f, bao, a, id, app)
}

/// [`world`] without its worker: the integration's id and its role_id.
async fn no_worker_yet(
    backend: Backend,
    renew: bool,
) -> (Fixture, Bao, Issued, uuid::Uuid, String) {
    let mut f = Fixture::on(backend).await;
    admit_loopback(&mut f);
    let bao = Bao::start().await;
    let role_id = bao.approle(None).await;
    allow_renewal(&bao, renew).await;
    let a = bao.secret_id().await;
    let record = integration_with(&mut f, &bao.addr, None, &role_id, &a.secret_id).await;
    (f, bao, a, record.id, role_id)
}

/// Renews `id` by request with `msg_id`, checking it applied; returns the
/// new secret (remembered for the leak search).
async fn renewed(f: &mut Fixture, msg_id: &str, id: uuid::Uuid) -> String {
    let reply = renew(f, Some(msg_id), id).await;
    let error = reply.header("Nats-Service-Error-Code");
    assert_eq!(error, None, "{:?}", reply.body);
    let new = f.secret(id).await;
    f.remember_secret(&new);
    new
}

async fn renew(f: &mut Fixture, msg_id: Option<&str>, id: uuid::Uuid) -> Seen {
    let key = f.key.clone();
    f.request_to(
        RENEW,
        headers(Some(&key), msg_id),
        body(json!({ "integrationId": id })),
    )
    .await
}

/// Whether `secret` logs in as role `ci` (one use of it).
async fn logs_in(bao: &Bao, role_id: &str, secret: &str) -> bool {
    let target = Target {
        address: &bao.addr,
        namespace: None,
    };
    let secret = SecretId::parse(secret.to_owned()).unwrap();
    client()
        .login(target, role_id, &secret, soon())
        .await
        .is_ok()
}

async fn renewed_at_once_and_the_old_secret_destroyed(backend: Backend) {
    let (mut f, bao, a, id, app) = world(backend, true, "0").await;
    let before = f.record(id).await;

    let reply = renew(&mut f, Some("rn-1"), id).await;
    assert_eq!(
        reply.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        reply.body
    );
    let after = f.record(id).await;
    assert_eq!(reply.body, json!(after));
    assert!(after.updated_at > before.updated_at, "updatedAt bumped");
    let new = f.secret(id).await;
    f.remember_secret(&new);
    assert_ne!(new, a.secret_id);
    assert_eq!(f.rotation_count(id).await, 1);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.header("Rotation-Operation"), Some("renew"));
    assert_eq!(done.header("Rotation-Event-Id"), Some("rn-1"));
    assert_eq!(done.body, reply.body);
    // Everything it minted and replaced is stored or destroyed: the next
    // renewal need not look for leftovers.
    assert!(!f.store.sweep_due(id).await);
    // Exactly one live secret_id: the new one; the old one is destroyed.
    let live = live_accessors(&bao).await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert!(!live.contains(&a.accessor));
    let role_id = after.role_id.clone();
    assert!(
        logs_in(&bao, &role_id, &new).await,
        "the new secret logs in"
    );
    assert!(!logs_in(&bao, &role_id, &a.secret_id).await);

    // A repeat answers the first record and mints nothing.
    let again = renew(&mut f, Some("rn-1"), id).await;
    assert_eq!(again.body, reply.body);
    assert_eq!(live_accessors(&bao).await, live);
    assert_eq!(f.secret(id).await, new);
    assert_eq!(f.rotation_count(id).await, 1);

    // A second renewal replaces the first one's secret in turn.
    let second = renew(&mut f, Some("rn-2"), id).await;
    assert_eq!(
        second.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        second.body
    );
    let newer = f.secret(id).await;
    f.remember_secret(&newer);
    let now_live = live_accessors(&bao).await;
    assert_eq!(now_live.len(), 1);
    assert_ne!(now_live, live);
    assert!(logs_in(&bao, &role_id, &newer).await);

    let logs = app.stop().await;
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

async fn within_retention_the_old_secret_is_kept_for_a_rollback(backend: Backend) {
    let (mut f, bao, a, id, app) = world(backend, true, "24").await;
    renewed(&mut f, "rn-keep", id).await;
    let live = live_accessors(&bao).await;
    assert_eq!(live.len(), 2, "the new one and the kept one: {live:?}");
    assert!(live.contains(&a.accessor));
    let key = f.key.clone();
    let back = crate::lifecycle::rollback(&mut f, Some(&key), Some("rb-keep"), id).await;
    assert_eq!(
        back.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        back.body
    );
    assert_eq!(f.secret(id).await, a.secret_id, "the old secret is back");
    let logs = app.stop().await;
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

async fn a_role_without_the_policy_is_a_422_that_mints_nothing(backend: Backend) {
    let (mut f, bao, a, id, app) = world(backend, false, "0").await;
    let reply = renew(&mut f, Some("rn-403"), id).await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("422"));
    assert_eq!(
        reply.body["error"],
        "the role may not renew its own secret_id"
    );
    assert_eq!(f.secret(id).await, a.secret_id);
    assert_eq!(f.rotation_count(id).await, 0);
    assert_eq!(live_accessors(&bao).await, vec![a.accessor.clone()]);
    let failed = f.next_outcome().await;
    assert_eq!(failed.subject, "vault.approle.rotation.failed");
    assert_eq!(failed.header("Rotation-Operation"), Some("renew"));
    let logs = app.stop().await;
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

async fn a_stored_secret_vault_rejects_is_a_422(backend: Backend) {
    let (mut f, bao, a, id, app) = world(backend, true, "0").await;
    bao.destroy_secret_id(&a.secret_id).await;
    let reply = renew(&mut f, Some("rn-rejected"), id).await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("422"));
    assert_eq!(reply.body["error"], "Vault rejected the stored secret_id");
    assert_eq!(f.secret(id).await, a.secret_id);
    assert_eq!(live_accessors(&bao).await, Vec::<String>::new());
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// A renewal of an integration whose renewal another worker (or the
/// schedule) holds is a 503 that asks Vault nothing and leaves the other's
/// claim in place: two at once would each sweep up what the other minted.
/// Once the claim ends, a renewal by request takes it and ends it.
async fn a_renewal_under_way_elsewhere_is_a_503_that_changes_nothing(backend: Backend) {
    let (mut f, bao, a, id, app) = world(backend, true, "0").await;
    let store = f.store.shared();
    let now = time::OffsetDateTime::now_utc();
    let until = now + time::Duration::minutes(5);
    let other = Some("another-renewal");
    assert!(store.claim_renewal(id, other, now, until).await.unwrap());

    let reply = renew(&mut f, Some("rn-busy"), id).await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("503"));
    assert_eq!(
        reply.body["error"],
        "a renewal of this integration is under way; the rotation was not applied"
    );
    let failed = f.next_outcome().await;
    assert_eq!(failed.subject, "vault.approle.rotation.failed");
    assert_eq!(failed.header("Rotation-Operation"), Some("renew"));
    assert_eq!(f.secret(id).await, a.secret_id);
    assert_eq!(f.rotation_count(id).await, 0);
    assert_eq!(live_accessors(&bao).await, vec![a.accessor.clone()]);
    let state = store.renewal_state(id).await.unwrap();
    assert_eq!(
        state.claimed_until.map(|t| t.unix_timestamp()),
        Some(until.unix_timestamp()),
        "the other's claim is kept"
    );
    assert_eq!(state.failures, 0, "nothing recorded: {state:?}");

    store
        .record_renewal(id, RenewalRecord::Released)
        .await
        .unwrap();
    assert_eq!(store.renewal_state(id).await.unwrap().claimed_until, None);
    let new = renewed(&mut f, "rn-free", id).await;
    assert_ne!(new, a.secret_id);
    let state = store.renewal_state(id).await.unwrap();
    assert_eq!(state.claimed_until, None, "ended with its record");
    assert_eq!(live_accessors(&bao).await.len(), 1);
    let logs = app.stop().await;
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

/// A worker killed at `point` of a renewal (retention 0), and the caller
/// asking again with the same `Nats-Msg-Id` of a healthy worker: one
/// rotation, one outcome, and exactly one live secret_id, the stored one.
async fn a_renewal_interrupted_at(backend: Backend, point: &str) {
    let (mut f, bao, a, id, role_id) = no_worker_yet(backend, true).await;
    // As after a renewal that accounted for everything it minted: the next
    // one sweeps only because the interrupted one marks it before minting.
    f.store.set_renewal_sweep_due(id, false).await.unwrap();
    let retention = (
        "ROTATION_WORKER_WORKER__PREVIOUS_SECRET_RETENTION_HOURS",
        "0",
    );
    let doomed = f
        .env
        .worker(&f.nats, &[retention, ("ROTATION_WORKER_CRASHPOINT", point)])
        .await;
    let key = f.key.clone();
    let client = f.client.clone();
    let first = headers(Some(&key), Some("rn-crash"));
    let asked = tokio::spawn(async move {
        let body = body(json!({ "integrationId": id }));
        client.request_with_headers(RENEW, first, body).await
    });
    doomed
        .wait_for_log("aborting at the configured crash point")
        .await;
    let mut logs = doomed.kill().await;
    asked.abort();
    // Killed before its retirement, it has not accounted for what it
    // minted; after its commit (and retirement), it has.
    let retired = point == "after-commit";
    let due = f.store.sweep_due(id).await;
    assert_eq!(due, !retired, "{point}");

    let worker = f.env.worker(&f.nats, &[retention]).await;
    let reply = renew(&mut f, Some("rn-crash"), id).await;
    assert_eq!(
        reply.header("Nats-Service-Error-Code"),
        None,
        "{:?}",
        reply.body
    );
    let stored = f.secret(id).await;
    f.remember_secret(&stored);
    assert_ne!(stored, a.secret_id);
    assert_eq!(f.rotation_count(id).await, 1);
    let live = live_accessors(&bao).await;
    assert_eq!(live.len(), 1, "{point}: {live:?}");
    assert!(
        !live.contains(&a.accessor),
        "{point}: the old one is destroyed"
    );
    assert!(logs_in(&bao, &role_id, &stored).await, "{point}");
    assert_eq!(f.store.unwrapped_rows(id).await, 0, "nothing kept");
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.body, reply.body);
    logs.push_str(&worker.kill().await);
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

async fn a_renewal_killed_after_minting_destroys_the_orphan_when_asked_again(backend: Backend) {
    a_renewal_interrupted_at(backend, "after-mint-before-unwrap").await;
}

async fn a_renewal_killed_after_sealing_completes_with_the_sealed_secret(backend: Backend) {
    a_renewal_interrupted_at(backend, "after-mint-sealed").await;
}

async fn a_renewal_killed_after_its_commit_still_destroys_the_old_secret(backend: Backend) {
    a_renewal_interrupted_at(backend, "before-retire").await;
}

async fn a_renewal_killed_before_its_reply_is_answered_as_a_repeat(backend: Backend) {
    a_renewal_interrupted_at(backend, "after-commit").await;
}

/// The schedule's settings: renew 15 s before expiry, look every second,
/// keep no previous secret.
const SCHEDULED: [(&str, &str); 3] = [
    ("ROTATION_WORKER_RENEWAL__BEFORE_EXPIRY_SECS", "15"),
    ("ROTATION_WORKER_RENEWAL__CHECK_INTERVAL_SECS", "1"),
    (
        "ROTATION_WORKER_WORKER__PREVIOUS_SECRET_RETENTION_HOURS",
        "0",
    ),
];

/// A renewing world whose role's secret_ids live 20 s, renewed once by
/// request so that the expiry of its secret is known: the schedule then
/// renews it 5 s after each renewal.
async fn scheduled_world(backend: Backend) -> (Fixture, Bao, Issued, uuid::Uuid, String) {
    let (f, bao, a, id, role_id) = no_worker_yet(backend, true).await;
    bao.call(
        None,
        "auth/approle/role/ci",
        json!({ "secret_id_ttl": "20s" }),
        false,
    )
    .await;
    (f, bao, a, id, role_id)
}

/// The next completion event of a renewal, and its event id.
async fn next_renewal(f: &mut Fixture) -> String {
    let done = f.next_outcome().await;
    assert_eq!(
        done.subject, "vault.approle.rotation.completed",
        "{:?}",
        done.body
    );
    assert_eq!(done.header("Rotation-Operation"), Some("renew"));
    done.header("Rotation-Event-Id")
        .unwrap_or_default()
        .to_owned()
}

/// Renews `id` by request (`rn-first`), so that its expiry is known.
async fn renewed_once_by_request(f: &mut Fixture, id: uuid::Uuid) {
    let first = renew(f, Some("rn-first"), id).await;
    let error = first.header("Nats-Service-Error-Code");
    assert_eq!(error, None, "{:?}", first.body);
    assert_eq!(next_renewal(f).await, "rn-first");
}

/// The next two renewals, which the schedule makes, each with an event id
/// of its own.
async fn renewed_twice_by_the_schedule(f: &mut Fixture, id: uuid::Uuid) {
    let scheduled = [next_renewal(f).await, next_renewal(f).await];
    for event in &scheduled {
        assert!(event.starts_with(&format!("renewal-{id}-")), "{event}");
    }
    assert_ne!(scheduled[0], scheduled[1], "each due renewal once");
    // Every outcome so far a completion, one rotation each.
    assert_eq!(f.rotation_count(id).await, 3);
}

async fn the_schedule_renews_before_expiry_again_and_again(backend: Backend) {
    let (mut f, bao, _a, id, role_id) = scheduled_world(backend).await;
    let app = f.env.spawn_worker(&f.nats, &SCHEDULED).await;
    renewed_once_by_request(&mut f, id).await;
    let key = f.key.clone();
    let known = crate::lifecycle::status(&mut f, Some(&key), id).await;
    let expires = known.body["secretExpiresAt"]
        .as_str()
        .expect("expiry known")
        .to_owned();
    assert!(known.body["lastRenewedAt"].is_string(), "{:?}", known.body);
    assert!(known.body["nextRenewalAt"].is_string(), "{:?}", known.body);

    renewed_twice_by_the_schedule(&mut f, id).await;
    let stored = f.secret(id).await;
    f.remember_secret(&stored);
    assert_eq!(live_accessors(&bao).await.len(), 1, "one live secret_id");
    assert!(logs_in(&bao, &role_id, &stored).await);
    let later = crate::lifecycle::status(&mut f, Some(&key), id).await;
    assert_ne!(
        later.body["secretExpiresAt"].as_str(),
        Some(expires.as_str())
    );
    let logs = app.stop().await;
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

#[tokio::test]
async fn two_workers_on_postgresql_renew_each_due_renewal_once() {
    let (mut f, bao, _a, id, _role_id) = scheduled_world(Backend::Postgres).await;
    let one = f.env.spawn_worker(&f.nats, &SCHEDULED).await;
    let two = f.env.spawn_worker(&f.nats, &SCHEDULED).await;
    renewed_once_by_request(&mut f, id).await;
    renewed_twice_by_the_schedule(&mut f, id).await;
    assert_eq!(live_accessors(&bao).await.len(), 1);
    let stored = f.secret(id).await;
    f.remember_secret(&stored);
    let mut logs = one.stop().await;
    logs.push_str(&two.stop().await);
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

/// A due renewal is claimed by one worker at a time: a second claim fails
/// until the first one's outcome is recorded or its claim runs out.
async fn a_renewal_is_claimed_by_one_worker_at_a_time(backend: Backend) {
    let (f, _bao, _a, id, _role_id) = no_worker_yet(backend, true).await;
    let store = f.store.shared();
    let now = time::OffsetDateTime::now_utc();
    let until = now + time::Duration::seconds(30);
    let (one, two) = (Some("renewal-one"), Some("renewal-two"));
    assert!(store.claim_renewal(id, one, now, until).await.unwrap());
    assert!(
        !store.claim_renewal(id, two, now, until).await.unwrap(),
        "held"
    );
    assert!(
        !store.claim_renewal(id, None, now, until).await.unwrap(),
        "held"
    );
    assert!(
        store.claim_renewal(id, one, now, until).await.unwrap(),
        "its holder takes it back"
    );
    let later = until + time::Duration::seconds(1);
    assert!(
        store
            .claim_renewal(id, two, later, later + time::Duration::seconds(30))
            .await
            .unwrap(),
        "run out"
    );
    store
        .record_renewal(id, RenewalRecord::Failed(later))
        .await
        .unwrap();
    assert!(
        store
            .claim_renewal(id, None, later, later + time::Duration::seconds(30))
            .await
            .unwrap(),
        "ended"
    );
    // A renewal with nothing to record (a repeat) only ends its claim.
    store
        .record_renewal(id, RenewalRecord::Released)
        .await
        .unwrap();
    let state = store.renewal_state(id).await.unwrap();
    assert_eq!(state.claimed_until, None, "released");
    assert_eq!(state.failures, 1);
    assert_eq!(state.expires_at, None, "unknown");
    store
        .record_renewal(id, RenewalRecord::Refused)
        .await
        .unwrap();
    let state = store.renewal_state(id).await.unwrap();
    assert!(state.stopped && state.failures == 0, "{state:?}");
    let expires_at = Some(later + time::Duration::hours(1));
    // The record of a renewal applied also says whether the next one must
    // sweep: only when this one left something in Vault unaccounted for.
    for swept in [false, true] {
        store
            .record_renewal(
                id,
                RenewalRecord::Renewed {
                    expires_at,
                    at: later,
                    swept,
                },
            )
            .await
            .unwrap();
        assert_eq!(f.store.sweep_due(id).await, !swept);
    }
    let state = store.renewal_state(id).await.unwrap();
    assert!(!state.stopped);
    assert_eq!(
        state.expires_at.flatten().map(|t| t.unix_timestamp()),
        expires_at.map(|t| t.unix_timestamp())
    );
    // A rotation changes the secret: its expiry is unknown again.
    let mut f = f;
    let app = f.env.spawn_worker(&f.nats, &[]).await;
    crate::lifecycle::rotate(&mut f, Some("by-hand"), id, "s.rotated-by-hand", None).await;
    assert_eq!(store.renewal_state(id).await.unwrap().expires_at, None);
    // A secret's expiry (as a verifying login learns it) is recorded only
    // while the integration holds that secret: told by its digest, or,
    // for a row without one, by the secret itself.
    let secret = |s: &str| rotation_worker::domain::SecretId::parse(s.to_owned()).unwrap();
    let (another, held) = (secret("s.another"), secret("s.rotated-by-hand"));
    let recorded = store.record_expiry(id, &another, expires_at).await;
    assert!(!recorded.unwrap(), "another secret's");
    assert_eq!(store.renewal_state(id).await.unwrap().expires_at, None);
    for (hours, digest) in [(2, "kept"), (3, "forgotten")] {
        if digest == "forgotten" {
            f.store.forget_digest(id).await;
        }
        let at = Some(later + time::Duration::hours(hours));
        let recorded = store.record_expiry(id, &held, at).await;
        assert!(recorded.unwrap(), "the secret held, its digest {digest}");
        let known = store.renewal_state(id).await.unwrap().expires_at.flatten();
        assert_eq!(
            known.map(|t| t.unix_timestamp()),
            at.map(|t| t.unix_timestamp()),
            "{digest}"
        );
    }
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// `integration renew --id`: an operator renews for any owner; the new
/// secret logs in, the outcome event is published, and the key it acted
/// with is the owner's schedule key, listed among the owner's keys.
async fn an_operator_renews_from_the_cli(backend: Backend) {
    let (mut f, bao, a, id, role_id) = no_worker_yet(backend, true).await;
    let app = f.env.spawn_worker(&f.nats, &[]).await;
    f.env.env.insert("NATS_URL".to_owned(), f.nats.url.clone());
    let list = ["api-key", "list", "--owner", "acme"];
    let before = f.env.cli(&list, "").await.json();
    let renewed = f
        .env
        .cli(&["integration", "renew", "--id", &id.to_string()], "")
        .await;
    let record = renewed.json();
    assert_eq!(record["id"], json!(id), "{record}");
    let new = f.secret(id).await;
    f.remember_secret(&new);
    assert_ne!(new, a.secret_id);
    assert!(logs_in(&bao, &role_id, &new).await);
    let done = f.next_outcome().await;
    assert_eq!(done.subject, "vault.approle.rotation.completed");
    assert_eq!(done.header("Rotation-Operation"), Some("renew"));
    assert_eq!(done.body, record);
    let keys = f.env.cli(&list, "").await;
    let count = |keys: &serde_json::Value| keys.as_array().map_or(0, Vec::len);
    assert_eq!(
        count(&keys.json()),
        count(&before) + 1,
        "the schedule's key"
    );
    let missing = f
        .env
        .cli(
            &[
                "integration",
                "renew",
                "--id",
                &uuid::Uuid::nil().to_string(),
            ],
            "",
        )
        .await;
    missing.assert_fails_with("no integration with id");
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&format!("{logs}{}{}", renewed.stderr, keys.stdout))
        .await;
}

/// A namespaced integration is renewed in its namespace, and the root
/// namespace's role is not touched.
async fn a_namespaced_integration_is_renewed_in_its_namespace(backend: Backend) {
    let mut f = Fixture::on(backend).await;
    admit_loopback(&mut f);
    let bao = Bao::start().await;
    bao.call(None, "sys/namespaces/team", json!({}), false)
        .await;
    let role_id = bao.approle(Some("team")).await;
    allow_renewal_in(&bao, Some("team"), true).await;
    let issued = bao
        .call(
            Some("team"),
            "auth/approle/role/ci/secret-id",
            json!({}),
            false,
        )
        .await;
    let a = issued["data"]["secret_id"].as_str().unwrap().to_owned();
    let record = integration_with(&mut f, &bao.addr, Some("team"), &role_id, &a).await;
    let app = keeping_previous_for(&f, "0").await;
    let reply = renew(&mut f, Some("rn-team"), record.id).await;
    let error = reply.header("Nats-Service-Error-Code");
    assert_eq!(error, None, "{:?}", reply.body);
    let new = f.secret(record.id).await;
    f.remember_secret(&new);
    assert_ne!(new, a);
    assert_eq!(live_accessors_in(&bao, Some("team")).await.len(), 1);
    let logs = app.stop().await;
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

/// A Vault that is down is a 503 that changes nothing, as everywhere.
async fn a_renewal_of_a_vault_that_is_down_is_a_503(backend: Backend) {
    let (mut f, bao, a, id, _) = no_worker_yet(backend, true).await;
    drop(bao);
    let app = f
        .env
        .spawn_worker(
            &f.nats,
            &[
                ("ROTATION_WORKER_VAULT__TIMEOUT_MS", "300"),
                ("ROTATION_WORKER_WORKER__RETRY_BUDGET_MS", "1000"),
            ],
        )
        .await;
    let reply = renew(&mut f, Some("rn-down"), id).await;
    assert_eq!(reply.header("Nats-Service-Error-Code"), Some("503"));
    assert_eq!(f.secret(id).await, a.secret_id);
    assert_eq!(f.rotation_count(id).await, 0);
    let failed = f.next_outcome().await;
    assert_eq!(failed.subject, "vault.approle.rotation.failed");
    let state = f.store.shared().renewal_state(id).await.unwrap();
    assert_eq!(state.failures, 1, "tried again later");
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// With `vault.verify = "login"` a rotation's new secret is looked up with
/// the token its verification got: the status then knows its expiry.
async fn a_verifying_login_records_the_new_secrets_expiry(backend: Backend) {
    let (mut f, bao, _a, id, _) = scheduled_world(backend).await;
    let verify = [("ROTATION_WORKER_VAULT__VERIFY", "login")];
    let app = f.env.spawn_worker(&f.nats, &verify).await;
    let key = f.key.clone();
    let before = crate::lifecycle::status(&mut f, Some(&key), id).await;
    assert_eq!(before.body["secretExpiresAt"], serde_json::Value::Null);
    let b = bao.secret_id().await;
    crate::lifecycle::rotate(&mut f, Some("rot-b"), id, &b.secret_id, None).await;
    let after = crate::lifecycle::status(&mut f, Some(&key), id).await;
    assert!(
        after.body["secretExpiresAt"].is_string(),
        "{:?}",
        after.body
    );
    assert_eq!(
        after.body["lastRenewedAt"],
        serde_json::Value::Null,
        "not a renewal"
    );
    let logs = app.stop().await;
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

/// `renewal.discover_expiry`: the schedule looks up the expiry of a secret
/// it does not know, with one login (one use of the secret_id), once. The
/// integration's secret_id was issued before its role had a TTL: it never
/// expires, which is known now.
async fn the_schedule_discovers_an_unknown_expiry_with_one_login(backend: Backend) {
    let (mut f, bao, a, id, _) = scheduled_world(backend).await;
    let discover = [
        ("ROTATION_WORKER_RENEWAL__DISCOVER_EXPIRY", "true"),
        ("ROTATION_WORKER_RENEWAL__CHECK_INTERVAL_SECS", "1"),
    ];
    let app = f.env.spawn_worker(&f.nats, &discover).await;
    let store = f.store.shared();
    let mut known = None;
    for _ in 0..100 {
        known = store.renewal_state(id).await.unwrap().expires_at;
        if known.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(known, Some(None), "discovered: it never expires");
    // Known now: the next checks do not log in again.
    app.wait_for_logs("the renewal schedule looked", 5).await;
    assert_eq!(bao.uses_left(None, &a.accessor).await, 4, "one login");
    let logs = app.stop().await;
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

/// The contract's order: 401 (no key, an unknown key), 400 (the body),
/// 404 (none, or another owner's; a role that names none); nothing is
/// minted for any of them.
async fn a_renewal_is_checked_in_the_contracts_order(backend: Backend) {
    let (mut f, bao, a, id, app) = world(backend, true, "0").await;
    let send = |key: Option<String>, body: serde_json::Value| {
        let headers = headers(key.as_deref(), None);
        (headers, crate::worker::body(body))
    };
    let cases = [
        (
            None,
            json!({ "integrationId": id }),
            401,
            "missing Authorization header: send `Authorization: Bearer <apiKey>`",
            None,
        ),
        (
            Some("rwk_unknown".to_owned()),
            json!({ "integrationId": id }),
            401,
            "unknown or revoked API key",
            None,
        ),
        (
            Some(f.key.clone()),
            json!({ "integrationId": "nope" }),
            400,
            "integrationId must be a UUID string",
            None,
        ),
        (
            Some(f.key.clone()),
            json!({ "integrationId": uuid::Uuid::nil() }),
            404,
            "integration not found",
            Some(uuid::Uuid::nil()),
        ),
        (
            Some(f.key.clone()),
            json!({ "roleId": "no-such-role" }),
            404,
            "no integration has this roleId",
            None,
        ),
    ];
    for (key, body, status, error, named) in cases {
        let (headers, body) = send(key, body);
        let reply = f.request_to(RENEW, headers, body).await;
        crate::lifecycle::assert_failure(&reply, status, error, named, None);
    }
    assert_eq!(
        live_accessors(&bao).await,
        vec![a.accessor.clone()],
        "nothing minted"
    );
    assert_eq!(f.secret(id).await, a.secret_id);
    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}

/// With a retention, the replaced secret lives for a rollback; when its
/// retention ends the worker destroys it in Vault and erases it.
async fn the_replaced_secret_is_destroyed_when_its_retention_ends(backend: Backend) {
    let (mut f, bao, a, id, app) = world(backend, true, "24").await;
    renewed(&mut f, "rn-kept", id).await;
    assert_eq!(live_accessors(&bao).await.len(), 2, "kept for a rollback");
    let mut logs = app.stop().await;
    f.store.expire_previous(id).await;
    let app = keeping_previous_for(&f, "24").await;
    app.wait_for_log("destroyed the secret_id a renewal replaced")
        .await;
    let live = live_accessors(&bao).await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert!(!live.contains(&a.accessor));
    app.wait_for_log("erased expired previous secrets").await;
    let key = f.key.clone();
    let back = crate::lifecycle::rollback(&mut f, Some(&key), Some("rb-late"), id).await;
    assert_eq!(back.header("Nats-Service-Error-Code"), Some("409"));
    logs.push_str(&app.stop().await);
    assert_nothing_leaked(&mut f, &bao, &logs).await;
}

crate::on_both_stores!(
    the_replaced_secret_is_destroyed_when_its_retention_ends,
    a_renewal_is_checked_in_the_contracts_order,
    the_schedule_discovers_an_unknown_expiry_with_one_login,
    a_verifying_login_records_the_new_secrets_expiry,
    a_namespaced_integration_is_renewed_in_its_namespace,
    a_renewal_of_a_vault_that_is_down_is_a_503,
    an_operator_renews_from_the_cli,
    a_renewal_is_claimed_by_one_worker_at_a_time,
    the_schedule_renews_before_expiry_again_and_again,
    a_renewal_killed_after_minting_destroys_the_orphan_when_asked_again,
    a_renewal_killed_after_sealing_completes_with_the_sealed_secret,
    a_renewal_killed_after_its_commit_still_destroys_the_old_secret,
    a_renewal_killed_before_its_reply_is_answered_as_a_repeat,
    renewed_at_once_and_the_old_secret_destroyed,
    within_retention_the_old_secret_is_kept_for_a_rollback,
    a_role_without_the_policy_is_a_422_that_mints_nothing,
    a_stored_secret_vault_rejects_is_a_422,
    a_renewal_under_way_elsewhere_is_a_503_that_changes_nothing,
);
