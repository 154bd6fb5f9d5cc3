//! Names that keep TLS verifiable (issue #17): a client names the real host and chooses the
//! leaf in its proxy user name (`alice@leaf`), so real clients verify real certificates through
//! the client entry. curl with `--cacert` (no `-k`) reaches an HTTPS server in the leaf whose
//! certificate names `web.internal`; kubectl with `HTTPS_PROXY` reaches a real kube-apiserver
//! as `kubernetes.default.svc`, checking its certificate. The names reach the leaf's agent
//! unresolved, and the agent's resolver (a test one: no `/etc/hosts`) answers loopback, which
//! an address rule permits.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tether::egress::connect::Resolver;
use tether::protocol::ClusterName;
use tether::proxy::{AccessDenied, LeafAccess, Reach, Who};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use support::*;

const ALICE: &str = "alice-4f1d9c27b8e3a6055d2e7c1b9a8f3e64";
const BOB: &str = "bob-b27e9d04c1f8a35e6d7c2b9f0a4e1d83";
/// What the leaf's HTTPS server answers.
const PAGE: &str = "hello over verified TLS";

/// The root's access rules in these tests: alice may dial every leaf, nobody else any.
struct OnlyAlice;

impl LeafAccess for OnlyAlice {
    fn check<'a>(
        &'a self,
        who: &'a Who,
        leaf: &'a ClusterName,
        _reach: Reach,
    ) -> BoxFuture<'a, Result<(), AccessDenied>> {
        Box::pin(async move {
            if who.user == "alice" {
                return Ok(());
            }
            Err(AccessDenied(format!(
                "{} may not dial leaf {leaf}",
                who.user
            )))
        })
    }
}

/// An agent resolver answering loopback for `names` and nothing for anything else.
fn loopback_for(names: &'static [&'static str]) -> Resolver {
    Resolver::from_fn(move |host, port| {
        if names.contains(&host) {
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such name",
            ))
        }
    })
}

/// A proxy applying [`OnlyAlice`], an agent allowing loopback `port` and resolving `names` to
/// it, and a client entry for alice and bob; the entry's address.
async fn rig_for(names: &'static [&'static str], port: u16) -> (Rig, SocketAddr) {
    let allow = [format!("127.0.0.1/32:{port}")];
    let rig = Rig::start(
        &allow,
        |proxy| proxy.access = Some(Arc::new(OnlyAlice)),
        |agent| agent.resolver = loopback_for(names),
    )
    .await;
    let tokens = format!("alice:{ALICE}\nbob:{BOB}\n");
    let entry = start_client_entry(&rig.proxy, &tokens, |_| {}).await;
    (rig, entry)
}

/// An HTTPS server on loopback whose certificate (from a CA of its own) names `web.internal`;
/// its address and the CA certificate's PEM.
async fn https_server() -> (SocketAddr, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Names of their own: a certificate whose issuer is its subject reads as self-signed.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "leaf test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["web.internal".to_owned()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "web.internal");
    let cert = params.signed_by(&key, &ca).expect("certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else {
                    return;
                };
                let mut head = [0u8; 4096];
                let _ = tls.read(&mut head).await;
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{PAGE}",
                    PAGE.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, ca.pem())
}

/// Runs `command` off the runtime (the proxy and the agent run on it), with no exceptions to
/// the proxy the machine may set, and bounded. (curl's `--proxy` and the `HTTPS_PROXY` given to
/// kubectl override whatever proxy the machine sets.)
async fn run(mut command: Command) -> Output {
    for var in ["NO_PROXY", "no_proxy"] {
        command.env_remove(var);
    }
    within(
        "a client process",
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output().expect("the client runs")),
    )
    .await
    .expect("join")
}

fn curl(ca: &Path, proxy: &str, url: &str) -> Command {
    let mut command = Command::new("curl");
    command
        .args(["-q", "-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--proxy", proxy, url]);
    command
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn curl_verifies_the_real_certificate_of_a_leaf_service() {
    let curl_runs = Command::new("curl").arg("--version").output();
    assert!(
        curl_runs.is_ok(),
        "curl is needed (scripts/test installs it)"
    );
    let logs = LogCapture::default();
    let _guard = logs.install();
    let (web, ca_pem) = https_server().await;
    let (_rig, entry) = rig_for(&["web.internal"], web.port()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).expect("write CA");
    let url = format!("https://web.internal:{}/", web.port());

    for proxy in [
        format!("http://alice%40leaf:{ALICE}@{entry}"),
        format!("socks5h://alice%40leaf:{ALICE}@{entry}"),
    ] {
        let out = run(curl(&ca, &proxy, &url)).await;
        assert!(out.status.success(), "{proxy}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), PAGE, "{proxy}");
    }
    // The audit record names the leaf chosen in the user name, and the real host.
    let port = web.port();
    logs.wait_for("who=alice via=\"http-connect\"").await;
    let audit = logs.text();
    assert!(
        audit.contains(&format!("leaf=leaf target=web.internal:{port}")),
        "{audit}"
    );

    // The same server named the old way: curl checks `web.internal.leaf.tether` against a
    // certificate for `web.internal`, and refuses (error 60): verification is on.
    let old = format!("https://web.internal.leaf.tether:{port}/");
    let out = run(curl(&ca, &format!("http://alice:{ALICE}@{entry}"), &old)).await;
    assert_eq!(out.status.code(), Some(60), "{}", text(&out.stderr));

    // The root's access rules judge the leaf chosen in the user name: bob may not dial it.
    let out = run(curl(&ca, &format!("http://bob%40leaf:{BOB}@{entry}"), &url)).await;
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));
    logs.wait_for("bob may not dial leaf leaf").await;
}

#[tokio::test]
async fn kubectl_through_https_proxy_verifies_the_leaf_apiserver() {
    let cp = support::kube::control_plane().await;
    let port = cp
        .server_url()
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .expect("the API server's port");
    let (_rig, entry) = rig_for(&["kubernetes.default.svc"], port).await;
    // The admin kubeconfig, naming the API server as its certificate does (not 127.0.0.1:
    // Go never sends loopback through a proxy).
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    let admin = std::fs::read_to_string(cp.kubeconfig_path()).expect("admin kubeconfig");
    let named = admin.replace(
        cp.server_url(),
        &format!("https://kubernetes.default.svc:{port}"),
    );
    assert_ne!(named, admin, "the server line was rewritten");
    std::fs::write(&kubeconfig, named).expect("write kubeconfig");

    let kubectl = |user: &str, token: &str| {
        let mut command = Command::new(cp.bin_dir().join("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "--request-timeout=20s",
                "get",
                "namespace",
                "default",
                "-o",
                "name",
            ])
            .env(
                "HTTPS_PROXY",
                format!("http://{user}%40leaf:{token}@{entry}"),
            );
        command
    };
    let out = run(kubectl("alice", ALICE)).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "namespace/default");

    // It went through the entry: bob, whom the root's rules refuse, does not get there.
    let out = run(kubectl("bob", BOB)).await;
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("Forbidden"),
        "{}",
        text(&out.stderr)
    );
}
