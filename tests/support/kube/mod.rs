//! A real Kubernetes control plane for integration tests: etcd,
//! kube-apiserver and (on request) kube-controller-manager, built from the
//! pinned Go module in `tests/kube/` and run on free loopback ports.
//!
//! ```ignore
//! mod support;
//!
//! #[tokio::test]
//! async fn works() {
//!     let cp = support::kube::control_plane().await;
//!     let ns = cp.new_namespace("works").await;
//!     let client = cp.kube_client();
//!     // ...
//! }
//! ```
//!
//! One control plane per test binary, started lazily by the first test that
//! asks and shared by the rest; each test gets its own namespace. The
//! components die with the test binary (`PR_SET_PDEATHSIG`), whether tests pass,
//! panic or the binary is killed. Logs, certificates and the admin kubeconfig
//! live in [`ControlPlane::dir`]; run directories of dead test processes are
//! removed at the next start.

pub mod api_writes;
mod certs;
mod server;

use super::procs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub use server::Versions;

/// Controllers kube-controller-manager runs in tests.
pub const CONTROLLERS: &str = "endpointslice,endpoint,serviceaccount,garbagecollector,namespace";

/// A running control plane. Get the shared one with [`control_plane`].
pub struct ControlPlane {
    dir: PathBuf,
    bin: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    config: Config,
    requests: Mutex<Option<mpsc::Sender<server::Request>>>,
    owner: Mutex<Option<JoinHandle<()>>>,
    namespaces: AtomicU32,
}

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The control plane of this test binary, started (and the binaries built) on
/// first use. Panics, naming the log files, if it cannot start.
pub async fn control_plane() -> &'static ControlPlane {
    match tokio::task::spawn_blocking(control_plane_blocking).await {
        Ok(cp) => cp,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("control plane start task failed: {e}"),
    }
}

/// Blocking form of [`control_plane`].
pub fn control_plane_blocking() -> &'static ControlPlane {
    match SHARED.get_or_init(ControlPlane::start) {
        Ok(cp) => cp,
        Err(e) => panic!("test control plane failed to start: {e}"),
    }
}

impl ControlPlane {
    /// Builds missing binaries and starts a new, private control plane. It
    /// stops when dropped (or when the process exits).
    pub fn start() -> Result<Self, String> {
        let bin = server::build_binaries()?;
        let dir = server::run_dir()?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let (req_tx, req_rx) = mpsc::channel();
        let owner = {
            let (bin, dir) = (bin.clone(), dir.clone());
            std::thread::Builder::new()
                .name("tether-control-plane".into())
                .spawn(move || server::own(bin, dir, ready_tx, req_rx))
                .map_err(|e| format!("spawning the control-plane thread: {e}"))?
        };
        let started = ready_rx
            .recv()
            .map_err(|_| format!("control-plane thread died; logs in {}", dir.display()))??;
        Ok(Self {
            dir,
            bin,
            kubeconfig: started.kubeconfig,
            server: started.server,
            config: started.config,
            requests: Mutex::new(Some(req_tx)),
            owner: Mutex::new(Some(owner)),
            namespaces: AtomicU32::new(0),
        })
    }

    /// A new client with admin (`system:masters`) rights. Call it inside the
    /// test's tokio runtime (a client is tied to the runtime it was made in).
    pub fn kube_client(&self) -> Client {
        Client::try_from(self.config.clone()).expect("admin kube client")
    }

    /// The admin client configuration.
    pub fn kube_config(&self) -> Config {
        self.config.clone()
    }

