//! Which leaf a client means: from its target name, or from its proxy user name.
//!
//! A target named `HOST.CLUSTER.tether:PORT` says its cluster itself, but an HTTPS client then
//! checks the server's certificate against `HOST.CLUSTER.tether`, which no certificate names.
//! So a client may instead name the real host (`web.internal:443`, `10.0.0.5:443`,
//! `kubernetes.default.svc:443`) and put the leaf in the user part of its credentials:
//! `alice@leaf-1` (HTTP Basic `alice@leaf-1:TOKEN`, in a proxy URL
//! `http://alice%40leaf-1:TOKEN@PROXY`; SOCKS5 user `alice@leaf-1`). The token is checked for
//! `alice`; the leaf is `leaf-1`.
//!
//! - A name that is itself a client of the token file is taken whole, so a client already
//!   named `bob@corp` keeps working as before; otherwise the name splits at its last `@`.
//! - A `.tether` target keeps its meaning; with a leaf in the user name as well, the two must
//!   agree (a client confused about where it dials is refused, not guessed for).
//! - A Bearer token has no user part: it takes `.tether` targets only.
//!
//! The leaf chosen either way is the target's cluster, so the root's access rules
//! ([`Dialer::permit`](crate::proxy::Dialer::permit)) and the audit record judge and name it
//! exactly as they do a `.tether` target.

use super::auth::ClientTokens;
use crate::protocol::target::{API_SERVER_LABEL, is_tether_name};
use crate::protocol::{ClusterName, Endpoint, Target};

/// An authenticated client and the leaf its user name chose, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Login {
    /// The token file's client the token was checked for (`alice` of `alice@leaf-1`).
    pub user: String,
    /// What followed the `@`, unchecked: a bad cluster name is the client's mistake to be told
    /// of with a 400 once it has authenticated, not a failed authentication.
    pub leaf: Option<String>,
}

/// Checks `token` for the user `name` names (see the module documentation); the client and
/// its leaf on success. Both readings are always checked, so the time taken does not tell
/// which names exist.
pub(super) fn verify_user(tokens: &ClientTokens, name: &str, token: &[u8]) -> Option<Login> {
    let whole = tokens.verify(name, token);
    let split = name.rsplit_once('@');
    let by_parts = split.is_some_and(|(user, _)| tokens.verify(user, token));
    if whole {
        return Some(Login {
            user: name.to_owned(),
            leaf: None,
        });
    }
    let (user, leaf) = split.filter(|_| by_parts)?;
    Some(Login {
        user: user.to_owned(),
        leaf: Some(leaf.to_owned()),
    })
}

/// The target a client means by host `name` (a bracketed or bare IPv6 literal allowed) and
/// `port`, with `leaf` from its user name; the error is for the client to read.
pub(super) fn target_for(name: &str, port: u16, leaf: Option<&str>) -> Result<Target, String> {
    let leaf = leaf.map(checked_leaf).transpose()?;
    if is_tether_name(name) {
        let target = Target::from_name(name, port).map_err(|e| e.to_string())?;
        return match leaf {
            Some(leaf) if leaf != target.cluster => Err(format!(
                "the target {name:?} is in cluster {} but the proxy user name chose leaf \
                 {leaf}: name one cluster (drop .{}.tether, or the @{leaf})",
                target.cluster, target.cluster
            )),
            _ => Ok(target),
        };
    }
    let Some(cluster) = leaf else {
        return Err(format!(
            "the target {name:?} names no cluster: choose the leaf in the proxy user name \
             (Basic USER@LEAF:TOKEN, in a URL USER%40LEAF:TOKEN; SOCKS5 user USER@LEAF), or \
             name the target HOST.CLUSTER.tether (the only form a Bearer token can use)"
        ));
    };
    let endpoint = if name.eq_ignore_ascii_case(API_SERVER_LABEL) {
        Endpoint::ApiServer
    } else {
        let host = name
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(name);
        Endpoint::host(host, port).map_err(|e| e.to_string())?
    };
    Ok(Target { cluster, endpoint })
}

