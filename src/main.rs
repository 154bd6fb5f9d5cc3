//! The `tether` command line: argument parsing and wiring only; the work is in the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use tether::agent::allow_list::AllowList;
use tether::agent::{Agent, AgentConfig, Backoff};
use tether::client::{DialClient, DialClientConfig};
use tether::identity::{CertificateAuthority, Identity, TrustStore, parse_ca_keys};
use tether::protocol::{ClusterName, Endpoint, Target};
use tether::proxy::client_entry::{self, ClientEntryConfig, ClientTokens};
use tether::proxy::{HeartbeatPolicy, Peer, PeeringConfig, ProxyConfig, ProxyLimits, ProxyServer};
use tether::stream::StreamLimits;

#[derive(Parser)]
#[command(name = "tether", version, about = "Reverse tunnels between clusters")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a root proxy and a leaf agent on loopback and dial through the tunnel.
    Demo,
    /// Manage a cluster's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Issue certificates signed by a cluster's CA.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Run a proxy: the tunnel server agents dial into.
    Proxy(Box<ProxyArgs>),
    /// Run an agent: dial out to the root's proxies and serve dials it allows.
    Agent(AgentArgs),
    /// Reach HOST:PORT in CLUSTER through a proxy, over stdin/stdout (works as ProxyCommand).
    Dial(DialArgs),
    /// Print the tether.dev CustomResourceDefinitions as YAML (what crds/ holds).
    Crd,
    /// Run the Kubernetes operator: reconcile ReverseTunnels into running agents.
    Operator(tether::operator::OperatorArgs),
    /// Forward a local port to HOST.CLUSTER.tether:PORT through a proxy's client entry (`ssh -L`).
    Forward(ForwardArgs),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA key pair: OUT (private, mode 0600) and OUT.pub.
    Init {
        /// The cluster the CA belongs to.
        #[arg(long)]
        cluster: ClusterName,
        /// Path of the private key to write.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct CaRef {
    /// The CA's private key file.
    #[arg(long)]
    ca: PathBuf,
    /// The cluster the CA belongs to.
    #[arg(long)]
    cluster: ClusterName,
    /// Path of the key to write; the certificate goes to OUT-cert.pub.
    #[arg(long)]
    out: PathBuf,
    /// How long the certificate is valid.
    #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
    validity: Duration,
}

#[derive(Subcommand)]
enum CertCommand {
    /// A proxy host certificate, principal `<proxy-id>.<cluster>`.
    Host {
        #[command(flatten)]
        ca: CaRef,
        /// The proxy replica's ID.
        #[arg(long)]
        proxy_id: String,
    },
    /// An agent user certificate for the CA's cluster.
    Agent {
        #[command(flatten)]
        ca: CaRef,
    },
    /// A client user certificate (for `tether dial`).
    Client {
        #[command(flatten)]
        ca: CaRef,
        /// The client's name.
        #[arg(long)]
        name: String,
    },
}

