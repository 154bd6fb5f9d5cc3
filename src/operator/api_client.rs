//! The Kubernetes API client every Tether component builds, named after its component.
//!
//! kube-rs sends no `User-Agent`, and the apiserver names the field manager of every write that
//! carries none of its own (a JSON patch, a create, kube-runtime's finalizer patches) after the
//! user agent: all of those appeared in `managedFields` as `unknown`, so `kubectl get -o yaml
//! --show-managed-fields` could not say which component wrote what. With a user agent
//! `tether-operator/<version>` they read `tether-operator`.

use hyper::http::{HeaderValue, header::USER_AGENT};
use kube::{Client, Config};

/// A client for `config` whose requests say they come from `component` (`tether-operator`,
/// `tether-proxy`) at this build's version.
pub fn named_client(mut config: Config, component: &str) -> Result<Client, kube::Error> {
    let agent = format!("{component}/{}", env!("CARGO_PKG_VERSION"));
    if let Ok(value) = HeaderValue::from_str(&agent) {
        config.headers.push((USER_AGENT, value));
    }
    Client::try_from(config)
}
