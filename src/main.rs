//! The `tether` command line: argument parsing and wiring only; the work is in the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use tether::agent::{Agent, AgentConfig};
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity, parse_ca_keys};
use tether::protocol::{ClusterName, Target};

use cli::shutdown_signal;

mod cli;

#[derive(Parser)]
#[command(name = "tether", version, about = "Reverse tunnels between clusters")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = cli::output::LogFormat::Text)]
    log_format: cli::output::LogFormat,
    /// What to log: a level (`debug`, `warn`) or a filter (`info,tether::proxy=debug`).
    /// Without it, `RUST_LOG` applies, else `info`.
    #[arg(long, global = true, env = "TETHER_LOG_LEVEL")]
    log_level: Option<String>,
    /// Where `tether proxy` writes its audit records (one JSON line per dial: who, from where,
    /// which leaf and target, the decision, bytes, duration), apart from the log and whatever
    /// its level. Unset: they join the log (target `tether::audit`).
    #[arg(long, global = true, env = "TETHER_AUDIT_LOG")]
    audit_log: Option<PathBuf>,
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
    Proxy(Box<cli::proxy::ProxyArgs>),
    /// Run an agent: dial out to the root's proxies and serve dials it allows.
    Agent(AgentArgs),
    /// Reach HOST:PORT in CLUSTER through a proxy, over stdin/stdout (works as ProxyCommand).
    Dial(cli::dial::DialArgs),
    /// Save a client profile (proxy, root cluster, identity, root CA) for `tether dial`.
    Login(cli::login::LoginArgs),
    /// Print an ssh_config block per leaf, so `ssh HOST.LEAF` dials through the root.
    SshConfig(cli::login::SshConfigArgs),
    /// Print the tether.dev CustomResourceDefinitions as YAML (what crds/ holds).
    Crd,
    /// Run the Kubernetes operator: reconcile ReverseTunnels into running agents.
    Operator(cli::operator::OperatorArgs),
    /// Forward a local port to HOST.CLUSTER.tether:PORT through a proxy's client entry (`ssh -L`).
    Forward(ForwardArgs),
    /// Write a kubeconfig for a leaf's Kubernetes API through the root's proxies.
    Kubeconfig(cli::kube::KubeconfigArgs),
    /// Issue a join token: prints its Secret (for `kubectl apply -f -` in the proxies'
    /// namespace) on stdout, and the token to give the leaf on stderr.
    JoinToken(JoinTokenArgs),
}

#[derive(Args)]
struct JoinTokenArgs {
    /// How long the token may be used (`0s`: no expiry, not recommended).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Allow any number of joins (default: the first join spends the token).
    #[arg(long)]
    reusable: bool,
    /// Namespace of the proxies (the Secret's namespace).
    #[arg(long)]
    namespace: Option<String>,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA key pair: OUT (private, mode 0600) and OUT.pub. Refuses to replace an
    /// existing CA unless --force is given.
    Init {
        /// The cluster the CA belongs to.
        #[arg(long)]
        cluster: ClusterName,
        /// Path of the private key to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace OUT and OUT.pub if they exist: every certificate the old CA issued
        /// stops being trusted.
        #[arg(long)]
        force: bool,
    },
    /// Sign the root's CA key set for a root CA rotation (`tether proxy --ca-keys`): the keys
    /// the proxies and every leaf trust for CLUSTER from now on, signed by one of them that
    /// they trust now (the old key at init, the new one at retire).
    KeySet {
        /// The cluster whose keys these are (the root).
        #[arg(long)]
        cluster: ClusterName,
        /// The CA private key that signs; its public key must be one of --key.
        #[arg(long)]
        sign_with: PathBuf,
        /// A CA public key of the set (an OpenSSH `.pub` file); once per key.
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        /// Where to write the signed set (for the root CA Secret).
        #[arg(long)]
        out: PathBuf,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Rotate a leaf cluster's CA without a dropped dial: move its TrustedCluster to a phase
    /// (init, update-clients, retire; or rollback) and wait until the operator completes it.
    Rotate(cli::rotate::RotateArgs),
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
    /// Replace OUT, OUT.pub and OUT-cert.pub if they exist.
    #[arg(long)]
    force: bool,
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
        /// A group the client is in, for the root's RBAC (repeatable; not `system:...`).
        #[arg(long = "group")]
        groups: Vec<String>,
    },
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
    #[arg(long, value_parser = cli::parse_host_port)]
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
    /// Serve /healthz, /readyz and /status here (`IP:PORT`; an IPv6 IP may go without brackets).
    #[arg(long, value_parser = tether::admin::parse_listen)]
    admin_listen: Option<SocketAddr>,
    #[command(flatten)]
    kube: cli::kube::AgentKubeArgs,
    #[command(flatten)]
    egress: cli::egress::EgressArgs,
}

