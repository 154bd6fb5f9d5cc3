//! The root's side of the join (see [`crate::protocol::join`] for the exchange).
//!
//! The proxy speaks the protocol; a [`JoinAuthority`] ([`super::authority`]) decides. The authority knows the issued
//! tokens and records admitted leaves: in Kubernetes it is `operator::root`, which keeps
//! tokens in Secrets and leaves in `RemoteCluster` objects, so every replica trusts a leaf
//! that joined through any one of them.
//!
//! A name is an identity: a join never takes a name some source already trusts with other
//! keys. Before the authority is asked, the proxy refuses ([`JoinRefusal::NameTaken`]) a name
//! that its static trust (`--trust-dir`, `--ca`) holds at all, that the root's records or an
//! earlier join hold with other CA keys, or whose online tunnels were authenticated by a CA
//! the joiner does not send; the authority then checks its own records (a race between two
//! replicas is settled there).

use std::net::SocketAddr;
use std::sync::Arc;

use russh::keys::PublicKey;
use tracing::{info, warn};

use super::authority::{Admission, JoinAuthority, Refused};
use super::shared::ProxyShared;
use crate::admin::metrics::label as metric_label;
use crate::identity::{TrustSource, same_keys};
use crate::protocol::ClusterName;
use crate::protocol::control::ControlError;
use crate::protocol::join::{self, JoinRefusal, JoinerMessage, MAX_CA_KEYS, RootMessage};
use crate::stream::frames::{read_message, write_message};

/// Serves one join exchange on `stream`, logging the outcome. The caller bounds it in time.
pub(super) async fn serve<S>(
    shared: Arc<ProxyShared>,
    authority: Arc<dyn JoinAuthority>,
    mut stream: S,
    peer: SocketAddr,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let outcome = exchange(&shared, authority.as_ref(), &mut stream).await;
    let label = match &outcome {
        Ok(_) => "joined",
        Err(Failure::Refused(r)) => r.reason.as_str(),
        Err(Failure::Io(_)) => "broken",
    };
    shared
        .metrics
        .joins
        .get_or_create(&metric_label("outcome", label))
        .inc();
    let answer = match outcome {
        Ok(admission) => {
            // This replica trusts the leaf at once; the others learn it from the authority.
            super::trust::update(&shared, |trust| {
                for ca in &admission.ca_keys {
                    trust.insert_from(TrustSource::Joined, admission.leaf.clone(), ca.clone());
                }
            })
            .await;
            info!(%peer, leaf = %admission.leaf, token = %admission.token_id, "leaf joined");
            RootMessage::Joined
        }
        Err(Failure::Refused(refused)) => {
            warn!(%peer, reason = %refused.reason, message = %refused.message, "join refused");
            RootMessage::Refused {
                reason: refused.reason,
                message: refused.message,
            }
        }
        Err(Failure::Io(e)) => {
            warn!(%peer, error = %e, "join exchange broke off");
            return;
        }
    };
    if let Err(e) = write_message(&mut stream, &answer).await {
        warn!(%peer, error = %e, "could not send the join answer");
    }
}

enum Failure {
    Refused(Refused),
    Io(ControlError),
}

impl From<Refused> for Failure {
    fn from(r: Refused) -> Self {
        Self::Refused(r)
    }
}

fn bad_request(message: impl Into<String>) -> Failure {
    Failure::Refused(Refused::new(JoinRefusal::BadRequest, message))
}

async fn receive<S>(stream: &mut S) -> Result<JoinerMessage, Failure>
where
    S: tokio::io::AsyncRead + Unpin,
{
    match read_message(stream).await {
        Ok(message) => Ok(message),
        Err(e @ (ControlError::TooLarge { .. } | ControlError::Malformed(_))) => {
            Err(bad_request(e.to_string()))
        }
        Err(e) => Err(Failure::Io(e)),
    }
}

