//! Log lines leave through a thread of their own. A handled message logs
//! one line; written straight to stderr, each line was a system call (and
//! a wake-up of whoever reads the pipe) on the message's path, which cost
//! about a fifth of the drain rate and a quarter of a request's latency
//! (see README, Performance). Here a line is formatted where it happens
//! and handed to a queue; the writer thread writes whatever has queued up
//! at once, in order, and flushes. The queue is bounded: when it is full a
//! line waits, as a direct write would; nothing is dropped.
//!
//! [`flush`] waits until every line queued before it is written: the CLI
//! calls it before the process exits and the crash points before they
//! abort.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Lines that may wait for the writer thread.
const QUEUE_LINES: usize = 16 * 1024;
/// Room a line starts with: a message's line with its span fits, so it
/// is one allocation, not one per doubling.
const LINE_CAPACITY: usize = 1024;
/// How long [`flush`] waits at most.
const FLUSH_WAIT: Duration = Duration::from_secs(2);

struct Queue {
    lines: SyncSender<Vec<u8>>,
    /// Lines handed to the queue.
    queued: AtomicU64,
    /// Lines written and flushed, and its change.
    written: Mutex<u64>,
    changed: Condvar,
}

fn queue() -> &'static Queue {
    static QUEUE: OnceLock<Queue> = OnceLock::new();
    QUEUE.get_or_init(|| {
        let (lines, rx) = sync_channel(QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(rx));
        if let Err(e) = spawned {
            // Lines then fall back to direct writes (see `Line::drop`).
            eprintln!("cannot start the log writer thread: {e}");
        }
        Queue {
            lines,
            queued: AtomicU64::new(0),
            written: Mutex::new(0),
            changed: Condvar::new(),
        }
    })
}

/// The writer thread: waits for a line, writes it and every line queued
/// behind it, flushes, and says how many are done.
fn write_lines(rx: Receiver<Vec<u8>>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr());
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(&line);
        let mut done = 1;
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(&line);
            done += 1;
        }
        let _ = out.flush();
        let q = queue();
        if let Ok(mut written) = q.written.lock() {
            *written += done;
        }
        q.changed.notify_all();
    }
}

/// Waits (up to two seconds) until every line queued so far is written.
pub fn flush() {
    let q = queue();
    let target = q.queued.load(Ordering::SeqCst);
    let Ok(written) = q.written.lock() else {
        return;
    };
    let _ = q
        .changed
        .wait_timeout_while(written, FLUSH_WAIT, |w| *w < target);
}

/// Standard error through the writer thread, for the log layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct QueuedStderr;

impl<'a> MakeWriter<'a> for QueuedStderr {
    type Writer = Line;

    fn make_writer(&'a self) -> Self::Writer {
        Line(Vec::with_capacity(LINE_CAPACITY))
    }
}

/// One log line being formatted; queued when dropped.
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        let line = std::mem::take(&mut self.0);
        let q = queue();
        q.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(unsent) = q.lines.send(line) {
            // No writer thread: write it here, and count it as written.
            let _ = std::io::stderr().write_all(&unsent.0);
            if let Ok(mut written) = q.written.lock() {
                *written += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_waits_for_every_queued_line() {
        for i in 0..1000 {
            let mut line = QueuedStderr.make_writer();
            let _ = writeln!(line, "log writer test line {i}");
        }
        flush();
        let q = queue();
        let written = *q.written.lock().unwrap();
        assert!(written >= q.queued.load(Ordering::SeqCst).min(1000));
        assert!(written >= 1000);
    }
}
