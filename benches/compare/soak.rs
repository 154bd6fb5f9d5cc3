//! The long soak (issue #18): one proxy and one agent, real processes, one long-lived tunnel,
//! under a steady load of short dials (a 64-byte echo through the client entry, then close),
//! with the RSS and open file descriptors of each process sampled over time.
//!
//! `cargo bench --bench compare -- --only soak --soak-secs 3600 [--soak-rate 50]`
//!
//! What it shows is the slope: memory kept per dial, in bytes, from the end of the warm-up (a
//! tenth of the run, at least 10 s) to the end. Before the russh fix in vendor/ the agent kept
//! ~3.3 KB per dial and the proxy ~0.4-1 KB, for as long as the tunnel lived.

use std::fmt::Write as _;
use std::fs;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::MissedTickBehavior;

use crate::Res;
use crate::paths::{Env, ready};
use crate::procs::{Procs, status_kib};
use crate::tunnel::{TetherFiles, spawn_agent};
use crate::workloads::Dial;

/// Dials in flight at most; a tick finding this many still open is counted as skipped, so a
/// stalled tunnel shows up as missing dials rather than as a pile of tasks in this process.
const MAX_IN_FLIGHT: u64 = 256;

/// The longest one dial may take before it counts as failed.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Rows in the printed table (every sample is kept in the CSV).
const TABLE_ROWS: usize = 12;

/// What the load has done so far.
#[derive(Default)]
struct Counts {
    /// Dials whose echo came back whole and whose stream closed cleanly.
    ok: AtomicU64,
    /// Dials that failed or timed out.
    failed: AtomicU64,
    /// Ticks with [`MAX_IN_FLIGHT`] dials already open.
    skipped: AtomicU64,
    /// Dials started and not finished.
    in_flight: AtomicU64,
}

/// One look at both processes.
pub(crate) struct Sample {
    /// Seconds since the load started.
    secs: f64,
    /// Dials finished by then (ok and failed).
    dials: u64,
    /// Of those, failed.
    failed: u64,
    /// The proxy's resident memory (VmRSS).
    proxy_rss_kib: u64,
    /// The proxy's open file descriptors: a stream whose socket outlived it shows here.
    proxy_fds: usize,
    /// The agent's resident memory (VmRSS).
    agent_rss_kib: u64,
    /// The agent's open file descriptors.
    agent_fds: usize,
}

/// A finished soak.
pub(crate) struct Soak {
    /// How long the load ran.
    secs: u64,
    /// Dials a second asked for.
    rate: u32,
    /// Looks at both processes, every `secs / 120` s (1 to 30 s), plus one after the load.
    samples: Vec<Sample>,
    /// Index of the first sample after the warm-up.
    warm: usize,
    /// Ticks skipped because [`MAX_IN_FLIGHT`] dials were still open.
    skipped: u64,
    /// The first failure's message, if any.
    first_error: Option<String>,
}

/// Runs the soak for `secs` at `rate` dials a second.
pub(crate) fn soak(env: &Env, files: &TetherFiles, secs: u64, rate: u32) -> Res<Soak> {
    eprintln!("== soak: {secs} s at {rate} dials/s");
    let mut procs = Procs::default();
    let (proxy, port, entry) = files.proxy(env, &mut procs, "soak-proxy")?;
    let agent = spawn_agent(env, files, &mut procs, "soak-agent", port, &[])?;
    let dial = Dial::Entry(Arc::new(files.entry(entry, env.echo.port())?));
    ready(env, &mut procs, &dial)?;
    let counts = Arc::new(Counts::default());
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(secs);
    let load = env.rt.spawn(steady_load(
        dial,
        rate,
        stop_at,
        counts.clone(),
        first_error.clone(),
    ));
    let every = Duration::from_secs((secs / 120).clamp(1, 30));
    let warm_after = Duration::from_secs((secs / 10).max(10));
    let mut samples = Vec::new();
    let mut warm = None;
    loop {
        let now = started.elapsed();
        let sample = look(proxy, agent, &counts, now.as_secs_f64())?;
        if warm.is_none() && now >= warm_after {
            warm = Some(samples.len());
        }
        samples.push(sample);
        procs.check(&env.logs)?;
        if Instant::now() >= stop_at {
            break;
        }
        let next = every * samples.len() as u32;
        std::thread::sleep(next.saturating_sub(started.elapsed()));
    }
    env.rt.block_on(load).map_err(|e| e.to_string())?;
    // The dials still in flight finish (or time out) before the last look.
    let settle = Instant::now() + DIAL_TIMEOUT;
    while counts.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(50));
    }
    samples.push(look(
        proxy,
        agent,
        &counts,
        started.elapsed().as_secs_f64(),
    )?);
    let first_error = first_error.lock().map(|e| e.clone()).unwrap_or(None);
    Ok(Soak {
        secs,
        rate,
        warm: warm.unwrap_or(0),
        samples,
        skipped: counts.skipped.load(Ordering::Relaxed),
        first_error,
    })
}

