//! The root's half of a root CA rotation (#19), with `tether proxy --ca-keys` and `tether ca
//! key-set` as processes: the signed set is announced to agents and trusted for the root's
//! clients; a set that does not list `--ca` is refused at start-up, naming the flag; at
//! retire the old key's client sessions end and its clients are refused, the new key's kept.
//! (How a leaf follows the announced set is `tests/ca_rotation.rs`.)

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use support::procs::{Proc, admin_get, fails, free_addr, ok, tether_bin};
use support::tunnel_e2e::eventually;
use tether::agent::Agent;
use tether::client::{DialClient, DialClientConfig};
use tether::demo::{Pki, echo_server};
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity, fingerprint};
use tether::protocol::{ClusterName, Target};

/// `tether proxy` issuing its certificates from `ca`, announcing `keys`, trusting leaf-1.
fn spawn_proxy(dir: &Path, ca: &str) -> (Proc, SocketAddr, SocketAddr) {
    for _ in 0..5 {
        let (listen, admin) = (free_addr(), free_addr());
        let mut cmd = std::process::Command::new(tether_bin());
        cmd.current_dir(dir)
            .args(["proxy", "--cluster", "root", "--proxy-id", "proxy-1"])
            .args(["--ca", ca, "--ca-keys", "keys", "--trust-dir", "trust"])
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string())
            .args(["--shutdown-grace", "1s"])
            .env("RUST_LOG", "info");
        let mut proc =
            Proc::logged("proxy-1", &mut cmd, dir.join(format!("proxy-{ca}.log"))).expect("proxy");
        if proc.accepts(&[listen, admin], Duration::from_secs(20)) {
            return (proc, listen, admin);
        }
    }
    panic!("tether proxy did not start; logs in {}", dir.display());
}

/// The root key set the proxy's `/status` says is in force, as fingerprints.
fn in_force(admin: SocketAddr) -> Option<Vec<String>> {
    let status: serde_json::Value = serde_json::from_str(&admin_get(admin, "/status")?).ok()?;
    let keys = status["root_keys"]["keys"].as_array()?;
    Some(
        keys.iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect(),
    )
}

