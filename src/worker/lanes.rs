//! The lanes: messages handed to the lane their integration id hashes to,
//! so that one integration's messages are handled one after another in
//! arrival order while lanes run in parallel; a lane applies what has
//! queued up as one batch, and a message that calls a Vault leaves its lane
//! so that the lane's other integrations do not wait for it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::TraceContextExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use super::answer::{finish, reply_first};
use super::settle;
use super::{Held, Item, Shared, Source};
use crate::event::{Decoded, SUBJECT_ROTATED};
use crate::rotator::{Handled, Rotator};
use crate::telemetry::{self, Metrics};
use crate::wire;

/// Hands messages to lanes by integration id.
#[derive(Clone)]
pub(super) struct Dispatcher {
    lanes: Vec<mpsc::Sender<Item>>,
    permits: Arc<Semaphore>,
    /// For the spans: the client and the consumer's and group's names.
    pub(super) shared: Arc<Shared>,
}

/// The CONSUMER span of one message, continuing the inbound trace.
fn process_span(decoded: &Decoded, source: &Source, shared: &Shared) -> tracing::Span {
    let w = &shared.settings;
    let (subject, group) = match source {
        Source::Stream(..) => (SUBJECT_ROTATED, &w.consumer),
        Source::Core(_) => (SUBJECT_ROTATED, &w.queue_group),
        Source::Request(_, endpoint) | Source::Answered(endpoint, _) => {
            (endpoint.subject, &w.queue_group)
        }
        Source::Schedule => (crate::event::SUBJECT_RENEW, &w.queue_group),
    };
    let from = wire::Consumed {
        subject,
        group: Some(group),
        path: source.path(),
        attempt: source.attempt(),
    };
    let parent = telemetry::remote_context(
        decoded.envelope.traceparent.as_deref(),
        decoded.envelope.tracestate.as_deref(),
    );
    wire::process_span(decoded, &from, shared.publisher.server(), parent)
}

impl Dispatcher {
    /// Waits for room (back-pressure on the source), then queues the
    /// message on its lane.
    pub(super) async fn dispatch(&self, mut decoded: Decoded, source: Source) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        self.find_role(&mut decoded).await;
        if source.attempt() > 1 {
            Metrics::get().redeliveries.add(1, &[]);
        }
        let lane = decoded
            .integration_id()
            .map_or(0, |id| (id.as_u128() % self.lanes.len() as u128) as usize);
        let item = Item {
            span: process_span(&decoded, &source, &self.shared),
            decoded,
            source,
            received: Instant::now(),
            held: Held::new(permit),
        };
        if self.lanes[lane].send(item).await.is_err() {
            tracing::warn!("lane closed; message left for redelivery");
        }
    }
}

impl Dispatcher {
    /// Resolves a message that names a role instead of an integration, so
    /// that it goes to its integration's lane and keeps its order there.
    /// One read, given [`FIND_ROLE_WAIT`] at most (the source waits for
    /// it); if it does not find exactly one integration in time, the
    /// rotator looks again (with retries) and answers.
    async fn find_role(&self, decoded: &mut Decoded) {
        let (Some(role), Ok(key)) = (decoded.role_target(), &decoded.key) else {
            return;
        };
        let store = self.shared.rotator.store();
        let found = tokio::time::timeout(
            FIND_ROLE_WAIT,
            store.integrations_of_role(&key.hash(), role),
        )
        .await;
        if let Ok(Ok(ids)) = found
            && let [id] = ids[..]
        {
            decoded.resolve_to(id);
        }
    }
}

/// How long a source waits for a role to be resolved on arrival: a store
/// that does not answer must not hold up every message behind it.
const FIND_ROLE_WAIT: Duration = Duration::from_millis(250);

