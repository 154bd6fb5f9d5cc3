//! Who may dial which leaf, by the root's RBAC (issue #16): a proxy with
//! `--dial-authorization rbac` asks the real API server, by SubjectAccessReview, whether a
//! client may `create` `remoteclusters/dial` on the leaf. Refused at the root with the missing
//! permission named, through both entries (`tether dial` over SSH and HTTP CONNECT); a
//! RoleBinding lets the same client in within the decision's lifetime; a grant for another
//! leaf does not.

mod support;

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::tunnel_e2e::{crds_and_namespace, eventually, grant_dial, grant_dial_to_group};
use support::{
    LogCapture, Rig, client_config, client_config_in, echo_server, leaf, start_client_entry,
};
use tether::client::{ClientError, DialClient};
use tether::operator::root::{RbacLeafAccess, TokenReviews};
use tether::protocol::{ClusterName, Target};
use tether::proxy::{LeafAccess, Reach, Who};

/// One test at a time: the first reads its audit records from a log capture scoped to its
/// thread, and with the other test running beside it the capture missed them (tracing caches
/// a callsite's interest across threads); alone or in turn both pass.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A root whose proxy asks the root's RBAC (in a fresh namespace of the real API server), its
/// leaf online with an echo server allowed, and that server as a target.
struct Root {
    cp: &'static support::kube::ControlPlane,
    admin: kube::Client,
    ns: String,
    rig: Rig,
    echo: std::net::SocketAddr,
    target: Target,
}

impl Root {
    async fn start(prefix: &str) -> Root {
        let (cp, admin, ns) = crds_and_namespace(prefix).await;
        let echo = echo_server().await.expect("echo");
        let rig = Rig::start(
            &[format!("{}/32:{}", echo.ip(), echo.port())],
            |proxy| proxy.access = Some(Arc::new(RbacLeafAccess::new(admin.clone(), &ns))),
            |_| {},
        )
        .await;
        let target =
            Target::parse(&format!("{}.leaf.tether:{}", echo.ip(), echo.port())).expect("target");
        Root {
            cp,
            admin,
            ns,
            rig,
            echo,
            target,
        }
    }
}

/// The words a refused client reads: who, what, which leaf, where.
const MISSING: &str = "user \"alice\" may not create remoteclusters/dial \"leaf\"";

#[tokio::test(flavor = "current_thread")]
async fn a_dial_needs_the_roots_rbac_and_a_role_binding_grants_it() {
    let _serial = SERIAL.lock().await;
    let logs = LogCapture::default();
    let _guard = logs.install();
    let Root {
        admin,
        ns,
        rig,
        echo,
        target,
        ..
    } = Root::start("access").await;
    let entry = start_client_entry(&rig.proxy, "alice:alice-token-0123456789abcdef", |_| {}).await;

    // Nobody granted alice anything: both entries refuse, naming the permission.
    let said = match ssh_dial(&rig, &target).await {
        Err(ClientError::NotPermitted { said, .. }) => said,
        other => panic!("expected NotPermitted, got {other:?}"),
    };
    assert!(said.contains(MISSING), "{said}");
    assert!(said.contains(&format!("in namespace {ns:?}")), "{said}");
    let (status, body) = http_connect(entry, &target).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains(MISSING), "{body}");
    // Each refusal leaves its audit record.
    let refusals: Vec<String> = logs
        .text()
        .lines()
        .filter(|l| l.contains("tether::audit") && l.contains("not_permitted"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        refusals.len(),
        2,
        "one record per refused dial: {refusals:#?}"
    );
    assert!(
        refusals
            .iter()
            .all(|r| r.contains("who=alice") && r.contains("leaf=leaf")),
        "{refusals:#?}"
    );

    // A grant for another leaf covers that leaf only (asked afresh, past any kept decision).
    grant_dial(&admin, &ns, "alice", "other-leaf").await;
    let fresh = RbacLeafAccess::new(admin.clone(), &ns);
    let other = ClusterName::new("other-leaf").expect("name");
    fresh
        .check(&Who::named("alice"), &other, Reach::Dial)
        .await
        .expect("alice may dial other-leaf");
    let refused = fresh
        .check(&Who::named("alice"), &leaf(), Reach::Dial)
        .await
        .expect_err("but not leaf");
    assert!(refused.0.contains(MISSING), "{refused}");

    // The leaf's own grant lets alice in, through both entries, within the decision's lifetime.
    grant_dial(&admin, &ns, "alice", "leaf").await;
    eventually("alice's dial through tether dial", || async {
        ssh_dial(&rig, &target).await.ok()
    })
    .await;
    let (status, body) = http_connect(entry, &target).await;
    assert_eq!(status, 200, "{body}");

    // The leaf keeps the last word: its allow-list still refuses what it does not list.
    let elsewhere =
        Target::parse(&format!("127.0.0.2.leaf.tether:{}", echo.port())).expect("target");
    match ssh_dial(&rig, &elsewhere).await {
        Err(ClientError::Dial { kind, .. }) => {
            assert_eq!(kind, tether::protocol::DialErrorKind::Forbidden)
        }
        other => panic!("expected the agent's refusal, got {other:?}"),
    }
}