    /// Admin kubeconfig, usable with `kubectl --kubeconfig` or `KUBECONFIG=`.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> &str {
        &self.server
    }

    /// Run directory: logs (`*.log`), certificates, kubeconfigs, etcd data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the component logs are (same as [`Self::dir`]).
    pub fn log_dir(&self) -> &Path {
        &self.dir
    }

    /// Directory holding the built binaries (etcd, kube-apiserver,
    /// kube-controller-manager, kubectl, helm).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// Runs the built `kubectl` against this control plane as admin.
    pub fn kubectl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.tool("kubectl", args)
    }

    /// Runs the built `helm` against this control plane as admin.
    pub fn helm<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.tool("helm", args)
    }

    fn tool<I, S>(&self, name: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let helm_home = self.dir.join("helm");
        Command::new(self.bin.join(name))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", helm_home.join("config"))
            .env("HELM_DATA_HOME", helm_home.join("data"))
            .output()
            .unwrap_or_else(|e| panic!("running {name}: {e}"))
    }

    /// Creates a namespace unique to this control plane (`<prefix>-<n>`) and
    /// its `default` ServiceAccount, and returns its name.
    pub async fn new_namespace(&self, prefix: &str) -> String {
        let n = self.namespaces.fetch_add(1, Ordering::Relaxed);
        let mut prefix: String = prefix
            .to_ascii_lowercase()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        prefix.truncate(40);
        let name = format!("{}-{n}", prefix.trim_matches('-'));
        let client = self.kube_client();
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some([("tether.dev/test".to_string(), "true".to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
        // Pods need it (ServiceAccount admission); without kube-controller-manager
        // nobody else creates it.
        ensure_service_account(&client, &name, "default").await;
        name
    }

    /// A client authenticated as ServiceAccount `ns/name` (created if missing)
    /// with a token from the TokenRequest API. It has only the rights RBAC
    /// grants that ServiceAccount.
    pub async fn client_for_service_account(&self, ns: &str, name: &str) -> Client {
        let token = self.service_account_token(ns, name, &[]).await;
        let mut config = self.config.clone();
        config.default_namespace = ns.to_string();
        config.auth_info = AuthInfo {
            token: Some(token.into()),
            ..Default::default()
        };
        Client::try_from(config).expect("service-account kube client")
    }

    /// A token of ServiceAccount `ns/name` (created if missing) from the TokenRequest API,
    /// valid an hour, issued for `audiences` (none: the API server's own).
    pub async fn service_account_token(&self, ns: &str, name: &str, audiences: &[&str]) -> String {
        let admin = self.kube_client();
        ensure_service_account(&admin, ns, name).await;
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                audiences: Some(audiences.iter().map(|a| (*a).to_owned()).collect())
                    .filter(|a: &Vec<String>| !a.is_empty()),
                ..Default::default()
            }),
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(admin, ns)
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("requesting a token for {ns}/{name}: {e}"))
            .status
            .and_then(|s| s.token)
            .expect("TokenRequest without a token")
    }

    /// Starts kube-controller-manager (once; later calls return at once) with
    /// the controllers a test cluster needs: EndpointSlices and Endpoints from
    /// Services and Pods, ServiceAccounts, garbage collection of owned objects
    /// and namespace deletion. Returns when it holds its leader lease.
    pub async fn start_controller_manager(&self) {
        let (tx, rx) = mpsc::channel();
        {
            let requests = self.requests.lock().expect("request channel lock");
            let sender = requests.as_ref().expect("control plane is stopped");
            sender
                .send(server::Request::StartControllerManager(tx))
                .expect("control-plane thread is gone");
        }
        tokio::task::spawn_blocking(move || rx.recv())
            .await
            .expect("waiting for kube-controller-manager")
            .expect("control-plane thread is gone")
            .unwrap_or_else(|e| panic!("kube-controller-manager failed to start: {e}"));
    }

    /// Versions of the running binaries.
    pub fn versions(&self) -> Versions {
        server::versions(&self.bin)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Closing the channel ends the owner thread, which kills its children.
        if let Ok(mut requests) = self.requests.lock() {
            requests.take();
        }
        if let Ok(mut owner) = self.owner.lock()
            && let Some(handle) = owner.take()
        {
            let _ = handle.join();
        }
    }
}

async fn ensure_service_account(client: &Client, ns: &str, name: &str) {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..Default::default()
        },
        ..Default::default()
    };
    match Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating ServiceAccount {ns}/{name}: {e}"),
    }
}

/// Reads an admin kubeconfig into a client configuration.
async fn load_config(path: &Path) -> Result<Config, String> {
    let kubeconfig = Kubeconfig::read_from(path)
        .map_err(|e| format!("reading kubeconfig {}: {e}", path.display()))?;
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("loading kubeconfig {}: {e}", path.display()))
}