async fn exchange<S>(
    shared: &ProxyShared,
    authority: &dyn JoinAuthority,
    stream: &mut S,
) -> Result<Admission, Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let JoinerMessage::Hello {
        token_id,
        nonce: leaf_nonce,
        ..
    } = receive(stream).await?
    else {
        return Err(bad_request("the join must start with hello"));
    };
    join::validate_token_id(&token_id).map_err(|e| bad_request(e.to_string()))?;
    let token = authority.token(&token_id).await?;

    let root_cluster = shared.config.cluster.to_string();
    let root_cas: Vec<String> = shared
        .config
        .trust
        .load()
        .cas(&shared.config.cluster)
        .iter()
        .filter_map(|key| key.to_openssh().ok())
        .collect();
    if root_cas.is_empty() {
        return Err(Refused::new(
            JoinRefusal::Unavailable,
            "this proxy does not know its own cluster's CA",
        )
        .into());
    }
    let root_nonce = join::nonce();
    let challenge = RootMessage::Challenge {
        proof: token.root_proof(&leaf_nonce, &root_cluster, &root_cas),
        root_cluster,
        ca_keys: root_cas,
        nonce: root_nonce.clone(),
    };
    write_message(stream, &challenge)
        .await
        .map_err(Failure::Io)?;

    let JoinerMessage::Join {
        leaf_cluster,
        ca_keys,
        proof,
    } = receive(stream).await?
    else {
        return Err(bad_request("expected the join request after the challenge"));
    };
    if !token.verify_leaf_proof(&proof, &root_nonce, &leaf_cluster, &ca_keys) {
        return Err(Refused::new(
            JoinRefusal::TokenInvalid,
            format!("the secret of join token {token_id} does not match"),
        )
        .into());
    }
    let leaf = ClusterName::new(&leaf_cluster)
        .map_err(|e| bad_request(format!("leaf cluster name {leaf_cluster:?}: {e}")))?;
    if leaf == shared.config.cluster {
        return Err(Refused::new(
            JoinRefusal::NameTaken,
            format!("{leaf} is the root cluster's own name"),
        )
        .into());
    }
    if ca_keys.is_empty() || ca_keys.len() > MAX_CA_KEYS {
        return Err(bad_request(format!(
            "a leaf sends 1 to {MAX_CA_KEYS} CA keys, not {}",
            ca_keys.len()
        )));
    }
    let ca_keys = ca_keys
        .iter()
        .map(|text| {
            PublicKey::from_openssh(text)
                .map_err(|e| bad_request(format!("leaf CA key is not an OpenSSH public key: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_name(shared, &leaf, &ca_keys)?;
    let admission = Admission {
        token_id,
        leaf,
        ca_keys,
    };
    authority.admit(&admission).await?;
    Ok(admission)
}

/// Refuses `leaf` if this proxy already trusts the name otherwise than with exactly `keys`:
/// statically at all (a static leaf never joins), through the records or an earlier join with
/// other keys, or with online tunnels signed by a CA not in `keys`. The message names the
/// source of the trust, never a key.
fn check_name(shared: &ProxyShared, leaf: &ClusterName, keys: &[PublicKey]) -> Result<(), Refused> {
    let taken = |why: String| {
        Refused::new(
            JoinRefusal::NameTaken,
            format!("{why}; pick another name, or have the root's administrator remove that trust"),
        )
    };
    let trust = shared.config.trust.load();
    for source in trust.sources(leaf) {
        let why = if source == TrustSource::Static {
            format!("the name {leaf} is taken: this root trusts it through {source}")
        } else if !same_keys(trust.cas_from(source, leaf), keys) {
            format!("a leaf named {leaf} already joined with another CA (trusted by {source})")
        } else {
            continue;
        };
        return Err(taken(why));
    }
    let foreign = shared
        .sites
        .tunnels_of(leaf)
        .iter()
        .filter(|t| !t.signed_by(keys))
        .count();
    if foreign > 0 {
        return Err(taken(format!(
            "the name {leaf} is taken: {foreign} tunnel(s) of a leaf of that name are online, authenticated by another CA"
        )));
    }
    Ok(())
}
