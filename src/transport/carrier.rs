//! What carries SSH over the first hop, chosen by the root address's scheme:
//!
//! | address | port on the root | carrier |
//! | --- | --- | --- |
//! | `HOST:PORT` | the SSH port | SSH on the socket, as always |
//! | `tls://HOST:PORT` | the TLS port (a load balancer's 443) | TLS; SSH by ALPN `tether-ssh`, or, when an L7 load balancer answered `http/1.1`, a WebSocket upgrade on the same connection |
//! | `ws://HOST:PORT` | an L7 load balancer listening in plain HTTP | a WebSocket upgrade |
//!
//! The scheme travels with the address everywhere an address goes (flags, the ReverseTunnel
//! and TrustedCluster specs, the chart), so nothing else needs a setting. What was used is
//! returned as [`Used`], for the agent to say.

use std::fmt;
use std::sync::{Arc, OnceLock};

use super::BoxIo;
use super::tls::{self, Inside, TlsError};
use super::websocket::{self, WebSocketError};

/// How SSH reaches the root over the first hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// SSH on the socket.
    Ssh,
    /// TLS, then SSH by ALPN or in WebSocket frames.
    Tls,
    /// A WebSocket upgrade in plain HTTP.
    WebSocket,
}

/// A root address: its carrier, and the `HOST:PORT` the first hop connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootAddress {
    /// What carries SSH.
    pub carrier: Carrier,
    /// Where the first hop connects (through a forward proxy or not).
    pub host_port: String,
}

impl RootAddress {
    /// Parses `HOST:PORT`, `tls://HOST:PORT` or `ws://HOST:PORT`; the error says which form
    /// was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (carrier, rest) = match text.split_once("://") {
            None => (Carrier::Ssh, text),
            Some(("tls", rest)) => (Carrier::Tls, rest),
            Some(("ws", rest)) => (Carrier::WebSocket, rest),
            Some((scheme, _)) => {
                return Err(format!(
                    "{text:?}: unknown scheme {scheme:?}: expected HOST:PORT (the SSH port), \
                     tls://HOST:PORT (the TLS port) or ws://HOST:PORT"
                ));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let Some((host, port)) = rest.rsplit_once(':') else {
            return Err(format!("{text:?} has no port: expected [tls://]HOST:PORT"));
        };
        if host.is_empty() || host == "[]" || host.contains('/') {
            return Err(format!("{text:?} has no host: expected [tls://]HOST:PORT"));
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => Ok(Self {
                carrier,
                host_port: rest.to_owned(),
            }),
            _ => Err(format!(
                "{text:?}: the port {port:?} is not a number from 1 to 65535"
            )),
        }
    }

    /// The host alone: the TLS server name, and the WebSocket request's `Host`.
    pub fn host(&self) -> &str {
        let host = self
            .host_port
            .rsplit_once(':')
            .map_or(self.host_port.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// What carried SSH in the end: the agent logs it and shows it in its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Used {
    /// SSH on the socket.
    Ssh,
    /// SSH inside TLS, the proxy having picked ALPN `tether-ssh`.
    TlsAlpn,
    /// SSH in WebSocket frames inside TLS (an L7 load balancer terminated TLS).
    TlsWebSocket,
    /// SSH in WebSocket frames in plain HTTP.
    WebSocket,
}

impl fmt::Display for Used {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Used::Ssh => "ssh",
            Used::TlsAlpn => "tls-alpn",
            Used::TlsWebSocket => "tls-websocket",
            Used::WebSocket => "websocket",
        })
    }
}

/// Why the carrier could not be set up over an open first hop.
#[derive(Debug, thiserror::Error)]
pub enum CarrierError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{addr}: {source}")]
    WebSocket {
        addr: String,
        #[source]
        source: WebSocketError,
    },
}

/// The TLS settings used when a route names none: no certificate check (see
/// [`super::tls`] for why), built once.
fn default_tls() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| tls::client_config(None).expect("the default TLS settings are valid"))
        .clone()
}

/// Sets up `address`'s carrier on `io`, the open first hop; `tls` replaces the default TLS
/// settings (a CA to check the port's certificate with).
pub async fn carry(
    address: &RootAddress,
    io: BoxIo,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(BoxIo, Used), CarrierError> {
    let upgrade = |source| CarrierError::WebSocket {
        addr: address.host_port.clone(),
        source,
    };
    match address.carrier {
        Carrier::Ssh => Ok((io, Used::Ssh)),
        Carrier::WebSocket => {
            let ws = websocket::connect(io, &address.host_port)
                .await
                .map_err(upgrade)?;
            Ok((Box::new(ws), Used::WebSocket))
        }
        Carrier::Tls => {
            let config = tls.cloned().unwrap_or_else(default_tls);
            let (stream, inside) = tls::connect(io, address.host(), config).await?;
            match inside {
                Inside::Ssh => Ok((Box::new(stream), Used::TlsAlpn)),
                Inside::Http => {
                    let ws = websocket::connect(stream, &address.host_port)
                        .await
                        .map_err(upgrade)?;
                    Ok((Box::new(ws), Used::TlsWebSocket))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_name_their_carrier() {
        let parse = |t| RootAddress::parse(t).expect(t);
        assert_eq!(parse("lb:3024").carrier, Carrier::Ssh);
        let tls = parse("tls://root.example.com:443/");
        assert_eq!(tls.carrier, Carrier::Tls);
        assert_eq!(tls.host_port, "root.example.com:443");
        assert_eq!(tls.host(), "root.example.com");
        assert_eq!(parse("ws://[::1]:80").host(), "::1");
        for bad in [
            "https://lb:443",
            "tls://lb",
            "tls://:443",
            "lb:0",
            "tls://lb/x:443",
        ] {
            assert!(RootAddress::parse(bad).is_err(), "{bad}");
        }
    }
}
