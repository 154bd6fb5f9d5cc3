//! Agents whose only way out is a forward proxy (issue #17): a real tinyproxy (Debian's) with
//! Basic auth between the agent and a real haproxy in front of three proxies.

mod support;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::Arc;
use std::time::Duration;

use tether::agent::{AgentConfig, Tunnel};
use tether::client::{DialClient, DialClientConfig};
use tether::demo::Pki;
use tether::egress::allow_list::AllowList;
use tether::identity::Identity;
use tether::protocol::Target;
use tether::proxy::{Peer, ProxyServer};
use tether::transport::{Credentials, Egress, ForwardProxy, NoProxy, Route};

use support::haproxy::Haproxy;
use support::procs::{Files, Proc, agent_command, free_addr};
use support::tinyproxy::{PASSWORD, Tinyproxy, USER};
use support::*;

/// Three proxies that announce each other, behind haproxy.
struct Root {
    pki: Arc<Pki>,
    proxies: Vec<ProxyServer>,
    lb: Haproxy,
}

impl Root {
    async fn start() -> Root {
        let pki = Arc::new(pki());
        let mut proxies = Vec::new();
        for id in ["proxy-1", "proxy-2", "proxy-3"] {
            let listener = StdListener::bind("127.0.0.1:0").expect("bind");
            let config = pki.proxy_config(id).expect("config");
            let proxy = ProxyServer::start_on_std(config, listener)
                .await
                .expect("proxy starts");
            proxies.push(proxy);
        }
        let peers: Vec<Peer> = proxies
            .iter()
            .zip(["proxy-1", "proxy-2", "proxy-3"])
            .map(|(p, id)| Peer {
                id: id.to_owned(),
                addr: Some(p.local_addr()),
                generation: 0,
            })
            .collect();
        for p in &proxies {
            p.set_peers(peers.clone());
        }
        let addrs: Vec<SocketAddr> = proxies.iter().map(ProxyServer::local_addr).collect();
        let lb = Haproxy::start("roundrobin", &addrs);
        Root { pki, proxies, lb }
    }

    fn holding(&self) -> usize {
        self.proxies
            .iter()
            .filter(|p| p.site(&leaf()).is_some_and(|s| !s.tunnels.is_empty()))
            .count()
    }

    async fn wait_all_held(&self) {
        wait_for("a tunnel on each of the 3 proxies", DEADLINE, || {
            self.holding() == 3
        })
        .await;
    }

    /// An agent of the leaf through `route` to the load balancer, reaching `echo` alone.
    fn agent_config(&self, route: Route, echo: SocketAddr) -> AgentConfig {
        let allow = AllowList::parse([format!("127.0.0.1/32:{}", echo.port())]).expect("allow");
        let mut config = self
            .pki
            .agent_config(&self.lb.addr.to_string(), allow)
            .expect("agent config");
        config.route = route;
        config.heartbeat_interval = Duration::from_millis(500);
        config
    }
}

const DEADLINE: Duration = Duration::from_secs(30);

