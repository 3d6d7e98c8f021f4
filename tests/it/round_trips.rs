//! How many statements a request costs the database. The happy path of a
//! request on PostgreSQL is one statement in one round trip (its own
//! transaction); the worker's SQL is counted from sqlx's statement log
//! (`sqlx::query` at DEBUG), which shows every statement sent, `BEGIN` and
//! `COMMIT` included.

use serde_json::json;

use crate::worker::{Fixture, body, headers};

/// Statements logged so far on behalf of a message (inside its `process`
/// span; the hourly pruning, for one, is not).
fn statements(logs: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains("sqlx::query") && l.contains("process{"))
        .count()
}

#[tokio::test]
async fn a_request_on_the_happy_path_is_one_statement_on_postgres() {
    let mut f = Fixture::new().await;
    let it = f.integration("acme", "s.trips-initial").await;
    let app = f
        .env
        .spawn_worker(
            &f.nats,
            &[("ROTATION_WORKER_LOG__LEVEL", "info,sqlx::query=debug")],
        )
        .await;
    let key = f.key.clone();
    let mut costs = Vec::new();
    for (i, msg_id) in [Some("trip-1"), None, Some("trip-3")]
        .into_iter()
        .enumerate()
    {
        let secret = format!("s.trips-{i}");
        f.remember_secret(&secret);
        let before = statements(&app.logs.text());
        let reply = f
            .request(
                headers(Some(&key), msg_id),
                body(json!({"integrationId": it.id, "secretId": secret})),
            )
            .await;
        assert_eq!(reply.body["id"], json!(it.id), "{:?}", reply.body);
        f.next_outcome().await;
        costs.push(statements(&app.logs.text()) - before);
        assert_eq!(f.secret(it.id).await, secret);
    }
    // The first rotation of a row written before digests were kept would
    // take the batch path; this row was created with its digest.
    assert_eq!(costs, [1, 1, 1], "statements per request");

    // A refusal or a repeat takes the batch path: more statements, and
    // the same answers as ever.
    let before = statements(&app.logs.text());
    let repeat = f
        .request(
            headers(Some(&key), Some("trip-3")),
            body(json!({"integrationId": it.id, "secretId": "s.trips-2"})),
        )
        .await;
    assert_eq!(repeat.body["id"], json!(it.id));
    assert!(statements(&app.logs.text()) - before > 1);
    assert_eq!(f.rotation_count(it.id).await, 3);

    let logs = app.stop().await;
    f.assert_no_secret_leaked(&logs).await;
}
