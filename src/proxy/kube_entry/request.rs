//! One Kubernetes request through the root: route it to its leaf, say who sent it, ask the
//! root's rules, then hand it to the leaf's agent on a stream of its own, with the caller
//! written first and the client's credentials left behind.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::KubeEntry;
use super::audit::{Counted, Direction, KubeAudit};
use super::request_info::{RequestInfo, asks_to_watch};
use crate::protocol::kube::{Caller, refusal, strip_credentials, upgrade_of};
use crate::protocol::{ClusterName, DialError, DialErrorKind, Endpoint, Target};
use crate::proxy::access::{Reach, Who};
use crate::stream::Splice;
use crate::stream::upgrade::splice_upgrades;

/// The body of every answer.
pub(super) type Body = BoxBody<Bytes, hyper::Error>;

/// The path prefix that names a leaf: `/clusters/LEAF/api/v1/...`.
const CLUSTERS: &str = "/clusters/";

/// The pipe between the request's HTTP client and its tunnel stream.
const PIPE_BYTES: usize = 64 * 1024;

/// What one TLS connection knows of its client.
pub(super) struct Connection {
    /// The client's address.
    pub from: SocketAddr,
    /// Who its verified client certificate names, if it showed one.
    pub certificate: Option<Who>,
}

/// Answers one request.
pub(super) async fn handle(
    entry: Arc<KubeEntry>,
    connection: Arc<Connection>,
    request: Request<Incoming>,
) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query();
    let accept = request.headers().get(header::ACCEPT).cloned();
    let accept = accept.as_ref();
    let Some((leaf, rest)) = route(&path) else {
        let info = RequestInfo::parse(request.method(), &path, false);
        let mut audit = KubeAudit::start(
            connection.from,
            info,
            entry.dialer.metrics().kube_requests.clone(),
        );
        return refuse(
            &mut audit,
            (StatusCode::NOT_FOUND, accept),
            "not_found",
            &format!("{path:?} names no cluster: paths here start with /clusters/LEAF/"),
        );
    };
    let info = RequestInfo::parse(request.method(), rest, asks_to_watch(query));
    let mut audit = KubeAudit::start(
        connection.from,
        info,
        entry.dialer.metrics().kube_requests.clone(),
    );
    let Ok(leaf) = ClusterName::new(leaf) else {
        return refuse(
            &mut audit,
            (StatusCode::NOT_FOUND, accept),
            "not_found",
            &format!("{leaf:?} is not a cluster name"),
        );
    };
    audit.leaf = Some(leaf.clone());
    let Some(who) = authenticate(&entry, &connection, &request).await else {
        entry.door.auth_failed(connection.from.ip());
        return refuse(
            &mut audit,
            (StatusCode::UNAUTHORIZED, accept),
            "unauthenticated",
            "the root knows no client certificate of this connection and no bearer token of this request",
        );
    };
    audit.who = Some(who.clone());
    if let Some(access) = &entry.access
        && let Err(denied) = access.check(&who, &leaf, Reach::Kube).await
    {
        let answer = (StatusCode::FORBIDDEN, accept);
        return refuse(&mut audit, answer, "not_permitted", &denied.0);
    }
    let rest = match request.uri().query() {
        Some(query) => format!("{rest}?{query}"),
        None => rest.to_owned(),
    };
    forward(&entry, &connection, who, leaf, rest, request, audit).await
}

/// `/clusters/LEAF/REST` → (`LEAF`, `/REST`).
fn route(path: &str) -> Option<(&str, &str)> {
    let after = path.strip_prefix(CLUSTERS)?;
    match after.find('/') {
        Some(slash) => Some((&after[..slash], &after[slash..])),
        None => Some((after, "/")),
    }
}

/// Who sent the request: its connection's client certificate, else its bearer token: a line of
/// the token file, or whoever the root's API server says it is.
async fn authenticate(
    entry: &KubeEntry,
    connection: &Connection,
    request: &Request<Incoming>,
) -> Option<Who> {
    if let Some(who) = &connection.certificate {
        return Some(who.clone());
    }
    let token = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim();
    if let Some(tokens) = &entry.tokens
        && let Some(name) = tokens.load().verify_bearer(token.as_bytes())
    {
        return Some(Who::named(name));
    }
    let bearer = entry.bearer.as_ref()?;
    bearer.review(token).await
}

