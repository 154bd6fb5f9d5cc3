//! The leaf's Kubernetes API through the root (issue #16), with two real API servers (the
//! root's and the leaf's), real kubectl and curl, a proxy and an agent:
//!
//! - the root's RBAC decides who reaches the leaf at all (`remoteclusters/kube`), refusing at
//!   the root with the permission named;
//! - the leaf's mapping decides who the caller is there (`tether:root:USER` in the mapped leaf
//!   groups), and the leaf's RBAC what they may do; an unmapped caller is refused in the leaf;
//! - nothing a client sends (`--as`, `Impersonate-*`, `Authorization`, the same named in
//!   `Connection`) changes the identity the leaf's API server sees;
//! - get, apply, delete, a watch (HTTP and WebSocket) pass; every request has its audit record.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

use support::kube::ControlPlane;
use support::tunnel_e2e::{crds_and_namespace, eventually, grant};
use support::{LogCapture, Rig};
use tether::agent::kube::{
    AccessRule, Credential, KubeAccess, KubeGateway, KubeUpstream, certificates_from_pem,
};
use tether::operator::root::{RbacLeafAccess, TokenReviews};
use tether::proxy::BearerTokens;
use tether::proxy::kube_entry::{self, KubeEntryConfig};

/// A token of the client entry's token file.
const DAVE: &str = "dave-token-0123456789abcdef";

/// The in-process tests one at a time: the first reads audit records from a log capture scoped
/// to its thread, and another emitting the same records beside it without one made the
/// capture miss them (tracing caches a callsite's interest across threads).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The leaf namespace the tests work in, and the groups the mapping grants there.
const APPS: &str = "apps";
const EDITORS: &str = "tether:editors";
const VIEWERS: &str = "tether:viewers";

/// The root's client CA (for the proxy's `--kube-client-ca`) and its certificates.
struct RootPki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl RootPki {
    fn new(dir: &Path) -> RootPki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "root client CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        std::fs::write(dir.join("ca.crt"), ca.pem()).expect("write CA");
        RootPki {
            dir: dir.to_owned(),
            ca,
        }
    }

    /// Writes NAME.crt and NAME.key: a server certificate for 127.0.0.1, or a client
    /// certificate with CN `name` and an O per group.
    fn issue(&self, name: &str, server: bool, groups: &[&str]) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let sans = if server {
            vec!["127.0.0.1".to_owned()]
        } else {
            vec![]
        };
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        for group in groups {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *group);
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let (crt, pem_key) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem()).expect("write cert");
        std::fs::write(&pem_key, key.serialize_pem()).expect("write key");
        (crt, pem_key)
    }
}

/// Sets up the leaf: the agent's ServiceAccount may impersonate; `tether:editors` may do
/// anything to ConfigMaps in `apps`, `tether:viewers` may read them; one, `seed`, is there. Returns the agent's token.
async fn leaf_rbac(leaf: &ControlPlane, dir: &Path) -> String {
    let yaml = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: {APPS}}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: tether-impersonator}}
rules:
  - apiGroups: [""]
    resources: [users, groups]
    verbs: [impersonate]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: tether-impersonator}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: tether-impersonator}}
subjects: [{{kind: ServiceAccount, name: tether-agent, namespace: default}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: configmap-editor, namespace: {APPS}}}
rules: [{{apiGroups: [""], resources: [configmaps], verbs: ["*"]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: editors, namespace: {APPS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-editor}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "{EDITORS}"}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: configmap-viewer, namespace: {APPS}}}
rules: [{{apiGroups: [""], resources: [configmaps], verbs: [get, list, watch]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: viewers, namespace: {APPS}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: configmap-viewer}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: Group, name: "{VIEWERS}"}}]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: seed, namespace: {APPS}}}
"#
    );
    let file = dir.join("leaf-rbac.yaml");
    std::fs::write(&file, yaml).expect("write leaf RBAC");
    let applied = leaf.kubectl(["apply", "-f", file.to_str().expect("utf-8")]);
    assert!(applied.status.success(), "leaf RBAC: {}", stderr(&applied));
    leaf.service_account_token("default", "tether-agent", &[])
        .await
}