#[derive(Args)]
struct ProxyArgs {
    /// This (root) cluster's name.
    #[arg(long, env = "TETHER_CLUSTER")]
    cluster: ClusterName,
    /// This replica's ID (its host certificate names it).
    #[arg(long, env = "TETHER_PROXY_ID")]
    proxy_id: String,
    /// Where agents and clients connect. Loopback unless you say otherwise.
    #[arg(long, default_value = "127.0.0.1:3024")]
    listen: SocketAddr,
    /// The host key; its certificate is read from IDENTITY-cert.pub.
    #[arg(long)]
    identity: PathBuf,
    /// Directory of `<cluster>.pub` files: the CAs trusted for each cluster.
    #[arg(long)]
    trust_dir: PathBuf,
    /// Heartbeat interval for agents that ask for none.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// A tunnel is offline, and closed, after this many missed heartbeats.
    #[arg(long, default_value_t = 3)]
    missed_heartbeats: u32,
    /// Another proxy of this cluster, `ID` or `ID=HOST:PORT` (repeatable): announced to agents,
    /// and, with an address and `--peer-identity`, asked to serve dials this proxy has no
    /// tunnel for. This proxy is always included.
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<Peer>,
    /// Client key (certificate from this cluster's CA) used to forward dials to peers.
    #[arg(long)]
    peer_identity: Option<PathBuf>,
    /// Learn peers from this Service's EndpointSlices (in-cluster or KUBECONFIG); the
    /// proxy's ID should then be its pod name.
    #[arg(long, env = "TETHER_PEERS_SERVICE")]
    peers_service: Option<String>,
    /// Namespace of `--peers-service`.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    peers_namespace: String,
    /// Name of the tunnel port in the Service.
    #[arg(long, default_value = "tunnel")]
    peers_port_name: String,
    /// Allow-list for direct dials into this cluster (none: direct dials refused).
    #[arg(long = "direct-allow")]
    direct_allow: Vec<String>,
    /// Concurrent connections per source IP.
    #[arg(long, default_value_t = ProxyLimits::default().max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// SSH handshakes in progress at once.
    #[arg(long, default_value_t = ProxyLimits::default().max_handshakes)]
    max_handshakes: usize,
    /// Time allowed for a connection to authenticate and set up.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Open streams per tunnel.
    #[arg(long, default_value_t = ProxyLimits::default().max_streams_per_tunnel)]
    max_streams_per_tunnel: usize,
    /// Also serve HTTP CONNECT and SOCKS5 clients here (loopback unless you say otherwise).
    #[arg(long, requires = "client_tokens")]
    client_listen: Option<SocketAddr>,
    /// File of `name:token` lines: the clients allowed on the HTTP CONNECT / SOCKS5 entry.
    #[arg(long)]
    client_tokens: Option<PathBuf>,
    /// Serve /healthz, /readyz and /status here.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// On SIGTERM, how long streams may finish before the proxy exits.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
}

#[derive(Args)]
struct AgentArgs {
    /// This (leaf) cluster's name.
    #[arg(long, env = "TETHER_CLUSTER")]
    cluster: ClusterName,
    /// The root cluster's name.
    #[arg(long)]
    root_cluster: ClusterName,
    /// The proxies' address, HOST:PORT (resolved anew on every attempt).
    #[arg(long)]
    proxy: String,
    /// The agent's key; its certificate is read from IDENTITY-cert.pub.
    #[arg(long)]
    identity: PathBuf,
    /// File of CA public keys trusted to sign the proxies' host certificates.
    #[arg(long)]
    root_ca: PathBuf,
    /// A target the root may reach: CIDR:PORTS or HOST:PORTS (repeatable; none = deny all).
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Address that `_apiserver.<cluster>.tether` reaches.
    #[arg(long)]
    api_server: Option<String>,
    /// Heartbeat interval to ask of the proxy.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// Timeout for a dialled target to answer.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    dial_timeout: Duration,
    /// Serve /healthz, /readyz and /status here.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
}

#[derive(Args)]
struct DialArgs {
    /// The cluster the target is in.
    cluster: ClusterName,
    /// The target, HOST:PORT (`_apiserver:443` for the cluster's API server).
    target: String,
    /// The proxy's address.
    #[arg(long)]
    proxy: String,
    /// The root cluster's name.
    #[arg(long)]
    root_cluster: ClusterName,
    /// The client key; its certificate is read from IDENTITY-cert.pub.
    #[arg(long)]
    identity: PathBuf,
    /// File of CA public keys trusted to sign the proxies' host certificates.
    #[arg(long)]
    root_ca: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,russh=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo => tether::demo::run().await,
        Command::Ca(CaCommand::Init { cluster, out }) => {
            let ca = CertificateAuthority::generate(cluster)?;
            ca.save(&out)?;
            println!(
                "wrote {} and {}.pub ({})",
                out.display(),
                out.display(),
                tether::identity::fingerprint(ca.public_key())
            );
            Ok(())
        }
        Command::Cert(cert) => issue(cert),
        Command::Proxy(args) => run_proxy(*args).await,
        Command::Agent(args) => run_agent(args).await,
        Command::Dial(args) => run_dial(args).await,
        Command::Crd => {
            print!("{}", tether::operator::crds_yaml()?);
            Ok(())
        }
        Command::Operator(args) => tether::operator::run_cli(args).await,
        Command::Forward(args) => run_forward(args).await,
    }
}

