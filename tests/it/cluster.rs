//! Beyond one machine: the worker on a three-node JetStream cluster with
//! its streams at three replicas. The node that leads the inbound stream is
//! SIGKILLed mid-drain, twice (a different node each time), and every event
//! still gets exactly one outcome and one stored record; a worker whose node
//! dies reconnects to another and serves; `/readyz` says when the inbound
//! stream has lost its quorum and recovers with it; a worker started
//! without a quorum waits for it instead of exiting.

use std::time::Duration;

use async_nats::jetstream;
use serde_json::json;

use crate::faults::{
    RESILIENT, Workload, assert_clean, wait_for_drained_after_failovers, wait_for_outcomes,
};
use crate::helpers::{
    NatsCluster, TestEnv, Worker, create_api_key, create_integration, http_get, secret_of,
};
use crate::worker::{body, headers};

/// Every stream at three replicas.
pub const R3: (&str, &str) = ("ROTATION_WORKER_WORKER__REPLICAS", "3");

/// The real worker binary on the cluster's seed list, once it is ready.
async fn worker_on(env: &TestEnv, cluster: &NatsCluster, extra: &[(&str, &str)]) -> Worker {
    let mut settings = vec![R3];
    settings.extend_from_slice(extra);
    let worker = env.start_worker(&cluster.url(), &settings);
    worker.wait_for_log("rotation-worker ready").await;
    worker
}

#[tokio::test]
async fn losing_the_stream_leader_twice_mid_drain_loses_nothing_and_applies_nothing_twice() {
    let mut cluster = NatsCluster::start().await;
    let env = TestEnv::new();
    let js = jetstream::new(cluster.client().await);
    let store = env.store().await;
    let work = Workload::seed(&store, 300, 10).await;

    // A first worker creates the streams at R3; the backlog queues while
    // none runs. A small in-flight window each keeps the drain long enough
    // to be interrupted, and shared by both workers.
    let first = worker_on(&env, &cluster, RESILIENT).await;
    let mut logs = first.kill().await;
    work.publish(&js, 0..work.len()).await;
    let mut sharing = RESILIENT.to_vec();
    sharing.push(("ROTATION_WORKER_WORKER__MAX_IN_FLIGHT", "16"));
    let workers = [
        worker_on(&env, &cluster, &sharing).await,
        worker_on(&env, &cluster, &sharing).await,
    ];

    // Kill the inbound stream's leader at 20 % and restart it at 40 %; kill
    // the new leader at 60 % and restart it at 80 %.
    let step = work.len() / 5;
    let within = Duration::from_secs(60);
    let mut killed = Vec::new();
    for round in 0..2 {
        wait_for_outcomes(&js, step * (2 * round + 1), within).await;
        let mut leader = cluster.leader_of(&js, "VAULT_ROTATIONS").await;
        // The node restarted after the first kill may lead again; the
        // second kill is to hit another node.
        if killed.contains(&leader) {
            leader = cluster
                .leader_other_than(&js, "VAULT_ROTATIONS", leader)
                .await;
        }
        cluster.kill(leader);
        killed.push(leader);
        wait_for_outcomes(&js, step * (2 * round + 2), within).await;
        cluster.restart(leader).await;
    }
    assert_ne!(killed[0], killed[1], "the second kill hit the new leader");
    wait_for_outcomes(&js, work.len(), within).await;
    wait_for_drained_after_failovers(&js).await;
    for worker in workers {
        logs.push_str(&worker.kill().await);
    }

    // Exactly one outcome per event, one stored record per applied one
    // (per integration: records, rotation count and applied outcomes
    // agree), each integration at its latest secret, the consumer empty (a
    // hard-killed 2.9 server may keep acked work-queue messages, so the
    // stream's count is not checked). Only successes are stored: an event
    // that was never applied before a newer one of its integration was
    // (its delivery lost with the leader) is answered 409, not stored.
    let raw = work.verify(&store, &js, true).await;
    assert_clean(&logs, &raw, &work.secrets());
}

