//! Renewal against a real OpenBao: the AppRole calls a renewal makes with
//! the role's own token (login, mint wrapped and tagged, unwrap with its
//! accessor, look up, list, destroy, end the session), under the policy
//! `docs/security.md` gives the role.

use std::str::FromStr;
use std::time::{Duration, Instant};

use rotation_worker::config::VaultSettings;
use rotation_worker::domain::SecretId;
use rotation_worker::vault::{Network, RENEWAL_TAG, Session, Target, Vault, VaultError};
use serde_json::json;

use crate::vault::{Bao, Issued};

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
    bao.call(
        None,
        "sys/policies/acl/renewer",
        json!({ "policy": RENEWER_POLICY }),
        false,
    )
    .await;
    let policies = if renew { json!(["renewer"]) } else { json!([]) };
    bao.call(
        None,
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
        .mint(target, &session, "r-1", Duration::from_secs(60), soon())
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
        .mint(target, &session, "r-1", Duration::from_secs(60), soon())
        .await;
    assert_eq!(refused.err(), Some(VaultError::Refused(403)));
    vault.end(target, session).await;
}
