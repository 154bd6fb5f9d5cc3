//! Building the binaries and running the components. Everything that spawns a
//! process runs on one long-lived "owner" thread ([`own`]), because
//! `PR_SET_PDEATHSIG` is tied to the thread that forked the child.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, Config};

use super::procs::{self, Proc, free_port, http_get};

const ETCD_READY: Duration = Duration::from_secs(60);
const APISERVER_READY: Duration = Duration::from_secs(180);
const KCM_READY: Duration = Duration::from_secs(120);
const START_ATTEMPTS: usize = 3;

pub enum Request {
    StartControllerManager(mpsc::Sender<Result<(), String>>),
}

pub struct Started {
    pub kubeconfig: PathBuf,
    pub server: String,
    pub config: Config,
}

/// Versions of the built binaries, as they report them.
#[derive(Debug, Clone)]
pub struct Versions {
    pub etcd: String,
    pub kube_apiserver: String,
    pub kubectl: String,
    pub helm: String,
}

/// Root of the binary cache, as in `tests/kube/build.sh`.
fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("tether");
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => PathBuf::from(home).join(".cache/tether"),
        None => std::env::temp_dir().join("tether-cache"),
    }
}

/// Runs `tests/kube/build.sh` (a no-op when the binaries are cached) under a
/// file lock, so concurrent test binaries build at most once. Returns the bin
/// directory.
pub fn build_binaries() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kube/build.sh");
    let lock_path = match std::env::var_os("TETHER_KUBE_BIN").filter(|d| !d.is_empty()) {
        Some(bin) => PathBuf::from(format!("{}.lock", bin.to_string_lossy())),
        None => cache_root().join("build.lock"),
    };
    let _lock = procs::lock_file(&lock_path)?;
    let out = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}); its output is above",
            script.display(),
            out.status
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bin = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .ok_or_else(|| format!("{} printed no bin directory", script.display()))?;
    Ok(bin)
}

/// A fresh run directory for this process, under `TETHER_KUBE_RUN_DIR`, the
/// cargo target tmpdir or the system temp dir. Removes those of dead processes.
pub fn run_dir() -> Result<PathBuf, String> {
    let base = std::env::var_os("TETHER_KUBE_RUN_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_TMPDIR").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir)
        .join("tether-kube");
    fs::create_dir_all(&base).map_err(|e| format!("creating {}: {e}", base.display()))?;
    if let Ok(entries) = fs::read_dir(&base) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.rsplit('-').next().and_then(|p| p.parse::<i32>().ok());
            // SAFETY: kill with signal 0 only checks that the process exists.
            if let Some(pid) = pid
                && unsafe { libc::kill(pid, 0) } != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
            {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    let exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "test".into());
    let exe: String = exe.chars().take(40).collect();
    // A second control plane in one process (tests/readme: a root and a leaf cluster) needs a
    // directory of its own; the pid stays last, for the clean-up above.
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = match STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
        0 => base.join(format!("{exe}-{}", std::process::id())),
        n => base.join(format!("{exe}-{n}-{}", std::process::id())),
    };
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Body of the owner thread: starts etcd and kube-apiserver, reports on
/// `ready`, then serves requests until the channel closes. Its children die
/// with it.
pub fn own(
    bin: PathBuf,
    dir: PathBuf,
    ready: mpsc::Sender<Result<Started, String>>,
    requests: mpsc::Receiver<Request>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("building a tokio runtime: {e}")));
            return;
        }
    };
    let mut attempt = 0;
    let (_etcd, _apiserver, started) = loop {
        attempt += 1;
        match boot(&rt, &bin, &dir, attempt) {
            Ok(booted) => break booted,
            Err(Boot::PortConflict(e)) if attempt < START_ATTEMPTS => {
                eprintln!("test control plane: {e}; retrying with other ports");
            }
            Err(Boot::PortConflict(e) | Boot::Failed(e)) => {
                let _ = ready.send(Err(format!("{e}\n(all logs: {})", dir.display())));
                return;
            }
        }
    };
    let kubeconfig = started.kubeconfig.clone();
    let config = started.config.clone();
    if ready.send(Ok(started)).is_err() {
        return;
    }
    let mut kcm: Option<Proc> = None;
    while let Ok(request) = requests.recv() {
        match request {
            Request::StartControllerManager(reply) => {
                let result = match &mut kcm {
                    Some(p) => p.exited().map_or(Ok(()), Err),
                    None => start_kcm(&rt, &bin, &dir, &kubeconfig, &config).map(|p| {
                        kcm = Some(p);
                    }),
                };
                let _ = reply.send(result);
            }
        }
    }
}

enum Boot {
    PortConflict(String),
    Failed(String),
}

fn failed(proc: &Proc, e: String) -> Boot {
    if proc.port_conflict() {
        Boot::PortConflict(e)
    } else {
        Boot::Failed(e)
    }
}

