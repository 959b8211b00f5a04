//! The access log's writer: lines go through a bounded queue to one writer thread, so
//! a slow stderr (a full pipe, a stalled log collector) never blocks a request. A line
//! that finds the queue full is dropped and counted ([`dropped`]); the edge exports the
//! count as `netbore_edge_access_log_dropped_total`. Other log lines stay synchronous:
//! they are rare, and a line logged just before the process exits must not be lost.

use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::time::Duration;

/// The `tracing` target of access lines: the events written through this queue.
pub const ACCESS_TARGET: &str = "netbore::access";
/// Most access lines waiting for the writer thread; past it lines are dropped (a few
/// hundred bytes each, so at most a few MiB are held).
pub const QUEUE_LINES: usize = 8192;
/// Most lines the writer thread joins into one write to stderr.
const BATCH_LINES: usize = 256;
/// How long the writer lets lines gather after each write. A writer parked in `recv`
/// is woken (a futex wake-up and a context switch) by every single line a request logs;
/// one that lingers is found awake, and writes many lines at once.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

enum Msg {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

static QUEUE: OnceLock<SyncSender<Msg>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Access lines dropped because the queue was full, since the process started.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

fn queue() -> &'static SyncSender<Msg> {
    QUEUE.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, std::io::stderr()));
        if let Err(e) = spawned {
            // Without the thread every line is dropped (and counted): say so once.
            eprintln!("warning: the access log writer thread did not start: {e}");
        }
        tx
    })
}

/// Writes what arrives on `rx` to `out`, joining queued lines into one write.
fn write_lines(rx: Receiver<Msg>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(16 * 1024);
    let mut flushes = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(l) => batch.extend_from_slice(&l),
                Msg::Flush(done) => flushes.push(done),
            }
            n += 1;
            if n < BATCH_LINES {
                next = rx.try_recv().ok();
            }
        }
        // A failed write has nowhere to be reported: stderr is where it would go.
        let _ = out.write_all(&batch);
        let _ = out.flush();
        batch.clear();
        if batch.capacity() > 256 * 1024 {
            batch.shrink_to(16 * 1024);
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        std::thread::sleep(LINGER);
    }
}

/// Waits (at most `within`) until every access line queued so far is written.
pub fn flush(within: Duration) {
    let Some(q) = QUEUE.get() else { return };
    let (tx, rx) = std::sync::mpsc::channel();
    let deadline = std::time::Instant::now() + within;
    let mut msg = Msg::Flush(tx);
    loop {
        match q.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let _ = rx.recv_timeout(left);
}

/// The `MakeWriter` of the access log layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for AccessWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter { buf: Vec::new() }
    }
}

/// One access line being formatted; queued when dropped (never waits).
#[derive(Debug)]
pub struct LineWriter {
    buf: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        send_line(queue(), &DROPPED, std::mem::take(&mut self.buf));
    }
}

/// Queues `line` without waiting; counts it in `dropped` when the queue is full.
fn send_line(q: &SyncSender<Msg>, dropped: &AtomicU64, line: Vec<u8>) {
    if q.try_send(Msg::Line(line)).is_err() {
        dropped.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records what the writer thread writes, and in how many writes.
    #[derive(Default)]
    struct Seen {
        bytes: Mutex<Vec<u8>>,
        writes: AtomicU64,
    }

    struct Recorder(Arc<Seen>);

    impl Write for Recorder {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.writes.fetch_add(1, Ordering::Relaxed);
            self.0.bytes.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn queued_lines_are_written_in_order_and_joined_into_few_writes() {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        let seen = Arc::new(Seen::default());
        let dropped = AtomicU64::new(0);
        for i in 0..1000 {
            send_line(&tx, &dropped, format!("line {i}\n").into_bytes());
        }
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        tx.send(Msg::Flush(done_tx)).unwrap();
        drop(tx);
        write_lines(rx, Recorder(seen.clone()));
        done_rx.recv().unwrap();
        assert_eq!(dropped.load(Ordering::Relaxed), 0);
        let text = String::from_utf8(seen.bytes.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert_eq!(lines[0], "line 0");
        assert_eq!(lines[999], "line 999");
        // 1,000 queued lines in batches of BATCH_LINES, not one write each.
        let writes = seen.writes.load(Ordering::Relaxed);
        assert!(writes <= (1000 / BATCH_LINES + 1) as u64, "{writes} writes");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // Nobody reads this queue of two: the third and fourth lines cannot wait.
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let dropped = AtomicU64::new(0);
        for l in ["a\n", "b\n", "c\n", "d\n"] {
            send_line(&tx, &dropped, l.as_bytes().to_vec());
        }
        assert_eq!(dropped.load(Ordering::Relaxed), 2);
        drop(tx);
        let seen = Arc::new(Seen::default());
        write_lines(rx, Recorder(seen.clone()));
        assert_eq!(&*seen.bytes.lock().unwrap(), b"a\nb\n");
    }
}
