//! Issue #5's end-to-end tests of the operator, against a real kube-apiserver, with every
//! component a real process: `tether proxy` processes behind a real haproxy, following the
//! EndpointSlices of their Service; `tether operator` processes reconciling the example
//! ReverseTunnel; `kubectl` and `tether dial` as users run them.
//!
//! - [`example_connects_and_follows_the_proxy_endpoints`]: `kubectl apply -f
//!   examples/reversetunnel.yaml` shows 3/3 Connected in `kubectl get rt`, a dial goes through
//!   once the allow-list admits it, and the tunnel follows the endpoints 3 -> 5 -> 2 while nobody
//!   touches the ReverseTunnel.
//! - [`standby_takes_over_after_kill_9`]: two operators share a Lease; the leader dies by
//!   SIGKILL and the standby holds the Lease, and the tunnels, within a bound.
//! - [`steady_state_is_quiet`]: a Connected ReverseTunnel writes nothing to the API over a quiet
//!   minute but the Lease renewals, counted by the API server's own `apiserver_request_total`.
//!
//! The proxies and the operators listen on port 0 and print what they got; haproxy adopts a
//! listener the test bound (`bind fd@3`), and proxies join it through its runtime API. The API
//! server refuses loopback endpoint addresses, so the slices name TEST-NET-1 addresses
//! (192.0.2.x) with the proxies' real ports; peering is off, agents learn proxy IDs from the
//! proxies' discovery messages and reach them through haproxy.
//!
//! The tests run one at a time ([`SERIAL`]): the quiet minute reads cluster-wide counters, and
//! the machine is small. Process logs are in the control plane's run directory, `ha-<ns>/`.

mod common;
#[allow(dead_code)]
#[path = "support/procs.rs"]
mod procs;
#[path = "common/tunnel_e2e.rs"]
mod tunnel_e2e;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use common::ControlPlane;
use procs::Files;
use tether::demo::{Pki, echo_server};
use tether::identity::Identity;
use tether::operator::crd::ReverseTunnel;
use tether::operator::crd::reverse_tunnel::Phase;
use tether::protocol::ClusterName;
use tunnel_e2e::{DEADLINE, create_secrets, eventually};

/// How long any one condition may take to come true on a loaded two-core machine.
/// The Service the proxies follow.
const SERVICE: &str = "tether-proxy";
/// Proxy IDs (pod names); haproxy slot `i` is `IDS[i]`.
const IDS: [&str; 5] = ["p1", "p2", "p3", "p4", "p5"];
/// The example's names.
const RT: &str = "to-root";
const LEAF: &str = "leaf-1";
const LEASE: &str = "tether-operator";

