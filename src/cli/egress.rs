//! `--egress-proxy` and its companions: how `tether agent` and the operator's agents and joins
//! leave the leaf, through a forward proxy or not (see [`tether::transport`]).
//!
//! Each flag falls back on the conventional variable, resolved here rather than by clap's
//! `env` (which reads one variable; the convention has two spellings of each):
//! `--egress-proxy` on `HTTPS_PROXY` then `https_proxy`, `--no-proxy` on `NO_PROXY` then
//! `no_proxy`. `HTTP_PROXY` and `ALL_PROXY` are not read (Go's rules; the module doc of
//! `tether::transport::forward_proxy` says why).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tether::transport::forward_proxy::{NO_PROXY_VARS, PROXY_VARS, first_set};
use tether::transport::{Credentials, Egress, ForwardProxy, NoProxy, Route};

/// The forward proxy flags.
#[derive(Debug, Clone, Default, Args)]
pub struct EgressArgs {
    /// The forward proxy (http://HOST:PORT or https://HOST:PORT) every connection to the root
    /// goes through, with HTTP CONNECT; `--egress-proxy=` (empty) dials directly. Default:
    /// $HTTPS_PROXY, else $https_proxy. A password never goes here (the command line is
    /// visible to every user of the host): use --egress-proxy-credentials, or the variable.
    #[arg(long, value_name = "URL")]
    pub egress_proxy: Option<String>,
    /// A file holding the proxy's Basic credentials, one line `user:password`; overrides any
    /// in the URL.
    #[arg(long, value_name = "FILE")]
    pub egress_proxy_credentials: Option<PathBuf>,
    /// Root addresses reached directly although a proxy is set: a comma list of `*`, host
    /// names (and everything under them), `.domain` suffixes, IP addresses, CIDRs, each with
    /// an optional `:port`. Default: $NO_PROXY, else $no_proxy.
    #[arg(long, value_name = "LIST")]
    pub no_proxy: Option<String>,
    /// PEM CA certificates the https:// proxy's certificate must chain to (default: the
    /// system's).
    #[arg(long, value_name = "FILE")]
    pub egress_proxy_ca: Option<PathBuf>,
    /// PEM CA certificates the root's TLS port (a `tls://` address) must present a
    /// certificate of, for its name. Default: not checked, as SSH inside TLS authenticates the
    /// root with its CA either way; give it where a TLS-intercepting box must be refused
    /// before SSH starts.
    #[arg(long, value_name = "FILE")]
    pub root_tls_ca: Option<PathBuf>,
}

impl EgressArgs {
    /// The route these flags and the environment give, checked now: a wrong URL, an
    /// unreadable file or an unusable CA stops the start-up, naming the flag or variable.
    pub fn route(&self) -> anyhow::Result<Route> {
        self.route_from(|name| std::env::var(name).ok())
    }