fn look(proxy: u32, agent: u32, counts: &Counts, secs: f64) -> Res<Sample> {
    let rss = |pid: u32, who: &str| {
        status_kib(pid, "VmRSS:").ok_or_else(|| format!("the {who} (pid {pid}) is gone"))
    };
    let failed = counts.failed.load(Ordering::Relaxed);
    Ok(Sample {
        secs,
        dials: counts.ok.load(Ordering::Relaxed) + failed,
        failed,
        proxy_rss_kib: rss(proxy, "proxy")?,
        proxy_fds: fds(proxy),
        agent_rss_kib: rss(agent, "agent")?,
        agent_fds: fds(agent),
    })
}

fn fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Starts a dial every `1/rate` s until `stop_at` (missed ticks are not made up in a burst).
async fn steady_load(
    dial: Dial,
    rate: u32,
    stop_at: Instant,
    counts: Arc<Counts>,
    first_error: Arc<std::sync::Mutex<Option<String>>>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    while Instant::now() < stop_at {
        tick.tick().await;
        if counts.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            counts.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        counts.in_flight.fetch_add(1, Ordering::Relaxed);
        let (dial, counts, first_error) = (dial.clone(), counts.clone(), first_error.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(DIAL_TIMEOUT, echo_and_close(&dial)).await {
                Ok(Ok(())) => counts.ok.fetch_add(1, Ordering::Relaxed),
                outcome => {
                    let why = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no echo within {DIAL_TIMEOUT:?}"),
                    };
                    if let Ok(mut first) = first_error.lock() {
                        first.get_or_insert(why);
                    }
                    counts.failed.fetch_add(1, Ordering::Relaxed)
                }
            };
            counts.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One dial: 64 bytes to the echo server and back, then a clean close from both ends.
async fn echo_and_close(dial: &Dial) -> std::io::Result<()> {
    let mut s = dial.open().await?;
    // The bench server echoes what follows a first byte `e`.
    let mut request = [b'x'; 65];
    request[0] = b'e';
    s.write_all(&request).await?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).await?;
    if back[..] != request[1..] {
        return Err(std::io::Error::other("the echo came back different"));
    }
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    Ok(())
}

impl Soak {
    /// Bytes each process kept per dial after the warm-up: (proxy, agent).
    fn kept_per_dial(&self) -> Option<(f64, f64)> {
        let (from, to) = (self.samples.get(self.warm)?, self.samples.last()?);
        let dials = to.dials.checked_sub(from.dials).filter(|d| *d > 0)? as f64;
        let per = |a: u64, b: u64| (b as f64 - a as f64) * 1024.0 / dials;
        Some((
            per(from.proxy_rss_kib, to.proxy_rss_kib),
            per(from.agent_rss_kib, to.agent_rss_kib),
        ))
    }

    /// The section of the report: a summary and the samples over time.
    pub(crate) fn render(&self) -> String {
        let mut s = String::new();
        let last = self.samples.last();
        let (dials, failed, secs) = last.map_or((0, 0, 0.0), |l| (l.dials, l.failed, l.secs));
        let _ = writeln!(s, "## Soak\n");
        let _ = writeln!(
            s,
            "{} s at {} dials/s asked: {dials} dials ({:.1}/s), {failed} failed, {} skipped \
             (already {MAX_IN_FLIGHT} in flight){}.\n",
            self.secs,
            self.rate,
            dials as f64 / secs.max(1e-9),
            self.skipped,
            self.first_error
                .as_ref()
                .map_or(String::new(), |e| format!("; first failure: {e}")),
        );
        if let Some((proxy, agent)) = self.kept_per_dial() {
            let _ = writeln!(
                s,
                "RSS kept per dial after the warm-up (from {:.0} s): proxy {proxy:.0} B, agent \
                 {agent:.0} B.\n",
                self.samples[self.warm].secs
            );
        }
        let _ = writeln!(
            s,
            "| s | dials | failed | proxy RSS MiB | proxy fds | agent RSS MiB | agent fds |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|");
        let step = self.samples.len().div_ceil(TABLE_ROWS).max(1);
        let last_index = self.samples.len().saturating_sub(1);
        for (i, x) in self.samples.iter().enumerate() {
            if i % step == 0 || i == self.warm || i == last_index {
                let _ = writeln!(
                    s,
                    "| {:.0}{} | {} | {} | {:.1} | {} | {:.1} | {} |",
                    x.secs,
                    if i == self.warm { " (warm)" } else { "" },
                    x.dials,
                    x.failed,
                    x.proxy_rss_kib as f64 / 1024.0,
                    x.proxy_fds,
                    x.agent_rss_kib as f64 / 1024.0,
                    x.agent_fds
                );
            }
        }
        s
    }

    /// Every sample, for plotting.
    pub(crate) fn csv(&self) -> String {
        let mut s =
            String::from("secs,dials,failed,proxy_rss_kib,proxy_fds,agent_rss_kib,agent_fds\n");
        for x in &self.samples {
            let _ = writeln!(
                s,
                "{:.1},{},{},{},{},{},{}",
                x.secs,
                x.dials,
                x.failed,
                x.proxy_rss_kib,
                x.proxy_fds,
                x.agent_rss_kib,
                x.agent_fds
            );
        }
        s
    }
}