/// Starts the lanes and the dispatcher that feeds them.
pub(super) fn start_lanes(shared: &Arc<Shared>) -> (TaskTracker, Dispatcher) {
    let w = &shared.settings;
    let lanes = TaskTracker::new();
    let mut senders = Vec::new();
    for _ in 0..w.lanes.max(1) {
        // Room for a lane's share of the in-flight messages, so that one
        // busy lane does not hold up the source for the others.
        let room = w.max_batch.max(w.max_in_flight / w.lanes.max(1)).max(1);
        let (tx, rx) = mpsc::channel(room);
        senders.push(tx);
        lanes.spawn(lane(rx, shared.clone(), lanes.clone()));
    }
    lanes.close();
    let dispatcher = Dispatcher {
        lanes: senders,
        permits: Arc::new(Semaphore::new(w.max_in_flight.max(1))),
        shared: shared.clone(),
    };
    (lanes, dispatcher)
}

/// A lane: takes what has queued up and applies it as one batch; then,
/// while the outcome events and acks of that batch are on their way, it
/// takes the next one (the store's order per integration is what matters,
/// and it is kept: one transaction after the other). Ends when every sender
/// is gone, the queue is empty and no message of it waits on a Vault;
/// `finishing` tracks the rest.
///
/// A message that calls its integration's Vault leaves the lane ([`Aside`]):
/// a tenant's Vault may hang, and the lane's other integrations must not
/// wait for it. Messages of that integration that arrive meanwhile wait
/// behind it, in order, and follow it one at a time.
async fn lane(mut rx: mpsc::Receiver<Item>, shared: Arc<Shared>, finishing: TaskTracker) {
    let max_batch = shared.settings.max_batch.max(1);
    let mut batch = Vec::with_capacity(max_batch);
    let mut aside = Aside::default();
    // Unbounded, but each message holds an in-flight permit: no more than
    // `max_in_flight` notices can be queued.
    let (done, mut finished) = mpsc::unbounded_channel();
    let mut open = true;
    while open || !aside.waiting.is_empty() {
        tokio::select! {
            taken = rx.recv_many(&mut batch, max_batch), if open => {
                if taken == 0 {
                    open = false;
                    continue;
                }
                let direct = aside.take_in(&shared.rotator, std::mem::take(&mut batch));
                process(&shared, &finishing, direct).await;
                for item in std::mem::take(&mut aside.start) {
                    spawn_aside(&shared, &finishing, &done, item);
                }
            }
            Some(id) = finished.recv() => {
                if let Some(item) = aside.next_of(id) {
                    spawn_aside(&shared, &finishing, &done, item);
                }
            }
        }
    }
}

/// The messages of a lane that call a Vault, handled outside it.
#[derive(Default)]
struct Aside {
    /// Integrations with a message out of the lane, and the messages of
    /// theirs that arrived since, in arrival order.
    waiting: HashMap<Uuid, VecDeque<Item>>,
    /// Messages to start once the lane's current batch has been applied
    /// (it may hold an earlier message of the same integration).
    start: Vec<Item>,
}

impl Aside {
    /// Takes the messages that call a Vault, or that follow one of their
    /// integration, out of `batch`; returns the rest.
    fn take_in(&mut self, rotator: &Rotator, batch: Vec<Item>) -> Vec<Item> {
        // The usual case, nothing to take out: the batch is not moved.
        if self.waiting.is_empty() && !batch.iter().any(|i| rotator.needs_vault(&i.decoded)) {
            return batch;
        }
        let mut direct = Vec::with_capacity(batch.len());
        for item in batch {
            let id = item.decoded.integration_id();
            match id {
                Some(id) if self.waiting.contains_key(&id) => {
                    self.waiting.entry(id).or_default().push_back(item);
                }
                _ if rotator.needs_vault(&item.decoded) => {
                    if let Some(id) = id {
                        self.waiting.insert(id, VecDeque::new());
                    }
                    self.start.push(item);
                }
                _ => direct.push(item),
            }
        }
        direct
    }

    /// The next message of integration `id`, whose last one is done; the
    /// integration is back in the lane once none waits.
    fn next_of(&mut self, id: Uuid) -> Option<Item> {
        let queue = self.waiting.get_mut(&id)?;
        let next = queue.pop_front();
        if next.is_none() {
            self.waiting.remove(&id);
        }
        next
    }
}