    /// [`route`](Self::route) reading variables through `get`.
    pub fn route_from(&self, get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Route> {
        let no_proxy = match &self.no_proxy {
            Some(list) => NoProxy::parse(list),
            None => first_set(&get, &NO_PROXY_VARS)
                .map(|(_, list)| NoProxy::parse(&list))
                .unwrap_or_default(),
        };
        let mut route = match self.proxy(&get)? {
            Some(proxy) => Route::via(Egress::via(proxy, no_proxy)),
            None => {
                self.refuse_orphans()?;
                Route::direct()
            }
        };
        if let Some(path) = &self.root_tls_ca {
            let config = tether::transport::tls::client_config(Some(path))
                .with_context(|| format!("--root-tls-ca {}", path.display()))?;
            route.tls = Some(config);
        }
        Ok(route)
    }

    /// The proxy: from the flag, else a variable; `None` when neither names one.
    fn proxy(&self, get: &impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<ForwardProxy>> {
        let proxy = match &self.egress_proxy {
            Some(url) if url.trim().is_empty() => return Ok(None),
            Some(url) => {
                let proxy = ForwardProxy::parse(url, "--egress-proxy")?;
                if url.contains('@') && proxy.credentials().is_some() {
                    anyhow::bail!(
                        "--egress-proxy: the URL holds credentials, which every user of this host can read on the command line: put them in a file for --egress-proxy-credentials, or in $HTTPS_PROXY"
                    );
                }
                proxy
            }
            None => match first_set(get, &PROXY_VARS) {
                Some((var, url)) => ForwardProxy::parse(&url, var)?,
                None => return Ok(None),
            },
        };
        let proxy = match &self.egress_proxy_credentials {
            Some(path) => {
                proxy.with_credentials(Credentials::read_file(path, "--egress-proxy-credentials")?)
            }
            None => proxy,
        };
        match &self.egress_proxy_ca {
            Some(path) => Ok(Some(proxy.with_ca(
                &read(path, "--egress-proxy-ca")?,
                &format!("--egress-proxy-ca {}", path.display()),
            )?)),
            None => Ok(Some(proxy)),
        }
    }

    /// Credentials or a CA without a proxy are a mistake worth stopping for: the user meant
    /// a proxy that is not configured.
    fn refuse_orphans(&self) -> anyhow::Result<()> {
        for (flag, given) in [
            (
                "--egress-proxy-credentials",
                self.egress_proxy_credentials.is_some(),
            ),
            ("--egress-proxy-ca", self.egress_proxy_ca.is_some()),
        ] {
            anyhow::ensure!(
                !given,
                "{flag} is given but no forward proxy is (--egress-proxy, or $HTTPS_PROXY)"
            );
        }
        Ok(())
    }
}

fn read(path: &Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{flag}: cannot read {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            list.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_flag_wins_over_the_variables_and_empty_means_direct() {
        let env = vars(&[
            ("HTTPS_PROXY", "http://envproxy:1"),
            ("no_proxy", "root.lan"),
        ]);
        let args = EgressArgs::default();
        let route = args.route_from(&env).expect("route");
        let proxy = route.egress.proxy.as_ref().expect("a proxy");
        assert_eq!(proxy.url().host, "envproxy");
        assert!(route.egress.proxy_for("root.lan:3024").is_none());
        let flag = EgressArgs {
            egress_proxy: Some("http://flagproxy:2".into()),
            no_proxy: Some(String::new()),
            ..Default::default()
        };
        let route = flag.route_from(&env).expect("route");
        assert!(
            route.egress.proxy_for("root.lan:3024").is_some(),
            "--no-proxy= empties it"
        );
        let direct = EgressArgs {
            egress_proxy: Some(String::new()),
            ..Default::default()
        };
        assert!(
            direct
                .route_from(&env)
                .expect("route")
                .egress
                .proxy
                .is_none()
        );
    }

    #[test]
    fn a_password_on_the_command_line_or_an_orphan_flag_is_refused() {
        let args = EgressArgs {
            egress_proxy: Some("http://u:secret@proxy:3128".into()),
            ..Default::default()
        };
        let err = args
            .route_from(vars(&[]))
            .expect_err("argv password")
            .to_string();
        assert!(
            err.contains("--egress-proxy-credentials") && !err.contains("secret"),
            "{err}"
        );
        let orphan = EgressArgs {
            egress_proxy_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        let err = orphan
            .route_from(vars(&[]))
            .expect_err("orphan")
            .to_string();
        assert!(err.starts_with("--egress-proxy-ca is given"), "{err}");
        let bad = EgressArgs::default()
            .route_from(vars(&[("https_proxy", "ftp://x")]))
            .expect_err("scheme")
            .to_string();
        assert!(bad.starts_with("https_proxy: "), "{bad}");
    }

    #[test]
    fn a_root_tls_ca_that_cannot_be_read_names_the_flag() {
        let args = EgressArgs {
            root_tls_ca: Some("no-such-ca.pem".into()),
            ..Default::default()
        };
        let err = format!(
            "{:#}",
            args.route_from(vars(&[])).expect_err("missing file")
        );
        assert!(err.contains("--root-tls-ca no-such-ca.pem"), "{err}");
    }
}
