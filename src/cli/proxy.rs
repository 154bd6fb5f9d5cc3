//! `tether proxy`: a root proxy replica, on its own or with its state in Kubernetes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use arc_swap::ArcSwap;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity, TrustStore, check_own_host_certificate};
use tether::protocol::ClusterName;
use tether::proxy::client_entry::ClientEntryConfig;
use tether::proxy::{
    Balancers, BearerTokens, HeartbeatPolicy, JoinAuthority, LeafAccess, Peer, PeeringConfig,
    ProxyConfig, ProxyLimits, ProxyServer,
};
use tether::stream::StreamLimits;

use super::shutdown_signal;

mod entry;

/// Validity of the certificates a proxy issues itself with `--ca`: short, as a leaked one
/// should not stay useful for long.
pub const SELF_ISSUED_VALIDITY: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often a proxy with `--ca` renews its certificates: well inside their validity, so a
/// few failed renewals in a row (a full disk, a clock step) still leave days of margin.
pub const RENEW_EVERY: Duration = Duration::from_secs(24 * 3600);

#[derive(Args)]
pub struct ProxyArgs {
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
    #[arg(long, required_unless_present = "ca", conflicts_with = "ca")]
    identity: Option<PathBuf>,
    /// This cluster's CA private key: the proxy issues its own host certificate
    /// (`<proxy-id>.<cluster>`) and peering client certificate from it at start, and trusts
    /// the CA for clients. What a Deployment uses, as replicas' IDs are pod names.
    #[arg(long, env = "TETHER_CA")]
    ca: Option<PathBuf>,
    /// During a root CA rotation: the root's CA key set, signed with `tether ca key-set`.
    /// Every agent is told it (its leaf then trusts exactly these keys for the root), and the
    /// proxy trusts them for its own clients and peers. Re-read every 2 s and on SIGHUP; no
    /// such file: no rotation under way.
    #[arg(long, requires = "ca")]
    ca_keys: Option<PathBuf>,
    /// Directory of `<cluster>.pub` files: the CAs trusted for each cluster. Optional with
    /// `--ca` and `--kubernetes`, which supply the root's CA and the leaves' CAs. Re-read every
    /// 2 s and on SIGHUP: tunnels whose CA a change removes are closed; a bad file keeps the
    /// previous trust (and is logged).
    #[arg(long, required_unless_present_all = ["ca", "kubernetes"])]
    trust_dir: Option<PathBuf>,
    /// Keep the root's state in Kubernetes, in `--namespace`: trust the leaves that
    /// RemoteCluster objects name, accept joins with tokens kept in Secrets, and write this
    /// replica's tunnels into RemoteCluster status. In-cluster, or `KUBECONFIG`.
    #[arg(long, env = "TETHER_KUBERNETES")]
    kubernetes: bool,
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
    /// Namespace of `--peers-service` and of the `--kubernetes` state.
    #[arg(
        long,
        alias = "peers-namespace",
        env = "POD_NAMESPACE",
        default_value = "default"
    )]
    namespace: String,
    /// Name of the tunnel port in the Service.
    #[arg(long, default_value = "tunnel")]
    peers_port_name: String,
    /// Allow-list for direct dials into this cluster (none: direct dials refused).
    #[arg(long = "direct-allow")]
    direct_allow: Vec<String>,
    /// Concurrent connections per source IP.
    #[arg(long, default_value_t = ProxyLimits::default().max_connections_per_ip)]
    max_connections_per_ip: usize,
    /// Connections in total.
    #[arg(long, default_value_t = ProxyLimits::default().max_connections)]
    max_connections: usize,
    /// SSH handshakes in progress at once (the `full` of OpenSSH's MaxStartups).
    #[arg(long, default_value_t = ProxyLimits::default().max_handshakes)]
    max_handshakes: usize,
    /// SSH handshakes one source IP may have in progress at once.
    #[arg(long, default_value_t = ProxyLimits::default().max_handshakes_per_ip)]
    max_handshakes_per_ip: usize,
    /// Load balancers (addresses or CIDRs, comma-separated or repeated) whose connections
    /// start with a PROXY protocol header (v1 or v2, as haproxy's `send-proxy-v2`): each is
    /// then counted against the client it names. Only these are read for one.
    #[arg(long, value_name = "CIDR", value_delimiter = ',', value_parser = parse_net)]
    proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Handshakes in progress from which new connections are dropped at random (30 % there,
    /// rising to 100 % at --max-handshakes).
    #[arg(long, default_value_t = ProxyLimits::default().handshakes_early_drop_start)]
    handshakes_early_drop_start: usize,
    /// Time allowed for a connection to authenticate and set up.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Open streams per tunnel.
    #[arg(long, default_value_t = ProxyLimits::default().max_streams_per_tunnel)]
    max_streams_per_tunnel: usize,
    /// Open streams one client identity (a certificate's name) may hold across the proxy, so
    /// one client cannot take a tunnel's whole stream budget.
    #[arg(long, default_value_t = ProxyLimits::default().max_streams_per_client)]
    max_streams_per_client: usize,
    /// Also serve HTTP CONNECT and SOCKS5 clients here (loopback unless you say otherwise).
    /// Its clients come from `--client-tokens`, and with `--kubernetes` also from bearer tokens
    /// the root's API server reviews (issued for the audience `tether`).
    #[arg(long)]
    client_listen: Option<SocketAddr>,
    /// File of `name:token` lines: the clients allowed on the HTTP CONNECT / SOCKS5 entry.
    #[arg(long, requires = "client_listen")]
    client_tokens: Option<PathBuf>,
    /// Connections the client entry serves at once, in total.
    #[arg(long, default_value_t = ClientEntryConfig::default().max_connections)]
    client_max_connections: usize,
    /// Connections one source address may hold on the client entry (raise it for clients
    /// behind one NAT address).
    #[arg(long, default_value_t = ClientEntryConfig::default().max_connections_per_ip)]
    client_max_connections_per_ip: usize,
    /// Serve /healthz, /readyz and /status here (`IP:PORT`; an IPv6 IP may go without brackets).
    #[arg(long, value_parser = tether::admin::parse_listen)]
    admin_listen: Option<SocketAddr>,
    /// On SIGTERM, how long streams may finish before the proxy exits.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Who may reach which leaf: `rbac` asks the root's API server whether the client may
    /// `create` `remoteclusters/dial` (a dial) or `remoteclusters/kube` (--kube-listen) on the
    /// leaf's RemoteCluster in `--namespace` (the default with `--kubernetes`); `none` lets
    /// every authenticated client reach every leaf (the default without). The leaf's
    /// allow-list and access mapping apply either way.
    #[arg(long, value_enum, requires_if("rbac", "kubernetes"))]
    dial_authorization: Option<DialAuthorization>,
    #[command(flatten)]
    kube: super::kube::ProxyKubeArgs,
    #[command(flatten)]
    stale: super::leaves::StaleLeafArgs,
    #[command(flatten)]
    tls_port: super::tls_port::TlsPortArgs,
}

