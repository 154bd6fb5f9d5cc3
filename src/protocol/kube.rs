//! What the root's Kubernetes endpoint and a leaf's agent agree on about a Kubernetes API
//! request in a tunnel (#16): who made it, which headers never cross, and how a refusal reads.
//!
//! A request travels as plain HTTP/1.1 on a stream of [`Endpoint::KubeApi`]
//! (crate::protocol::Endpoint::KubeApi). Before the HTTP, the proxy writes one [`Caller`]
//! frame: the root identity it authenticated and authorized. The agent believes it because only
//! a proxy it authenticated (by the root CA's host certificate) opens such a stream, and no
//! client name parses to that endpoint; nothing in the request's own headers can say who the
//! caller is ([`strip_credentials`] removes every such header on both sides).

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;

/// Longest [`Caller`] frame body: a user name and a few hundred groups.
pub const MAX_CALLER_LEN: usize = 64 * 1024;

/// A root identity, as the proxy authenticated it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Caller {
    /// The root user's name (`system:serviceaccount:NS:NAME`, a certificate's CN, ...).
    pub user: String,
    /// The root groups the user is in.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Why a [`Caller`] frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("the caller frame is {0} bytes, over the {MAX_CALLER_LEN}-byte limit")]
    TooLong(usize),
    #[error("the caller frame is not a caller: {0}")]
    Malformed(#[source] serde_json::Error),
}

impl Caller {
    /// The frame: a 4-byte big-endian length, then the caller as JSON.
    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    /// Checks a frame's announced length before its body is read.
    pub fn body_len(prefix: [u8; 4]) -> Result<usize, CallerError> {
        let len = u32::from_be_bytes(prefix) as usize;
        if len > MAX_CALLER_LEN {
            return Err(CallerError::TooLong(len));
        }
        Ok(len)
    }

    /// Reads a frame's body.
    pub fn decode(body: &[u8]) -> Result<Self, CallerError> {
        serde_json::from_slice(body).map_err(CallerError::Malformed)
    }
}

/// Headers that must never cross from a client to an API server: credentials and
/// impersonation. A header whose name starts with `impersonate-` is one, whatever follows.
fn is_credential(name: &HeaderName) -> bool {
    name == header::AUTHORIZATION
        || name == header::PROXY_AUTHORIZATION
        || name.as_str().starts_with("impersonate-")
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), which describe one connection, not the request.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes credentials, impersonation and hop-by-hop headers (with those `Connection` names) from
/// a request's headers; an upgrade (exec, attach, port-forward, a WebSocket watch) keeps its
/// `Connection: Upgrade` and `Upgrade`.
///
/// What is removed is decided before anything is added, and `Connection` can name no header the
/// caller then adds: a client's `Connection: Impersonate-User` once made a proxy drop the
/// impersonation it had just set, so requests ran with the proxy's own rights (Rancher,
/// CVE-2021-31999).
pub fn strip_credentials(headers: &mut HeaderMap) {
    let upgrade = upgrade_of(headers);
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    let credentials: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_credential(n))
        .cloned()
        .collect();
    for name in credentials {
        headers.remove(name);
    }
    if let Some(protocol) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, protocol);
    }
}

/// The protocol a request asks to upgrade to (`Connection: Upgrade` with `Upgrade: X`).
pub fn upgrade_of(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// A failure answered to a request that accepts `accept`, so that kubectl prints
/// `Error from server (REASON): MESSAGE`: as the API server words one, a Kubernetes `Status`
/// object, except to discovery requests (`Accept: ...;g=apidiscovery.k8s.io...`), whose
/// decoder reads no `Status` (kubectl said "unknown") but prints a plain-text body as it is.
pub fn refusal(
    code: StatusCode,
    message: &str,
    accept: Option<&HeaderValue>,
) -> Response<Full<Bytes>> {
    let discovery = accept
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("apidiscovery.k8s.io"));
    if !discovery {
        return status_response(code, message);
    }
    let mut response = Response::new(Full::new(Bytes::from(message.to_owned())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// A failure answered as the API server words one, a Kubernetes `Status` object. The reason is
/// the HTTP status's (`Forbidden`, `Unauthorized`, `ServiceUnavailable`, ...).
pub fn status_response(code: StatusCode, message: &str) -> Response<Full<Bytes>> {
    let reason: String = code
        .canonical_reason()
        .unwrap_or("Unknown")
        .split_whitespace()
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    }))
    .unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn credentials_and_impersonation_never_cross() {
        let mut h = headers(&[
            ("Authorization", "Bearer root-token"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Impersonate-User", "system:admin"),
            ("Impersonate-Group", "system:masters"),
            ("Impersonate-Extra-scopes", "x"),
            ("Impersonate-Uid", "1"),
            ("Accept", "application/json"),
        ]);
        strip_credentials(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn connection_names_are_dropped_and_cannot_name_what_comes_later() {
        let mut h = headers(&[
            ("Connection", "X-Secret, Impersonate-User"),
            ("X-Secret", "1"),
            ("Accept", "*/*"),
        ]);
        strip_credentials(&mut h);
        assert!(h.get("x-secret").is_none());
        assert!(
            h.get(header::CONNECTION).is_none(),
            "no Connection left to name anything"
        );
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_and_nothing_else_hop_by_hop() {
        let mut h = headers(&[
            ("Connection", "Upgrade, Impersonate-Group"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
            ("Impersonate-Group", "system:masters"),
        ]);
        strip_credentials(&mut h);
        assert_eq!(h[header::CONNECTION], "Upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert!(h.get("impersonate-group").is_none());
        assert!(h.get("sec-websocket-protocol").is_some());
    }

    #[test]
    fn a_failure_reads_as_a_kubernetes_status() {
        let response = status_response(StatusCode::SERVICE_UNAVAILABLE, "no tunnel");
        assert_eq!(response.status(), 503);
        let body = response.into_body();
        let bytes = futures::executor::block_on(http_body_util::BodyExt::collect(body))
            .expect("body")
            .to_bytes();
        let status: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(status["kind"], "Status");
        assert_eq!(status["reason"], "ServiceUnavailable");
        assert_eq!(status["message"], "no tunnel");
    }

    #[test]
    fn a_caller_frame_round_trips_and_its_length_is_bounded() {
        let caller = Caller {
            user: "system:serviceaccount:ops:ci".into(),
            groups: vec!["system:serviceaccounts".into()],
        };
        let frame = caller.encode();
        let len = Caller::body_len(frame[..4].try_into().expect("4")).expect("len");
        assert_eq!(Caller::decode(&frame[4..4 + len]).expect("caller"), caller);
        assert!(Caller::body_len((MAX_CALLER_LEN as u32 + 1).to_be_bytes()).is_err());
        assert!(Caller::decode(b"{}").is_err());
    }
}
