//! Re-reading a file the proxy was started with (its client token file) while it runs: when
//! the file changes, and at once on SIGHUP (what `kill -HUP` and most supervisors send to ask
//! for a reload).
//!
//! A change is seen by polling the file's identity every 2 s (inode, size, modification time:
//! one `stat`, so nothing is read or parsed while the file stays as it was). Kubernetes
//! replaces a mounted Secret by swapping a symlink, which changes the inode the path leads to.
//! A file that has become unreadable or invalid leaves the previous contents in force; its
//! error (naming the file and the cause) is logged once until it changes, so a bad edit does
//! not lock every client out, nor fill the log.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the file's identity is checked.
pub const POLL: Duration = Duration::from_secs(2);

/// What `stat` says of a file: enough to tell that it was replaced or edited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    /// The inode the path leads to (a replaced file or a swapped symlink changes it).
    inode: u64,
    /// Its size.
    len: u64,
    /// Its modification time, in nanoseconds since the epoch.
    modified_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: meta.ino(),
        len: meta.len(),
        modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
    })
}

/// Calls `reload(path)` whenever the file at `path` changes (checked every `poll`, usually
/// [`POLL`]) and whenever `wake` is notified, until `stop`. `reload` applies the new contents or returns why it could not (the previous
/// contents then stay); `what` names the file in logs ("client token file").
pub async fn follow_file<E: std::fmt::Display>(
    what: &'static str,
    path: PathBuf,
    poll: Duration,
    wake: Arc<Notify>,
    stop: CancellationToken,
    mut reload: impl FnMut(&Path) -> Result<(), E>,
) {
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen = stamp(&path);
    let mut last_error: Option<String> = None;
    loop {
        let woken = tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => false,
            () = wake.notified() => true,
        };
        let now = stamp(&path);
        if !woken && now == seen {
            continue;
        }
        seen = now;
        match reload(&path) {
            Ok(()) => {
                last_error = None;
                info!(file = %path.display(), "{what} re-read");
            }
            Err(e) => {
                let text = e.to_string();
                if last_error.as_deref() != Some(text.as_str()) {
                    warn!(error = %text, "{what} not re-read; the previous contents stay");
                    last_error = Some(text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const TEST_POLL: Duration = Duration::from_millis(20);

    /// Runs [`follow_file`] on a file, recording what each reload read: the text it applied,
    /// or `refused: TEXT` for one it turned down.
    fn start(path: PathBuf) -> (Arc<Mutex<Vec<String>>>, Arc<Notify>, CancellationToken) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (wake, stop) = (Arc::new(Notify::new()), CancellationToken::new());
        tokio::spawn(follow_file(
            "test file",
            path,
            TEST_POLL,
            wake.clone(),
            stop.clone(),
            {
                let seen = seen.clone();
                move |p: &Path| {
                    let text = std::fs::read_to_string(p).map_err(|e| e.to_string())?;
                    if text.contains("bad") {
                        seen.lock().expect("lock").push(format!("refused: {text}"));
                        return Err(format!("{}: bad", p.display()));
                    }
                    seen.lock().expect("lock").push(text);
                    Ok::<(), String>(())
                }
            },
        ));
        (seen, wake, stop)
    }

    async fn until(seen: &Mutex<Vec<String>>, n: usize) {
        while seen.lock().expect("lock").len() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_changed_file_is_re_read_and_an_unchanged_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, "one").expect("write");
        let (seen, _wake, stop) = start(path.clone());
        // Ten polls of an unchanged file read nothing.
        tokio::time::sleep(TEST_POLL * 10).await;
        assert!(seen.lock().expect("lock").is_empty());
        std::fs::write(&path, "two, longer").expect("write");
        until(&seen, 1).await;
        assert_eq!(*seen.lock().expect("lock"), ["two, longer"]);
        stop.cancel();
    }

    #[tokio::test]
    async fn a_wake_re_reads_at_once_and_a_bad_file_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, "one").expect("write");
        let (seen, wake, stop) = start(path.clone());
        wake.notify_one();
        until(&seen, 1).await;
        // No wake from here: the poll sees each change once.
        std::fs::write(&path, "bad contents").expect("write");
        until(&seen, 2).await;
        std::fs::write(&path, "fixed").expect("write");
        until(&seen, 3).await;
        // The bad file was read and refused once (not again at every poll while it stayed),
        // and the next good one applied.
        assert_eq!(
            *seen.lock().expect("lock"),
            ["one", "refused: bad contents", "fixed"]
        );
        stop.cancel();
    }
}