/// How a proxy decides who may dial which leaf (`--dial-authorization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DialAuthorization {
    /// Kubernetes RBAC in the root cluster, by SubjectAccessReview.
    Rbac,
    /// Any client the proxy authenticates.
    None,
}

pub async fn run(args: ProxyArgs) -> anyhow::Result<()> {
    let stale = args.stale.policy()?;
    if args.client_listen.is_some() && args.client_tokens.is_none() && !args.kubernetes {
        anyhow::bail!(
            "--client-listen needs clients: --client-tokens FILE, or --kubernetes (bearer \
             tokens the root's API server reviews)"
        );
    }
    if args.kube.kube_listen.is_some()
        && args.kube.kube_client_ca.is_none()
        && args.client_tokens.is_none()
        && !args.kubernetes
    {
        anyhow::bail!(
            "--kube-listen needs callers: --kube-client-ca FILE, --client-tokens FILE, or \
             --kubernetes (bearer tokens the root's API server reviews)"
        );
    }
    let kube_tls = args.kube.tls()?;
    let kube_client_ca = args.kube.kube_client_ca.clone();
    let tls_port = args
        .tls_port
        .load(&args.proxy_id, kube_client_ca.as_deref())?;
    let ca = match &args.ca {
        Some(path) => Some(CertificateAuthority::load(path, args.cluster.clone())?),
        None => None,
    };
    let own_ca_key = ca.as_ref().map(|c| c.public_key().clone());
    let root_keys = match (&args.ca_keys, &own_ca_key) {
        (Some(path), Some(key)) => tether::proxy::root_keys::load(path, &args.cluster, key)?,
        _ => None,
    };
    // The proxy's own CA is part of its static trust, beside the trust directory's files.
    let mut own_ca = TrustStore::new();
    if let Some(ca) = &ca {
        own_ca.insert(args.cluster.clone(), ca.public_key().clone());
    }
    let from_dir = match &args.trust_dir {
        Some(dir) => TrustStore::load_dir(dir)
            .with_context(|| format!("--trust-dir {}: cannot load it", dir.display()))?,
        None => TrustStore::new(),
    };
    report_trust(&args, &from_dir);
    let trust = tether::proxy::trust::union(&from_dir, &own_ca);
    let (host_identity, peering_identity) = identities(&args, ca.as_ref())?;
    let direct = if args.direct_allow.is_empty() {
        None
    } else {
        Some(Arc::new(AllowList::parse(&args.direct_allow)?))
    };
    // One API client for everything Kubernetes gives this proxy: peers, joins, trust, status.
    let kube = if args.kubernetes || args.peers_service.is_some() {
        let config = kube::Config::infer().await?;
        Some(tether::operator::api_client::named_client(
            config,
            "tether-proxy",
        )?)
    } else {
        None
    };
    let root_client = kube.clone().filter(|_| args.kubernetes);
    let bearer = root_client.as_ref().map(|client| {
        Arc::new(tether::operator::root::TokenReviews::new(client.clone())) as Arc<dyn BearerTokens>
    });
    let config = ProxyConfig {
        cluster: args.cluster.clone(),
        proxy_id: args.proxy_id.clone(),
        listen: args.listen,
        host_identity: Arc::new(host_identity),
        trust: Arc::new(ArcSwap::from_pointee(trust)),
        heartbeat: HeartbeatPolicy {
            interval: args.heartbeat_interval,
            missed: args.missed_heartbeats,
            ..HeartbeatPolicy::default()
        },
        limits: ProxyLimits {
            max_connections_per_ip: args.max_connections_per_ip,
            max_connections: args.max_connections,
            max_handshakes: args.max_handshakes,
            max_handshakes_per_ip: args.max_handshakes_per_ip,
            handshakes_early_drop_start: args.handshakes_early_drop_start,
            handshake_timeout: args.handshake_timeout,
            max_streams_per_tunnel: args.max_streams_per_tunnel,
            max_streams_per_client: args.max_streams_per_client,
            ..ProxyLimits::default()
        },
        stream: StreamLimits::default(),
        direct,
        peering: peering_identity.map(PeeringConfig::new),
        join: root_client.as_ref().map(|client| {
            Arc::new(tether::operator::root::KubeJoinAuthority::new(
                client.clone(),
                &args.namespace,
            )) as Arc<dyn JoinAuthority>
        }),
        access: dial_access(&args, root_client.as_ref()),
        balancers: Balancers::new(args.proxy_protocol_from.clone()),
        protocol: tether::protocol::ProtocolVersion::CURRENT,
    };
    let access = config.access.clone();
    let proxy = ProxyServer::start(config)
        .await
        .with_context(|| format!("--listen {}: cannot listen", args.listen))?;
    let mut peers = vec![Peer {
        id: args.proxy_id.clone(),
        addr: Some(proxy.local_addr()),
        generation: 0,
    }];
    peers.extend(args.peers.iter().filter(|p| p.id != args.proxy_id).cloned());
    proxy.set_peers(peers.clone());
    println!("listening on {}", proxy.local_addr());
    let proxy = Arc::new(proxy);
    // One tree stops everything, in three steps (see the end): what serves and watches stops
    // at the signal, the root's Kubernetes state after the drain, the admin endpoint last (a
    // load balancer sees /readyz fail while the proxy drains). Every task is tracked and
    // waited for.
    let shutdown = CancellationToken::new();
    let (serving, root_state, admin_stop) = (
        shutdown.child_token(),
        shutdown.child_token(),
        shutdown.child_token(),
    );
    let tasks = TaskTracker::new();
    if let Some(ca) = ca {
        tasks.spawn(until(
            serving.clone(),
            renew_certificates(proxy.clone(), ca, args.proxy_id.clone()),
        ));
    }
    let hangup = Hangup::install(&tasks, serving.clone())?;
    if let (Some(path), Some(key)) = (args.ca_keys.clone(), own_ca_key) {
        tether::proxy::root_keys::apply(&proxy, &args.cluster, root_keys).await;
        tasks.spawn(tether::proxy::root_keys::follow(
            proxy.clone(),
            path,
            key,
            hangup.keys.clone(),
            serving.clone(),
        ));
    }
    if let Some(dir) = args.trust_dir.clone() {
        tasks.spawn(tether::proxy::trust::follow_dir(
            proxy.shared().clone(),
            dir,
            own_ca,
            hangup.trust.clone(),
            root_state.clone(),
        ));
    }
    if let Some(client) = root_client {
        tasks.spawn(tether::operator::root::run(
            client,
            args.namespace.clone(),
            proxy.clone(),
            (args.peers_service.is_some(), stale),
            root_state.clone(),
        ));
    }
    if let (Some(service), Some(client)) = (args.peers_service.clone(), kube) {
        proxy.expect_peer_discovery();
        let (watched, me) = (proxy.clone(), peers[0].clone());
        let (namespace, port_name) = (args.namespace.clone(), Some(args.peers_port_name.clone()));
        tasks.spawn(until(serving.clone(), async move {
            let sink = move |mut found: Vec<Peer>| {
                // Until this pod is ready, its own endpoint is missing; it is a peer all the same.
                if !found.iter().any(|p| p.id == me.id) {
                    found.push(me.clone());
                }
                watched.set_peers(found);
            };
            tether::operator::endpoints::watch_peers(client, &namespace, &service, port_name, sink)
                .await;
        }));
    }
    // The token file's clients may use the Kubernetes endpoint too.
    let (file_tokens, tls_port) = entry::start(
        &args,
        &proxy,
        bearer.clone(),
        tls_port,
        &tasks,
        &hangup,
        &serving,
    )
    .await?;
    let mut tls_port = tls_port;
    if let (Some(listen), Some(tls)) = (args.kube.kube_listen, kube_tls) {
        let listener = super::bind("--kube-listen", listen).await?;
        println!("Kubernetes endpoint on https://{}", listener.local_addr()?);
        let (hand, handed) = tether::proxy::kube_entry::hand_off();
        tls_port = tls_port.map(|(addr, port)| (addr, port.with_kube(hand)));
        let config = tether::proxy::kube_entry::KubeEntryConfig {
            bearer: bearer.clone(),
            tokens: file_tokens,
            access,
            ..tether::proxy::kube_entry::KubeEntryConfig::new(tls)
        };
        let stopped = serving.clone();
        tasks.spawn(tether::proxy::kube_entry::serve_with(
            listener,
            Some(handed),
            config,
            proxy.dialer(),
            async move { stopped.cancelled().await },
        ));
    }
    let serve_tls = args
        .tls_port
        .serve(tls_port, &proxy, kube_client_ca, &tasks, serving.clone());
    serve_tls.await?;
    if let Some(addr) = args.admin_listen {
        let listener = super::bind("--admin-listen", addr).await?;
        println!("admin endpoint on {}", listener.local_addr()?);
        let stopped = admin_stop.clone();
        tasks.spawn(tether::admin::serve(
            listener,
            proxy.shared().clone(),
            async move { stopped.cancelled().await },
        ));
    }
    tasks.close();
    shutdown_signal().await;
    serving.cancel();
    tracing::info!(grace = ?args.shutdown_grace, "draining");
    proxy.shutdown(args.shutdown_grace).await;
    root_state.cancel();
    admin_stop.cancel();
    if tokio::time::timeout(TASKS_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = tasks.len(),
            "tasks still running after the drain; exiting"
        );
    }
    Ok(())
}