/// A root workload reaches a leaf with its ServiceAccount token: the root's TokenReview says
/// who it is (user and groups), and the root's RBAC, on those groups too, whether it may dial.
/// Only tokens issued for the audience `tether` are accepted.
#[tokio::test(flavor = "current_thread")]
async fn a_workload_dials_with_its_service_account_token_and_its_groups_rbac() {
    let _serial = SERIAL.lock().await;
    let Root {
        cp,
        admin,
        ns,
        rig,
        target,
        ..
    } = Root::start("bearer").await;
    let entry = start_client_entry(&rig.proxy, "", |entry| {
        entry.bearer = Some(Arc::new(TokenReviews::new(admin.clone())));
    })
    .await;
    let robot = cp.service_account_token(&ns, "robot", &["tether"]).await;
    let for_the_api_server = cp.service_account_token(&ns, "robot", &[]).await;

    // Not for this audience, or no token at all: not authenticated.
    let (status, _) =
        http_connect_with(entry, &target, &format!("Bearer {for_the_api_server}")).await;
    assert_eq!(status, 407, "a token for the API server itself is refused");
    let (status, _) = http_connect_with(entry, &target, "Bearer not-a-token").await;
    assert_eq!(status, 407);

    // Authenticated as the ServiceAccount, refused by RBAC, named as such.
    let (status, body) = http_connect_with(entry, &target, &format!("Bearer {robot}")).await;
    assert_eq!(status, 403, "{body}");
    let user = format!("system:serviceaccount:{ns}:robot");
    assert!(
        body.contains(&format!("user {user:?} may not create remoteclusters/dial")),
        "{body}"
    );

    // A grant to a group the TokenReview puts it in lets it in: groups reach the review.
    grant_dial_to_group(&admin, &ns, &format!("system:serviceaccounts:{ns}"), "leaf").await;
    let (status, body) = eventually("the group's grant", || async {
        let answer = http_connect_with(entry, &target, &format!("Bearer {robot}")).await;
        (answer.0 == 200).then_some(answer)
    })
    .await;
    assert_eq!(status, 200, "{body}");
}

/// A client certificate's groups (`tether cert client --group`) reach the root's RBAC: a
/// RoleBinding to a group lets its members dial.
#[tokio::test(flavor = "current_thread")]
async fn a_client_certificates_groups_reach_the_roots_rbac() {
    let _serial = SERIAL.lock().await;
    let Root {
        admin,
        ns,
        rig,
        target,
        ..
    } = Root::start("groups").await;
    let dave = client_config_in(&rig, &rig.pki.root, "dave", &["payments".to_owned()]);
    match echo_as(&dave, &target).await {
        Err(ClientError::NotPermitted { said, .. }) => {
            assert!(said.contains("user \"dave\" may not"), "{said}")
        }
        other => panic!("expected NotPermitted, got {other:?}"),
    }
    grant_dial_to_group(&admin, &ns, "payments", "leaf").await;
    eventually("dave's dial as a member of payments", || async {
        echo_as(&dave, &target).await.ok()
    })
    .await;
}

/// `tether dial`'s way in, as client `alice` of the root CA: an echo through `target`.
async fn ssh_dial(rig: &Rig, target: &Target) -> Result<(), ClientError> {
    echo_as(&client_config(rig, &rig.pki.root, "alice"), target).await
}

/// An echo through `target` by `tether dial`'s way in, as the client `config` names.
async fn echo_as(
    config: &tether::client::DialClientConfig,
    target: &Target,
) -> Result<(), ClientError> {
    let client = DialClient::connect(config).await?;
    let mut stream = client.open(target, "127.0.0.1").await?;
    stream.write_all(b"ping").await?;
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await?;
    assert_eq!(&echoed, b"ping");
    Ok(())
}

/// An HTTP CONNECT to `target` as alice; the status and, for a refusal, the body.
async fn http_connect(entry: std::net::SocketAddr, target: &Target) -> (u16, String) {
    use base64::Engine as _;
    let credentials =
        base64::engine::general_purpose::STANDARD.encode("alice:alice-token-0123456789abcdef");
    http_connect_with(entry, target, &format!("Basic {credentials}")).await
}

/// An HTTP CONNECT to `target` with `Proxy-Authorization: AUTHORIZATION`; the status and, for
/// a refusal, the body.
async fn http_connect_with(
    entry: std::net::SocketAddr,
    target: &Target,
    authorization: &str,
) -> (u16, String) {
    let mut conn = tokio::net::TcpStream::connect(entry)
        .await
        .expect("connect");
    let (host, port) = target.to_name();
    let request = format!(
        "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {authorization}\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.expect("request");
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await.expect("read");
        assert!(n > 0, "the entry closed before its answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let status: u16 = String::from_utf8_lossy(&answer)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    if status != 200 {
        let _ = conn.read_to_end(&mut answer).await;
    }
    (status, String::from_utf8_lossy(&answer).into_owned())
}
