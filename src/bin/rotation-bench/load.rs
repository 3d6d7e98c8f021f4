//! The load: seeding integrations, rotation requests and the floors they
//! are judged against (a bare NATS request, one rotation through the store).

use super::*;

pub(super) fn headers(key: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {key}").as_str());
    h
}

/// A rotation request's body: `secret` for integration `id`.
pub(super) fn body(id: Uuid, secret: &str) -> bytes::Bytes {
    bytes::Bytes::from(
        serde_json::to_vec(&json!({"integrationId": id, "secretId": secret})).unwrap_or_default(),
    )
}

pub(super) fn rotation(id: Uuid, n: usize) -> bytes::Bytes {
    body(id, &format!("s.bench-{n}-{}", Uuid::new_v4().simple()))
}

/// Publishes `count` messages to `subject` as `message(n)` makes them,
/// 1,024 awaiting their PubAck at once, and waits for every PubAck.
pub(super) async fn queue(
    js: &async_nats::jetstream::Context,
    subject: &'static str,
    count: usize,
    message: impl Fn(usize) -> (HeaderMap, bytes::Bytes),
) -> anyhow::Result<()> {
    futures::stream::iter(0..count)
        .map(|n| {
            let (headers, payload) = message(n);
            async move {
                js.publish_with_headers(subject, headers, payload)
                    .await?
                    .await
                    .map(|_| ())
                    .map_err(anyhow::Error::from)
            }
        })
        .buffer_unordered(1024)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Where seeded integrations point: a Vault address and a role_id.
pub(super) struct SeedTarget<'a> {
    /// Prefix of the integrations' names.
    pub(super) name: &'a str,
    pub(super) address: &'a str,
    pub(super) role_id: &'a str,
}

/// The benchmark's API key (owner `bench`) and `n` integrations.
pub(super) async fn seed(store: &dyn Store, n: usize) -> anyhow::Result<(String, Vec<Uuid>)> {
    let key = ApiKey::generate();
    store
        .create_api_key(&Owner::parse("bench")?, &key.hash())
        .await?;
    let target = SeedTarget {
        name: "vault",
        address: "https://vault.example.com:8200",
        role_id: "bench-role",
    };
    let ids = seed_integrations(store, n, &target).await?;
    Ok((key.expose().to_owned(), scattered(ids)))
}

/// `ids` reordered so that consecutive ones were seeded far apart: the
/// `i`-th is the seeded `i * stride mod n`-th, `stride` coprime with `n`
/// and near `n / φ`, whose multiples spread evenly. Events and requests
/// go to the integrations in this order, as independent pipelines send
/// them: in the seeding order, a batch of 128 events rotated rows created
/// together, which share the database's pages, and on PostgreSQL only the
/// first few rotations of a page fit in it (HOT updates); the others
/// wrote an entry into every index of the table.
fn scattered(ids: Vec<Uuid>) -> Vec<Uuid> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 { a } else { gcd(b, a % b) }
    }
    let n = ids.len();
    let near = (n as f64 * 0.618_034) as usize;
    let stride = (near..n).find(|&s| gcd(s, n) == 1).unwrap_or(1);
    (0..n).map(|i| ids[i * stride % n]).collect()
}