/// How long the proxy's own tasks (watches, followers, the client entry's open connections)
/// get to end after the drain.
const TASKS_GRACE: Duration = Duration::from_secs(10);

/// Runs `work` until it ends or `stop` is cancelled (for loops that take no token).
async fn until(stop: CancellationToken, work: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = stop.cancelled() => {}
        () = work => {}
    }
}

/// The access rules `--dial-authorization` (or its default) asks for. Clap has already refused
/// `rbac` without `--kubernetes`, so `rbac` here always has the root's API client.
fn dial_access(
    args: &ProxyArgs,
    root_client: Option<&kube::Client>,
) -> Option<Arc<dyn LeafAccess>> {
    let rbac = args.dial_authorization.unwrap_or(if args.kubernetes {
        DialAuthorization::Rbac
    } else {
        DialAuthorization::None
    }) == DialAuthorization::Rbac;
    let client = root_client.filter(|_| rbac)?;
    tracing::info!(namespace = %args.namespace, "dials into leaves need create on remoteclusters/dial in the root's RBAC");
    Some(Arc::new(tether::operator::root::RbacLeafAccess::new(
        client.clone(),
        &args.namespace,
    )))
}

/// Says at start-up which clusters the trust directory makes trusted: a file named by accident
/// (`leaf-ca.pub` trusts a cluster called `leaf-ca`) shows here, and an empty directory, with
/// nothing else to learn trust from, means no agent can connect yet.
fn report_trust(args: &ProxyArgs, from_dir: &TrustStore) {
    let Some(dir) = &args.trust_dir else { return };
    let mut clusters: Vec<String> = from_dir.clusters().map(|c| c.to_string()).collect();
    clusters.sort();
    if !clusters.is_empty() {
        tracing::info!(dir = %dir.display(), ?clusters, "trusting the clusters of the trust directory");
    } else if !args.kubernetes {
        tracing::warn!(
            dir = %dir.display(),
            "the trust directory (--trust-dir) holds no CLUSTER.pub file: no agent can connect \
             until one is added (it is re-read every 2 s and on SIGHUP)"
        );
    }
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

/// The host identity and the peering client identity: from files, or issued from `--ca`.
fn identities(
    args: &ProxyArgs,
    ca: Option<&CertificateAuthority>,
) -> anyhow::Result<(Identity, Option<Identity>)> {
    match (ca, &args.identity) {
        (Some(ca), _) => {
            let (host, peering) = issue_from_ca(ca, &args.proxy_id)?;
            Ok((host, Some(peering)))
        }
        (None, Some(path)) => {
            let host = super::load_identity("--identity", path)?;
            check_own_host_certificate(
                &host.certificate,
                &args.cluster,
                &args.proxy_id,
                SystemTime::now(),
            )
            .with_context(|| {
                format!(
                    "--identity {}: not a host certificate for --proxy-id {} of --cluster {}",
                    path.display(),
                    args.proxy_id,
                    args.cluster
                )
            })?;
            let peering = match &args.peer_identity {
                Some(path) => Some(super::load_identity("--peer-identity", path)?),
                None => None,
            };
            Ok((host, peering))
        }
        (None, None) => anyhow::bail!("--identity or --ca is required"),
    }
}

/// A host certificate `<proxy_id>.<cluster>` and a peering client certificate.
fn issue_from_ca(
    ca: &CertificateAuthority,
    proxy_id: &str,
) -> Result<(Identity, Identity), tether::identity::IdentityError> {
    Ok((
        Identity::generate_host(ca, proxy_id, SELF_ISSUED_VALIDITY)?,
        Identity::generate_client(ca, &format!("proxy-{proxy_id}"), SELF_ISSUED_VALIDITY)?,
    ))
}

/// Re-issues the proxy's own certificates every [`RENEW_EVERY`], forever.
async fn renew_certificates(proxy: Arc<ProxyServer>, ca: CertificateAuthority, proxy_id: String) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.tick().await;
    loop {
        tick.tick().await;
        match issue_from_ca(&ca, &proxy_id) {
            Ok((host, peering)) => {
                proxy.renew_identities(&host, Some(peering));
                tracing::info!(valid_for = ?SELF_ISSUED_VALIDITY, "renewed this proxy's certificates");
            }
            Err(e) => tracing::error!(error = %e, "renewing this proxy's certificates failed"),
        }
    }
}

