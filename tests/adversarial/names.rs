//! Names are identities (issue #11, items 3, 4 and part of 6): a join never takes a name some
//! source already trusts, a change of trust ends the tunnels it no longer accepts, the key-less
//! join user (and an agent) cannot make the proxy hold channels, and an agent's `held` list is
//! checked before `/status` shows it. Everything runs in process; `tests/operator_revoke.rs`
//! does revocation through a real API server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tether::admin::Component;
use tether::agent::join::{JoinError, JoinRequest, join};
use tether::agent::{Agent, AgentConfig};
use tether::demo::Pki;
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, Identity, PublicKey, TrustSource, TrustStore};
use tether::protocol::control::{self, AgentMessage, CONTROL_SUBSYSTEM, FrameReader, ProxyMessage};
use tether::protocol::join::{JOIN_USER, JoinRefusal, JoinToken};
use tether::proxy::{Admission, JoinAuthority, ProxyServer, Refused};
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// An authority that knows its tokens and admits whatever proves one, checking no names: what
/// the proxy refuses here, it refused on its own.
#[derive(Default)]
struct AdmitAll {
    /// Issued tokens by ID.
    tokens: Mutex<HashMap<String, JoinToken>>,
    /// Every leaf admitted, so a test can tell the authority was never asked.
    admitted: Mutex<Vec<String>>,
}

impl AdmitAll {
    fn issue(&self) -> JoinToken {
        let token = JoinToken::generate();
        let mut tokens = self.tokens.lock().expect("lock");
        tokens.insert(token.id().to_owned(), token.clone());
        token
    }
}

impl JoinAuthority for AdmitAll {
    fn token<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<JoinToken, Refused>> {
        let found = self.tokens.lock().expect("lock").get(id).cloned();
        Box::pin(async move {
            found.ok_or_else(|| Refused::new(JoinRefusal::TokenUnknown, format!("no token {id}")))
        })
    }

    fn admit<'a>(&'a self, admission: &'a Admission) -> BoxFuture<'a, Result<(), Refused>> {
        let leaf = admission.leaf.to_string();
        self.admitted.lock().expect("lock").push(leaf);
        Box::pin(async { Ok(()) })
    }
}

fn join_request(proxy: &ProxyServer, token: &JoinToken, ca: &PublicKey) -> JoinRequest {
    JoinRequest {
        root_address: proxy.local_addr().to_string(),
        route: tether::transport::Route::direct(),
        token: token.clone(),
        leaf_cluster: leaf(),
        leaf_cas: vec![ca.clone()],
        root_ca_pin: None,
        timeout: Duration::from_secs(10),
    }
}

fn name_taken(result: Result<impl std::fmt::Debug, JoinError>) -> String {
    match result {
        Err(JoinError::Refused {
            reason: JoinRefusal::NameTaken,
            message,
        }) => message,
        other => panic!("expected NameTaken, got {other:?}"),
    }
}

/// Starts an agent of `leaf` whose certificate `ca` signed, dialling `proxy`, until `stop`.
fn start_agent(
    pki: &Pki,
    proxy: &ProxyServer,
    ca: &CertificateAuthority,
    stop: &CancellationToken,
) {
    let mut config: AgentConfig = pki
        .agent_config(&proxy.local_addr().to_string(), AllowList::default())
        .expect("agent config");
    config.identity = Arc::new(Identity::generate_agent(ca, Duration::from_secs(600)).expect("id"));
    let agent = Arc::new(Agent::new(config));
    let stop = stop.clone();
    tokio::spawn(async move { agent.run(stop).await });
}

/// A rig whose proxy also takes joins, admitted by the returned authority; the rig's leaf is
/// trusted statically (as through `--trust-dir`), a name no join may take.
async fn rig_taking_joins() -> (Rig, Arc<AdmitAll>) {
    let authority = Arc::new(AdmitAll::default());
    let joins = authority.clone();
    let rig = Rig::start(
        &[],
        move |c| c.join = Some(joins as Arc<dyn JoinAuthority>),
        |_| {},
    )
    .await;
    (rig, authority)
}

