//! A dial load through a client entry (HTTP CONNECT): a dial every period, each an echo round
//! trip, timed from its TCP connect to its echo.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::support::within;

/// A strong token for the entry's one client.
pub const TOKEN: &str = "5d2a7c9e1b3f46a08e7d2c5b9a1f3e6d4c8b0a2f7e9d1c3b5a7f9e2d4c6b8a0f";

/// The `name:token` line the entry is started with.
pub fn tokens() -> String {
    format!("alice:{TOKEN}\n")
}

/// How one dial ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Connected and echoed.
    Served,
    /// The entry answered with something other than 200 (the text).
    Refused(String),
    /// Connected (200), then the stream broke before the echo: it was on the path that died.
    Broken,
    /// Nothing within the client's own limit.
    Hung,
}

/// One dial of the load.
#[derive(Debug, Clone)]
pub struct Dial {
    /// When it started.
    pub started: Instant,
    /// How long it took to end, however it ended.
    pub took: Duration,
    pub outcome: Outcome,
}

/// The client's own limit on one dial: beyond the proxy's 30 s dial timeout, so a dial that
/// waits on a dead path shows as such.
const CLIENT_LIMIT: Duration = Duration::from_secs(40);

/// One dial to `echo` in the leaf through `entry`.
pub async fn dial_once(entry: SocketAddr, echo: SocketAddr) -> Dial {
    let started = Instant::now();
    let outcome = tokio::time::timeout(CLIENT_LIMIT, connect_and_echo(entry, echo))
        .await
        .unwrap_or(Outcome::Hung);
    Dial {
        started,
        took: started.elapsed(),
        outcome,
    }
}

async fn connect_and_echo(entry: SocketAddr, echo: SocketAddr) -> Outcome {
    match open_stream(entry, echo).await {
        Ok(_) => Outcome::Served,
        Err(outcome) => outcome,
    }
}

/// The first stream to `echo` through `entry` that opens and echoes, trying every 50 ms for up
/// to 20 s (named `what`): right after start-up, the agent's tunnel may not be up yet.
pub async fn first_stream(what: &str, entry: SocketAddr, echo: SocketAddr) -> TcpStream {
    within(what, Duration::from_secs(20), async {
        loop {
            if let Ok(s) = open_stream(entry, echo).await {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// Asserts `stream` (named `what`) ends, at end-of-file or with an error, within `bound` and
/// without delivering data: what a client must see once the path under its stream died.
pub async fn assert_stream_ends(stream: &mut TcpStream, what: &str, bound: Duration) {
    let mut buf = [0u8; 16];
    let end = within(&format!("{what} to end"), bound, stream.read(&mut buf)).await;
    assert!(
        matches!(end, Ok(0) | Err(_)),
        "{what} delivered data instead of ending: {end:?}"
    );
}

/// Opens a stream to `echo` through `entry` and checks one echo, leaving it open.
pub async fn open_stream(entry: SocketAddr, echo: SocketAddr) -> Result<TcpStream, Outcome> {
    let Ok(mut s) = TcpStream::connect(entry).await else {
        return Err(Outcome::Refused("entry unreachable".into()));
    };
    let target = format!("127.0.0.1.leaf.tether:{}", echo.port());
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("alice:{TOKEN}"));
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {credentials}\r\n\r\n"
    );
    if s.write_all(request.as_bytes()).await.is_err() {
        return Err(Outcome::Refused("entry closed".into()));
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(Outcome::Refused(
            head.lines().next().unwrap_or("").to_owned(),
        ));
    }
    let mut back = [0u8; 4];
    match async {
        s.write_all(b"ping").await?;
        s.read_exact(&mut back).await
    }
    .await
    {
        Ok(_) if &back == b"ping" => Ok(s),
        _ => Err(Outcome::Broken),
    }
}

/// A load running in the background until [`Load::finish`].
pub struct Load {
    stop: CancellationToken,
    dials: Arc<Mutex<Vec<tokio::task::JoinHandle<Dial>>>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Starts a dial every `period`, each in its own task (a slow dial never delays the next).
    pub fn start(entry: SocketAddr, echo: SocketAddr, period: Duration) -> Load {
        let stop = CancellationToken::new();
        let dials: Arc<Mutex<Vec<_>>> = Arc::default();
        let (stopped, list) = (stop.clone(), dials.clone());
        let driver = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    _ = tick.tick() => {
                        let dial = tokio::spawn(dial_once(entry, echo));
                        list.lock().expect("lock").push(dial);
                    }
                }
            }
        });
        Load {
            stop,
            dials,
            driver,
        }
    }

    /// How many dials have ended so far.
    pub fn finished(&self) -> usize {
        let list = self.dials.lock().expect("lock");
        list.iter().filter(|d| d.is_finished()).count()
    }

    /// Stops starting dials, waits for those started, and returns them in start order.
    pub async fn finish(self) -> Vec<Dial> {
        self.stop.cancel();
        let _ = self.driver.await;
        let handles = std::mem::take(&mut *self.dials.lock().expect("lock"));
        let mut out = Vec::with_capacity(handles.len());
        for h in handles {
            out.push(h.await.expect("dial task"));
        }
        out
    }
}

/// The `q` quantile (0..=1) of the dials' latencies.
pub fn quantile(dials: &[&Dial], q: f64) -> Duration {
    let mut took: Vec<Duration> = dials.iter().map(|d| d.took).collect();
    took.sort();
    if took.is_empty() {
        return Duration::ZERO;
    }
    let i = ((took.len() - 1) as f64 * q).round() as usize;
    took[i]
}

/// Prints the latencies of the dials started from `from` on (the fault), and returns them.
pub fn report<'a>(what: &str, dials: &'a [Dial], from: Instant) -> Vec<&'a Dial> {
    let during: Vec<&Dial> = dials.iter().filter(|d| d.started >= from).collect();
    let count = |o: fn(&Outcome) -> bool| during.iter().filter(|d| o(&d.outcome)).count();
    println!(
        "{what}: {} dials during the fault ({} served, {} broken in flight, {} refused, {} hung): p50 {:?}, p99 {:?}, max {:?}",
        during.len(),
        count(|o| *o == Outcome::Served),
        count(|o| *o == Outcome::Broken),
        count(|o| matches!(o, Outcome::Refused(_))),
        count(|o| *o == Outcome::Hung),
        quantile(&during, 0.5),
        quantile(&during, 0.99),
        quantile(&during, 1.0),
    );
    for d in during.iter().filter(|d| d.outcome != Outcome::Served) {
        println!(
            "  {:?}: started {:?} into the fault, took {:?}",
            d.outcome,
            d.started.duration_since(from),
            d.took
        );
    }
    during
}

/// Asserts that every dial ended within `bound` and that none was refused or hung (a dial
/// whose stream was already open on the path that died may break; that is counted, not
/// failed).
pub fn assert_no_dial_waited(dials: &[Dial], bound: Duration) {
    for d in dials {
        assert!(
            d.took <= bound,
            "a dial took {:?} (bound {bound:?}), ending {:?}",
            d.took,
            d.outcome
        );
        assert!(
            matches!(d.outcome, Outcome::Served | Outcome::Broken),
            "a dial failed: {:?} after {:?}",
            d.outcome,
            d.took
        );
    }
}
