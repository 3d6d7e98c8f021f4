//! Log lines leave through a thread of their own. A handled message logs
//! one line; written straight to stderr, each line was a system call (and
//! a wake-up of whoever reads the pipe) on the message's path, which cost
//! about a fifth of the drain rate and a quarter of a request's latency
//! (see docs/performance.md). Here a line is appended to one shared buffer
//! where it happens; the writer thread takes whatever has gathered, in
//! order, and writes it with one call. A line costs no allocation and no
//! hand-off of its own: the log layer formats it into a buffer of its
//! thread, and the two buffers here are reused for good. (A queue of owned
//! lines freed each line on the writer thread, a thread other than the one
//! that allocated it, and the allocator's lock on that arena showed in the
//! profile.) The buffer is bounded: when it is full a line waits, as a
//! direct write would; nothing is dropped.
//!
//! After a write the thread lets lines gather for [`GATHER`] before it
//! takes them: under load one write (and one wake-up of the thread, and of
//! whoever reads the pipe) carries a hundred lines instead of one or two,
//! and a line appended meanwhile wakes no one. The first line after a quiet
//! spell is written at once; a buffer half full, or a [`flush`], ends the
//! wait early.
//!
//! [`flush`] waits until every line appended before it is written: the CLI
//! calls it before the process exits and the crash points before they
//! abort.

use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Bytes that may wait for the writer thread.
const PENDING_BYTES: usize = 4 * 1024 * 1024;
/// Room each buffer starts with, and what it is cut back to after a
/// burst made it larger than [`PENDING_BYTES`].
const START_BYTES: usize = 64 * 1024;
/// How long [`flush`] waits at most.
const FLUSH_WAIT: Duration = Duration::from_secs(2);
/// How long lines gather after a write before the next one.
const GATHER: Duration = Duration::from_millis(5);

struct Queue {
    pending: Mutex<Pending>,
    /// The writer thread waits here for lines, and lines for room.
    changed: Condvar,
    /// Lines written, and the flushes waiting for them.
    written: Mutex<Written>,
    flushed: Condvar,
}

struct Pending {
    /// Lines not yet taken by the writer thread, whole and in order.
    bytes: Vec<u8>,
    /// Lines appended since the start.
    lines: u64,
    /// Whether the writer thread runs; without it lines are written where
    /// they happen.
    writer: bool,
    /// Whether the writer thread waits for lines (only then is it woken).
    writer_idle: bool,
    /// Lines waiting for room.
    blocked: usize,
    /// Whether a [`flush`] waits: the lines gathering are written at once.
    hurry: bool,
}

#[derive(Default)]
struct Written {
    lines: u64,
    flushes: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn queue() -> &'static Queue {
    static QUEUE: OnceLock<Queue> = OnceLock::new();
    let q = QUEUE.get_or_init(|| Queue {
        pending: Mutex::new(Pending {
            bytes: Vec::with_capacity(START_BYTES),
            lines: 0,
            writer: false,
            writer_idle: false,
            blocked: 0,
            hurry: false,
        }),
        changed: Condvar::new(),
        written: Mutex::new(Written::default()),
        flushed: Condvar::new(),
    });
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        // Marked before the thread runs, so that no line is written
        // directly while an earlier one waits in the buffer.
        lock(&q.pending).writer = true;
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(q));
        if let Err(e) = spawned {
            lock(&q.pending).writer = false;
            eprintln!("cannot start the log writer thread: {e}");
        }
    });
    q
}

/// The writer thread: waits for lines, takes all of them, writes them in
/// one call, says how many are done, and lets the next ones gather.
fn write_lines(q: &'static Queue) {
    let mut taken = Vec::with_capacity(START_BYTES);
    loop {
        let done = {
            let mut p = lock(&q.pending);
            while p.bytes.is_empty() {
                p.writer_idle = true;
                p = q.changed.wait(p).unwrap_or_else(PoisonError::into_inner);
            }
            p.writer_idle = false;
            p.hurry = false;
            std::mem::swap(&mut p.bytes, &mut taken);
            if p.blocked > 0 {
                q.changed.notify_all();
            }
            p.lines
        };
        let _ = std::io::stderr().lock().write_all(&taken);
        taken.clear();
        if taken.capacity() > PENDING_BYTES {
            taken = Vec::with_capacity(START_BYTES);
        }
        {
            let mut written = lock(&q.written);
            written.lines = done;
            if written.flushes > 0 {
                q.flushed.notify_all();
            }
        }
        let p = lock(&q.pending);
        let _gathered = q
            .changed
            .wait_timeout_while(p, GATHER, |p| !p.hurry && p.bytes.len() < PENDING_BYTES / 2)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Appends a line, waiting while the buffer is full.
fn append(line: &[u8]) {
    let q = queue();
    let mut p = lock(&q.pending);
    if !p.writer {
        drop(p);
        let _ = std::io::stderr().lock().write_all(line);
        return;
    }
    while p.bytes.len() >= PENDING_BYTES {
        p.blocked += 1;
        p = q.changed.wait(p).unwrap_or_else(PoisonError::into_inner);
        p.blocked -= 1;
    }
    let before = p.bytes.len();
    p.bytes.extend_from_slice(line);
    p.lines += 1;
    // The writer thread is woken when it waits for a first line, and once
    // when the buffer passes half full while it lets lines gather.
    let half = PENDING_BYTES / 2;
    if p.writer_idle || (before < half && p.bytes.len() >= half) {
        p.writer_idle = false;
        q.changed.notify_all();
    }
}

/// Waits (up to two seconds) until every line appended so far is written.
pub fn flush() {
    let q = queue();
    let target = {
        let mut p = lock(&q.pending);
        p.hurry = true;
        q.changed.notify_all();
        p.lines
    };
    let mut written = lock(&q.written);
    written.flushes += 1;
    let (mut written, _) = q
        .flushed
        .wait_timeout_while(written, FLUSH_WAIT, |w| w.lines < target)
        .unwrap_or_else(PoisonError::into_inner);
    written.flushes -= 1;
}

/// Standard error through the writer thread, for the log layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueuedStderr;

impl<'a> MakeWriter<'a> for QueuedStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Self::Writer {
        Line
    }
}

/// A log line on its way: the log layer writes each line in one call
/// (`write_all` of the line it formatted), so a call is appended whole.
pub struct Line;

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !buf.is_empty() {
            append(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_waits_for_every_appended_line() {
        for i in 0..1000 {
            let mut line = QueuedStderr.make_writer();
            let _ = writeln!(line, "log writer test line {i}");
        }
        let appended = lock(&queue().pending).lines;
        assert!(appended >= 1000);
        flush();
        assert!(lock(&queue().written).lines >= appended);
    }
}
