//! `tether demo`: a root proxy and a leaf agent on loopback, with throwaway certificates, and a
//! dial through the tunnel. The same building blocks serve the integration tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, AgentConfig};
use crate::egress::allow_list::AllowList;
use crate::identity::{CertificateAuthority, Identity, IdentityError, TrustStore};
use crate::protocol::{ClusterName, Target};
use crate::proxy::{
    Dialer, HeartbeatPolicy, Peer, PeeringConfig, ProxyConfig, ProxyLimits, ProxyServer,
};
use crate::stream::{Splice, StreamLimits};

/// How long demo and test certificates stay valid.
const VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// A root and a leaf cluster's certificate authorities, generated in memory.
pub struct Pki {
    /// The root cluster's CA: signs proxy host certificates and client certificates.
    pub root: CertificateAuthority,
    /// The leaf cluster's CA: signs its agents' certificates.
    pub leaf: CertificateAuthority,
}

impl Pki {
    /// Fresh CAs for clusters `root` and `leaf`.
    pub fn generate(root: ClusterName, leaf: ClusterName) -> Result<Self, IdentityError> {
        Ok(Self {
            root: CertificateAuthority::generate(root)?,
            leaf: CertificateAuthority::generate(leaf)?,
        })
    }

    /// The proxy's trust store: the leaf's CA for agents, the root's own CA for clients.
    pub fn trust(&self) -> TrustStore {
        let mut trust = TrustStore::new();
        trust.insert(self.leaf.cluster().clone(), self.leaf.public_key().clone());
        trust.insert(self.root.cluster().clone(), self.root.public_key().clone());
        trust
    }

    /// A proxy configuration listening on a free loopback port.
    pub fn proxy_config(&self, proxy_id: &str) -> Result<ProxyConfig, IdentityError> {
        Ok(ProxyConfig {
            cluster: self.root.cluster().clone(),
            proxy_id: proxy_id.to_owned(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            host_identity: Arc::new(Identity::generate_host(&self.root, proxy_id, VALIDITY)?),
            trust: Arc::new(ArcSwap::from_pointee(self.trust())),
            heartbeat: HeartbeatPolicy::default(),
            limits: ProxyLimits::default(),
            stream: StreamLimits::default(),
            direct: None,
            peering: Some(PeeringConfig::new(Identity::generate_client(
                &self.root,
                &format!("proxy-{proxy_id}"),
                VALIDITY,
            )?)),
            join: None,
            access: None,
            balancers: Default::default(),
            protocol: crate::protocol::ProtocolVersion::CURRENT,
        })
    }

    /// An agent configuration for the leaf, dialling `proxy_addr`, allowing `allow`.
    pub fn agent_config(
        &self,
        proxy_addr: &str,
        allow: AllowList,
    ) -> Result<AgentConfig, IdentityError> {
        Ok(AgentConfig::new(
            self.leaf.cluster().clone(),
            self.root.cluster().clone(),
            proxy_addr,
            Arc::new(Identity::generate_agent(&self.leaf, VALIDITY)?),
            vec![self.root.public_key().clone()],
            allow,
        ))
    }
}

/// Starts a TCP echo server on a free loopback port; it runs until the runtime ends.
pub async fn echo_server() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A minimal TCP load balancer for the demo (the tests use a real haproxy): each connection
/// goes to a random backend.
async fn load_balancer(backends: Vec<SocketAddr>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let backend = backends[rand::random_range(0..backends.len())];
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(backend).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Runs the demo, printing each step.
pub async fn run() -> anyhow::Result<()> {
    println!(
        "tether demo: three root proxies behind a load balancer, one leaf agent, on loopback\n"
    );
    let pki = Pki::generate(ClusterName::new("root")?, ClusterName::new("leaf")?)?;
    println!(
        "1. created CAs for clusters 'root' ({}) and 'leaf' ({})",
        crate::identity::fingerprint(pki.root.public_key()),
        crate::identity::fingerprint(pki.leaf.public_key())
    );
    let mut proxies = Vec::new();
    for id in ["proxy-1", "proxy-2", "proxy-3"] {
        proxies.push(ProxyServer::start(pki.proxy_config(id)?).await?);
    }
    let peers: Vec<Peer> = proxies
        .iter()
        .map(|p| Peer {
            id: p.shared().config.proxy_id.clone(),
            addr: Some(p.local_addr()),
            generation: 0,
        })
        .collect();
    for p in &proxies {
        p.set_peers(peers.clone());
    }
    let lb = load_balancer(proxies.iter().map(|p| p.local_addr()).collect()).await?;
    println!("2. proxies proxy-1..3 listening; a load balancer in front of them at {lb}");
    let echo = echo_server().await?;
    println!("3. an echo server in the leaf network at {echo}");
    let allow = AllowList::parse([format!("{}/32:{}", echo.ip(), echo.port())])?;
    let agent = Arc::new(Agent::new(pki.agent_config(&lb.to_string(), allow)?));
    let stop = CancellationToken::new();
    let runner = tokio::spawn({
        let agent = agent.clone();
        let stop = stop.clone();
        async move { agent.run(stop).await }
    });
    let mut status = agent.status();
    tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| s.connected() == 3 && s.expected == 3),
    )
    .await??;
    println!(
        "4. the agent dialled out through the load balancer and holds a tunnel to each proxy \
         ({} dials; host certificates verified)",
        agent.attempts()
    );
    let leaf = ClusterName::new("leaf")?;
    // Each proxy learns who else holds the leaf's tunnels from the agent's next heartbeat.
    let all_reported = || {
        proxies
            .iter()
            .all(|p| p.site(&leaf).is_some_and(|s| s.held_by.len() == 3))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !all_reported() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for p in &proxies {
        if let Some(site) = p.site(&leaf) {
            println!(
                "   {} sees site 'leaf' {}; tunnels held by {}",
                p.shared().config.proxy_id,
                site.status,
                site.held_by.join(", ")
            );
        }
    }

    let target = Target::parse(&format!("{}.leaf.tether:{}", echo.ip(), echo.port()))?;
    let conn = proxies[1]
        .dialer()
        .dial(target.clone(), "127.0.0.1:0".parse()?)
        .await?;
    let (mut mine, theirs) = tokio::io::duplex(64 * 1024);
    let splice = tokio::spawn(conn.splice(theirs));
    let message = b"hello through the tunnel";
    mine.write_all(message).await?;
    mine.shutdown().await?;
    let mut echoed = Vec::new();
    mine.read_to_end(&mut echoed).await?;
    splice.await??;
    anyhow::ensure!(
        echoed == message,
        "the echo came back different: {:?}",
        String::from_utf8_lossy(&echoed)
    );
    println!(
        "5. dialled {target} via proxy-2: sent {} bytes, got them back intact",
        message.len()
    );

    let forbidden = Target::parse("10.1.2.3.leaf.tether:22")?;
    match proxies[0]
        .dialer()
        .dial(forbidden.clone(), "127.0.0.1:0".parse()?)
        .await
    {
        Ok(_) => anyhow::bail!("a dial outside the allow-list succeeded"),
        Err(e) => println!("6. dialled {forbidden}: refused as expected ({e})"),
    }

    stop.cancel();
    runner.await?;
    for p in &proxies {
        p.shutdown(Duration::from_secs(1)).await;
    }
    println!("\ndemo finished: three tunnels up, a dial through them, allow-list enforced");
    Ok(())
}