/// `tether ca key-set` for the root, signed with `sign_with`, listing `keys`, into `keys`.
fn key_set<'a>(sign_with: &'a str, keys: &[&'a str], force: bool) -> Vec<&'a str> {
    let mut args = vec![
        "ca",
        "key-set",
        "--cluster",
        "root",
        "--sign-with",
        sign_with,
    ];
    for key in keys {
        args.extend(["--key", key]);
    }
    args.extend(["--out", "keys"]);
    if force {
        args.push("--force");
    }
    args
}

/// A client of the root with a certificate from `ca`.
async fn client(
    proxy: SocketAddr,
    root_cas: &[&CertificateAuthority],
    ca: &CertificateAuthority,
) -> Result<DialClient, String> {
    let identity =
        Identity::generate_client(ca, "alice", Duration::from_secs(3600)).expect("client");
    DialClient::connect(&DialClientConfig {
        proxy_addr: proxy.to_string(),
        route: tether::transport::Route::direct(),
        root_cluster: ca.cluster().clone(),
        root_cas: root_cas.iter().map(|c| c.public_key().clone()).collect(),
        identity: Arc::new(identity),
        timeout: Duration::from_secs(10),
    })
    .await
    .map_err(|e| e.to_string())
}

/// Runs an agent of `pki`'s leaf against `proxy`, trusting `root_cas`; the root key set it
/// was told, as fingerprints, once it was told one.
async fn announced_to_agent(
    pki: &Pki,
    proxy: SocketAddr,
    root_cas: &[&CertificateAuthority],
) -> Vec<String> {
    let mut config = pki
        .agent_config(&proxy.to_string(), AllowList::default())
        .expect("agent config");
    config.root_cas = root_cas.iter().map(|c| c.public_key().clone()).collect();
    let agent = Arc::new(Agent::new(config));
    let stop = CancellationToken::new();
    tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(stop).await }
    });
    let keys = eventually("the root's key set at the agent", || async {
        agent.status().borrow().root_keys.clone()
    })
    .await;
    stop.cancel();
    keys.keys
        .iter()
        .map(|k| fingerprint(&tether::identity::PublicKey::from_openssh(k).expect("key")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotates_its_ca_with_ca_keys_and_the_old_keys_clients_go_at_retire() {
    let dir = tempfile::tempdir().expect("dir");
    let dir = dir.path();
    let root = ClusterName::new("root").expect("name");
    let pki = Pki::generate(root.clone(), ClusterName::new("leaf-1").expect("name")).expect("pki");
    let (old, new) = (
        &pki.root,
        &CertificateAuthority::generate(root).expect("new CA"),
    );
    old.save(&dir.join("root-ca")).expect("save");
    new.save(&dir.join("root-ca-next")).expect("save");
    std::fs::create_dir(dir.join("trust")).expect("trust dir");
    std::fs::write(
        dir.join("trust/leaf-1.pub"),
        pki.leaf.public_key().to_openssh().expect("encode"),
    )
    .expect("leaf trust");
    let (old_print, new_print) = (fingerprint(old.public_key()), fingerprint(new.public_key()));

    // A set that does not list the proxy's own CA is refused at start-up, naming the flag.
    ok(dir, &key_set("root-ca-next", &["root-ca-next.pub"], false));
    let said = fails(
        dir,
        &[
            "proxy",
            "--cluster",
            "root",
            "--proxy-id",
            "p",
            "--ca",
            "root-ca",
            "--ca-keys",
            "keys",
            "--trust-dir",
            "trust",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert!(
        said.contains("--ca-keys keys") && said.contains("does not list the key of --ca"),
        "{said}"
    );
    // Nor is a file overwritten without --force.
    let said = fails(dir, &key_set("root-ca", &["root-ca.pub"], false));
    assert!(said.contains("--force"), "{said}");

    // Init: [old, new] signed by old; agents are told it; clients of either key are trusted.
    ok(
        dir,
        &key_set("root-ca", &["root-ca.pub", "root-ca-next.pub"], true),
    );
    let (mut proxy, addr, admin) = spawn_proxy(dir, "root-ca");
    assert_eq!(
        in_force(admin),
        Some(vec![old_print.clone(), new_print.clone()])
    );
    assert_eq!(
        announced_to_agent(&pki, addr, &[old]).await,
        [old_print.clone(), new_print.clone()]
    );
    client(addr, &[old], new)
        .await
        .expect("a client of the new key, trusted from init");

    // Update servers: the proxy issues its certificates from the new key. A leaf's agent
    // trusting both keys serves an echo server; a client of the old key keeps a stream open.
    proxy.kill();
    let (proxy, addr, admin) = spawn_proxy(dir, "root-ca-next");
    let echo = echo_server().await.expect("echo");
    let allow = AllowList::parse(&[format!("127.0.0.1/32:{}", echo.port())]).expect("rule");
    let mut config = pki
        .agent_config(&addr.to_string(), allow)
        .expect("agent config");
    config.root_cas = vec![old.public_key().clone(), new.public_key().clone()];
    let agent = Arc::new(Agent::new(config));
    let agent_stop = CancellationToken::new();
    tokio::spawn({
        let (agent, stop) = (agent.clone(), agent_stop.clone());
        async move { agent.run(stop).await }
    });
    let target = Target::from_name("127.0.0.1.leaf-1.tether", echo.port()).expect("target");
    let old_client = client(addr, &[old, new], old)
        .await
        .expect("a client of the old key");
    let mut stream = eventually("a stream of the old key's client", || async {
        old_client.open(&target, "127.0.0.1:1").await.ok()
    })
    .await;
    stream.write_all(b"ping").await.expect("write");
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.expect("echo");

    // Retire: [new] signed by new, re-read on SIGHUP: the old key's session ends with its
    // stream, its clients are refused, the new key's are served, and agents are told the new
    // key alone.
    ok(dir, &key_set("root-ca-next", &["root-ca-next.pub"], true));
    proxy.signal(libc::SIGHUP).expect("SIGHUP");
    let retired = vec![new_print.clone()];
    eventually("the retire set in force", || async {
        (in_force(admin).as_ref() == Some(&retired)).then_some(())
    })
    .await;
    eventually("the old key's session ended", || async {
        old_client.is_closed().then_some(())
    })
    .await;
    client(addr, &[new], old)
        .await
        .err()
        .expect("an old key's client refused");
    let new_client = client(addr, &[new], new)
        .await
        .expect("a client of the new key");
    new_client
        .open(&target, "127.0.0.1:1")
        .await
        .expect("the new key's client dials");
    assert_eq!(
        announced_to_agent(&pki, addr, &[old, new]).await,
        [new_print]
    );
    agent_stop.cancel();
    drop(proxy);
}