fn main() -> std::process::ExitCode {
    tether::stream::tune_allocator();
    let cli = Cli::parse();
    let result = cli::output::init_logging(
        cli.log_format,
        cli.log_level.as_deref(),
        cli.audit_log.as_deref(),
    )
    .and_then(|()| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        runtime.block_on(run(cli.command))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            for line in cli::output::error_lines(&e) {
                eprintln!("{line}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo => tether::demo::run().await,
        Command::Ca(CaCommand::Init {
            cluster,
            out,
            force,
        }) => {
            let ca = CertificateAuthority::generate(cluster)?;
            if force {
                ca.save(&out)?;
            } else {
                ca.save_new(&out).context(
                    "refusing to replace a CA key: every certificate it issued would stop \
                     being trusted (pass --force to replace it anyway)",
                )?;
            }
            println!(
                "wrote {} and {}.pub ({})",
                out.display(),
                out.display(),
                tether::identity::fingerprint(ca.public_key())
            );
            Ok(())
        }
        Command::Ca(CaCommand::Rotate(args)) => cli::rotate::run(args).await,
        Command::Ca(CaCommand::KeySet {
            cluster,
            sign_with,
            keys,
            out,
            force,
        }) => cli::rotate::sign_key_set(&cluster, &sign_with, &keys, &out, force),
        Command::Cert(cert) => issue(cert),
        Command::Proxy(args) => cli::proxy::run(*args).await,
        Command::Agent(args) => run_agent(args).await,
        Command::Dial(args) => cli::dial::run(args).await,
        Command::Login(args) => cli::login::run(args),
        Command::SshConfig(args) => cli::login::run_ssh_config(args),
        Command::Crd => {
            print!("{}", tether::operator::crds_yaml()?);
            Ok(())
        }
        Command::Operator(args) => cli::operator::run(args).await,
        Command::Forward(args) => run_forward(args).await,
        Command::Kubeconfig(args) => cli::kube::run_kubeconfig(args),
        Command::JoinToken(args) => {
            let token = tether::protocol::join::JoinToken::generate();
            let expires = (!args.ttl.is_zero()).then(|| std::time::SystemTime::now() + args.ttl);
            let secret = tether::operator::root::tokens::token_secret(
                &token,
                args.namespace.as_deref(),
                expires,
                args.reusable,
            );
            print!("{}", serde_yaml::to_string(&secret)?);
            eprintln!(
                "join token {} ({}): {}\non the leaf, save it in a file (not on a command line, \
                 where `ps` shows it) and run:\n  kubectl create secret generic root-join-token \
                 --from-file=token=TOKEN_FILE",
                token,
                if args.reusable {
                    "reusable"
                } else {
                    "single use"
                },
                token.reveal()
            );
            Ok(())
        }
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
    /// File holding the client's token (mode 0600). Without it the token is read from the
    /// TETHER_TOKEN environment variable; it is never taken as an argument, since every
    /// local user can read a process's arguments (`ps`).
    #[arg(long, env = "TETHER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Refused: a token on the command line is visible in `ps`.
    #[arg(long, hide = true)]
    token: Option<String>,
}

/// The environment variable `tether forward` reads the client token from.
const TOKEN_ENV: &str = "TETHER_TOKEN";

/// The client token for `tether forward`: from `--token-file`, else from [`TOKEN_ENV`].
fn forward_token(args: &ForwardArgs) -> anyhow::Result<String> {
    if args.token.is_some() {
        anyhow::bail!(
            "--token is refused: a token on the command line is visible to every local user \
             in `ps`; put it in a file for --token-file FILE or in the {TOKEN_ENV} \
             environment variable"
        );
    }
    let token = match &args.token_file {
        Some(path) => cli::read_secret_file(path)?,
        None => std::env::var(TOKEN_ENV).map_err(|_| {
            anyhow::anyhow!("no client token: pass --token-file FILE or set {TOKEN_ENV}")
        })?,
    };
    let token = token.trim().to_owned();
    anyhow::ensure!(!token.is_empty(), "the client token is empty");
    Ok(token)
}

async fn run_forward(args: ForwardArgs) -> anyhow::Result<()> {
    let target = Target::parse(&args.to)?;
    let token = forward_token(&args)?;
    let config = tether::forward::ForwardConfig {
        entry: args.entry,
        user: args.user,
        token,
        target,
        connect_timeout: Duration::from_secs(30),
    };
    tether::forward::check_entry(&config)
        .await
        .with_context(|| format!("--entry {}: cannot forward through it", config.entry))?;
    let (listener, addr) = tether::forward::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen", args.listen))?;
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
        CertCommand::Client { ca, name, groups } => {
            let authority = CertificateAuthority::load(&ca.ca, ca.cluster.clone())?;
            for group in groups {
                tether::identity::groups::validate_group(group)
                    .map_err(|reason| anyhow::anyhow!("--group {group:?}: {reason}"))?;
            }
            let identity = Identity::generate_client_in(&authority, name, groups, ca.validity)?;
            (ca, identity)
        }
    };
    if ca_ref.force {
        identity.save(&ca_ref.out)?;
    } else {
        identity
            .save_new(&ca_ref.out)
            .context("refusing to replace an existing key (pass --force to replace it)")?;
    }
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

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let config = AgentConfig {
        api_server: args.api_server,
        kube: args.kube.gateway(&args.root_cluster)?,
        heartbeat_interval: args.heartbeat_interval,
        connect_timeout: Duration::from_secs(15),
        dial_timeout: args.dial_timeout,
        route: args.egress.route()?,
        ..AgentConfig::new(
            args.cluster,
            args.root_cluster,
            args.proxy,
            Arc::new(cli::load_identity("--identity", &args.identity)?),
            read_cas(&args.root_ca)?,
            AllowList::parse(&args.allow)?,
        )
    };
    let agent = Arc::new(Agent::new(config));
    let stop = CancellationToken::new();
    if let Some(addr) = args.admin_listen {
        let listener = cli::bind("--admin-listen", addr).await?;
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
