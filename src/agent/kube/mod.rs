//! The leaf's Kubernetes API, served to root callers through the tunnel (#16).
//!
//! A stream of [`Endpoint::KubeApi`](crate::protocol::Endpoint::KubeApi) starts with the caller
//! the root proxy authenticated ([`Caller`]), then carries HTTP/1.1. The agent maps the caller
//! with the leaf's own rules ([`KubeAccess`]), removes every credential and impersonation header
//! the request brought ([`strip_credentials`]), and sends it to its API server with its own
//! credential and `Impersonate-User`/`Impersonate-Group`: the leaf's RBAC decides what the
//! caller may do, and its audit log names `tether:ROOT:USER`. Upgrades (exec, attach,
//! port-forward, WebSocket watches) are spliced once both sides switch protocols.

mod access;
mod upstream;

pub use access::{AccessRule, AccessRuleError, Impersonation, KubeAccess, USER_PREFIX};
pub use upstream::{
    ClientCertificate, Credential, KubeUpstream, UpstreamError, certificates_from_pem,
};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tracing::{debug, info};

use crate::protocol::kube::{Caller, refusal, strip_credentials, upgrade_of};
use crate::stream::upgrade::splice_upgrades;

/// How long the proxy has to send the caller frame once the stream is open.
const CALLER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request head may take to arrive (a caller's idle keep-alive connection ends too).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The body of every answer: the API server's, or a refusal of the agent's own.
type Body = BoxBody<Bytes, hyper::Error>;

/// Everything the agent needs to serve the root's Kubernetes requests.
#[derive(Debug)]
pub struct KubeGateway {
    /// Who root callers become here.
    pub access: KubeAccess,
    /// The leaf's API server, and the agent's credential there (one for every tunnel of an
    /// operator).
    pub upstream: Arc<KubeUpstream>,
}

/// Serves one stream: reads its caller, then answers its HTTP requests until it ends.
pub async fn serve<S>(gateway: Arc<KubeGateway>, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let caller = match tokio::time::timeout(CALLER_TIMEOUT, read_caller(&mut stream)).await {
        Ok(Ok(caller)) => caller,
        Ok(Err(e)) => {
            info!(error = %e, "a Kubernetes stream without a caller; closing it");
            return;
        }
        Err(_) => {
            info!("a Kubernetes stream sent no caller in time; closing it");
            return;
        }
    };
    let mapped = gateway.access.map(&caller);
    let service = service_fn(move |request| {
        let (gateway, mapped, caller) = (gateway.clone(), mapped.clone(), caller.clone());
        async move {
            let answer = match mapped {
                Ok(who) => forward(&gateway, &who, request).await,
                Err(why) => {
                    info!(user = caller.user, "refused an unmapped root caller");
                    let accept = request.headers().get(header::ACCEPT);
                    refuse(StatusCode::FORBIDDEN, &why, accept)
                }
            };
            Ok::<_, std::convert::Infallible>(answer)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        debug!(error = %e, "a Kubernetes stream ended with an error");
    }
}

async fn read_caller<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Caller, String> {
    let mut prefix = [0u8; 4];
    stream
        .read_exact(&mut prefix)
        .await
        .map_err(|e| e.to_string())?;
    let len = Caller::body_len(prefix).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Caller::decode(&body).map_err(|e| e.to_string())
}

/// A refusal of the agent's own, worded for what the request accepts.
fn refuse(code: StatusCode, message: &str, accept: Option<&HeaderValue>) -> Response<Body> {
    refusal(code, message, accept).map(|b| b.map_err(|never| match never {}).boxed())
}

/// Sends `request` to the API server as `who`, and hands its answer back (upgraded if it
/// switches protocols).
async fn forward(
    gateway: &KubeGateway,
    who: &Impersonation,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let upgrade = upgrade_of(request.headers()).map(|_| hyper::upgrade::on(&mut request));
    let accept = request.headers().get(header::ACCEPT).cloned();
    let accept = accept.as_ref();
    let (mut parts, body) = request.into_parts();
    strip_credentials(&mut parts.headers);
    parts.headers.remove(header::HOST);
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match gateway.upstream.uri(&path) {
        Ok(uri) => uri,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                &format!("bad path {path:?}: {e}"),
                accept,
            );
        }
    };
    match gateway.upstream.authorization().await {
        Ok(Some(value)) => match HeaderValue::from_str(&value) {
            Ok(mut value) => {
                value.set_sensitive(true);
                parts.headers.insert(header::AUTHORIZATION, value);
            }
            Err(_) => {
                let message = "the agent's token is not a valid header value";
                return refuse(StatusCode::BAD_GATEWAY, message, accept);
            }
        },
        Ok(None) => {}
        Err(e) => return refuse(StatusCode::BAD_GATEWAY, &e, accept),
    }
    if let Err(refusal) = impersonate(&mut parts.headers, who) {
        return refuse(StatusCode::BAD_REQUEST, &refusal, accept);
    }
    let mut response = match gateway
        .upstream
        .client()
        .request(Request::from_parts(parts, body))
        .await
    {
        Ok(response) => response,
        Err(e) => {
            let message = format!("the leaf's agent could not reach its API server: {e}");
            return refuse(StatusCode::BAD_GATEWAY, &message, accept);
        }
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client) = upgrade
    {
        let server = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            splice_upgrades(client, server).await;
        });
    }
    response.map(BodyExt::boxed)
}

/// Adds the impersonation headers for `who`.
fn impersonate(headers: &mut http::HeaderMap, who: &Impersonation) -> Result<(), String> {
    let value = |v: &str| {
        HeaderValue::from_str(v).map_err(|_| format!("{v:?} cannot be sent as a header value"))
    };
    headers.insert("impersonate-user", value(&who.user)?);
    for group in &who.groups {
        headers.append("impersonate-group", value(group)?);
    }
    Ok(())
}