/// Handles one message outside its lane, then tells the lane its
/// integration may go on.
fn spawn_aside(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    done: &mpsc::UnboundedSender<Uuid>,
    item: Item,
) {
    let id = item.decoded.integration_id();
    let (shared, finishing, done) = (shared.clone(), tracker.clone(), done.clone());
    tracker.spawn(async move {
        process(&shared, &finishing, vec![item]).await;
        if let Some(id) = id {
            // The lane is gone only at the end of a shutdown's grace.
            let _ = done.send(id);
        }
    });
}

async fn process(shared: &Arc<Shared>, tracker: &TaskTracker, batch: Vec<Item>) {
    let now = Instant::now();
    let batch = set_aside_late_and_overdelivered(shared, tracker, batch, now);
    let Some(until) = batch.iter().map(|item| deadline(item, now, shared)).min() else {
        return;
    };
    let tx_span = transaction_span(shared, &batch);
    let (decoded, mut rest) = split(batch);
    let handled = match shared
        .rotator
        .handle_until(&decoded, until)
        .instrument(tx_span)
        .await
    {
        Ok(handled) => handled,
        Err(e) => {
            tracing::warn!(error = %e, size = decoded.len(), "store unavailable after retries");
            decoded.iter().map(Handled::unavailable).collect::<Vec<_>>()
        }
    };
    reply_first(&handled, &mut rest).await;
    finish(shared, tracker, handled, decoded, rest);
}

/// When a message must be answered by: a request's own deadline, or the
/// retry budget from `now`. A batch shares the earliest among its
/// messages.
fn deadline(item: &Item, now: Instant, shared: &Shared) -> Instant {
    let w = &shared.settings;
    match item.source {
        Source::Request(..) => item.received + w.request_timeout,
        _ => now + w.retry.budget,
    }
}

/// Answers what must not be handled and returns the rest: a request
/// already past its deadline is answered 503 at once; a stream message
/// delivered more often than it may be was never settled (the worker died
/// handling it), and is set aside before anything, a Vault call included,
/// can end the same way again. Usually neither is in the batch, which is
/// then not moved.
fn set_aside_late_and_overdelivered(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    batch: Vec<Item>,
    now: Instant,
) -> Vec<Item> {
    let late = |i: &Item| deadline(i, now, shared) <= now;
    let overdelivered =
        |i: &Item| settle::overdelivered(i.source.kind(), i.source.attempt(), &shared.policy);
    if !batch.iter().any(|i| late(i) || overdelivered(i)) {
        return batch;
    }
    let (mut late_ones, mut over, mut rest) = (Vec::new(), Vec::new(), Vec::new());
    for item in batch {
        if late(&item) {
            late_ones.push(item);
        } else if overdelivered(&item) {
            over.push(item);
        } else {
            rest.push(item);
        }
    }
    for (items, answer) in [
        (late_ones, Handled::unavailable as fn(&Decoded) -> Handled),
        (over, Handled::overdelivered),
    ] {
        if !items.is_empty() {
            let (decoded, rest) = split(items);
            let handled = decoded.iter().map(answer).collect();
            finish(shared, tracker, handled, decoded, rest);
        }
    }
    rest
}

/// One transaction for a batch: a child of the first message's span,
/// linked to the others.
fn transaction_span(shared: &Shared, batch: &[Item]) -> tracing::Span {
    let Some((first, others)) = batch.split_first() else {
        return tracing::Span::none();
    };
    let tx_span = tracing::info_span!(
        parent: &first.span,
        "transaction",
        otel.name = "rotate transaction",
        otel.kind = "client",
        db.system.name = shared.db_system,
        db.operation.name = "rotate",
        rotation.batch_size = batch.len() as i64,
    );
    for item in others {
        tx_span.add_link(item.span.context().span().span_context().clone());
    }
    tx_span
}

/// What settling a message needs beside its decoded form.
pub(super) type Rest = (Source, tracing::Span, Instant, Held);

fn split(items: Vec<Item>) -> (Vec<Decoded>, Vec<Rest>) {
    items
        .into_iter()
        .map(|i| (i.decoded, (i.source, i.span, i.received, i.held)))
        .unzip()
}