/// Creates `n` integrations of owner `bench` at `target`; returns their ids.
/// A transaction per chunk, two at once (SQLite takes them in turn).
pub(super) async fn seed_integrations(
    store: &dyn Store,
    n: usize,
    target: &SeedTarget<'_>,
) -> anyhow::Result<Vec<Uuid>> {
    const CHUNK: usize = 2_000;
    let owner = Owner::parse("bench")?;
    let (address, role_id) = (
        VaultAddress::parse(target.address)?,
        RoleId::parse(target.role_id)?,
    );
    let chunks = (0..n).step_by(CHUNK).map(|start| {
        let new = (start..(start + CHUNK).min(n))
            .map(|i| {
                Ok(NewIntegration {
                    owner: owner.clone(),
                    name: Name::parse(&format!("{}-{i}", target.name))?,
                    address: address.clone(),
                    namespace: None,
                    role_id: role_id.clone(),
                    secret_id: SecretId::parse(format!("s.seed-{i}"))?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>();
        async move { Ok::<_, anyhow::Error>(store.create_integrations(&new?).await?) }
    });
    let created: Vec<Vec<Uuid>> = futures::stream::iter(chunks)
        .buffered(2)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    Ok(created.concat())
}

/// What one request came to: its round trip, and for a failure reply its
/// status and body (`None`: a 200).
pub(super) struct Reply {
    pub(super) ms: f64,
    pub(super) failure: Option<(u16, String)>,
}

/// One `vault.approle.rotate` request with `payload`, timed.
pub(super) async fn round_trip(
    client: &async_nats::Client,
    key: &str,
    payload: bytes::Bytes,
) -> anyhow::Result<Reply> {
    round_trip_on(client, "vault.approle.rotate", key, payload).await
}

/// One request on `subject` with `payload`, timed.
pub(super) async fn round_trip_on(
    client: &async_nats::Client,
    subject: &'static str,
    key: &str,
    payload: bytes::Bytes,
) -> anyhow::Result<Reply> {
    let started = Instant::now();
    let reply = client
        .request_with_headers(subject, headers(key), payload)
        .await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let failure = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|code| {
            (
                code.as_str().parse().unwrap_or(0),
                String::from_utf8_lossy(&reply.payload).into_owned(),
            )
        });
    Ok(Reply { ms, failure })
}

/// Requests one at a time, and the two floors they are judged against,
/// taken in the same moments: after each request, a bare NATS
/// request-reply with the same headers and body, answered by an echo
/// responder on a connection of its own (as the worker's is), and a
/// rotation of a new secret applied straight through the store, as the
/// worker applies a request. A database commit's time moves by half
/// from minute to minute on a shared machine, so floors taken before or
/// after the requests may judge them by another minute's disk.
pub(super) struct OneAtATime {
    /// Each request's time, in ms.
    pub(super) requests: Vec<f64>,
    /// The p50 of the bare request-replies.
    pub(super) nats_floor_ms: f64,
    /// The p50 of the rotations through the store.
    pub(super) store_floor_ms: f64,
}

/// `requests` requests to the worker on `ids[n % len]`, each followed by
/// its floors. The store's rotations go to the integrations from the other
/// end of `ids`: the store takes its one statement only over a secret it
/// has written or opened itself, and a secret the worker has since
/// replaced is neither. Each integration of either is rotated once
/// untimed first, by the worker or the store, so that both rotate rows in
/// the same state: written moments ago, their pages in the database's
/// cache and in its log since the last checkpoint (at a million
/// integrations the drain's first rows are neither by the time the
/// requests start). Every rotation must be applied, every request
/// answered without a failure.
pub(super) async fn one_at_a_time(
    url: &str,
    client: &async_nats::Client,
    api_key: &str,
    store: &dyn Store,
    ids: &[Uuid],
    requests: usize,
) -> anyhow::Result<OneAtATime> {
    let key = ApiKey::parse(api_key)?.hash();
    let own = |n: usize| ids[ids.len() - 1 - n % ids.len()];
    for (n, &id) in ids.iter().take(requests).enumerate() {
        request(client, api_key, id, requests + n).await?;
        apply_one(store, &key, own(n), &format!("s.store-warm-{n}")).await?;
    }
    let responder = connect(url).await?;
    let mut echo = responder.subscribe("rotation-bench.echo").await?;
    responder.flush().await?;
    let echoing = tokio::spawn(async move {
        while let Some(message) = echo.next().await {
            if let Some(reply) = message.reply {
                let _ = responder.publish(reply, message.payload).await;
            }
        }
    });
    let bare = connect(url).await?;
    let mut times = Vec::with_capacity(requests);
    let mut nats = Vec::with_capacity(requests);
    let mut store_times = Vec::with_capacity(requests);
    for n in 0..requests {
        times.push(request(client, api_key, ids[n % ids.len()], n).await?);
        let started = Instant::now();
        bare.request_with_headers("rotation-bench.echo", headers(api_key), rotation(ids[0], n))
            .await?;
        nats.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        apply_one(store, &key, own(n), &format!("s.store-{n}")).await?;
        store_times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    echoing.abort();
    Ok(OneAtATime {
        requests: times,
        nats_floor_ms: latency(nats).p50_ms,
        store_floor_ms: latency(store_times).p50_ms,
    })
}

/// Applies one rotation of a new secret through the store, as the worker
/// applies a request; it must be applied.
async fn apply_one(
    store: &dyn Store,
    key: &rotation_worker::auth::ApiKeyHash,
    id: Uuid,
    name: &str,
) -> anyhow::Result<()> {
    let secret = SecretId::parse(format!("{name}-{}", Uuid::new_v4().simple()))?;
    let now = time::OffsetDateTime::now_utc();
    let rotation = Rotation {
        key: key.clone(),
        integration_id: id,
        change: Change::Secret(secret),
        role_id: None,
        rotated_at: now,
        event_id: None,
        own_event_id: None,
        keep_previous_until: now + time::Duration::hours(24),
    };
    let results = store.rotate(std::slice::from_ref(&rotation)).await?;
    if !matches!(
        results.as_slice(),
        [RotationResult {
            outcome: Outcome::Applied(_),
            ..
        }]
    ) {
        bail!("the store did not apply {name}: {results:?}");
    }
    Ok(())
}

pub(super) async fn request(
    client: &async_nats::Client,
    key: &str,
    id: Uuid,
    n: usize,
) -> anyhow::Result<f64> {
    let reply = round_trip(client, key, rotation(id, n)).await?;
    if let Some((_, body)) = reply.failure {
        bail!("request failed: {body}");
    }
    Ok(reply.ms)
}

/// The store's side of a drain done by the benchmark with nothing else:
/// `events` rotations of new secrets, each with an event id as a drained
/// event has, through the store the worker uses (its SQL, its seal, the
/// database's client; on SQLite the database itself, which runs in the
/// process), as the worker's lanes apply them: each integration's in one
/// of `lanes` lanes, in order, a lane's in batches of `batch`, the lanes
/// at once. Every one must be applied. Returns this process's CPU time
/// per event, in µs: the part of the worker's CPU per drained event that
/// its store costs by itself.
pub(super) async fn store_cpu_us_per_event(
    store: &dyn Store,
    key: &rotation_worker::auth::ApiKeyHash,
    ids: &[Uuid],
    events: usize,
    batch: usize,
    lanes: usize,
) -> anyhow::Result<f64> {
    let lanes = lanes.max(1);
    let start = time::OffsetDateTime::now_utc();
    let mut queued: Vec<Vec<Rotation>> = vec![Vec::new(); lanes];
    for n in 0..events {
        let slot = n % ids.len();
        let secret = SecretId::parse(format!("s.store-side-{n}-{}", Uuid::new_v4().simple()))?;
        // Later events rotated later, as a pipeline's are.
        let rotated_at = start + time::Duration::microseconds(n as i64);
        queued[slot % lanes].push(Rotation {
            key: key.clone(),
            integration_id: ids[slot],
            change: Change::Secret(secret),
            role_id: None,
            rotated_at,
            event_id: Some(format!("js:BENCH_STORE:1:{n}")),
            own_event_id: None,
            keep_previous_until: rotated_at + time::Duration::hours(24),
        });
    }
    let started = cpu_seconds_of("self");
    let applied = futures::future::join_all(queued.iter().map(|lane| async move {
        let mut results = Vec::with_capacity(lane.len());
        for batch in lane.chunks(batch.max(1)) {
            results.extend(store.rotate(batch).await?);
        }
        anyhow::Ok(results)
    }))
    .await;
    let cpu = cpu_seconds_of("self") - started;
    for results in applied {
        if let Some(other) = results?
            .iter()
            .find(|r| !matches!(r.outcome, Outcome::Applied(_)))
        {
            bail!("the store did not apply a rotation: {other:?}");
        }
    }
    Ok(cpu * 1e6 / events.max(1) as f64)
}
