//! The join exchange against a real proxy: token proofs both ways, the root's certificate
//! checked against the CA it sent, refusals that say why, and a joined leaf's agent admitted.
//! The root's records here live in memory; `tests/operator_join.rs` runs the same exchange
//! with tokens and leaves in a real API server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tether::agent::Agent;
use tether::agent::join::{JoinError, JoinRequest, join};
use tether::demo::Pki;
use tether::egress::allow_list::AllowList;
use tether::identity::{CertificateAuthority, TrustStore, fingerprint};
use tether::protocol::ClusterName;
use tether::protocol::join::{JoinRefusal, JoinToken};
use tether::proxy::{Admission, JoinAuthority, ProxyServer, Refused};
use tokio_util::sync::CancellationToken;

use crate::support::{AnyHost, leaf, pki, wait_for, within};

/// Tokens by ID, with whether each is spent; admitted leaves by name.
#[derive(Default)]
pub(crate) struct MemoryAuthority {
    tokens: Mutex<HashMap<String, (JoinToken, bool)>>,
    pub(crate) leaves: Mutex<HashMap<String, Vec<String>>>,
}

impl JoinAuthority for MemoryAuthority {
    fn token<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<JoinToken, Refused>> {
        let found = self.tokens.lock().expect("lock").get(id).cloned();
        Box::pin(async move {
            found
                .map(|(token, _)| token)
                .ok_or_else(|| Refused::new(JoinRefusal::TokenUnknown, format!("no token {id}")))
        })
    }

    fn admit<'a>(&'a self, admission: &'a Admission) -> BoxFuture<'a, Result<(), Refused>> {
        let keys: Vec<String> = admission
            .ca_keys
            .iter()
            .map(|k| k.to_openssh().expect("encodes"))
            .collect();
        let result = (|| {
            let mut leaves = self.leaves.lock().expect("lock");
            let name = admission.leaf.to_string();
            if leaves.get(&name).is_some_and(|known| *known != keys) {
                return Err(Refused::new(
                    JoinRefusal::NameTaken,
                    format!("{name} is taken"),
                ));
            }
            let mut tokens = self.tokens.lock().expect("lock");
            let entry = tokens.get_mut(&admission.token_id).expect("token exists");
            if entry.1 {
                return Err(Refused::new(JoinRefusal::TokenAlreadyUsed, "used"));
            }
            entry.1 = true;
            leaves.insert(name, keys);
            Ok(())
        })();
        Box::pin(async move { result })
    }
}

pub(crate) async fn root_proxy(pki: &Pki, authority: Option<Arc<MemoryAuthority>>) -> ProxyServer {
    let mut config = pki.proxy_config("proxy-1").expect("config");
    // The root trusts only itself until a leaf joins.
    let mut trust = TrustStore::new();
    trust.insert(pki.root.cluster().clone(), pki.root.public_key().clone());
    config.trust.store(Arc::new(trust));
    config.join = authority.map(|a| a as Arc<dyn JoinAuthority>);
    ProxyServer::start(config).await.expect("proxy starts")
}

pub(crate) fn request(proxy: &ProxyServer, pki: &Pki, token: &JoinToken) -> JoinRequest {
    JoinRequest {
        root_address: proxy.local_addr().to_string(),
        route: tether::transport::Route::direct(),
        token: token.clone(),
        leaf_cluster: leaf(),
        leaf_cas: vec![pki.leaf.public_key().clone()],
        root_ca_pin: None,
        timeout: Duration::from_secs(10),
    }
}

pub(crate) fn authority_with(token: &JoinToken) -> Arc<MemoryAuthority> {
    let authority = MemoryAuthority::default();
    authority
        .tokens
        .lock()
        .expect("lock")
        .insert(token.id().to_owned(), (token.clone(), false));
    Arc::new(authority)
}

/// Asserts `err` is the root refusing for `reason`, the code that becomes the leaf's condition.
fn assert_refused(err: &JoinError, reason: JoinRefusal) {
    assert!(
        matches!(err, JoinError::Refused { reason: r, .. } if *r == reason),
        "expected {reason:?}: {err}"
    );
}