/// The leaf's control plane, a second one beside the root's, shared by this binary's tests.
async fn leaf_control_plane() -> &'static ControlPlane {
    static LEAF: std::sync::OnceLock<ControlPlane> = std::sync::OnceLock::new();
    tokio::task::spawn_blocking(|| {
        LEAF.get_or_init(|| ControlPlane::start().expect("the leaf's control plane starts"))
    })
    .await
    .expect("task")
}

fn leaf_ca_path(leaf: &ControlPlane) -> PathBuf {
    leaf.dir().join("pki/ca.crt")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs the built kubectl with `kubeconfig`, off the runtime's thread.
async fn kubectl(bin: &Path, kubeconfig: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(bin.join("kubectl"));
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run kubectl"))
        .await
        .expect("kubectl task")
}

/// `kubectl get configmaps --watch -o name` in `apps` (with `extra` flags), and its lines; the
/// watch ends when the child is dropped.
fn kubectl_watch(
    bin: &Path,
    kubeconfig: &Path,
    extra: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut watch = tokio::process::Command::new(bin.join("kubectl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["get", "configmaps", "-n", APPS, "--watch", "-o", "name"])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl watch");
    let lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    (watch, lines)
}

/// Runs `curl -sS ARGS` off the runtime's thread; what it printed, as JSON.
async fn curl_json(args: &[&str]) -> serde_json::Value {
    let mut cmd = std::process::Command::new("curl");
    cmd.arg("-sS").args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run curl"))
        .await
        .expect("curl task");
    assert!(out.status.success(), "curl: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

/// The ConfigMaps of `apps` as `kubeconfig` lists them, once it may (waiting for `what`).
async fn listed_once_let_in(what: &str, bin: &Path, kubeconfig: &Path) -> String {
    eventually(what, || async {
        let out = kubectl(
            bin,
            kubeconfig,
            &["get", "configmaps", "-n", APPS, "-o", "name"],
        )
        .await;
        out.status.success().then(|| stdout(&out))
    })
    .await
}

/// `tether kubeconfig` for the leaf, as the README tells a user to run it.
fn write_kubeconfig(dir: &Path, name: &str, server: &str, ca: &Path, user: &[&str]) -> PathBuf {
    let out = dir.join(format!("{name}.kubeconfig"));
    let mut args = vec![
        "kubeconfig",
        "--cluster",
        "leaf",
        "--server",
        server,
        "--certificate-authority",
        ca.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ];
    args.extend_from_slice(user);
    support::procs::ok(dir, &args);
    out
}

/// [`write_kubeconfig`] for a caller with a client certificate.
fn cert_kubeconfig(
    dir: &Path,
    name: &str,
    server: &str,
    ca: &Path,
    crt: &Path,
    key: &Path,
) -> PathBuf {
    let (crt, key) = (crt.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
    write_kubeconfig(
        dir,
        name,
        server,
        ca,
        &["--client-certificate", crt, "--client-key", key],
    )
}

/// What the leaf's API server says the caller is (SelfSubjectReview).
async fn whoami(bin: &Path, kubeconfig: &Path, extra: &[&str]) -> (String, Vec<String>) {
    let mut args = vec!["auth", "whoami", "-o", "json"];
    args.extend_from_slice(extra);
    let out = kubectl(bin, kubeconfig, &args).await;
    assert!(out.status.success(), "whoami: {}", stderr(&out));
    let review: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let info = &review["status"]["userInfo"];
    let groups = info["groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (
        info["username"].as_str().unwrap_or_default().to_owned(),
        groups,
    )
}

#[tokio::test(flavor = "current_thread")]
async fn kubectl_reaches_the_leaf_through_the_root_as_the_leaf_maps_it() {
    let _serial = SERIAL.lock().await;
    let logs = LogCapture::default();
    let _guard = logs.install();
    let (root, admin, ns) = crds_and_namespace("kube-access").await;
    let leaf_cp = leaf_control_plane().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let bin = root.bin_dir().to_owned();

    // The leaf: its RBAC, and the agent's mapping of root callers.
    let agent_token = leaf_rbac(leaf_cp, dir).await;
    let ci = format!("system:serviceaccount:{ns}:ci");
    let rules = vec![
        AccessRule {
            users: vec!["carol".into()],
            leaf_groups: vec![EDITORS.into()],
            ..AccessRule::default()
        },
        AccessRule {
            groups: vec![format!("system:serviceaccounts:{ns}")],
            leaf_groups: vec![VIEWERS.into()],
            ..AccessRule::default()
        },
    ];
    let token_file = dir.join("agent-token");
    std::fs::write(&token_file, agent_token).expect("token");
    let leaf_ca = std::fs::read(leaf_ca_path(leaf_cp)).expect("the leaf's CA");
    let upstream = KubeUpstream::new(
        leaf_cp.server_url(),
        certificates_from_pem(&leaf_ca).expect("the leaf's CA"),
        Credential::TokenFile(token_file),
        None,
    )
    .expect("upstream");
    let root_name = tether::protocol::ClusterName::new("root").expect("name");
    let gateway = Arc::new(KubeGateway {
        access: KubeAccess::new(root_name, rules).expect("rules"),
        upstream: Arc::new(upstream),
    });

    // The root: a proxy whose Kubernetes endpoint takes root client certificates and root
    // ServiceAccount tokens, and asks the root's RBAC.
    let access = Arc::new(RbacLeafAccess::new(admin.clone(), &ns));
    let agent_metrics = tether::admin::metrics::AgentMetrics::default();
    let rig = Rig::start(
        &[],
        |_| {},
        |agent| {
            agent.kube = Some(gateway);
            agent.metrics = agent_metrics.clone();
        },
    )
    .await;
    // Streams the agent was asked for, whatever became of them.
    let served = || {
        ["ok", "forbidden", "other"]
            .map(|outcome| {
                let labels = vec![("outcome", outcome.to_owned())];
                agent_metrics.served.get_or_create(&labels).get()
            })
            .iter()
            .sum::<u64>()
    };
    let pki = RootPki::new(dir);
    let (server_crt, server_key) = pki.issue("proxy", true, &[]);
    let ca = dir.join("ca.crt");
    let tls = kube_entry::server_config(&server_crt, &server_key, Some(&ca)).expect("tls");
    let config = KubeEntryConfig {
        bearer: Some(Arc::new(TokenReviews::new(admin.clone())) as Arc<dyn BearerTokens>),
        access: Some(access),
        ..KubeEntryConfig::new(tls)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let server = format!("https://{}", listener.local_addr().expect("addr"));
    tokio::spawn(kube_entry::serve(
        listener,
        config,
        rig.proxy.dialer(),
        std::future::pending::<()>(),
    ));

    // A root ServiceAccount, by a token issued for the audience `tether`.
    let token = root.service_account_token(&ns, "ci", &["tether"]).await;
    let token_path = dir.join("ci-token");
    std::fs::write(&token_path, token).expect("write token");
    let as_ci = write_kubeconfig(
        dir,
        "ci",
        &server,
        &ca,
        &["--token-file", token_path.to_str().expect("utf-8")],
    );

    // Refused at the root until the root's RBAC grants remoteclusters/kube, and no stream
    // reaches the leaf meanwhile.
    let before = served();
    let refused = kubectl(&bin, &as_ci, &["get", "configmaps", "-n", APPS]).await;
    assert_eq!(
        served(),
        before,
        "a refused caller opened a stream to the leaf"
    );
    assert!(!refused.status.success());
    let said = stderr(&refused);
    assert!(
        said.contains(&format!(
            "user \"{ci}\" may not create remoteclusters/kube \"leaf\""
        )),
        "{said}"
    );
    grant(&admin, &ns, "User", &ci, "leaf", "kube").await;
    let listed = listed_once_let_in("the grant to take effect", &bin, &as_ci).await;
    assert!(listed.contains("configmap/seed"), "{listed}");
    assert!(
        served() > before,
        "a permitted caller's requests are streams to the leaf"
    );

    // In the leaf, the ServiceAccount is who the mapping says: a viewer, named by its root.
    let (user, groups) = whoami(&bin, &as_ci, &[]).await;
    assert_eq!(user, format!("tether:root:{ci}"));
    assert!(groups.contains(&VIEWERS.to_owned()), "{groups:?}");
    assert!(
        !groups.iter().any(|g| g.contains("serviceaccounts")),
        "{groups:?}"
    );
    // The leaf's RBAC has the last word: a viewer may not create.
    let forbidden = kubectl(&bin, &as_ci, &["create", "configmap", "nope", "-n", APPS]).await;
    let said = stderr(&forbidden);
    assert!(!forbidden.status.success());
    assert!(
        said.contains("is forbidden") && said.contains(&format!("User \"tether:root:{ci}\"")),
        "the leaf's own 403: {said}"
    );

    // A root user by client certificate: an editor in the leaf.
    let (carol_crt, carol_key) = pki.issue("carol", false, &["ops"]);
    grant(&admin, &ns, "User", "carol", "leaf", "kube").await;
    let as_carol = cert_kubeconfig(dir, "carol", &server, &ca, &carol_crt, &carol_key);
    let (user, groups) = whoami(&bin, &as_carol, &[]).await;
    assert_eq!(user, "tether:root:carol");
    assert!(groups.contains(&EDITORS.to_owned()), "{groups:?}");

    // Smuggling: kubectl's own impersonation flags change nothing...
    let smuggled = whoami(
        &bin,
        &as_carol,
        &["--as", "system:admin", "--as-group", "system:masters"],
    )
    .await;
    assert_eq!(smuggled.0, "tether:root:carol");
    assert!(!smuggled.1.contains(&"system:masters".to_owned()));
    // ...nor raw headers, nor headers named in Connection, nor an Authorization header.
    let raw = smuggle_with_curl(&server, &ca, &carol_crt, &carol_key).await;
    assert_eq!(
        raw["status"]["userInfo"]["username"], "tether:root:carol",
        "{raw}"
    );
    let raw_groups = raw["status"]["userInfo"]["groups"].to_string();
    assert!(!raw_groups.contains("system:masters"), "{raw_groups}");

    // A watch sees what is applied after it starts; apply and delete work.
    let (watch, mut lines) = kubectl_watch(&bin, &as_carol, &[]);
    let first = lines.next_line().await.expect("read").expect("a line");
    assert_eq!(first, "configmap/seed");
    let manifest = dir.join("cm.yaml");
    std::fs::write(
        &manifest,
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: through-root, namespace: {APPS}}}\ndata: {{a: b}}\n"),
    )
    .expect("manifest");
    let applied = kubectl(
        &bin,
        &as_carol,
        &["apply", "-f", manifest.to_str().expect("utf-8")],
    )
    .await;
    assert!(applied.status.success(), "apply: {}", stderr(&applied));
    // (The other tests' ConfigMaps may pass by; this one must come.)
    while lines.next_line().await.expect("read").expect("a line") != "configmap/through-root" {}
    let deleted = kubectl(
        &bin,
        &as_carol,
        &["delete", "configmap", "through-root", "-n", APPS],
    )
    .await;
    assert!(deleted.status.success(), "delete: {}", stderr(&deleted));
    drop(watch);

    // A WebSocket watch, through the root, end to end.
    let event = websocket_watch(&server, &ca, &carol_crt, &carol_key).await;
    assert!(event.contains("\"type\":\"ADDED\""), "{event}");

    // A root user the root permits but the leaf does not map is refused in the leaf.
    let (mallory_crt, mallory_key) = pki.issue("mallory", false, &["system:masters"]);
    grant(&admin, &ns, "User", "mallory", "leaf", "kube").await;
    let as_mallory = cert_kubeconfig(dir, "mallory", &server, &ca, &mallory_crt, &mallory_key);
    let unmapped = kubectl(&bin, &as_mallory, &["get", "configmaps", "-n", APPS]).await;
    assert!(!unmapped.status.success());
    assert!(
        stderr(&unmapped).contains("is not mapped to this cluster"),
        "{}",
        stderr(&unmapped)
    );

    // Every request above left its record on the audit stream.
    let audit = logs.text();
    let records: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("tether::audit") && l.contains("via=\"kube\""))
        .collect();
    let find = |needles: &[&str]| {
        records
            .iter()
            .any(|r| needles.iter().all(|n| r.contains(n)))
    };
    assert!(
        find(&["decision=\"not_permitted\"", "status=403", &ci]),
        "{audit}"
    );
    assert!(
        find(&[
            "who=\"carol\"",
            "verb=\"create\"",
            "resource=\"configmaps\""
        ]) || find(&["who=\"carol\"", "verb=\"patch\""]),
        "apply: {audit}"
    );
    assert!(
        find(&[
            "who=\"carol\"",
            "verb=\"delete\"",
            "name=\"through-root\"",
            "status=200"
        ]),
        "{audit}"
    );
    assert!(
        find(&["who=\"carol\"", "verb=\"watch\"", "namespace=\"apps\""]),
        "{audit}"
    );
    assert!(
        find(&["who=\"mallory\"", "status=403", "leaf=\"leaf\""]),
        "{audit}"
    );
    assert!(!audit.contains("Bearer "), "no token in any record");
    // And the counts, by decision only (a bounded set of labels).
    let counted = |decision: &str| {
        let labels = vec![("decision", decision.to_owned())];
        rig.proxy
            .shared()
            .metrics
            .kube_requests
            .get_or_create(&labels)
            .get()
    };
    assert!(counted("not_permitted") >= 1 && counted("ok") >= 10);

    // A watch whose tunnel dies ends, and not as if the API server had ended it: the chunked
    // response is cut off without its last chunk, so the client sees an error and re-watches.
    let tunnels = rig.proxy.shared().sites.tunnels_of(&support::leaf());
    let cut = async {
        for tunnel in &tunnels {
            tunnel.disconnect("the test cuts the tunnel").await;
        }
    };
    let rest = watch_cut(&server, &ca, &carol_crt, &carol_key, cut).await;
    assert!(
        !rest.ends_with(b"0\r\n\r\n"),
        "a clean end: {}",
        String::from_utf8_lossy(&rest)
    );
}

/// A SelfSubjectReview sent with every header that tries to change who the caller is.
async fn smuggle_with_curl(server: &str, ca: &Path, crt: &Path, key: &Path) -> serde_json::Value {
    let url = format!("{server}/clusters/leaf/apis/authentication.k8s.io/v1/selfsubjectreviews");
    let (ca, crt, key) = (path_str(ca), path_str(crt), path_str(key));
    curl_json(&[
        "--http1.1",
        "-X",
        "POST",
        &url,
        "--cacert",
        ca,
        "--cert",
        crt,
        "--key",
        key,
        "-H",
        "Content-Type: application/json",
        "-H",
        "Impersonate-User: system:admin",
        "-H",
        "Impersonate-Group: system:masters",
        "-H",
        "Impersonate-Extra-scopes: everything",
        "-H",
        "Authorization: Bearer not-a-token",
        "-H",
        "Connection: keep-alive, Impersonate-User, Impersonate-Group, Authorization",
        "-d",
        r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#,
    ])
    .await
}

/// A TLS connection to the endpoint `server` with the client certificate `crt`, and its
/// address.
async fn connect_tls(
    server: &str,
    ca: &Path,
    crt: &Path,
    key: &Path,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    String,
) {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca") {
        roots.add(cert.expect("cert")).expect("add");
    }
    let chain = CertificateDer::pem_file_iter(crt)
        .expect("crt")
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    let addr = server.trim_start_matches("https://").to_owned();
    let tcp = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS");
    (stream, addr)
}

/// Opens an HTTP watch through the root, waits for its first event, then runs `cut`: returns
/// how the response ended (every byte after the first event), or panics if it did not end.
async fn watch_cut<F: std::future::Future<Output = ()>>(
    server: &str,
    ca: &Path,
    crt: &Path,
    key: &Path,
    cut: F,
) -> Vec<u8> {
    let (mut stream, addr) = connect_tls(server, ca, crt, key).await;
    let request = format!(
        "GET /clusters/leaf/api/v1/namespaces/{APPS}/configmaps?watch=true HTTP/1.1\r\n\
         Host: {addr}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\"type\":\"ADDED\"") {
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).await.expect("read the first event");
        assert!(n > 0, "the watch ended before its first event");
        seen.extend_from_slice(&buf[..n]);
    }
    cut.await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch outlived its tunnel");
    rest
}

/// Opens a WebSocket watch of ConfigMaps in `apps` through the root and returns its first
/// event.
async fn websocket_watch(server: &str, ca: &Path, crt: &Path, key: &Path) -> String {
    let (mut stream, addr) = connect_tls(server, ca, crt, key).await;
    let request = format!(
        "GET /clusters/leaf/api/v1/namespaces/{APPS}/configmaps?watch=true HTTP/1.1\r\n\
         Host: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nOrigin: {server}\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    // (The API server's WebSocket library refuses a request without an Origin.)
    // The 101 head, then one frame (the server's frames are not masked).
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("read head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        let mut rest = vec![0u8; 2048];
        let n = stream.read(&mut rest).await.unwrap_or(0);
        panic!("{head}{}", String::from_utf8_lossy(&rest[..n]));
    }
    let mut frame = [0u8; 2];
    stream.read_exact(&mut frame).await.expect("frame head");
    let len = match frame[1] & 0x7f {
        126 => u64::from(stream.read_u16().await.expect("len16")),
        127 => stream.read_u64().await.expect("len64"),
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await.expect("payload");
    String::from_utf8_lossy(&payload).into_owned()
}

/// What the README tells an operator to run, as processes: `tether proxy --kube-listen` with a
/// client CA, `tether agent --kube-access` with its rules, and kubectl with the kubeconfig
/// `tether kubeconfig` writes.
#[tokio::test(flavor = "current_thread")]
async fn proxy_and_agent_processes_serve_kubectl_with_their_kube_flags() {
    let leaf_cp = leaf_control_plane().await;
    let files = support::procs::Files::write(&support::pki(), &["proxy-1"]);
    let dir = files.dir.path();
    let agent_token = leaf_rbac(leaf_cp, dir).await;
    std::fs::write(dir.join("agent-token"), agent_token).expect("token");
    std::fs::write(
        dir.join("access.yaml"),
        format!("- users: [carol]\n  leafGroups: [\"{EDITORS}\"]\n"),
    )
    .expect("rules");
    let pki = RootPki::new(dir);
    let (server_crt, server_key) = pki.issue("proxy", true, &[]);
    let (carol_crt, carol_key) = pki.issue("carol", false, &[]);

    let (listen, admin, kube, tls) = (
        support::procs::free_addr(),
        support::procs::free_addr(),
        support::procs::free_addr(),
        support::procs::free_addr(),
    );
    let mut proxy = support::procs::proxy_command(&files, "proxy-1", listen, admin, &[]);
    proxy
        .arg("--tls-listen")
        .arg(tls.to_string())
        .arg("--tls-cert")
        .arg(&server_crt)
        .arg("--tls-key")
        .arg(&server_key)
        .arg("--kube-listen")
        .arg(kube.to_string())
        .arg("--kube-tls-cert")
        .arg(&server_crt)
        .arg("--kube-tls-key")
        .arg(&server_key)
        .arg("--kube-client-ca")
        .arg(dir.join("ca.crt"));
    let _proxy = support::procs::spawn(proxy);
    let path = |name: &str| dir.join(name).to_str().expect("utf-8").to_owned();
    let _agent = support::procs::spawn_agent(
        &files,
        listen,
        &[
            "--heartbeat-interval".into(),
            "200ms".into(),
            "--kube-access".into(),
            path("access.yaml"),
            "--kube-api-server".into(),
            leaf_cp.server_url().to_owned(),
            "--kube-ca".into(),
            leaf_ca_path(leaf_cp).to_str().expect("utf-8").to_owned(),
            "--kube-token-file".into(),
            path("agent-token"),
        ],
    );
    let server = format!("https://{kube}");
    let as_carol = cert_kubeconfig(
        dir,
        "carol",
        &server,
        &dir.join("ca.crt"),
        &carol_crt,
        &carol_key,
    );
    let bin = leaf_cp.bin_dir().to_owned();
    let listed = listed_once_let_in(
        "kubectl through the proxy and agent processes",
        &bin,
        &as_carol,
    )
    .await;
    assert!(listed.contains("configmap/seed"), "{listed}");
    let (user, groups) = whoami(&bin, &as_carol, &[]).await;
    assert_eq!(user, "tether:root:carol");
    assert!(groups.contains(&EDITORS.to_owned()), "{groups:?}");

    // The same endpoint on the TLS port (#17), carol's client certificate verified there.
    let on_tls_port = cert_kubeconfig(
        dir,
        "carol-tls",
        &format!("https://{tls}"),
        &dir.join("ca.crt"),
        &carol_crt,
        &carol_key,
    );
    let (user, _) = whoami(&bin, &on_tls_port, &[]).await;
    assert_eq!(user, "tether:root:carol", "through the TLS port");

    // A watch held open over a minute, idle, still carries what comes after.
    let selector = ["--field-selector", "metadata.name=after-a-minute"];
    let (_watch, mut lines) = kubectl_watch(&bin, &as_carol, &selector);
    // The subject of the test, not a synchronisation: the watch idles past a minute.
    tokio::time::sleep(std::time::Duration::from_secs(65)).await;
    let created = kubectl(
        &bin,
        &as_carol,
        &["create", "configmap", "after-a-minute", "-n", APPS],
    )
    .await;
    assert!(created.status.success(), "create: {}", stderr(&created));
    let seen = lines.next_line().await.expect("read").expect("a line");
    assert_eq!(seen, "configmap/after-a-minute");
    let deleted = kubectl(
        &bin,
        &as_carol,
        &["delete", "configmap", "after-a-minute", "-n", APPS],
    )
    .await;
    assert!(deleted.status.success(), "delete: {}", stderr(&deleted));
}

/// The endpoint is a public listener: a client that sends one byte and stops is closed at the
/// handshake deadline, one address holds at most its share of connections, and nobody gets a
/// stream to a leaf without authenticating (a 401, and no audit of a leaf reached).
#[tokio::test]
async fn the_endpoint_bounds_strangers_before_they_authenticate() {
    let _serial = SERIAL.lock().await;
    let logs = LogCapture::default();
    let _guard = logs.install();
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = RootPki::new(dir.path());
    let (crt, key) = pki.issue("proxy", true, &[]);
    let rig = Rig::start(&[], |_| {}, |_| {}).await;
    let tokens =
        tether::proxy::client_entry::ClientTokens::parse(&format!("dave:{DAVE}")).expect("tokens");
    let config = KubeEntryConfig {
        tokens: Some(Arc::new(arc_swap::ArcSwap::from_pointee(tokens))),
        max_connections_per_ip: 2,
        handshake_timeout: std::time::Duration::from_millis(300),
        ..KubeEntryConfig::new(kube_entry::server_config(&crt, &key, None).expect("tls"))
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(kube_entry::serve(
        listener,
        config,
        rig.proxy.dialer(),
        std::future::pending::<()>(),
    ));

    // Without credentials: 401, as a Kubernetes Status.
    let ca = dir.path().join("ca.crt");
    let namespaces = format!("https://{addr}/clusters/leaf/api/v1/namespaces");
    let status = curl_json(&["--cacert", path_str(&ca), &namespaces]).await;
    assert_eq!(status["code"], 401, "{status}");
    logs.wait_for("decision=\"unauthenticated\"").await;
    // A line of the token file authenticates (here the leaf's agent serves no Kubernetes API,
    // and says so: the request got past the root).
    let bearer = format!("Authorization: Bearer {DAVE}");
    let status = curl_json(&["--cacert", path_str(&ca), "-H", &bearer, &namespaces]).await;
    assert_eq!(status["code"], 403, "{status}");
    let message = status["message"].as_str().unwrap_or_default();
    assert!(message.contains("serves no Kubernetes API"), "{status}");
    logs.wait_for("who=\"dave\"").await;

    // One byte, then silence: closed once the handshake deadline passes.
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(&[0x16]).await.expect("one byte");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), slow.read(&mut buf))
        .await
        .expect("closed within the deadline, not held");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    // Two connections held from one address: a third is closed at once.
    let _a = tokio::net::TcpStream::connect(addr).await.expect("a");
    let _b = tokio::net::TcpStream::connect(addr).await.expect("b");
    let mut third = tokio::net::TcpStream::connect(addr).await.expect("c");
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("the third is closed, not served");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
