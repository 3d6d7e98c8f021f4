//! Group commit for the SQLite store.
//!
//! SQLite has one writer, and every statement of a write transaction is a
//! hand-off to its connection's thread and back. Run from the worker's
//! runtime, each hand-off back waits for a runtime thread, busy meanwhile
//! with decoding, settling and PubAcks, while the writer sits idle; and
//! every lane paid a transaction of its own (its statements, its WAL
//! frames, its fsync). Here the rotation batches of all callers go to one
//! thread of their own, which applies what has queued up as one
//! transaction ([`MAX_GROUP_ROWS`] rotations at most) and hands each
//! caller its share of the results.
//!
//! What a caller sees does not change: its results, in order, or an
//! error of its own. A group that fails is applied again one caller at a
//! time, so one caller's bad batch fails only that caller; a caller that
//! gives up (its deadline) has its group's transaction rolled back, as
//! when it ran the transaction itself, and the others' work is applied
//! again without it.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use super::{Rotation, RotationResult, Store, StoreError};

/// Rotations in one group transaction at most (a caller's batch is never
/// split, so a larger one runs alone): as many as a lane takes at once by
/// default. 256 drained about 3% faster with 1.5 MB more at the peak.
const MAX_GROUP_ROWS: usize = 128;

type Answer = Result<Vec<RotationResult>, StoreError>;

/// One caller's batch and where its results go.
struct Job {
    batch: Vec<Rotation>,
    reply: oneshot::Sender<Answer>,
}

/// The way in to the writer thread. When the last handle is dropped, the
/// thread finishes what it holds and ends.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    jobs: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the writer thread, which applies groups through `store` (a
    /// store that applies a batch itself) and calls `committed` after
    /// each.
    pub(crate) fn start(
        store: Arc<dyn Store>,
        committed: impl Fn() + Send + 'static,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || runtime.block_on(run(queue, store, committed)))?;
        Ok(Self { jobs })
    }

    /// Applies `batch` within a group; the results are the batch's own.
    pub(crate) async fn rotate(&self, batch: &[Rotation]) -> Answer {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            batch: batch.to_vec(),
            reply,
        };
        // Only a writer thread that is gone drops a job: transient, as a
        // closed pool is.
        self.jobs
            .send(job)
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolClosed))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::WorkerCrashed))?
    }
}

/// The writer thread: takes what has queued up, applies it as groups.
async fn run(mut queue: mpsc::UnboundedReceiver<Job>, store: Arc<dyn Store>, committed: impl Fn()) {
    let mut pending = VecDeque::new();
    loop {
        if pending.is_empty() {
            match queue.recv().await {
                Some(job) => pending.push_back(job),
                None => return,
            }
        }
        while let Ok(job) = queue.try_recv() {
            pending.push_back(job);
        }
        let group = take_group(&mut pending);
        apply(store.as_ref(), group, &mut pending).await;
        committed();
    }
}

/// The jobs at the front of the queue that fit in one group (the first
/// always does), leaving out callers that have given up.
fn take_group(pending: &mut VecDeque<Job>) -> Vec<Job> {
    let mut group = Vec::new();
    let mut rows = 0;
    while let Some(job) = pending.pop_front() {
        if job.reply.is_closed() {
            continue;
        }
        if !group.is_empty() && rows + job.batch.len() > MAX_GROUP_ROWS {
            pending.push_front(job);
            break;
        }
        rows += job.batch.len();
        group.push(job);
    }
    group
}

/// Applies one group as one transaction. If a caller gives up meanwhile,
/// the transaction is rolled back and the others go back to the front of
/// the queue; if it fails, each caller's batch is applied alone.
async fn apply(store: &dyn Store, mut group: Vec<Job>, pending: &mut VecDeque<Job>) {
    if group.is_empty() {
        return;
    }
    let sizes: Vec<usize> = group.iter().map(|job| job.batch.len()).collect();
    let all: Vec<Rotation> = group
        .iter_mut()
        .flat_map(|job| std::mem::take(&mut job.batch))
        .collect();
    let gave_up =
        futures::future::select_all(group.iter_mut().map(|job| job.reply.closed().boxed()));
    let answer = tokio::select! {
        answer = store.rotate(&all) => Some(answer),
        _ = gave_up => None,
    };
    match answer {
        Some(Ok(results)) if results.len() == all.len() => {
            let mut results = results.into_iter();
            for (job, size) in group.into_iter().zip(sizes) {
                let _ = job.reply.send(Ok(results.by_ref().take(size).collect()));
            }
        }
        Some(answer) if group.len() == 1 => {
            if let Some(job) = group.pop() {
                let _ = job.reply.send(answer);
            }
        }
        // Rolled back (a caller gave up), or failed: each batch again.
        answer => {
            let alone = answer.is_some();
            let mut all = all.into_iter();
            let again: Vec<Job> = group
                .into_iter()
                .zip(sizes)
                .map(|(mut job, size)| {
                    job.batch = all.by_ref().take(size).collect();
                    job
                })
                .collect();
            if alone {
                for job in again {
                    Box::pin(apply(store, vec![job], pending)).await;
                }
            } else {
                for job in again.into_iter().rev() {
                    pending.push_front(job);
                }
            }
        }
    }
}