/// SIGHUP asks for the trust directory and the token file to be re-read now. Installed
/// whatever the flags, so a HUP never kills the proxy (its default action) without a drain.
struct Hangup {
    /// Woken for the trust directory's follower.
    trust: Arc<tokio::sync::Notify>,
    /// Woken for the token file's follower.
    tokens: Arc<tokio::sync::Notify>,
    /// Woken for the root CA key set's follower.
    keys: Arc<tokio::sync::Notify>,
}

impl Hangup {
    /// Installs the handler, its loop tracked by `tasks` until `stop`.
    fn install(tasks: &TaskTracker, stop: CancellationToken) -> anyhow::Result<Self> {
        let mut signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("installing the SIGHUP handler")?;
        let hangup = Hangup {
            trust: Arc::default(),
            tokens: Arc::default(),
            keys: Arc::default(),
        };
        let woken = [&hangup.trust, &hangup.tokens, &hangup.keys].map(Arc::clone);
        tasks.spawn(until(stop, async move {
            while signal.recv().await.is_some() {
                tracing::info!("SIGHUP: re-reading the trust directory, the client token file and the root CA key set");
                for follower in &woken {
                    follower.notify_one();
                }
            }
        }));
        Ok(hangup)
    }
}

/// An address (one host) or a CIDR.
fn parse_net(text: &str) -> Result<ipnet::IpNet, String> {
    let text = text.trim();
    match text.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(ip.into()),
        Err(_) => text
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR (such as 10.0.0.0/8)")),
    }
}