/// One test at a time (a tokio mutex: no poisoning when a test fails).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process: stderr (and stdout lines) appended to a log file, stdout lines also handed
/// to [`Process::printed`]. SIGKILLed and reaped on drop, and killed by the kernel if the
/// thread that spawned it (a test's runtime thread) ends first (`PR_SET_PDEATHSIG`).
struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Spawns `cmd`; with `inherit`, that descriptor becomes the child's fd 3.
    fn spawn(name: &str, mut cmd: Command, log: PathBuf, inherit: Option<RawFd>) -> Process {
        let err = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err.try_clone().expect("dup log"));
        // SAFETY: only async-signal-safe calls (prctl, getppid, fcntl, dup2, _exit) run between
        // fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() == 1 {
                    libc::_exit(1);
                }
                if let Some(fd) = inherit {
                    // dup2 clears close-on-exec on the copy; fd 3 itself needs it cleared.
                    let ok = if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0) == 0
                    } else {
                        libc::dup2(fd, 3) == 3
                    };
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        let mut copy = err;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(copy, "[stdout] {line}");
                let _ = tx.send(line);
            }
        });
        Process {
            name: name.to_owned(),
            child,
            log,
            lines,
        }
    }

    /// Waits (blocking, at most 30 s) for a stdout line starting with `prefix`; the rest of it.
    fn printed(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return rest.trim().to_owned();
                    }
                }
                Err(e) => panic!(
                    "{} printed no {prefix:?} line ({e}); log: {}",
                    self.name,
                    self.log.display()
                ),
            }
        }
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on our own, not yet reaped, child.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "signalling {}", self.name);
    }

    /// Waits for the process to exit (it was signalled).
    async fn exited(&mut self) -> std::process::ExitStatus {
        let name = self.name.clone();
        eventually(&format!("{name} to exit"), || {
            let status = self.child.try_wait().expect("try_wait");
            async move { status }
        })
        .await
    }

    /// Panics (naming the log) if the process has already exited.
    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited: {status}; log: {}",
                self.name,
                self.log.display()
            );
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real haproxy in TCP mode: `slots` backend servers, all in maintenance until
/// [`Lb::enable`] points one at a proxy through the runtime API.
struct Lb {
    _process: Process,
    addr: SocketAddr,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Lb {
    fn start(slots: usize, logs: &Path) -> Lb {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("admin.sock");
        // The frontend's port stays bound from here on: haproxy adopts this very socket.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let servers: String = (0..slots)
            .map(|i| format!("  server s{i} 127.0.0.1:1 disabled\n"))
            .collect();
        let config = format!(
            "global\n  maxconn 4000\n  stats socket {} level admin\n\
             defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 120s\n  timeout server 120s\n  retries 3\n  option redispatch 1\n\
             frontend tunnels\n  bind fd@3\n  default_backend proxies\n\
             backend proxies\n  balance random\n  default-server check inter 100ms fall 1 rise 1\n{servers}",
            socket.display()
        );
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).expect("write haproxy.cfg");
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&path);
        let mut process = Process::spawn(
            "haproxy",
            cmd,
            logs.join("haproxy.log"),
            Some(listener.as_raw_fd()),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let lb = loop {
            process.assert_running();
            if UnixStream::connect(&socket).is_ok() {
                break Lb {
                    _process: process,
                    addr,
                    socket,
                    _dir: dir,
                };
            }
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(lb.command("show info").contains("Name: HAProxy"));
        lb
    }

    /// One runtime API command; its answer.
    fn command(&self, command: &str) -> String {
        let mut s = UnixStream::connect(&self.socket).expect("haproxy admin socket");
        writeln!(s, "{command}").expect("write command");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read answer");
        out
    }

    /// Points slot `slot` at `addr` and takes it out of maintenance.
    fn enable(&self, slot: usize, addr: SocketAddr) {
        let out = self.command(&format!(
            "set server proxies/s{slot} addr {} port {}",
            addr.ip(),
            addr.port()
        ));
        assert!(out.contains("changed"), "haproxy: {out}");
        let out = self.command(&format!("set server proxies/s{slot} state ready"));
        assert!(out.trim().is_empty(), "haproxy: {out}");
    }

    /// Puts slot `slot` in maintenance: no new connections go there.
    fn disable(&self, slot: usize) {
        let out = self.command(&format!("set server proxies/s{slot} state maint"));
        assert!(out.trim().is_empty(), "haproxy: {out}");
    }
}

// ---------------------------------------------------------------------------------------------
// The root cluster: proxies, their Service and EndpointSlices, haproxy

struct ProxyProcess {
    process: Process,
    admin: SocketAddr,
}

struct Root {
    ns: String,
    kubeconfig: PathBuf,
    logs: PathBuf,
    files: Files,
    lb: Lb,
    slices: Api<EndpointSlice>,
    proxies: BTreeMap<String, ProxyProcess>,
}

/// The EndpointSlice of proxy pod `id` (slot `slot`): a TEST-NET-1 address, the real port.
fn slice(id: &str, slot: usize, port: u16) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("{SERVICE}-{id}"),
            "labels": {"kubernetes.io/service-name": SERVICE},
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [format!("192.0.2.{}", slot + 1)],
            "conditions": {"ready": true},
            "targetRef": {"kind": "Pod", "name": id},
        }],
        "ports": [{"name": "tunnel", "port": port, "protocol": "TCP"}],
    }))
    .expect("valid EndpointSlice")
}