fn tunnel_ids(proxy: &ProxyServer) -> Vec<u64> {
    proxy
        .site(&leaf())
        .map(|s| s.tunnels.iter().map(|t| t.id).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_join_cannot_take_a_statically_trusted_name() {
    let (rig, authority) = rig_taking_joins().await;
    let impostor = CertificateAuthority::generate(leaf()).expect("ca");
    let token = authority.issue();
    let message = name_taken(join(&join_request(&rig.proxy, &token, impostor.public_key())).await);
    assert!(message.contains("the name leaf is taken"), "{message}");
    assert!(message.contains("static trust"), "{message}");
    assert!(message.contains("--trust-dir"), "{message}");
    assert!(authority.admitted.lock().expect("lock").is_empty());
    let trust = rig.proxy.shared().config.trust.load();
    assert_eq!(
        trust.cas(&leaf()).len(),
        1,
        "the impostor's CA is not trusted"
    );
    rig.wait_online().await;
}

#[tokio::test]
async fn a_join_cannot_take_the_name_of_a_joined_leaf_that_is_online() {
    let pki = pki();
    let authority = Arc::new(AdmitAll::default());
    let mut config = pki.proxy_config("proxy-1").expect("config");
    let mut trust = TrustStore::new();
    trust.insert(pki.root.cluster().clone(), pki.root.public_key().clone());
    config.trust.store(Arc::new(trust));
    config.join = Some(authority.clone() as Arc<dyn JoinAuthority>);
    let proxy = ProxyServer::start(config).await.expect("proxy");

    // The real leaf joins and its agent comes online.
    let first = authority.issue();
    join(&join_request(&proxy, &first, pki.leaf.public_key()))
        .await
        .expect("the real leaf joins");
    let stop = CancellationToken::new();
    start_agent(&pki, &proxy, &pki.leaf, &stop);
    wait_for("the real leaf online", Duration::from_secs(20), || {
        !tunnel_ids(&proxy).is_empty()
    })
    .await;
    let online = tunnel_ids(&proxy);

    // Another token, the same name, an unrelated CA: refused, and the real tunnel untouched.
    let impostor = CertificateAuthority::generate(leaf()).expect("ca");
    let second = authority.issue();
    let message = name_taken(join(&join_request(&proxy, &second, impostor.public_key())).await);
    assert!(
        message.contains("a leaf named leaf already joined with another CA"),
        "{message}"
    );
    assert_eq!(authority.admitted.lock().expect("lock").len(), 1);
    let trust = proxy.shared().config.trust.load();
    assert_eq!(trust.cas(&leaf()), [pki.leaf.public_key().clone()]);
    assert_eq!(tunnel_ids(&proxy), online);

    // The same leaf with the same CA may join again (a lost answer is retried).
    let third = authority.issue();
    join(&join_request(&proxy, &third, pki.leaf.public_key()))
        .await
        .expect("the real leaf again");
    stop.cancel();
}

#[tokio::test(flavor = "current_thread")]
async fn a_trust_dir_change_ends_the_tunnels_it_no_longer_trusts() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_owned();
    // The rig's PKI, trusted through a directory as an operator would.
    let rig = Rig::start(
        &[],
        |c| {
            let start = c.trust.load_full();
            for cluster in start.clusters() {
                let keys: Vec<String> = start
                    .cas(cluster)
                    .iter()
                    .map(|k| k.to_openssh().expect("encode"))
                    .collect();
                std::fs::write(path.join(format!("{cluster}.pub")), keys.join("\n"))
                    .expect("write");
            }
            let store = TrustStore::load_dir(&path).expect("trust dir");
            c.trust.store(Arc::new(store));
        },
        |_| {},
    )
    .await;
    let stop = CancellationToken::new();
    tokio::spawn(tether::proxy::trust::follow_dir(
        rig.proxy.shared().clone(),
        dir.path().to_owned(),
        TrustStore::new(),
        Arc::new(tokio::sync::Notify::new()),
        stop.clone(),
    ));
    rig.wait_online().await;

    // A bad file: the previous trust stays, and the log names the file and the cause.
    std::fs::write(dir.path().join("other.pub"), "ssh-ed25519 garbage\n").expect("write");
    logs.wait_for("other.pub line 1").await;
    assert!(logs.text().contains("the previous trust stays"));
    assert!(
        !tunnel_ids(&rig.proxy).is_empty(),
        "a bad file dropped trust"
    );
    std::fs::remove_file(dir.path().join("other.pub")).expect("remove");
    logs.wait_for("the trust directory is readable again").await;

    // The leaf's key is replaced: its tunnel ends within 5 s, and the agent cannot return.
    let rotated = CertificateAuthority::generate(leaf()).expect("ca");
    let text = rotated.public_key().to_openssh().expect("encode");
    std::fs::write(dir.path().join("leaf.pub"), text).expect("write");
    wait_for("the tunnel closed", Duration::from_secs(5), || {
        tunnel_ids(&rig.proxy).is_empty()
    })
    .await;
    rig.stop.cancel();
    stop.cancel();
}

#[tokio::test]
async fn removing_a_ca_ends_only_the_tunnels_it_signed() {
    let second_ca = Arc::new(CertificateAuthority::generate(leaf()).expect("ca"));
    let trusted = second_ca.public_key().clone();
    let rig = Rig::start(
        &[],
        move |c| {
            let mut store = (**c.trust.load()).clone();
            store.insert(leaf(), trusted);
            c.trust.store(Arc::new(store));
        },
        |_| {},
    )
    .await;
    let first = tunnel_ids(&rig.proxy);
    assert_eq!(first.len(), 1);
    let stop = CancellationToken::new();
    start_agent(&rig.pki, &rig.proxy, &second_ca, &stop);
    wait_for("both agents online", Duration::from_secs(20), || {
        tunnel_ids(&rig.proxy).len() == 2
    })
    .await;
    let second: Vec<u64> = tunnel_ids(&rig.proxy)
        .into_iter()
        .filter(|id| !first.contains(id))
        .collect();

    // The rig's own CA is removed; the second one stays.
    let kept = second_ca.public_key().clone();
    let change = rig
        .proxy
        .update_trust(|t| {
            t.remove_from(TrustSource::Static, &leaf());
            t.insert(leaf(), kept.clone());
        })
        .await;
    assert_eq!(change.evicted, 1, "{change:?}");
    wait_for(
        "the first CA's tunnel closed",
        Duration::from_secs(5),
        || tunnel_ids(&rig.proxy) == second,
    )
    .await;
    // The agents allow nothing: a refusal from the remaining agent shows its tunnel works.
    let echo = echo_server().await.expect("echo");
    assert!(matches!(
        rig.dial(echo).await,
        Err(e) if e.kind == tether::protocol::DialErrorKind::Forbidden
    ));
    assert_eq!(
        tunnel_ids(&rig.proxy),
        second,
        "the second CA's tunnel stays"
    );
    stop.cancel();
    rig.stop.cancel();
}

async fn raw_client(proxy: &ProxyServer) -> russh::client::Handle<AnyHost> {
    let config = Arc::new(tether::protocol::ssh::client_config());
    russh::client::connect(config, proxy.local_addr(), AnyHost)
        .await
        .expect("connects")
}

/// Opens session channels until `attempts` or the connection ends; returns how many the proxy
/// accepted and whether it hung up.
async fn open_sessions(
    handle: &russh::client::Handle<AnyHost>,
    attempts: usize,
) -> (usize, bool, Vec<russh::Channel<russh::client::Msg>>) {
    let mut accepted = Vec::new();
    for _ in 0..attempts {
        match handle.channel_open_session().await {
            Ok(channel) => accepted.push(channel),
            Err(russh::Error::ChannelOpenFailure(_)) => {}
            Err(_) => return (accepted.len(), true, accepted),
        }
    }
    (accepted.len(), handle.is_closed(), accepted)
}

#[tokio::test]
async fn the_join_user_and_agents_cannot_make_the_proxy_hold_channels() {
    let (rig, _) = rig_taking_joins().await;

    // The join user: one session channel, then refusals, then the proxy hangs up.
    let mut joiner = raw_client(&rig.proxy).await;
    assert!(
        joiner
            .authenticate_none(JOIN_USER)
            .await
            .expect("auth")
            .success()
    );
    let opened = open_sessions(&joiner, 20_000);
    let (accepted, hung_up, _held) = within("20,000 opens", Duration::from_secs(120), opened).await;
    assert_eq!(accepted, 1, "the join user got {accepted} session channels");
    assert!(
        hung_up,
        "the proxy kept talking to a joiner opening 20,000 channels"
    );

    // An agent before its control channel: a couple, then the same.
    let mut agent = raw_client(&rig.proxy).await;
    let identity = Identity::generate_agent(&rig.pki.leaf, Duration::from_secs(60)).expect("id");
    assert!(
        agent
            .authenticate_openssh_cert("leaf", Arc::new(identity.key), identity.certificate)
            .await
            .expect("auth")
            .success()
    );
    let opened = open_sessions(&agent, 20_000);
    let (accepted, hung_up, _held) = within("20,000 opens", Duration::from_secs(120), opened).await;
    assert!(
        accepted <= 2,
        "an agent got {accepted} pending session channels"
    );
    assert!(
        hung_up,
        "the proxy kept talking to an agent opening 20,000 channels"
    );

    // The real leaf never noticed.
    rig.wait_online().await;
    rig.stop.cancel();
}

/// A hand-made agent's control channel: authenticated, hello sent, welcome and discovery read.
struct RawControl {
    /// Keeps the connection open.
    _handle: russh::client::Handle<AnyHost>,
    /// The control channel's incoming side.
    read: russh::ChannelReadHalf,
    /// The control channel's outgoing side.
    write: russh::ChannelWriteHalf<russh::client::Msg>,
    /// Reassembles the proxy's length-prefixed messages.
    frames: FrameReader,
}

impl RawControl {
    async fn open(proxy: &ProxyServer, ca: &CertificateAuthority) -> Self {
        let mut handle = raw_client(proxy).await;
        let identity = Identity::generate_agent(ca, Duration::from_secs(60)).expect("id");
        let auth = handle
            .authenticate_openssh_cert("leaf", Arc::new(identity.key), identity.certificate)
            .await
            .expect("auth");
        assert!(auth.success());
        let channel = handle.channel_open_session().await.expect("session");
        channel
            .request_subsystem(true, CONTROL_SUBSYSTEM)
            .await
            .expect("subsystem");
        let (read, write) = channel.split();
        let mut me = Self {
            _handle: handle,
            read,
            write,
            frames: FrameReader::default(),
        };
        me.send(&AgentMessage::Hello {
            version: "raw".into(),
            heartbeat_interval_ms: 60_000,
            protocol: None,
        })
        .await;
        assert!(matches!(me.next().await, ProxyMessage::Welcome { .. }));
        assert!(matches!(me.next().await, ProxyMessage::Discovery { .. }));
        me
    }

    async fn send(&mut self, message: &AgentMessage) {
        let bytes = control::encode(message).expect("encode");
        self.write.data(&bytes[..]).await.expect("send");
    }

    async fn next(&mut self) -> ProxyMessage {
        within(
            "a control message",
            Duration::from_secs(10),
            tether::stream::frames::next_channel_message(&mut self.read, &mut self.frames),
        )
        .await
        .expect("a control message")
    }

    /// Sends a heartbeat carrying `held` and waits for its pong, so the proxy has handled it.
    async fn ping(&mut self, seq: u64, held: Vec<String>) {
        self.send(&AgentMessage::Ping { seq, held }).await;
        loop {
            if let ProxyMessage::Pong { seq: answered } = self.next().await
                && answered == seq
            {
                return;
            }
        }
    }
}

#[tokio::test]
async fn an_agents_held_list_is_checked_before_status_shows_it() {
    let rig = Rig::start(&[], |_| {}, |_| {}).await;
    // The rig's agent reports proxy-1; stop it so only the hand-made agent speaks.
    rig.stop.cancel();
    wait_for("the rig's agent gone", Duration::from_secs(10), || {
        tunnel_ids(&rig.proxy).is_empty()
    })
    .await;
    let mut agent = RawControl::open(&rig.proxy, &rig.pki.leaf).await;
    let held_by = || rig.proxy.site(&leaf()).expect("site").held_by;

    agent
        .ping(1, vec!["proxy-1".into(), "proxy-2".into()])
        .await;
    assert_eq!(held_by(), ["proxy-1", "proxy-2"]);

    // 5,000 made-up proxies (94 KB): dropped, the last believable list stays.
    let fake: Vec<String> = (0..5_000).map(|i| format!("fake-proxy-{i:05}")).collect();
    agent.ping(2, fake).await;
    assert_eq!(held_by(), ["proxy-1", "proxy-2"]);
    // Not proxy IDs at all.
    agent
        .ping(3, vec!["<script>alert(1)</script>".into()])
        .await;
    assert_eq!(held_by(), ["proxy-1", "proxy-2"]);
    let status = rig.proxy.shared().status().to_string();
    assert!(!status.contains("fake-proxy"), "{status}");
    assert!(!status.contains("script"), "{status}");
}

/// Rotating a client CA out ends the sessions it signed, streams and all, not only their next
/// dial; a client of the CA that stays keeps its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_client_ca_ends_the_streams_of_its_clients() {
    use tether::client::DialClient;
    use tokio::io::AsyncReadExt;

    let echo = echo_server().await.expect("echo");
    let second =
        CertificateAuthority::generate(pki().root.cluster().clone()).expect("a second root CA");
    let second_key = second.public_key().clone();
    let rig = Rig::start(
        &[format!("127.0.0.1/32:{}", echo.port())],
        |c| {
            let mut store = (**c.trust.load()).clone();
            store.insert(c.cluster.clone(), second_key);
            c.trust.store(Arc::new(store));
        },
        |_| {},
    )
    .await;
    let target = tether::protocol::Target::parse(&format!("127.0.0.1.leaf.tether:{}", echo.port()))
        .expect("target");
    let mut streams = Vec::new();
    for ca in [&second, &rig.pki.root] {
        let client = DialClient::connect(&client_config(&rig, ca, "alice"))
            .await
            .expect("connects");
        let mut stream = client.open(&target, "127.0.0.1").await.expect("stream");
        echo_once(&mut stream, b"ping").await;
        streams.push((client, stream));
    }
    let root = rig.pki.root.cluster().clone();
    let kept = rig.pki.root.public_key().clone();
    let change = rig
        .proxy
        .update_trust(|t| {
            t.remove_from(TrustSource::Static, &root);
            t.insert(root.clone(), kept.clone());
        })
        .await;
    assert!(change.changed);
    let (_revoked_client, mut revoked) = streams.remove(0);
    // Reading to the end returns (EOF, or an error for a reset) only once the stream has
    // ended; `within` fails the test if it has not within 5 s.
    let mut rest = Vec::new();
    let _ = within(
        "the revoked client's stream to end",
        Duration::from_secs(5),
        revoked.read_to_end(&mut rest),
    )
    .await;
    let (_client, mut kept_stream) = streams.remove(0);
    // The other CA's client keeps its stream.
    echo_once(&mut kept_stream, b"pong").await;
}
