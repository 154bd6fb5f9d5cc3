//! Root side against a real kube-apiserver: proxies learn their peers from the EndpointSlices of
//! their Service, and an agent behind haproxy follows: 3/3, scaled to 5/5, then down to 2/2,
//! without anything touching the agent.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use tokio_util::sync::CancellationToken;

use support::tunnel_e2e::proxy_slice;
use tether::agent::Agent;
use tether::demo::Pki;
use tether::egress::allow_list::AllowList;
use tether::operator::endpoints::watch_peers;
use tether::protocol::ClusterName;
use tether::proxy::ProxyServer;

const SERVICE: &str = "tether-proxy";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_their_endpoint_slices_and_the_agent_follows_them() {
    let cp = support::kube::control_plane().await;
    let ns = cp.new_namespace("peers").await;
    let client = cp.kube_client();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    let pki = Arc::new(
        Pki::generate(
            ClusterName::new("root").expect("name"),
            ClusterName::new("leaf").expect("name"),
        )
        .expect("pki"),
    );
    let ids = ["p1", "p2", "p3", "p4", "p5"];
    // Ports stay bound from the start (a released port can be taken as an ephemeral source
    // port by any connection on the machine); each proxy adopts its listener when it starts.
    let listeners: Vec<std::net::TcpListener> = ids
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr"))
        .collect();
    let lb = support::haproxy::Haproxy::start("random", &addrs);
    let stop = CancellationToken::new();
    let mut proxies: HashMap<&str, Arc<ProxyServer>> = HashMap::new();

    let start = |id: &'static str, listener: std::net::TcpListener| {
        let (pki, client, ns, stop) = (pki.clone(), client.clone(), ns.clone(), stop.clone());
        async move {
            let mut config = pki.proxy_config(id).expect("config");
            config.peering = None;
            let proxy = Arc::new(
                ProxyServer::start_on_std(config, listener)
                    .await
                    .expect("proxy"),
            );
            let watched = proxy.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    () = watch_peers(client, &ns, SERVICE, Some("tunnel".into()), move |peers| watched.set_peers(peers)) => {}
                }
            });
            proxy
        }
    };
    let mut listeners = listeners.into_iter();
    for (i, (id, addr)) in ids.iter().zip(&addrs).enumerate().take(3) {
        proxies.insert(id, start(id, listeners.next().expect("listener")).await);
        slices
            .create(
                &PostParams::default(),
                &proxy_slice(SERVICE, id, i, addr.port(), true),
            )
            .await
            .expect("create slice");
    }

    let config = pki
        .agent_config(&lb.addr.to_string(), AllowList::default())
        .expect("agent config");
    let agent = Arc::new(Agent::new(config));
    tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(stop).await }
    });
    let mut status = agent.status();
    let converge = |n: usize| {
        let mut status = status.clone();
        let watcher = status.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(60),
                status.wait_for(|s| s.expected == n && s.connected() == n),
            )
            .await
            .unwrap_or_else(|_| panic!("the agent did not reach {n}/{n}: {:?}", watcher.borrow()))
            .expect("status");
        }
    };
    converge(3).await;

    for (i, (id, addr)) in ids.iter().zip(&addrs).enumerate().skip(3) {
        proxies.insert(id, start(id, listeners.next().expect("listener")).await);
        slices
            .create(
                &PostParams::default(),
                &proxy_slice(SERVICE, id, i, addr.port(), true),
            )
            .await
            .expect("create slice");
    }
    converge(5).await;

    // Scale down to two: the endpoints go, then the pods.
    for id in &ids[..3] {
        slices
            .delete(&format!("{SERVICE}-{id}"), &DeleteParams::default())
            .await
            .expect("delete slice");
    }
    for id in &ids[..3] {
        let proxy = proxies.remove(id).expect("proxy");
        proxy.close();
        proxy.wait().await;
    }
    converge(2).await;
    let held: Vec<String> = status
        .borrow_and_update()
        .proxies
        .iter()
        .map(|p| p.proxy_id.clone())
        .collect();
    assert_eq!(held, ["p4", "p5"]);
    stop.cancel();
}