#[tokio::test]
async fn a_leaf_joins_with_a_token_and_its_agent_is_admitted() {
    let pki = pki();
    let token = JoinToken::generate();
    let authority = authority_with(&token);
    let proxy = root_proxy(&pki, Some(authority.clone())).await;
    let mut req = request(&proxy, &pki, &token);
    req.root_ca_pin = Some(fingerprint(pki.root.public_key()));

    let joined = join(&req).await.expect("join succeeds");
    assert_eq!(joined.root_cluster.as_str(), "root");
    assert_eq!(joined.root_cas, vec![pki.root.public_key().clone()]);
    assert_eq!(joined.fingerprint(), fingerprint(pki.root.public_key()));
    assert!(authority.leaves.lock().expect("lock").contains_key("leaf"));

    // The agent, trusting only what the join returned, reaches the proxy and is admitted.
    let mut agent_config = pki
        .agent_config(&proxy.local_addr().to_string(), AllowList::default())
        .expect("agent config");
    agent_config.root_cas = joined.root_cas.clone();
    let agent = Arc::new(Agent::new(agent_config));
    let stop = CancellationToken::new();
    tokio::spawn({
        let (agent, stop) = (agent.clone(), stop.clone());
        async move { agent.run(stop).await }
    });
    wait_for("the joined leaf online", Duration::from_secs(20), || {
        proxy.site(&leaf()).is_some()
    })
    .await;
    stop.cancel();

    // A single-use token cannot be used twice.
    match join(&req).await {
        Err(JoinError::Refused {
            reason: JoinRefusal::TokenAlreadyUsed,
            ..
        }) => {}
        other => panic!("second use: {other:?}"),
    }
}

#[tokio::test]
async fn refusals_name_what_was_wrong() {
    let pki = pki();
    let token = JoinToken::generate();
    let proxy = root_proxy(&pki, Some(authority_with(&token))).await;

    // Unknown ID.
    let unknown = JoinToken::generate();
    let err = join(&request(&proxy, &pki, &unknown)).await.unwrap_err();
    assert_refused(&err, JoinRefusal::TokenUnknown);
    assert_eq!(err.reason(), "TokenUnknown");

    // Right ID, wrong secret: the root's proof fails first, so the leaf sends nothing of its own.
    let forged = JoinToken::from_parts(token.id(), "0000000000000000").expect("token");
    let err = join(&request(&proxy, &pki, &forged)).await.unwrap_err();
    assert!(matches!(err, JoinError::Impostor(_)), "{err}");
    assert!(err.to_string().contains("could not prove"), "{err}");

    // A pinned fingerprint that is not the root's.
    let other_ca =
        CertificateAuthority::generate(ClusterName::new("root").expect("name")).expect("ca");
    let mut pinned = request(&proxy, &pki, &token);
    pinned.root_ca_pin = Some(fingerprint(other_ca.public_key()));
    let err = join(&pinned).await.unwrap_err();
    assert!(matches!(err, JoinError::PinMismatch { .. }), "{err}");

    // A leaf calling itself the root.
    let mut as_root = request(&proxy, &pki, &token);
    as_root.leaf_cluster = ClusterName::new("root").expect("name");
    let err = join(&as_root).await.unwrap_err();
    assert_refused(&err, JoinRefusal::NameTaken);

    // The name of a leaf already joined with another CA.
    join(&request(&proxy, &pki, &token))
        .await
        .expect("first join");
    let second = JoinToken::generate();
    let authority = authority_with(&second);
    authority
        .leaves
        .lock()
        .expect("lock")
        .insert("leaf".into(), vec!["ssh-ed25519 AAAA other".into()]);
    let taken = root_proxy(&pki, Some(authority)).await;
    let err = join(&request(&taken, &pki, &second)).await.unwrap_err();
    assert_refused(&err, JoinRefusal::NameTaken);
}

#[tokio::test]
async fn a_proxy_with_joins_off_refuses_and_a_joiner_gets_nothing_else() {
    let pki = pki();
    let token = JoinToken::generate();
    let closed = root_proxy(&pki, None).await;
    let err = join(&request(&closed, &pki, &token)).await.unwrap_err();
    assert!(matches!(err, JoinError::NotAccepted), "{err}");

    // With joins on, the key-less join user can neither dial nor open a control channel.
    let open = root_proxy(&pki, Some(authority_with(&token))).await;
    let config = Arc::new(tether::protocol::ssh::client_config());
    let mut handle = russh::client::connect(config, open.local_addr(), AnyHost)
        .await
        .expect("connects");
    assert!(
        handle
            .authenticate_none(tether::protocol::join::JOIN_USER)
            .await
            .expect("auth")
            .success()
    );
    assert!(
        handle
            .channel_open_direct_tcpip("127.0.0.1.leaf.tether", 22, "127.0.0.1", 0)
            .await
            .is_err(),
        "a joiner opened a stream"
    );
    let mut session = handle.channel_open_session().await.expect("session");
    session
        .request_subsystem(true, tether::protocol::control::CONTROL_SUBSYSTEM)
        .await
        .expect("request sent");
    let reply = within(
        "the subsystem answer",
        Duration::from_secs(10),
        session.wait(),
    )
    .await;
    assert!(
        matches!(reply, Some(russh::ChannelMsg::Failure)),
        "control subsystem for a joiner: {reply:?}"
    );
    // Any other user without a key is refused outright.
    let mut other = russh::client::connect(
        Arc::new(tether::protocol::ssh::client_config()),
        open.local_addr(),
        AnyHost,
    )
    .await
    .expect("connects");
    assert!(
        !other
            .authenticate_none("root")
            .await
            .expect("auth")
            .success()
    );
}