#[derive(Args)]
struct ForwardArgs {
    /// Local address to listen on (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where connections go: HOST.CLUSTER.tether:PORT.
    #[arg(long)]
    to: String,
    /// The proxy's client entry (HTTP CONNECT), HOST:PORT.
    #[arg(long)]
    entry: String,
    /// The client's name in the entry's token file.
    #[arg(long, env = "TETHER_USER")]
    user: String,
    /// The client's token.
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: String,
}

async fn run_forward(args: ForwardArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.to)?;
    let config = tether::forward::ForwardConfig {
        entry: args.entry,
        user: args.user,
        token: args.token,
        target,
        connect_timeout: Duration::from_secs(30),
    };
    let (listener, addr) = tether::forward::bind(args.listen).await?;
    println!("forwarding {addr} to {}", config.target);
    tokio::select! {
        () = tether::forward::serve(listener, Arc::new(config)) => {}
        () = shutdown_signal() => {}
    }
    Ok(())
}

fn issue(command: CertCommand) -> anyhow::Result<()> {
    let (ca_ref, identity) = match &command {
        CertCommand::Host { ca, proxy_id } => {
            let authority = CertificateAuthority::load(&ca.ca, ca.cluster.clone())?;
            (
                ca,
                Identity::generate_host(&authority, proxy_id, ca.validity)?,
            )
        }
        CertCommand::Agent { ca } => {
            let authority = CertificateAuthority::load(&ca.ca, ca.cluster.clone())?;
            (ca, Identity::generate_agent(&authority, ca.validity)?)
        }
        CertCommand::Client { ca, name } => {
            let authority = CertificateAuthority::load(&ca.ca, ca.cluster.clone())?;
            (
                ca,
                Identity::generate_client(&authority, name, ca.validity)?,
            )
        }
    };
    identity.save(&ca_ref.out)?;
    println!(
        "wrote {0} and {0}-cert.pub (key id {1:?})",
        ca_ref.out.display(),
        identity.certificate.key_id()
    );
    Ok(())
}

fn read_cas(path: &Path) -> anyhow::Result<Vec<tether::identity::PublicKey>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading root CA keys from {}", path.display()))?;
    Ok(parse_ca_keys(&text, path)?)
}

async fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let trust = TrustStore::load_dir(&args.trust_dir)?;
    let direct = if args.direct_allow.is_empty() {
        None
    } else {
        Some(Arc::new(AllowList::parse(&args.direct_allow)?))
    };
    let config = ProxyConfig {
        cluster: args.cluster,
        proxy_id: args.proxy_id.clone(),
        listen: args.listen,
        host_identity: Arc::new(Identity::load(&args.identity)?),
        trust: Arc::new(ArcSwap::from_pointee(trust)),
        heartbeat: HeartbeatPolicy {
            interval: args.heartbeat_interval,
            missed: args.missed_heartbeats,
            ..HeartbeatPolicy::default()
        },
        limits: ProxyLimits {
            max_connections_per_ip: args.max_connections_per_ip,
            max_handshakes: args.max_handshakes,
            handshake_timeout: args.handshake_timeout,
            max_streams_per_tunnel: args.max_streams_per_tunnel,
            ..ProxyLimits::default()
        },
        stream: StreamLimits::default(),
        direct,
        peering: match &args.peer_identity {
            Some(path) => Some(PeeringConfig {
                identity: Arc::new(Identity::load(path)?),
            }),
            None => None,
        },
        join: None,
    };
    let proxy = ProxyServer::start(config).await?;
    let mut peers = vec![Peer {
        id: args.proxy_id.clone(),
        addr: Some(proxy.local_addr()),
        generation: 0,
    }];
    peers.extend(args.peers.into_iter().filter(|p| p.id != args.proxy_id));
    proxy.set_peers(peers.clone());
    println!("listening on {}", proxy.local_addr());
    let proxy = Arc::new(proxy);
    if let Some(service) = args.peers_service.clone() {
        let (watched, me) = (proxy.clone(), peers[0].clone());
        tokio::spawn(async move {
            let sink = move |mut found: Vec<Peer>| {
                // Until this pod is ready, its own endpoint is missing; it is a peer all the same.
                if !found.iter().any(|p| p.id == me.id) {
                    found.push(me.clone());
                }
                watched.set_peers(found);
            };
            let namespace = args.peers_namespace;
            let port_name = Some(args.peers_port_name);
            if let Err(e) = tether::operator::endpoints::watch_peers_default(
                namespace, service, port_name, sink,
            )
            .await
            {
                tracing::error!(error = %e, "cannot watch the proxies' EndpointSlices");
            }
        });
    }
    let stop = CancellationToken::new();
    let entry = match (&args.client_listen, &args.client_tokens) {
        (Some(listen), Some(tokens)) => {
            let config = ClientEntryConfig {
                listen: *listen,
                ..ClientEntryConfig::new(ClientTokens::load(tokens)?)
            };
            let listener = config.bind().await?;
            println!(
                "client entry (HTTP CONNECT, SOCKS5) on {}",
                listener.local_addr()?
            );
            let stopped = stop.clone();
            Some(tokio::spawn(client_entry::serve(
                listener,
                Arc::new(config),
                Arc::new(proxy.dialer()),
                async move { stopped.cancelled().await },
            )))
        }
        _ => None,
    };
    // The admin endpoint outlives the drain, so load balancers see /readyz fail meanwhile.
    let admin_stop = CancellationToken::new();
    if let Some(addr) = args.admin_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("admin endpoint on {}", listener.local_addr()?);
        let stopped = admin_stop.clone();
        tokio::spawn(tether::admin::serve(
            listener,
            proxy.shared().clone(),
            async move { stopped.cancelled().await },
        ));
    }
    shutdown_signal().await;
    stop.cancel();
    tracing::info!(grace = ?args.shutdown_grace, "draining");
    proxy.shutdown(args.shutdown_grace).await;
    admin_stop.cancel();
    if let Some(entry) = entry {
        entry.abort();
    }
    Ok(())
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let config = AgentConfig {
        cluster: args.cluster,
        root_cluster: args.root_cluster,
        proxy_addr: args.proxy,
        identity: Arc::new(Identity::load(&args.identity)?),
        root_cas: read_cas(&args.root_ca)?,
        allow: Arc::new(ArcSwap::from_pointee(AllowList::parse(&args.allow)?)),
        api_server: args.api_server,
        heartbeat_interval: args.heartbeat_interval,
        connect_timeout: Duration::from_secs(15),
        dial_timeout: args.dial_timeout,
        backoff: Backoff::default(),
        stream: StreamLimits::default(),
    };
    let agent = Arc::new(Agent::new(config));
    let stop = CancellationToken::new();
    if let Some(addr) = args.admin_listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("admin endpoint on {}", listener.local_addr()?);
        let stopped = stop.clone();
        tokio::spawn(tether::admin::serve(listener, agent.clone(), async move {
            stopped.cancelled().await
        }));
    }
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_stop.cancel();
    });
    agent.run(stop).await;
    Ok(())
}

async fn run_dial(args: DialArgs) -> anyhow::Result<()> {
    let target = Target {
        cluster: args.cluster,
        endpoint: Endpoint::parse(&args.target)?,
    };
    let config = DialClientConfig {
        proxy_addr: args.proxy,
        root_cluster: args.root_cluster,
        root_cas: read_cas(&args.root_ca)?,
        identity: Arc::new(Identity::load(&args.identity)?),
        timeout: Duration::from_secs(15),
    };
    let client = DialClient::connect(&config).await?;
    let stdio = tokio::io::join(tokio::io::stdin(), tokio::io::stdout());
    client.splice(&target, stdio).await?;
    Ok(())
}

fn parse_peer(text: &str) -> Result<Peer, String> {
    let (id, addr) = match text.split_once('=') {
        Some((id, addr)) => {
            let addr = addr
                .parse()
                .map_err(|e| format!("peer address {addr:?}: {e}"))?;
            (id, Some(addr))
        }
        None => (text, None),
    };
    tether::identity::validate_proxy_id(id).map_err(|e| format!("peer ID {id:?}: {e}"))?;
    Ok(Peer {
        id: id.to_owned(),
        addr,
        generation: 0,
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
