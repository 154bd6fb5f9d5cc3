//! Who may connect: both sides check certificates, refuse with a clear log line, and the proxy
//! survives garbage, silence and bursts.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tether::agent::{Tunnel, TunnelError};
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity, ROLE_EXTENSION};
use tether::protocol::{ClusterName, DialErrorKind};
use tether::proxy::{ProxyLimits, ProxyServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

async fn agent_attempt(
    pki: &tether::demo::Pki,
    proxy: &ProxyServer,
    tune: impl FnOnce(&mut tether::agent::AgentConfig),
) -> Result<Tunnel, TunnelError> {
    let mut config = pki
        .agent_config(&proxy.local_addr().to_string(), AllowList::default())
        .expect("agent config");
    tune(&mut config);
    Tunnel::connect(Arc::new(config)).await
}

/// A proxy `p1` of a fresh PKI, started with this thread's log lines captured: each refusal
/// test checks both what the refused side is told and what an operator reads in the log.
struct LoggedProxy {
    proxy: ProxyServer,
    pki: tether::demo::Pki,
    _guard: tracing::subscriber::DefaultGuard,
    logs: LogCapture,
}

impl LoggedProxy {
    async fn start() -> LoggedProxy {
        let logs = LogCapture::default();
        let _guard = logs.install();
        let pki = pki();
        let proxy = ProxyServer::start(pki.proxy_config("p1").expect("config"))
            .await
            .expect("proxy");
        LoggedProxy {
            proxy,
            pki,
            _guard,
            logs,
        }
    }

    /// An agent's attempt with a certificate `ca` signed, for `ca`'s cluster.
    async fn attempt_signed_by(&self, ca: &CertificateAuthority) -> Result<Tunnel, TunnelError> {
        agent_attempt(&self.pki, &self.proxy, |c| {
            c.cluster = ca.cluster().clone();
            c.identity =
                Arc::new(Identity::generate_agent(ca, Duration::from_secs(60)).expect("id"));
        })
        .await
    }
}

/// The reason the proxy gave the refused agent.
fn refusal(result: Result<Tunnel, TunnelError>) -> String {
    match result {
        Err(TunnelError::AuthRefused(Some(reason))) => reason,
        other => panic!("expected a refusal with a reason, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_of_an_unknown_cluster_is_refused_with_a_reason() {
    let p1 = LoggedProxy::start().await;
    let stranger =
        CertificateAuthority::generate(ClusterName::new("stranger").expect("name")).expect("ca");
    // The agent learns why, as much as the proxy may say: an unknown cluster reads the same as
    // an untrusted CA (below), so a prober cannot list the clusters a proxy trusts.
    let reason = refusal(p1.attempt_signed_by(&stranger).await);
    assert_eq!(
        reason,
        "the certificate's authority is not trusted for cluster \"stranger\""
    );
    p1.logs
        .wait_for("no certificate authority is trusted for cluster \"stranger\"")
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn an_agent_certificate_from_the_wrong_ca_is_refused() {
    let p1 = LoggedProxy::start().await;
    // Same cluster name, another CA.
    let impostor = CertificateAuthority::generate(leaf()).expect("ca");
    let reason = refusal(p1.attempt_signed_by(&impostor).await);
    assert_eq!(
        reason,
        "the certificate's authority is not trusted for cluster \"leaf\""
    );
    p1.logs
        .wait_for("which is not a trusted certificate authority of cluster leaf")
        .await;
    // The refused connection ends cleanly: it once panicked polling its ended session again.
    let metrics = &p1.proxy.shared().metrics;
    wait_for(
        "the refused connection ended",
        Duration::from_secs(10),
        || metrics.connections.get() == 0,
    )
    .await;
    assert_eq!(metrics.connection_panics.get(), 0, "{}", p1.logs.text());
}

#[tokio::test(flavor = "current_thread")]
async fn an_expired_agent_certificate_is_refused() {
    let p1 = LoggedProxy::start().await;
    let identity = Identity::generate_agent(&p1.pki.leaf, Duration::from_secs(60)).expect("id");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let mut builder = russh::keys::ssh_key::certificate::Builder::new(
        vec![7u8; 32],
        identity.key.public_key(),
        now - 7200,
        now - 3600,
    )
    .expect("builder");
    builder
        .cert_type(russh::keys::ssh_key::certificate::CertType::User)
        .expect("type");
    builder.key_id("agent leaf").expect("key id");
    builder.valid_principal("leaf").expect("principal");
    builder.extension(ROLE_EXTENSION, "agent").expect("role");
    let expired = builder.sign(p1.pki.leaf.private_key()).expect("sign");
    let result = agent_attempt(&p1.pki, &p1.proxy, |c| {
        c.identity = Arc::new(Identity {
            key: identity.key.clone(),
            certificate: expired,
        });
    })
    .await;
    // Known before dialling: russh refuses an expired certificate before the proxy's handler
    // sees it, so the proxy could not say why.
    match result {
        Err(TunnelError::OwnCertificate(why)) => {
            assert!(why.contains("\"agent leaf\" expired at"), "{why}");
        }
        other => panic!("expected the agent to refuse its own certificate, got {other:?}"),
    }
    p1.logs.wait_for("expired").await;
}

#[tokio::test(flavor = "current_thread")]
async fn the_agent_refuses_a_proxy_whose_host_certificate_it_does_not_trust() {
    let rogue = LoggedProxy::start().await;
    let real = pki();
    // The agent trusts the real root CA only.
    let result = agent_attempt(&rogue.pki, &rogue.proxy, |c| {
        c.root_cas = vec![real.root.public_key().clone()];
    })
    .await;
    assert!(result.is_err(), "the agent connected to an untrusted proxy");
    rogue.logs.wait_for("refusing the proxy").await;
    rogue
        .logs
        .wait_for("not a trusted certificate authority")
        .await;
    assert!(rogue.proxy.sites().list().is_empty());
}

#[tokio::test]
async fn garbage_and_silence_are_dropped_by_the_handshake_timeout() {
    let pki = pki();
    let mut config = pki.proxy_config("p1").expect("config");
    config.limits.handshake_timeout = Duration::from_millis(500);
    let proxy = ProxyServer::start(config).await.expect("proxy");
    let addr = proxy.local_addr();

    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut garbage = TcpStream::connect(addr).await.expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00\x01\x02garbage")
        .await
        .expect("write");
    for (name, conn) in [("silent", &mut silent), ("garbage", &mut garbage)] {
        within(
            &format!("the {name} client to be dropped"),
            Duration::from_secs(5),
            async {
                let mut buf = [0u8; 1024];
                // The proxy may send its version line first; then it must close.
                loop {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            },
        )
        .await;
    }
    wait_for("connections to be released", Duration::from_secs(5), || {
        proxy.shared().limiter.connections() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_is_held_by_the_limits_and_agents_keep_working() {
    let limits = ProxyLimits {
        max_connections_per_ip: 200,
        max_handshakes: 32,
        handshake_timeout: Duration::from_secs(2),
        ..ProxyLimits::default()
    };
    let rig = Rig::start(
        &["127.0.0.1/32:*".to_owned()],
        |p| p.limits = limits,
        |_| {},
    )
    .await;
    let echo = echo_server().await.expect("echo");
    let addr = rig.proxy.local_addr();
    let limiter = rig.proxy.shared().limiter.clone();
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let watcher = {
        let (limiter, peak) = (limiter.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(limiter.connections(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut held = Vec::new();
    for _ in 0..2000 {
        if let Ok(s) = TcpStream::connect(addr).await {
            held.push(s);
        }
    }
    // While the burst is held open, the agent's tunnel still serves dials.
    let (mut stream, _t) = attach(rig.dial(echo).await.expect("dial during burst"), 4096);
    let back = within(
        "echo during burst",
        Duration::from_secs(10),
        echo_round_trip(&mut stream, b"ok"),
    )
    .await;
    assert_eq!(back, b"ok");
    drop(held);
    watcher.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("burst of 2000 connections: at most {peak} held at once (limit 200)");
    assert!(peak <= 200, "{peak} connections were held, over the limit");
    rig.wait_online().await;
    let refused = rig.dial_name("10.9.9.9.leaf.tether:80").await;
    assert_eq!(
        refused.err().map(|e| e.kind),
        Some(DialErrorKind::Forbidden)
    );
}

/// Records the serial of the host certificate a proxy presents.
struct HostCertSerial(Arc<std::sync::Mutex<Option<u64>>>);

impl russh::client::Handler for HostCertSerial {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &russh::keys::PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        if let russh::keys::PublicKeyOrCertificate::Certificate(cert) = key {
            *self.0.lock().expect("lock") = Some(cert.serial());
        }
        Ok(true)
    }
}

async fn presented_serial(proxy: &ProxyServer) -> Option<u64> {
    let seen = Arc::new(std::sync::Mutex::new(None));
    let config = Arc::new(tether::protocol::ssh::client_config());
    let _handle = russh::client::connect(config, proxy.local_addr(), HostCertSerial(seen.clone()))
        .await
        .expect("connects");
    *seen.lock().expect("lock")
}

#[tokio::test]
async fn renewed_certificates_are_presented_to_new_connections_and_tunnels_stay() {
    let rig = Rig::start(&[], |_| {}, |_| {}).await;
    let before = presented_serial(&rig.proxy)
        .await
        .expect("a host certificate");
    let tunnels = rig.proxy.site(&leaf()).expect("site").tunnels.len();
    let host = Identity::generate_host(&rig.pki.root, "proxy-1", Duration::from_secs(600))
        .expect("host identity");
    let peering =
        Identity::generate_client(&rig.pki.root, "proxy-proxy-1", Duration::from_secs(600))
            .expect("peering identity");
    rig.proxy.renew_identities(&host, Some(peering));
    let after = presented_serial(&rig.proxy)
        .await
        .expect("a host certificate");
    assert_eq!(after, host.certificate.serial());
    assert_ne!(before, after, "serials are random, so a renewal changes it");
    // The tunnel set up with the old certificate is untouched, and a new agent gets in.
    assert_eq!(
        rig.proxy.site(&leaf()).expect("site").tunnels.len(),
        tunnels
    );
    let tunnel = agent_attempt(&rig.pki, &rig.proxy, |_| {}).await;
    assert!(
        tunnel.is_ok(),
        "a new agent accepts the renewed certificate"
    );
}