fn via(url: &str, no_proxy: &str) -> Route {
    let proxy = ForwardProxy::parse(url, "HTTPS_PROXY").expect("proxy URL");
    Route::via(Egress::via(proxy, NoProxy::parse(no_proxy)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_a_proxy_with_basic_auth_holds_three_tunnels_and_dials_work() {
    let root = Root::start().await;
    let tiny = Tinyproxy::start(&[root.lb.addr.port()]);
    let echo = echo_server().await.expect("echo");
    let (_agent, stop) = run_agent(root.agent_config(via(&tiny.url(PASSWORD), ""), echo));
    root.wait_all_held().await;
    assert!(tiny.connects() >= 3, "every tunnel went through tinyproxy");

    // The root dials into the leaf through each proxy's tunnel.
    let target = Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port())).expect("target");
    for proxy in &root.proxies {
        let conn = tether::proxy::Dialer::dial(
            &proxy.dialer(),
            target.clone(),
            "127.0.0.1:1".parse().expect("addr"),
        )
        .await
        .expect("a dial through the tunnel");
        let (mut stream, _task) = attach(conn, 64 * 1024);
        assert_eq!(
            echo_round_trip(&mut stream, b"through the proxy").await,
            b"through the proxy"
        );
    }

    // A client (`tether dial`) behind the same proxy, its credentials from a file.
    let creds = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(creds.path(), format!("{USER}:{PASSWORD}\n")).expect("write");
    let proxy = ForwardProxy::parse(&format!("http://{}", tiny.addr), "--egress-proxy")
        .expect("url")
        .with_credentials(
            Credentials::read_file(creds.path(), "--egress-proxy-credentials").expect("creds"),
        );
    let before = tiny.connects();
    let client = DialClient::connect(&DialClientConfig {
        proxy_addr: root.lb.addr.to_string(),
        root_cluster: root.pki.root.cluster().clone(),
        root_cas: vec![root.pki.root.public_key().clone()],
        identity: Arc::new(
            Identity::generate_client(&root.pki.root, "alice", Duration::from_secs(600))
                .expect("client"),
        ),
        timeout: Duration::from_secs(10),
        route: Route::via(Egress::via(proxy, NoProxy::default())),
    })
    .await
    .expect("the client connects through the proxy");
    assert_eq!(
        tiny.connects(),
        before + 1,
        "the client went through tinyproxy"
    );
    let mut stream = client
        .open(&target, "127.0.0.1:1")
        .await
        .expect("a client dial");
    echo_once(&mut stream, b"a client behind the proxy").await;
    stop.cancel();
}

#[tokio::test]
async fn wrong_credentials_say_407_and_whose_and_never_the_password() {
    let logs = LogCapture::default();
    let _guard = logs.install_at(tracing::Level::DEBUG);
    let root = Root::start().await;
    let tiny = Tinyproxy::start(&[root.lb.addr.port()]);
    let wrong = "wrong-secret-42";
    let config = root.agent_config(via(&tiny.url(wrong), ""), free_addr());

    let err = Tunnel::connect(Arc::new(config.clone()))
        .await
        .expect_err("refused by the proxy")
        .to_string();
    assert!(err.contains("407 Proxy Authentication Required"), "{err}");
    assert!(
        err.contains(&format!(
            "refused the credentials of user \"{USER}\" (from the user:password in HTTPS_PROXY)"
        )),
        "{err}"
    );
    assert!(
        err.contains(&tiny.addr.to_string()),
        "names the proxy: {err}"
    );
    assert!(!err.contains(wrong), "{err}");

    // The running agent says the same in its log and its status, without the password.
    let (agent, stop) = run_agent(config.clone());
    logs.wait_for("407 Proxy Authentication Required").await;
    let status = format!("{:?}", *agent.status().borrow());
    assert!(
        !logs.text().contains(wrong) && !status.contains(wrong),
        "a password leaked"
    );
    assert!(
        !format!("{:?}", config.route).contains(wrong),
        "Debug of the route"
    );
    assert_eq!(root.holding(), 0);
    stop.cancel();

    // Without credentials: says none were given and how to give them.
    let bare = root.agent_config(via(&format!("http://{}", tiny.addr), ""), free_addr());
    let err = Tunnel::connect(Arc::new(bare))
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("407") && err.contains("none were given"),
        "{err}"
    );

    // A port the proxy does not allow: 403 with tinyproxy's reason.
    let tiny_strict = Tinyproxy::start(&[1]);
    let forbidden = root.agent_config(via(&tiny_strict.url(PASSWORD), ""), free_addr());
    let err = Tunnel::connect(Arc::new(forbidden))
        .await
        .expect_err("403")
        .to_string();
    assert!(
        err.contains("forbids CONNECT") && err.contains("403"),
        "{err}"
    );
    assert!(
        err.contains("not allowed with the port"),
        "quotes the proxy: {err}"
    );
}

#[tokio::test]
async fn no_proxy_naming_the_root_dials_it_directly() {
    let root = Root::start().await;
    let tiny = Tinyproxy::start(&[root.lb.addr.port()]);
    // A proxy that does not exist: a connection through it could not succeed.
    let dead = format!("http://{USER}:{PASSWORD}@{}", free_addr());
    let config = root.agent_config(via(&dead, "example.com,127.0.0.1"), free_addr());
    Tunnel::connect(Arc::new(config))
        .await
        .expect("a direct connection");
    // And with the live tinyproxy: the agent holds its tunnels and tinyproxy saw none.
    let (_agent, stop) = run_agent(root.agent_config(
        via(&tiny.url(PASSWORD), "*.example.com, 127.0.0.0/8"),
        free_addr(),
    ));
    root.wait_all_held().await;
    assert_eq!(
        tiny.connects(),
        0,
        "NO_PROXY sends the root around the proxy"
    );
    stop.cancel();
}

