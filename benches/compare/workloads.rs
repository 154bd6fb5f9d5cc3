//! The workloads every path runs: bulk transfers, round trips, stream setup, iperf3.

use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use tether::forward::ForwardConfig;

use crate::procs::run;
use crate::{Opts, Res};

// ---------------------------------------------------------------------------------------------
// Workloads

/// How a client reaches the echo server through a path.
#[derive(Clone)]
pub(crate) enum Dial {
    Plain(SocketAddr),
    /// Tether's client entry: HTTP CONNECT with a token.
    Entry(Arc<ForwardConfig>),
}

impl Dial {
    pub(crate) async fn open(&self) -> io::Result<TcpStream> {
        let s = match self {
            Dial::Plain(a) => TcpStream::connect(a).await?,
            Dial::Entry(c) => tether::forward::connect(c)
                .await
                .map_err(io::Error::other)?,
        };
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// Opens an echo stream and checks one echoed byte: the stream works end to end.
    pub(crate) async fn open_checked(&self) -> io::Result<TcpStream> {
        let mut s = self.open().await?;
        s.write_all(b"ex").await?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await?;
        Ok(s)
    }
}

/// Bytes the bench server's sinks have read, all streams together.
pub(crate) static SUNK: AtomicU64 = AtomicU64::new(0);

/// Size of the buffers bulk transfers write and read.
pub(crate) const BULK_BUF: usize = 128 * 1024;

/// The server every path leads to. A stream's first byte says what it wants: `e` echo, `u`
/// upload (read and count into [`SUNK`]), `d` download (send until the client goes away).
pub(crate) async fn bench_server() -> io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mode) = s.read_u8().await else { return };
                match mode {
                    b'u' => {
                        let mut buf = vec![0u8; BULK_BUF];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            SUNK.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                    b'd' => {
                        let buf = vec![0x5a; BULK_BUF];
                        while s.write_all(&buf).await.is_ok() {}
                    }
                    _ => {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Bulk transfer on `streams` parallel streams, up (client → server) or down: Gbit/s over
/// `secs` after `warm` (counted where the bytes arrive).
pub(crate) async fn bulk(
    dial: &Dial,
    streams: usize,
    down: bool,
    warm: Duration,
    secs: Duration,
) -> io::Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut s = dial.open().await?;
        s.write_all(if down { b"d" } else { b"u" }).await?;
        conns.push(s);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in conns {
        let received = received.clone();
        tasks.spawn(async move {
            let mut buf = vec![0x33u8; BULK_BUF];
            loop {
                if down {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => received.fetch_add(n as u64, Ordering::Relaxed),
                    };
                } else if s.write_all(&buf).await.is_err() {
                    break;
                }
            }
        });
    }
    let count = || {
        if down {
            received.load(Ordering::Relaxed)
        } else {
            SUNK.load(Ordering::Relaxed)
        }
    };
    tokio::time::sleep(warm).await;
    let (c0, t0) = (count(), Instant::now());
    tokio::time::sleep(secs).await;
    let (c1, elapsed) = (count(), t0.elapsed());
    let finished_early = tasks.try_join_next().is_some();
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    if finished_early || c1 <= c0 {
        return Err(io::Error::other(
            "a stream ended during the transfer or moved nothing",
        ));
    }
    Ok((c1 - c0) as f64 * 8.0 / elapsed.as_secs_f64() / 1e9)
}

/// 64-byte round trips on one stream: (p50, p99) in µs.
pub(crate) async fn latency(dial: &Dial, n: usize) -> io::Result<(f64, f64)> {
    let mut s = dial.open_checked().await?;
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    for _ in 0..n.min(200) {
        s.write_all(&msg).await?;
        s.read_exact(&mut buf).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await?;
        s.read_exact(&mut buf).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok((at(0.50), at(0.99)))
}

/// New streams per second (each checked end to end with one echoed byte), 4 dialling at once,
/// until `n` streams or `limit` time.
pub(crate) async fn setup_rate(dial: &Dial, n: usize, limit: Duration) -> io::Result<f64> {
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..4 {
        let dial = dial.clone();
        let done = done.clone();
        workers.push(tokio::spawn(async move {
            while started.elapsed() < limit && done.load(Ordering::Relaxed) < n {
                let s = dial.open_checked().await?;
                drop(s);
                done.fetch_add(1, Ordering::Relaxed);
            }
            io::Result::Ok(())
        }));
    }
    for w in workers {
        w.await.map_err(io::Error::other)??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// One iperf3 run, tried up to 3 times (iperf3's server refuses a test while it is still
/// tearing down the previous one): Gbit/s received, or why not.
pub(crate) fn iperf(port: u16, streams: u32, reverse: bool, opts: &Opts) -> Res<f64> {
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        match iperf_once(port, streams, reverse, opts) {
            Ok(g) => return Ok(g),
            Err(e) => last = e,
        }
    }
    Err(last)
}

pub(crate) fn iperf_once(port: u16, streams: u32, reverse: bool, opts: &Opts) -> Res<f64> {
    let omit = if opts.smoke { 0 } else { 1 };
    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", "127.0.0.1", "-J", "-p"])
        .arg(port.to_string())
        .args(["-t", &opts.secs.to_string(), "-O", &omit.to_string()])
        .args(["-P", &streams.to_string()]);
    if reverse {
        cmd.arg("-R");
    }
    let limit = Duration::from_secs(u64::from(opts.secs + omit) + 20);
    let out = run(&mut cmd, limit).map_err(|e| {
        // iperf3 -J reports its error in the JSON on stdout.
        e.split("\"error\":")
            .nth(1)
            .map(|s| s.trim().to_owned())
            .unwrap_or(e)
    })?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(e) = v.get("error") {
        return Err(format!("iperf3: {e}"));
    }
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    if bytes <= 0.0 {
        return Err("iperf3 moved no bytes".into());
    }
    sum["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .ok_or_else(|| "iperf3 JSON without bits_per_second".into())
}