impl Root {
    /// haproxy with a slot per [`IDS`], the proxies' Service, and the first `n` proxies.
    async fn start(cp: &ControlPlane, client: &Client, ns: &str, pki: &Pki, n: usize) -> Root {
        let logs = cp.dir().join(format!("ha-{ns}"));
        std::fs::create_dir_all(&logs).expect("log dir");
        eprintln!("[{ns}] process logs in {}", logs.display());
        let files = Files::write(pki, &IDS);
        Identity::generate_client(&pki.root, "alice", Duration::from_secs(3600))
            .expect("client identity")
            .save(&files.path("alice"))
            .expect("save");
        // A Service without a selector: its EndpointSlices are the test's to write.
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": SERVICE},
            "spec": {"ports": [{"name": "tunnel", "port": 3024, "protocol": "TCP"}]},
        }))
        .expect("service");
        Api::<Service>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &service)
            .await
            .expect("creating the Service");
        let mut root = Root {
            ns: ns.to_owned(),
            kubeconfig: cp.kubeconfig_path().to_owned(),
            lb: Lb::start(IDS.len(), &logs),
            logs,
            files,
            slices: Api::namespaced(client.clone(), ns),
            proxies: BTreeMap::new(),
        };
        for id in &IDS[..n] {
            root.add(id).await;
        }
        root
    }

    /// Starts proxy `id`, puts it behind haproxy, then publishes its endpoint.
    async fn add(&mut self, id: &str) {
        let slot = IDS.iter().position(|i| *i == id).expect("known id");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
        cmd.args(["proxy", "--cluster", "root", "--proxy-id", id])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--identity")
            .arg(self.files.path(id))
            .arg("--trust-dir")
            .arg(self.files.path("trust"))
            .args(["--peers-service", SERVICE, "--peers-namespace", &self.ns])
            .args(["--shutdown-grace", "1s"])
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("POD_NAMESPACE")
            .env_remove("TETHER_PEERS_SERVICE");
        let mut process = Process::spawn(id, cmd, self.logs.join(format!("{id}.log")), None);
        let listen: SocketAddr = process.printed("listening on").parse().expect("address");
        let admin: SocketAddr = process
            .printed("admin endpoint on")
            .parse()
            .expect("address");
        // Before it gets traffic, the new proxy announces the proxies whose endpoints it found
        // in its first list (and itself): a proxy that starts after its peers' slices exist
        // (every restart) must not announce only itself until the next slice change.
        let mut want: Vec<String> = self.proxies.keys().cloned().collect();
        want.push(id.to_owned());
        want.sort();
        eventually(&format!("{id} to announce {want:?}"), || {
            let peers: Option<Vec<String>> = procs::admin_get(admin, "/status")
                .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
                .and_then(|s| serde_json::from_value(s["peers"].clone()).ok());
            let done = peers.is_some_and(|mut p| {
                p.sort();
                p == want
            });
            async move { done.then_some(()) }
        })
        .await;
        self.lb.enable(slot, listen);
        self.slices
            .create(&PostParams::default(), &slice(id, slot, listen.port()))
            .await
            .expect("creating the EndpointSlice");
        self.proxies
            .insert(id.to_owned(), ProxyProcess { process, admin });
    }

    /// Scales proxy `id` away: its endpoint goes, haproxy stops sending to it, then it gets
    /// SIGTERM (drain) and exits.
    async fn remove(&mut self, id: &str) {
        let slot = IDS.iter().position(|i| *i == id).expect("known id");
        self.slices
            .delete(&format!("{SERVICE}-{id}"), &DeleteParams::default())
            .await
            .expect("deleting the EndpointSlice");
        self.lb.disable(slot);
        let mut proxy = self.proxies.remove(id).expect("running proxy");
        proxy.process.signal(libc::SIGTERM);
        proxy.process.exited().await;
    }

    /// Tunnel IDs from the leaf on each live proxy, from its admin `/status`.
    fn tunnels(&mut self) -> BTreeMap<String, Vec<u64>> {
        let mut all = BTreeMap::new();
        for (id, proxy) in &mut self.proxies {
            proxy.process.assert_running();
            let status: serde_json::Value = procs::admin_get(proxy.admin, "/status")
                .and_then(|body| serde_json::from_str(&body).ok())
                .unwrap_or_default();
            let ids: Vec<u64> = status["sites"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["name"] == LEAF)
                .flat_map(|s| s["tunnels"].as_array().cloned().unwrap_or_default())
                .filter_map(|t| t["id"].as_u64())
                .collect();
            all.insert(id.clone(), ids);
        }
        all
    }

    /// Waits until every live proxy holds exactly one tunnel from the leaf.
    async fn wait_all_hold(&mut self) -> BTreeMap<String, Vec<u64>> {
        let n = self.proxies.len();
        eventually(&format!("a tunnel on each of the {n} proxies"), || {
            let tunnels = self.tunnels();
            async move { tunnels.values().all(|t| t.len() == 1).then_some(tunnels) }
        })
        .await
    }

    /// `tether dial leaf-1 <target>` through haproxy: sends `message`, closes its side, and
    /// returns what came back, or the exit status and stderr.
    async fn dial(&self, target: SocketAddr, message: &[u8]) -> Result<Vec<u8>, String> {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["dial", LEAF, &target.to_string(), "--root-cluster", "root"])
            .args(["--proxy", &self.lb.addr.to_string()])
            .arg("--identity")
            .arg(self.files.path("alice"))
            .arg("--root-ca")
            .arg(self.files.path("root-ca.pub"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("tether dial starts");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(message).await.map_err(|e| e.to_string())?;
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .map_err(|_| "tether dial timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

/// `tether operator` for `ns`; with `lease`, competing for the Lease as
/// `(identity, duration, grace)` (no duration: the defaults).
fn spawn_operator(
    cp: &ControlPlane,
    ns: &str,
    logs: &Path,
    identity: &str,
    lease: Option<Option<(&str, &str)>>,
) -> Process {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.arg("operator")
        .arg("--kubeconfig")
        .arg(cp.kubeconfig_path())
        .args(["--namespace", ns, "--identity", identity]);
    for var in [
        "KUBECONFIG",
        "POD_NAME",
        "POD_NAMESPACE",
        "TETHER_NAMESPACE",
        "TETHER_LEASE_NAME",
    ] {
        cmd.env_remove(var);
    }
    if let Some(times) = lease {
        cmd.args(["--lease-name", LEASE, "--lease-namespace", ns]);
        if let Some((duration, grace)) = times {
            cmd.args(["--lease-duration", duration, "--lease-grace", grace]);
        }
    }
    Process::spawn(identity, cmd, logs.join(format!("{identity}.log")), None)
}

// ---------------------------------------------------------------------------------------------
// kubectl and the API

/// Runs kubectl off the runtime threads; its stdout, or a panic with its stderr.
async fn kubectl(cp: &'static ControlPlane, args: Vec<String>) -> String {
    let shown = args.join(" ");
    let out = tokio::task::spawn_blocking(move || cp.kubectl(&args))
        .await
        .expect("kubectl task");
    assert!(
        out.status.success(),
        "kubectl {shown}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// CRDs from `crds/` as users install them.
async fn install_crds(cp: &'static ControlPlane) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/crds");
    kubectl(cp, args(&["apply", "-f", dir])).await;
    kubectl(
        cp,
        args(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "-f",
            dir,
        ]),
    )
    .await;
}

/// `kubectl apply -f examples/reversetunnel.yaml`, the real file with only `proxyAddress`
/// pointed at haproxy.
async fn apply_example(cp: &'static ControlPlane, root: &Root) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/reversetunnel.yaml"
    ))
    .expect("reading the example");
    let original = "proxyAddress: tunnel.root.example.com:3024";
    assert!(text.contains(original), "the example changed: {text}");
    let text = text.replace(original, &format!("proxyAddress: {}", root.lb.addr));
    let path = root.files.path("reversetunnel.yaml");
    std::fs::write(&path, text).expect("write manifest");
    let path = path.to_string_lossy().into_owned();
    kubectl(cp, args(&["apply", "-n", &root.ns, "-f", &path])).await;
}

/// STATUS and PROXIES of the example's row in `kubectl get reversetunnels`.
async fn kubectl_get_rt(cp: &'static ControlPlane, ns: &str) -> Option<(String, String)> {
    let table = kubectl(cp, args(&["get", "reversetunnels", "-n", ns])).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    let status = header.iter().position(|c| *c == "STATUS")?;
    let proxies = header.iter().position(|c| *c == "PROXIES")?;
    let row: Vec<&str> = lines
        .find(|l| l.split_whitespace().next() == Some(RT))?
        .split_whitespace()
        .collect();
    Some((row.get(status)?.to_string(), row.get(proxies)?.to_string()))
}

/// Waits until `kubectl get rt` shows the example Connected with `proxies` (e.g. `3/3`).
async fn wait_kubectl_connected(cp: &'static ControlPlane, ns: &str, proxies: &str) {
    let start = Instant::now();
    loop {
        let seen = kubectl_get_rt(cp, ns).await;
        if let Some((status, ready)) = &seen
            && status == "Connected"
            && ready == proxies
        {
            return;
        }
        if start.elapsed() > DEADLINE {
            let out = cp.kubectl(["get", "rt", "-n", ns, "-o", "yaml"]);
            panic!(
                "timed out after {DEADLINE:?} waiting for kubectl get rt: Connected {proxies}; last seen {seen:?}; the object:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Everything a test needs before the operator runs: CRDs, Secrets, the root with `n` proxies.
async fn setup(prefix: &str, n: usize) -> (&'static ControlPlane, Client, String, Root) {
    let cp = common::control_plane().await;
    let client = cp.kube_client();
    let ns = cp.new_namespace(prefix).await;
    install_crds(cp).await;
    let pki = Pki::generate(
        ClusterName::new("root").expect("name"),
        ClusterName::new(LEAF).expect("name"),
    )
    .expect("pki");
    create_secrets(&client, &ns, &pki).await;
    let root = Root::start(cp, &client, &ns, &pki, n).await;
    (cp, client, ns, root)
}

// ---------------------------------------------------------------------------------------------
// 1. The example, a dial, and scaling the proxies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_connects_and_follows_the_proxy_endpoints() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root) = setup("ha-example", 3).await;
    let _operator = spawn_operator(cp, &ns, &root.logs, "operator", None);

    let applied = Instant::now();
    apply_example(cp, &root).await;
    wait_kubectl_connected(cp, &ns, "3/3").await;
    let to_3 = applied.elapsed();
    eprintln!("[{ns}] kubectl apply -> `kubectl get rt` Connected 3/3 in {to_3:?}");
    let tunnels = root.wait_all_hold().await;
    eprintln!("[{ns}] tunnels on the proxies: {tunnels:?}");

    // The example allows nothing on loopback: the dial is refused by the agent.
    let echo = echo_server().await.expect("echo server");
    let message = b"through the reverse tunnel\n";
    let refused = root.dial(echo, message).await;
    let error = refused.expect_err("a dial outside the example's allow-list went through");
    assert!(error.contains("is forbidden"), "{error}");
    // The client learns only that it is forbidden; the proxy's log says by what.
    let why = format!("forbidden by the agent's allow-list: {echo} is not in");
    eventually("the proxy's log naming the allow-list", || {
        let logged = root
            .proxies
            .values()
            .any(|p| std::fs::read_to_string(&p.process.log).is_ok_and(|log| log.contains(&why)));
        async move { logged.then_some(()) }
    })
    .await;

    // Allow it, as a user would; the running agent takes the edit.
    let rule = format!("127.0.0.1/32:{}", echo.port());
    let patch = json!([{"op": "add", "path": "/spec/allow/-", "value": rule}]).to_string();
    let edited = Instant::now();
    kubectl(
        cp,
        args(&["patch", "rt", RT, "-n", &ns, "--type=json", "-p", &patch]),
    )
    .await;
    let echoed = eventually("a dial through the tunnel", || async {
        root.dial(echo, message).await.ok()
    })
    .await;
    assert_eq!(echoed, message);
    eprintln!(
        "[{ns}] allow-list edit -> a dial through `tether dial` echoed in {:?}",
        edited.elapsed()
    );
    assert_eq!(
        root.tunnels(),
        tunnels,
        "the allow-list edit replaced tunnels"
    );

    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let generation = api.get(RT).await.expect("get").metadata.generation;

    // 3 -> 5: new pods, new endpoints; nothing touches the ReverseTunnel.
    let scaled = Instant::now();
    root.add("p4").await;
    root.add("p5").await;
    wait_kubectl_connected(cp, &ns, "5/5").await;
    eprintln!(
        "[{ns}] endpoints 3 -> 5: `kubectl get rt` 5/5 in {:?}",
        scaled.elapsed()
    );
    let tunnels = root.wait_all_hold().await;
    assert_eq!(tunnels.len(), 5);

    // 5 -> 2: endpoints of p1..p3 go, then the pods (SIGTERM, drain).
    let scaled = Instant::now();
    for id in ["p1", "p2", "p3"] {
        root.remove(id).await;
    }
    wait_kubectl_connected(cp, &ns, "2/2").await;
    eprintln!(
        "[{ns}] endpoints 5 -> 2: `kubectl get rt` 2/2 in {:?}",
        scaled.elapsed()
    );
    let rt = api.get(RT).await.expect("get");
    let listed: Vec<&str> = rt
        .status
        .as_ref()
        .expect("status")
        .proxies
        .iter()
        .map(|p| p.id.as_str())
        .collect();
    assert_eq!(listed, ["p4", "p5"]);
    let tunnels = root.wait_all_hold().await;
    assert_eq!(tunnels.keys().collect::<Vec<_>>(), ["p4", "p5"]);
    assert_eq!(
        rt.metadata.generation, generation,
        "the ReverseTunnel's spec changed while scaling"
    );
    let echoed = root.dial(echo, message).await.expect("a dial after 5 -> 2");
    assert_eq!(echoed, message);
}

// ---------------------------------------------------------------------------------------------
// 2. Leader failover

/// The Lease in the failover test: renewed every 4 s, expires 6 s after the last renewal.
const FAILOVER_LEASE: (&str, &str) = ("6s", "2s");
/// Bound on kill -9 -> tunnels back on every proxy: the Lease may have just been renewed
/// (6 s), the standby waits up to 1 s before taking an expired Lease (kube-lease-manager's
/// random back-off), and the agent needs a few hundred ms per proxy; 5 s of slack on top.
const FAILOVER_BOUND: Duration = Duration::from_secs(11);

/// A status write seen by a watch: when, the phase, and PROXIES (`3/3`).
type StatusWrite = (Instant, Option<Phase>, String);

async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt(LEASE)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_after_kill_9() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root) = setup("ha-failover", 3).await;
    let mut operators: BTreeMap<String, Process> = ["operator-a", "operator-b"]
        .into_iter()
        .map(|name| {
            let process = spawn_operator(cp, &ns, &root.logs, name, Some(Some(FAILOVER_LEASE)));
            (name.to_owned(), process)
        })
        .collect();
    apply_example(cp, &root).await;
    wait_kubectl_connected(cp, &ns, "3/3").await;
    let before = root.wait_all_hold().await;

    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let leader = eventually("a Lease holder", || lease_holder(&leases)).await;
    let standby = operators
        .keys()
        .find(|n| **n != leader)
        .expect("standby")
        .clone();
    let lease = leases.get(LEASE).await.expect("lease");
    eprintln!(
        "[{ns}] leader {leader}, standby {standby}; Lease {:?}",
        lease.spec
    );

    // Every write to the ReverseTunnel from here on, as it happens.
    let api: Api<ReverseTunnel> = Api::namespaced(client.clone(), &ns);
    let version = api
        .get(RT)
        .await
        .expect("get")
        .resource_version()
        .expect("rv");
    let writes: Arc<Mutex<Vec<StatusWrite>>> = Arc::default();
    let watcher = tokio::spawn({
        let (api, writes) = (api.clone(), writes.clone());
        async move {
            let mut events = api
                .watch(
                    &WatchParams::default().fields("metadata.name=to-root"),
                    &version,
                )
                .await
                .expect("watch")
                .boxed();
            while let Ok(Some(event)) = events.try_next().await {
                if let WatchEvent::Modified(rt) = event {
                    let status = rt.status.unwrap_or_default();
                    let ready = status.proxies_ready.unwrap_or_default();
                    writes
                        .lock()
                        .expect("lock")
                        .push((Instant::now(), status.phase, ready));
                }
            }
        }
    });

    let mut dead = operators.remove(&leader).expect("leader process");
    let renewed = leases
        .get(LEASE)
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.renew_time)
        .expect("renewTime");
    let killed = Instant::now();
    dead.signal(libc::SIGKILL);
    let since_renewal = std::time::SystemTime::now()
        .duration_since(renewed.0.into())
        .unwrap_or_default();
    let old: BTreeSet<u64> = before.values().flatten().copied().collect();
    let (mut gone, mut took_lease, mut back) = (None, None, None);
    while back.is_none() || took_lease.is_none() {
        assert!(
            killed.elapsed() < DEADLINE,
            "no takeover after {DEADLINE:?}: lease {took_lease:?}, tunnels {:?}",
            root.tunnels()
        );
        let tunnels = root.tunnels();
        if gone.is_none() && tunnels.values().flatten().all(|t| !old.contains(t)) {
            gone = Some(killed.elapsed());
        }
        if took_lease.is_none() && lease_holder(&leases).await.as_deref() == Some(&standby) {
            took_lease = Some(killed.elapsed());
        }
        if back.is_none()
            && tunnels
                .values()
                .all(|t| t.len() == 1 && !old.contains(&t[0]))
        {
            back = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (gone, took_lease, back) = (
        gone.expect("old tunnels gone before new ones are all there"),
        took_lease.expect("lease"),
        back.expect("back"),
    );
    wait_kubectl_connected(cp, &ns, "3/3").await;
    // The status the dead leader wrote last stays until the standby's first write; the
    // standby then writes Pending/Connecting before Connected 3/3.
    let reconnected = eventually("the standby's Connected 3/3 status", || {
        let writes = writes.lock().expect("lock").clone();
        async move {
            let connected = Some(Phase::Connected);
            let first_down = writes.iter().position(|(_, p, _)| *p != connected)?;
            writes[first_down..]
                .iter()
                .find(|(_, p, r)| *p == connected && r == "3/3")
                .map(|(at, _, _)| at.duration_since(killed))
        }
    })
    .await;
    watcher.abort();
    let history: Vec<String> = writes
        .lock()
        .expect("lock")
        .iter()
        .map(|(at, p, r)| format!("+{:?} {p:?} {r}", at.duration_since(killed)))
        .collect();
    eprintln!(
        "[{ns}] kill -9 {leader} (Lease {}/grace {}, last renewed {since_renewal:?} before \
         the kill): its tunnels closed after {gone:?}; \
         {standby} held the Lease after {took_lease:?}; tunnels back on all 3 proxies after \
         {back:?}; ReverseTunnel status Connected 3/3 again after {reconnected:?}; \
         status writes since the kill: {history:?}",
        FAILOVER_LEASE.0, FAILOVER_LEASE.1
    );
    assert!(
        back <= FAILOVER_BOUND,
        "failover took {back:?}, more than {FAILOVER_BOUND:?}"
    );
    assert!(reconnected <= FAILOVER_BOUND + Duration::from_secs(2));
    operators
        .get_mut(&standby)
        .expect("standby")
        .assert_running();
    dead.exited().await;
}

// ---------------------------------------------------------------------------------------------
// 3. Quiet steady state

const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];
/// The quiet window.
const QUIET: Duration = Duration::from_secs(60);
/// `tether operator`'s default Lease: 15 s, renewed 5 s before expiry, so every 10 s.
const RENEWAL: Duration = Duration::from_secs(10);

/// `apiserver_request_total` of write verbs, by `resource[/subresource] VERB CODE`.
async fn write_counts(client: &Client) -> BTreeMap<String, f64> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("request");
    let text = client.request_text(request).await.expect("GET /metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    let mut counts = BTreeMap::new();
    for sample in scrape
        .samples
        .iter()
        .filter(|s| s.metric == "apiserver_request_total")
    {
        let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_owned();
        let verb = label("verb");
        if !WRITE_VERBS.contains(&verb.as_str()) {
            continue;
        }
        let mut resource = label("resource");
        let sub = label("subresource");
        if !sub.is_empty() {
            resource = format!("{resource}/{sub}");
        }
        let prometheus_parse::Value::Counter(v) = sample.value else {
            continue;
        };
        *counts
            .entry(format!("{resource} {verb} {}", label("code")))
            .or_default() += v;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_state_is_quiet() {
    let _serial = SERIAL.lock().await;
    let (cp, client, ns, mut root) = setup("ha-quiet", 3).await;
    let mut operator = spawn_operator(cp, &ns, &root.logs, "operator-q", Some(None));
    apply_example(cp, &root).await;
    wait_kubectl_connected(cp, &ns, "3/3").await;
    let tunnels = root.wait_all_hold().await;
    // The Connected Event is the last write of the connection.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    eventually("the Connected Event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Connected"))
            .then_some(())
    })
    .await;

    // Every Lease write in the cluster during the window, by Lease.
    let leases: Api<Lease> = Api::all(client.clone());
    let version = leases
        .list_metadata(&ListParams::default())
        .await
        .expect("list leases")
        .metadata
        .resource_version
        .expect("rv");
    let renewals: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let watcher = tokio::spawn({
        let renewals = renewals.clone();
        async move {
            let mut stream = leases
                .watch(&WatchParams::default(), &version)
                .await
                .expect("watch leases")
                .boxed();
            while let Ok(Some(event)) = stream.try_next().await {
                if let WatchEvent::Added(l) | WatchEvent::Modified(l) = event {
                    let name = format!("{}/{}", l.namespace().unwrap_or_default(), l.name_any());
                    *renewals.lock().expect("lock").entry(name).or_default() += 1;
                }
            }
        }
    });

    let before = write_counts(&client).await;
    let started = Instant::now();
    tokio::time::sleep(QUIET).await;
    let after = write_counts(&client).await;
    let window = started.elapsed();
    // A Lease write made just before the scrape may reach the watch a moment later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watcher.abort();
    operator.assert_running();

    let mut writes: BTreeMap<String, f64> = BTreeMap::new();
    for (key, v) in &after {
        let d = v - before.get(key).copied().unwrap_or(0.0);
        if d > 0.0 {
            writes.insert(key.clone(), d);
        }
    }
    let renewals = renewals.lock().expect("lock").clone();
    eprintln!(
        "[{ns}] API writes in a quiet {window:?} with a Connected ReverseTunnel \
         (apiserver_request_total, resource VERB code: count): {writes:?}"
    );
    eprintln!("[{ns}] Lease writes seen by a watch, by Lease: {renewals:?}");
    let total = |resource: &str| -> f64 {
        writes
            .iter()
            .filter(|(k, _)| {
                let r = k.split_whitespace().next().unwrap_or_default();
                r == resource || r.starts_with(&format!("{resource}/"))
            })
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(
        total("reversetunnels"),
        0.0,
        "ReverseTunnel writes: {writes:?}"
    );
    let others: Vec<&String> = writes
        .keys()
        .filter(|k| !k.starts_with("leases "))
        .collect();
    assert!(
        others.is_empty(),
        "writes besides Lease renewals: {writes:?}"
    );
    assert_eq!(total("events"), 0.0, "Event writes: {writes:?}");
    // The operator's Lease: one renewal per period, no more.
    let ours = renewals.get(&format!("{ns}/{LEASE}")).copied().unwrap_or(0);
    let expected = (window.as_secs_f64() / RENEWAL.as_secs_f64()).round() as u32;
    eprintln!(
        "[{ns}] the operator renewed its Lease {ours} times in {window:?} (one per {RENEWAL:?}: \
         {expected} expected)"
    );
    assert!(
        ours + 1 >= expected && ours <= expected + 1,
        "{ours} renewals of the operator's Lease in {window:?}, expected {expected}"
    );
    // Every Lease write the API server counted is one of the renewals the watch saw.
    let lease_writes = total("leases");
    let seen: u32 = renewals.values().sum();
    assert!(
        lease_writes <= f64::from(seen),
        "{lease_writes} Lease writes counted, {seen} seen: {renewals:?}"
    );
    assert_eq!(
        root.tunnels(),
        tunnels,
        "tunnels changed in the quiet minute"
    );
}