fn boot(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    dir: &Path,
    attempt: usize,
) -> Result<(Proc, Proc, Started), Boot> {
    let port = || free_port().map_err(Boot::Failed);
    let (etcd_client, etcd_peer, api_port) = (port()?, port()?, port()?);

    let etcd_url = format!("http://127.0.0.1:{etcd_client}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    let etcd_args: Vec<String> = vec![
        "--name=tether-test".into(),
        format!(
            "--data-dir={}",
            dir.join(format!("etcd-data-{attempt}")).display()
        ),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={peer_url}"),
        format!("--initial-advertise-peer-urls={peer_url}"),
        format!("--initial-cluster=tether-test={peer_url}"),
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
    ];
    let mut etcd = Proc::spawn("etcd", &bin.join("etcd"), &etcd_args, dir.join("etcd.log"))
        .map_err(Boot::Failed)?;
    if let Err(e) = etcd.wait_for("etcd /health", ETCD_READY, || {
        let (code, body) = http_get(([127, 0, 0, 1], etcd_client).into(), "/health")?;
        Ok((code == 200 && body.contains("true")).then_some(()))
    }) {
        return Err(failed(&etcd, e));
    }

    let server = format!("https://127.0.0.1:{api_port}");
    let pki = super::certs::generate(&dir.join("pki"), &server).map_err(Boot::Failed)?;
    let p = |path: &Path| path.display().to_string();
    let api_args: Vec<String> = vec![
        format!("--etcd-servers={etcd_url}"),
        "--bind-address=127.0.0.1".into(),
        "--advertise-address=127.0.0.1".into(),
        // The `kubernetes` Service's endpoints may not be loopback addresses.
        "--endpoint-reconciler-type=none".into(),
        format!("--secure-port={api_port}"),
        format!("--cert-dir={}", p(&dir.join("pki"))),
        format!("--tls-cert-file={}", p(&pki.serving_cert)),
        format!("--tls-private-key-file={}", p(&pki.serving_key)),
        format!("--client-ca-file={}", p(&pki.ca_cert)),
        format!("--service-account-key-file={}", p(&pki.sa_pub)),
        format!("--service-account-signing-key-file={}", p(&pki.sa_key)),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        "--api-audiences=https://kubernetes.default.svc.cluster.local".into(),
        "--authorization-mode=Node,RBAC".into(),
        "--service-cluster-ip-range=10.96.0.0/16".into(),
        "--allow-privileged=true".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ];
    let mut apiserver = Proc::spawn(
        "kube-apiserver",
        &bin.join("kube-apiserver"),
        &api_args,
        dir.join("kube-apiserver.log"),
    )
    .map_err(Boot::Failed)?;

    let config = rt
        .block_on(super::load_config(&pki.admin_kubeconfig))
        .map_err(Boot::Failed)?;
    let client = {
        let _guard = rt.enter();
        Client::try_from(config.clone()).map_err(|e| Boot::Failed(format!("admin client: {e}")))?
    };
    let readyz = || {
        let req = http::Request::get("/readyz")
            .body(Vec::new())
            .map_err(|e| e.to_string())?;
        match rt.block_on(client.request_text(req)) {
            Ok(body) if body.trim() == "ok" => Ok(Some(())),
            Ok(body) => Err(body),
            Err(e) => Err(e.to_string()),
        }
    };
    if let Err(e) = apiserver.wait_for("kube-apiserver /readyz", APISERVER_READY, readyz) {
        return Err(failed(&apiserver, e));
    }
    let started = Started {
        kubeconfig: pki.admin_kubeconfig.clone(),
        server,
        config,
    };
    Ok((etcd, apiserver, started))
}

fn start_kcm(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    dir: &Path,
    admin_kubeconfig: &Path,
    config: &Config,
) -> Result<Proc, String> {
    let kubeconfig = admin_kubeconfig.with_file_name("kube-controller-manager.kubeconfig");
    let args: Vec<String> = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--controllers={}", super::CONTROLLERS),
        "--use-service-account-credentials=false".into(),
        "--secure-port=0".into(),
        // Leader election gives an observable "started" signal: the Lease.
        "--leader-elect=true".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ];
    let mut kcm = Proc::spawn(
        "kube-controller-manager",
        &bin.join("kube-controller-manager"),
        &args,
        dir.join("kube-controller-manager.log"),
    )?;
    let client = {
        let _guard = rt.enter();
        Client::try_from(config.clone()).map_err(|e| format!("admin client: {e}"))?
    };
    let leases: Api<Lease> = Api::namespaced(client, "kube-system");
    kcm.wait_for("kube-controller-manager leader lease", KCM_READY, || {
        let lease = rt
            .block_on(leases.get_opt("kube-controller-manager"))
            .map_err(|e| e.to_string())?;
        let holder = lease
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty());
        Ok(holder.map(|_| ()))
    })
    .map_err(|e| format!("{e}\n(all logs: {})", dir.display()))?;
    Ok(kcm)
}

/// `<binary> <args>` first line of output, or the error.
fn version_of(bin: &Path, name: &str, args: &[&str]) -> String {
    match Command::new(bin.join(name)).args(args).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string(),
        Err(e) => format!("{name}: {e}"),
    }
}

pub fn versions(bin: &Path) -> Versions {
    Versions {
        etcd: version_of(bin, "etcd", &["--version"]),
        kube_apiserver: version_of(bin, "kube-apiserver", &["--version"]),
        kubectl: version_of(bin, "kubectl", &["version", "--client"]),
        helm: version_of(bin, "helm", &["version", "--short"]),
    }
}