#[tokio::test]
async fn a_worker_whose_node_dies_reconnects_to_another_and_serves() {
    let mut cluster = NatsCluster::start().await;
    let env = TestEnv::new();
    let store = env.store().await;
    let key = create_api_key(&store, "acme").await;
    let integration = create_integration(&store, "acme", "vault", "s.before").await;
    let worker = worker_on(&env, &cluster, &[]).await;

    let serving = cluster.node_serving("rotation-worker").await;
    cluster.kill(serving);
    worker.wait_for_log("disconnected from NATS").await;

    // A request through another node reaches the worker once it has
    // reconnected (until then, nobody answers the subject).
    let client = cluster.client().await;
    let payload = body(json!({"integrationId": integration.id, "secretId": "s.after"}));
    let answered = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let h = headers(Some(&key), Some("request-after-failover"));
            let request = client.request_with_headers("vault.approle.rotate", h, payload.clone());
            if let Ok(reply) = request.await {
                return reply;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("the worker answers within 30 s of losing its node");
    let reply: serde_json::Value = serde_json::from_slice(&answered.payload).unwrap();
    assert!(reply.get("error").is_none(), "{reply}");
    assert_eq!(secret_of(&store, integration.id).await, "s.after");
    assert_ne!(cluster.node_serving("rotation-worker").await, serving);
    worker.kill().await;
}

/// Polls `/readyz` (up to 60 s) until it answers `status` with a body
/// containing `needle`.
async fn wait_for_readyz(addr: &str, status: u16, needle: &str) {
    let mut last = (0, String::new());
    let reached = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            last = http_get(addr, "/readyz").await;
            if last.0 == status && last.1.contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "/readyz never answered {status} {needle:?}; last {last:?}"
    );
}

#[tokio::test]
async fn readiness_follows_the_inbound_streams_quorum() {
    let mut cluster = NatsCluster::start().await;
    let env = TestEnv::new();
    let worker = worker_on(&env, &cluster, &[]).await;
    let addr = worker.http_addr().await;
    wait_for_readyz(&addr, 200, "").await;

    // Two of three nodes down (not the worker's own, so that it stays
    // connected and the stream's quorum is what it reports).
    let serving = cluster.node_serving("rotation-worker").await;
    let others: Vec<usize> = (0..3).filter(|&i| i != serving).collect();
    for &i in &others {
        cluster.kill(i);
    }
    wait_for_readyz(&addr, 503, "not ready: inbound stream has no leader").await;
    for &i in &others {
        cluster.restart(i).await;
    }
    wait_for_readyz(&addr, 200, "").await;
    worker.kill().await;
}

/// The replicas of the inbound, results and dead-letter streams.
async fn replicas(js: jetstream::Context) -> Vec<usize> {
    let mut counts = Vec::new();
    for name in [
        "VAULT_ROTATIONS",
        "VAULT_ROTATION_RESULTS",
        "VAULT_ROTATION_DLQ",
    ] {
        let mut stream = js.get_stream(name).await.unwrap();
        counts.push(stream.info().await.unwrap().config.num_replicas);
    }
    counts
}

/// Item 1: streams a worker created at one replica are brought to three
/// when the worker starts again with `worker.replicas = 3`.
#[tokio::test]
async fn streams_created_at_one_replica_are_raised_to_three() {
    let cluster = NatsCluster::start().await;
    let env = TestEnv::new();
    let js = jetstream::new(cluster.client().await);
    let worker = worker_on(&env, &cluster, &[("ROTATION_WORKER_WORKER__REPLICAS", "1")]).await;
    let (code, _) = worker.terminate().await;
    assert_eq!(code, Some(0));
    assert_eq!(replicas(js.clone()).await, [1, 1, 1]);

    let worker = worker_on(&env, &cluster, &[]).await;
    assert_eq!(replicas(js.clone()).await, [3, 3, 3]);
    let (code, _) = worker.terminate().await;
    assert_eq!(code, Some(0));
}

/// A worker started while the cluster has no JetStream quorum (two of three
/// nodes down, as while a cluster forms or restarts) does not exit: it
/// says on `/readyz` and in its log what it waits for, and sets up its
/// streams and serves once the nodes are back.
#[tokio::test]
async fn a_worker_started_without_a_jetstream_quorum_waits_for_it() {
    let mut cluster = NatsCluster::start().await;
    let env = TestEnv::new();
    for i in [1, 2] {
        cluster.kill(i);
    }
    let worker = env.start_worker(&cluster.url(), &[R3]);
    let addr = worker.http_addr().await;
    worker
        .wait_for_log("JetStream cannot set up the streams yet")
        .await;
    wait_for_readyz(&addr, 503, "not ready: waiting for JetStream: ").await;
    assert!(!worker.logs.text().contains("rotation-worker ready"));

    for i in [1, 2] {
        cluster.restart(i).await;
    }
    worker.wait_for_log("rotation-worker ready").await;
    wait_for_readyz(&addr, 200, "ready").await;
    let js = jetstream::new(cluster.client().await);
    assert_eq!(replicas(js).await, [3, 3, 3]);
    let (code, _) = worker.terminate().await;
    assert_eq!(code, Some(0));
}
