//! A dial load: workers that run `tether dial` through haproxy back to back, each dial
//! recorded with when it started and ended and how it failed, to tell the dials a fault could
//! have touched from those it must not.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// One dial of the load.
#[derive(Debug, Clone)]
pub(crate) struct DialRecord {
    /// When `tether dial` was started.
    pub(crate) started: Instant,
    /// When it ended.
    pub(crate) ended: Instant,
    /// Why it failed (an error, or an echo that did not match); `None` when it echoed.
    pub(crate) error: Option<String>,
}

/// Workers dialling until [`Load::finish`].
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    records: Arc<Mutex<Vec<DialRecord>>>,
}

impl Load {
    /// Starts `workers` workers dialling `target` (an echo server) through `dialer`.
    pub(crate) fn start(dialer: Dialer, target: SocketAddr, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let records: Arc<Mutex<Vec<DialRecord>>> = Arc::default();
        let workers = (0..workers)
            .map(|w| {
                let (dialer, stop, records) = (dialer.clone(), stop.clone(), records.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let message = format!("worker {w} dial {n}\n").into_bytes();
                        let started = Instant::now();
                        let error = match dialer.dial(target, &message).await {
                            Ok(echo) if echo == message => None,
                            Ok(echo) => {
                                Some(format!("echoed {} of {} bytes", echo.len(), message.len()))
                            }
                            Err(e) => Some(e),
                        };
                        let ended = Instant::now();
                        records.lock().expect("lock").push(DialRecord {
                            started,
                            ended,
                            error,
                        });
                    }
                })
            })
            .collect();
        Load {
            stop,
            workers,
            records,
        }
    }

    /// Dials completed so far that started after `since`.
    pub(crate) fn completed_since(&self, since: Instant) -> usize {
        self.records
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.started >= since)
            .count()
    }

    /// Waits until `n` dials started after `since` have completed (the load ran on past it).
    pub(crate) async fn wait_dials_after(&self, since: Instant, n: usize) {
        eventually(&format!("{n} dials started after the event"), || {
            let done = self.completed_since(since) >= n;
            async move { done.then_some(()) }
        })
        .await;
    }

    /// Stops the workers (each finishes its dial) and returns every dial.
    pub(crate) async fn finish(self) -> Vec<DialRecord> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("a load worker panicked");
        }
        std::mem::take(&mut *self.records.lock().expect("lock"))
    }
}

/// The dials of `records` around `event`, up to `next` (the following event, if any): (failed
/// while in flight at `event`, failed after it, total started after it).
///
/// A dial started after `event` but still in flight at `next` belongs to `next`: it is counted
/// there as in flight, where a kill may fail it. (A dial begun 33 ms before the second kill
/// and cut by it was once blamed on the first.)
pub(crate) fn split_at(
    records: &[DialRecord],
    event: Instant,
    next: Option<Instant>,
) -> (Vec<&DialRecord>, Vec<&DialRecord>, usize) {
    let in_flight = records
        .iter()
        .filter(|r| r.error.is_some() && r.started < event && r.ended >= event)
        .collect();
    let after: Vec<&DialRecord> = records
        .iter()
        .filter(|r| r.started >= event && next.is_none_or(|n| r.ended < n))
        .collect();
    let failed_after = after
        .iter()
        .copied()
        .filter(|r| r.error.is_some())
        .collect();
    (in_flight, failed_after, after.len())
}

/// A `tether dial` kept open: its first message echoed, the rest to come.
pub(crate) struct LongDial {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
}

impl LongDial {
    /// Opens a dial to `target` and waits for `first` to come back.
    pub(crate) async fn open(dialer: &Dialer, target: SocketAddr, first: &[u8]) -> LongDial {
        use tokio::io::AsyncReadExt;
        let mut child = dialer.command(target).spawn().expect("tether dial starts");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        stdin.write_all(first).await.expect("write");
        let mut echo = vec![0u8; first.len()];
        tokio::time::timeout(Duration::from_secs(30), stdout.read_exact(&mut echo))
            .await
            .expect("the first echo in time")
            .expect("the first echo");
        assert_eq!(echo, first);
        LongDial {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends `last`, closes its side, and checks that exactly `last` comes back before the end.
    pub(crate) async fn finish(mut self, last: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        self.stdin
            .write_all(last)
            .await
            .map_err(|e| format!("writing: {e}"))?;
        drop(self.stdin);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), self.stdout.read_to_end(&mut rest))
            .await
            .map_err(|_| "the stream did not end".to_owned())?
            .map_err(|e| format!("reading: {e}"))?;
        let status = self.child.wait().await.map_err(|e| e.to_string())?;
        if rest != last || !status.success() {
            return Err(format!(
                "{status}: echoed {} of {} bytes",
                rest.len(),
                last.len()
            ));
        }
        Ok(())
    }
}
