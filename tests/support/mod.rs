//! The one test-support module, included by every test binary (`mod support;`, or
//! `#[path = "../support/mod.rs"] mod support;` from a test folder) and by the bench drivers.
//! Each binary uses a part of it, hence `dead_code` is allowed.
//!
//! - here: a proxy and an agent in-process on loopback ([`Rig`]), target servers, log capture,
//!   and waiting for conditions with a deadline;
//! - [`procs`]: child processes (one [`procs::Proc`]), free ports, HTTP GETs, `tether` itself;
//! - [`kube`]: a real control plane (etcd, kube-apiserver, kube-controller-manager);
//! - [`tunnel_e2e`]: the operator's end-to-end pieces (CRDs, Secrets, an operator in-process);
//! - [`haproxy`], [`relay`]: a real load balancer, and a relay that can black-hole a path;
//! - [`tinyproxy`]: a real forward proxy with Basic auth.
#![allow(dead_code)]

pub mod haproxy;
pub mod kube;
pub mod procs;
pub mod relay;
pub mod tinyproxy;
pub mod tunnel_e2e;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether::agent::{Agent, AgentConfig, AgentEvent};
use tether::demo::Pki;
use tether::egress::allow_list::AllowList;
use tether::protocol::{ClusterName, DialError, Target};
use tether::proxy::{Dialer, ProxyConfig, ProxyConn, ProxyServer};
use tether::stream::Splice;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)] // for the binaries that use it
pub use tether::demo::echo_server;

/// Runs an agent with `config` in the background; the token stops it.
pub fn run_agent(config: AgentConfig) -> (Arc<Agent>, CancellationToken) {
    let agent = Arc::new(Agent::new(config));
    let stop = CancellationToken::new();
    tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(stop).await }
    });
    (agent, stop)
}