/// Sends the request to the leaf's agent and its answer back.
async fn forward(
    entry: &KubeEntry,
    connection: &Connection,
    who: Who,
    leaf: ClusterName,
    path_and_query: String,
    mut request: Request<Incoming>,
    mut audit: KubeAudit,
) -> Response<Body> {
    let target = Target {
        cluster: leaf,
        endpoint: Endpoint::KubeApi,
    };
    let accept = request.headers().get(header::ACCEPT).cloned();
    let accept = accept.as_ref();
    let stream = match entry.dialer.dial_local(&target, connection.from).await {
        Ok(stream) => stream,
        Err(e) => {
            let answer = (status_of(&e), accept);
            return refuse(&mut audit, answer, e.kind.as_str(), &e.message);
        }
    };
    let (ours, mut theirs) = tokio::io::duplex(PIPE_BYTES);
    tokio::spawn(stream.splice(ours));
    let caller = Caller {
        user: who.user,
        groups: who.groups,
    };
    let handshake = async {
        theirs.write_all(&caller.encode()).await?;
        hyper::client::conn::http1::handshake(TokioIo::new(theirs))
            .await
            .map_err(std::io::Error::other)
    };
    let (mut sender, client) = match handshake.await {
        Ok(both) => both,
        Err(e) => {
            let message = format!("the stream to the leaf's agent failed: {e}");
            let answer = (StatusCode::BAD_GATEWAY, accept);
            return refuse(&mut audit, answer, "stream", &message);
        }
    };
    tokio::spawn(client.with_upgrades());
    let upgrade = upgrade_of(request.headers()).map(|_| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    strip_credentials(&mut parts.headers);
    parts.uri = match path_and_query.parse() {
        Ok(uri) => uri,
        Err(_) => {
            let message = format!("{path_and_query:?} is not a request path");
            let answer = (StatusCode::BAD_REQUEST, accept);
            return refuse(&mut audit, answer, "bad_request", &message);
        }
    };
    let audit = Arc::new(audit);
    let body = Counted::new(body, audit.clone(), Direction::Up);
    let mut response = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(response) => response,
        Err(e) => {
            let message = format!("the leaf's agent did not answer: {e}");
            audit.ended("stream", StatusCode::BAD_GATEWAY.as_u16(), &message);
            return boxed(refusal(StatusCode::BAD_GATEWAY, &message, accept));
        }
    };
    audit.ended("ok", response.status().as_u16(), "");
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = upgrade
    {
        let server = hyper::upgrade::on(&mut response);
        let audit = audit.clone();
        tokio::spawn(async move { audit.carried(splice_upgrades(client, server).await) });
    }
    response.map(|body| Counted::new(body, audit, Direction::Down).boxed())
}

/// A refusal by the root, recorded and answered as a Kubernetes `Status`.
fn refuse(
    audit: &mut KubeAudit,
    (code, accept): (StatusCode, Option<&http::HeaderValue>),
    decision: &'static str,
    message: &str,
) -> Response<Body> {
    audit.ended(decision, code.as_u16(), message);
    boxed(refusal(code, message, accept))
}

fn boxed(response: Response<http_body_util::Full<Bytes>>) -> Response<Body> {
    response.map(|b| b.map_err(|never| match never {}).boxed())
}

/// The HTTP status that says why a stream to the leaf could not be had.
fn status_of(error: &DialError) -> StatusCode {
    match error.kind {
        DialErrorKind::NoTunnel => StatusCode::SERVICE_UNAVAILABLE,
        DialErrorKind::TimedOut => StatusCode::GATEWAY_TIMEOUT,
        DialErrorKind::Forbidden | DialErrorKind::NotPermitted => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_GATEWAY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_segment_after_clusters_names_the_leaf() {
        assert_eq!(
            route("/clusters/leaf-1/api/v1/pods"),
            Some(("leaf-1", "/api/v1/pods"))
        );
        assert_eq!(route("/clusters/leaf-1"), Some(("leaf-1", "/")));
        assert_eq!(route("/api/v1/pods"), None);
    }
}