/// The HTTP CONNECT target `authority` (`HOST:PORT`, `[V6]:PORT`), as [`target_for`].
pub(super) fn target_of_authority(authority: &str, leaf: Option<&str>) -> Result<Target, String> {
    let (name, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid target {authority:?}: expected HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("invalid port in {authority:?}: expected 1-65535"))?;
    target_for(name, port, leaf)
}

fn checked_leaf(leaf: &str) -> Result<ClusterName, String> {
    ClusterName::new(leaf).map_err(|e| format!("the leaf chosen in the proxy user name: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "alice-token-0123456789abcdef";
    const B: &str = "bob-at-corp-token-zyxwvutsrq";

    fn tokens() -> ClientTokens {
        ClientTokens::parse(&format!("alice:{A}\nbob@corp:{B}\n")).unwrap()
    }

    fn login(user: &str, leaf: Option<&str>) -> Option<Login> {
        Some(Login {
            user: user.into(),
            leaf: leaf.map(str::to_owned),
        })
    }

    #[test]
    fn the_user_name_may_choose_the_leaf() {
        let t = tokens();
        assert_eq!(verify_user(&t, "alice", A.as_bytes()), login("alice", None));
        assert_eq!(
            verify_user(&t, "alice@leaf-1", A.as_bytes()),
            login("alice", Some("leaf-1"))
        );
        // A client whose own name has an @ keeps it, and may still choose a leaf.
        assert_eq!(
            verify_user(&t, "bob@corp", B.as_bytes()),
            login("bob@corp", None)
        );
        assert_eq!(
            verify_user(&t, "bob@corp@leaf-2", B.as_bytes()),
            login("bob@corp", Some("leaf-2"))
        );
        // The token is checked for the user before the @, never for anyone else.
        for (name, token) in [("alice@leaf-1", B), ("bob@leaf-1", B), ("@leaf-1", A)] {
            assert_eq!(verify_user(&t, name, token.as_bytes()), None, "{name}");
        }
    }

    #[test]
    fn real_hosts_take_the_leaf_of_the_user_name() {
        for (authority, host, port) in [
            ("web.internal:443", "web.internal", 443),
            ("10.0.0.5:8443", "10.0.0.5", 8443),
            ("[fd00::1]:22", "fd00::1", 22),
            ("kubernetes.default.svc:443", "kubernetes.default.svc", 443),
        ] {
            let t = target_of_authority(authority, Some("leaf-1")).unwrap();
            assert_eq!(t.cluster.as_str(), "leaf-1");
            assert_eq!(
                t.endpoint,
                Endpoint::host(host, port).unwrap(),
                "{authority}"
            );
        }
        let api = target_of_authority("_apiserver:443", Some("leaf-1")).unwrap();
        assert_eq!(api.endpoint, Endpoint::ApiServer);
    }

    #[test]
    fn tether_names_work_as_before_and_must_agree_with_the_user_name() {
        let before = target_of_authority("web.leaf-1.tether:80", None).unwrap();
        assert_eq!(before, Target::parse("web.leaf-1.tether:80").unwrap());
        assert_eq!(
            target_of_authority("web.leaf-1.tether:80", Some("leaf-1")).unwrap(),
            before
        );
        let err = target_of_authority("web.leaf-1.tether:80", Some("leaf-2")).unwrap_err();
        assert!(
            err.contains("cluster leaf-1") && err.contains("leaf leaf-2"),
            "{err}"
        );
    }

    #[test]
    fn a_target_without_a_cluster_or_with_a_bad_leaf_is_explained() {
        let err = target_of_authority("web.internal:443", None).unwrap_err();
        assert!(
            err.contains("names no cluster") && err.contains("USER@LEAF"),
            "{err}"
        );
        let err = target_of_authority("web.internal:443", Some("Leaf_1")).unwrap_err();
        assert!(
            err.contains("proxy user name") && err.contains("Leaf_1"),
            "{err}"
        );
        for bad in [
            "web.internal",
            "web.internal:0",
            "web.internal:http",
            "a b:80",
        ] {
            assert!(target_of_authority(bad, Some("leaf-1")).is_err(), "{bad}");
        }
    }
}