#[test]
fn tether_agent_follows_https_proxy_from_its_environment() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let root = rt.block_on(Root::start());
    let tiny = Tinyproxy::start(&[root.lb.addr.port()]);
    let files = Files::write(&root.pki, &[]);
    let mut cmd = agent_command(
        "leaf",
        &root.lb.addr.to_string(),
        &files.path("agent"),
        &files.path("root-ca.pub"),
    );
    cmd.args(["--heartbeat-interval", "500ms"])
        .env("HTTPS_PROXY", tiny.url(PASSWORD));
    let log = files.path("agent.log");
    let mut agent = Proc::logged("tether agent", &mut cmd, log.clone()).expect("tether agent");
    let started = std::time::Instant::now();
    while root.holding() < 3 {
        assert!(
            started.elapsed() < DEADLINE,
            "no 3 tunnels from `tether agent`; its log: {}",
            agent.log_tail(20)
        );
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(50)).await });
    }
    assert!(tiny.connects() >= 3, "through tinyproxy");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains(PASSWORD),
        "the password is in the agent's log"
    );
    agent.kill();
}

/// `tether agent` checks its egress flags before it dials: each refusal names the flag and
/// the cause, and never echoes a password.
#[test]
fn tether_agent_refuses_a_bad_egress_configuration_at_start_up() {
    let pki = pki();
    let files = Files::write(&pki, &[]);
    let dir = files.dir.path();
    let base = support::procs::agent_args("127.0.0.1:9");
    let with = |extra: &[&str]| support::procs::fails(dir, &[&base[..], extra].concat());
    let err = with(&["--egress-proxy", "socks5://proxy:1080"]);
    assert!(
        err.contains("--egress-proxy: ") && err.contains("socks5"),
        "{err}"
    );
    let err = with(&["--egress-proxy", "http://u:hunter2@proxy:3128"]);
    assert!(
        err.contains("--egress-proxy-credentials") && !err.contains("hunter2"),
        "{err}"
    );
    let err = with(&[
        "--egress-proxy",
        "http://proxy:3128",
        "--egress-proxy-credentials",
        "missing-file",
    ]);
    assert!(
        err.contains("--egress-proxy-credentials: cannot read missing-file"),
        "{err}"
    );
    let err = with(&["--egress-proxy-ca", "ca.pem"]);
    assert!(err.contains("no forward proxy is"), "{err}");
}

/// The whole corporate network at once (#17): the agent's only way out is tinyproxy with Basic
/// auth, and the root's only way in is an L7 load balancer (haproxy in `mode http`) terminating
/// TLS in front of the proxies' TLS ports. The agent dials `tls://`, falls back to WebSocket
/// (haproxy answers without ALPN), and holds a tunnel to each of the 3 proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_forward_proxy_and_an_l7_load_balancer_agents_hold_every_tunnel() {
    let root = Root::start().await;
    let mut tls_ports = Vec::new();
    for proxy in &root.proxies {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        tls_ports.push(listener.local_addr().expect("addr"));
        let port = tether::proxy::tls_port::TlsPort::self_issued(vec!["localhost".into()], None)
            .expect("certificate");
        proxy.serve_tls_port(listener, port);
    }
    let pem = tempfile::NamedTempFile::new().expect("pem");
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let key = issued.signing_key.serialize_pem();
    std::fs::write(pem.path(), format!("{}{key}", issued.cert.pem())).expect("write pem");
    let l7 = Haproxy::start_l7(&tls_ports, pem.path(), false);
    let tiny = Tinyproxy::start(&[l7.addr.port()]);
    let echo = echo_server().await.expect("echo");
    let mut config = root.agent_config(via(&tiny.url(PASSWORD), ""), echo);
    config.proxy_addr = format!("tls://localhost:{}", l7.addr.port());
    let (agent, stop) = run_agent(config);
    root.wait_all_held().await;
    assert!(tiny.connects() >= 3, "every tunnel went through tinyproxy");
    let status = agent.status();
    wait_for(
        "the agent's 3 tunnels over WebSocket in TLS",
        DEADLINE,
        || {
            let status = status.borrow();
            status.proxies.len() == 3
                && status
                    .proxies
                    .iter()
                    .all(|p| p.carrier.map(|c| c.to_string()).as_deref() == Some("tls-websocket"))
        },
    )
    .await;
    stop.cancel();
}