/// Polls `condition` until it holds or `deadline` passes (then panics naming `what`).
pub async fn wait_for<F: FnMut() -> bool>(what: &str, deadline: Duration, mut condition: F) {
    let started = tokio::time::Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut` with a deadline, panicking with `what` if it passes.
pub async fn within<T>(what: &str, deadline: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(deadline, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {deadline:?}: {what}"),
    }
}

pub fn leaf() -> ClusterName {
    ClusterName::new("leaf").expect("valid name")
}

pub fn pki() -> Pki {
    Pki::generate(
        ClusterName::new("root").expect("valid"),
        ClusterName::new("leaf").expect("valid"),
    )
    .expect("pki")
}

/// A proxy, an agent connected to it, and a way to stop the agent.
pub struct Rig {
    pub pki: Pki,
    pub proxy: ProxyServer,
    pub agent: Arc<Agent>,
    pub stop: CancellationToken,
    pub events: tokio::sync::broadcast::Receiver<AgentEvent>,
    /// The proxy's port, kept bound for the whole test so a restarted proxy gets it back.
    pub port: std::net::TcpListener,
}

impl Rig {
    /// Starts a proxy configured by `tune_proxy` and an agent allowing `allow`, configured by
    /// `tune_agent`, and waits until the site is online.
    pub async fn start(
        allow: &[String],
        tune_proxy: impl FnOnce(&mut ProxyConfig),
        tune_agent: impl FnOnce(&mut AgentConfig),
    ) -> Rig {
        let pki = pki();
        let mut config = pki.proxy_config("proxy-1").expect("proxy config");
        tune_proxy(&mut config);
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let held = port.try_clone().expect("clone listener");
        let proxy = ProxyServer::start_on_std(config, held)
            .await
            .expect("proxy starts");
        let mut agent_config = pki
            .agent_config(
                &proxy.local_addr().to_string(),
                AllowList::parse(allow).expect("allow-list"),
            )
            .expect("agent config");
        tune_agent(&mut agent_config);
        let agent = Arc::new(Agent::new(agent_config));
        let events = agent.events();
        let stop = CancellationToken::new();
        tokio::spawn({
            let agent = agent.clone();
            let stop = stop.clone();
            async move { agent.run(stop).await }
        });
        let rig = Rig {
            pki,
            proxy,
            agent,
            stop,
            events,
            port,
        };
        rig.wait_online().await;
        rig
    }

    pub async fn wait_online(&self) {
        let sites = self.proxy.sites();
        wait_for("the leaf to come online", Duration::from_secs(20), || {
            sites
                .get(&leaf())
                .is_some_and(|s| s.status == tether::proxy::SiteStatus::Online)
        })
        .await;
    }

    /// Dials `addr` in the leaf through the proxy.
    pub async fn dial(&self, addr: SocketAddr) -> Result<ProxyConn, DialError> {
        self.dial_name(&format!("{}.leaf.tether:{}", addr.ip(), addr.port()))
            .await
    }

    pub async fn dial_name(&self, name: &str) -> Result<ProxyConn, DialError> {
        let target = Target::parse(name).expect("valid target");
        self.proxy
            .dialer()
            .dial(target, "127.0.0.1:1".parse().expect("addr"))
            .await
    }
}

/// Splices `conn` to one end of an in-memory pipe and returns the other end.
pub fn attach(conn: ProxyConn, buffer: usize) -> (DuplexStream, tokio::task::JoinHandle<()>) {
    let (mine, theirs) = tokio::io::duplex(buffer);
    let task = tokio::spawn(async move {
        let _ = conn.splice(theirs).await;
    });
    (mine, task)
}

/// A server that writes zeros as fast as its client reads; counts what it wrote.
pub async fn firehose_server() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let chunk = vec![0u8; 64 * 1024];
                while let Ok(n) = socket.write(&chunk).await {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (addr, written)
}

/// A server that accepts and never reads; counts nothing (the kernel buffers fill).
pub async fn black_hole_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

/// Sends `message`, half-closes, and reads everything back.
pub async fn echo_round_trip(stream: &mut DuplexStream, message: &[u8]) -> Vec<u8> {
    stream.write_all(message).await.expect("write");
    stream.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.expect("read");
    back
}

/// Sends `message` through a stream to an echo server and checks it comes back, leaving the
/// stream open (unlike [`echo_round_trip`], which half-closes it).
pub async fn echo_once<S>(stream: &mut S, message: &[u8])
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(message).await.expect("write");
    let mut back = vec![0u8; message.len()];
    within(
        "the echo",
        Duration::from_secs(10),
        stream.read_exact(&mut back),
    )
    .await
    .expect("read");
    assert_eq!(back, message, "the echo came back different");
}

/// Captures log lines for the tests that assert what an operator would read.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Installs a capturing subscriber for this thread (use a current-thread runtime).
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        self.install_at(tracing::Level::INFO)
    }

    /// [`LogCapture::install`], capturing up to `level`.
    pub fn install_at(&self, level: tracing::Level) -> tracing::subscriber::DefaultGuard {
        // russh logs through `log`; forward it so its refusals are captured too.
        let _ = tracing_log::LogTracer::init();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .with_max_level(level)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }

    pub async fn wait_for(&self, needle: &str) {
        let me = self.clone();
        wait_for(
            &format!("a log line containing {needle:?}"),
            Duration::from_secs(10),
            || me.text().contains(needle),
        )
        .await;
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("rss field");
    pages * 4096
}

/// An SSH client handler that accepts any host key: for tests that speak SSH to a proxy as an
/// attacker or a joiner would, where the host's identity is not what is tested.
pub struct AnyHost;

impl russh::client::Handler for AnyHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// Serves a client entry (HTTP CONNECT and SOCKS5) for the `name:token` lines of `tokens`,
/// dialling through `proxy`, until the test ends; returns where it listens.
pub async fn start_client_entry(
    proxy: &ProxyServer,
    tokens: &str,
    tune: impl FnOnce(&mut tether::proxy::client_entry::ClientEntryConfig),
) -> SocketAddr {
    use tether::proxy::client_entry::{self, ClientEntryConfig, ClientTokens};
    let mut config = ClientEntryConfig::new(ClientTokens::parse(tokens).expect("tokens"));
    tune(&mut config);
    let config = Arc::new(config);
    let listener = config.bind().await.expect("bind entry");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(client_entry::serve(
        listener,
        config,
        Arc::new(proxy.dialer()),
        std::future::pending::<()>(),
    ));
    addr
}

/// A `tether dial` client of `rig`'s proxy named `name`, its certificate signed by `ca` (the
/// rig's root CA, or another the test makes the proxy trust).
pub fn client_config(
    rig: &Rig,
    ca: &tether::identity::CertificateAuthority,
    name: &str,
) -> tether::client::DialClientConfig {
    client_config_in(rig, ca, name, &[])
}

/// [`client_config`] for a client whose certificate puts it in `groups`.
pub fn client_config_in(
    rig: &Rig,
    ca: &tether::identity::CertificateAuthority,
    name: &str,
    groups: &[String],
) -> tether::client::DialClientConfig {
    tether::client::DialClientConfig {
        proxy_addr: rig.proxy.local_addr().to_string(),
        route: tether::transport::Route::direct(),
        root_cluster: rig.pki.root.cluster().clone(),
        root_cas: vec![rig.pki.root.public_key().clone()],
        identity: Arc::new(
            tether::identity::Identity::generate_client_in(
                ca,
                name,
                groups,
                Duration::from_secs(600),
            )
            .expect("client identity"),
        ),
        timeout: Duration::from_secs(10),
    }
}
