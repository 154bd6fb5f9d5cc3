//! The real processes of the tests and the apiserver objects that describe them.

use super::*;

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process ([`Proc`]: killed on drop and with the thread that spawned it) whose stderr
/// (and stdout lines) go to a log file, and whose stdout lines are also handed to
/// [`Process::printed`].
pub(crate) struct Process {
    /// The process itself.
    proc: Proc,
    /// Its log, named in failures.
    pub(crate) log: PathBuf,
    /// Its stdout, line by line, for [`Process::printed`].
    lines: mpsc::Receiver<String>,
}

impl Process {
    /// Spawns `cmd`; with `inherit`, that descriptor becomes the child's fd 3.
    pub(crate) fn spawn(
        name: &str,
        mut cmd: Command,
        log: PathBuf,
        inherit: Option<RawFd>,
    ) -> Process {
        let err = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err.try_clone().expect("dup log"));
        if let Some(fd) = inherit {
            // SAFETY: only async-signal-safe calls (fcntl, dup2) run between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // dup2 clears close-on-exec on the copy; fd 3 itself needs it cleared.
                    let ok = if fd == 3 {
                        libc::fcntl(3, libc::F_SETFD, 0) == 0
                    } else {
                        libc::dup2(fd, 3) == 3
                    };
                    if ok {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut proc = Proc::start(name, &mut cmd).unwrap_or_else(|e| panic!("{e}"));
        let stdout = proc.take_stdout().expect("stdout");
        let (tx, lines) = mpsc::channel();
        let mut copy = err;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(copy, "[stdout] {line}");
                let _ = tx.send(line);
            }
        });
        Process { proc, log, lines }
    }

    /// Waits (blocking, at most 30 s) for a stdout line starting with `prefix`; the rest of it.
    pub(crate) fn printed(&mut self, prefix: &str) -> String {
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
                    self.proc.name,
                    self.log.display()
                ),
            }
        }
    }

    pub(crate) fn signal(&self, signal: libc::c_int) {
        self.proc.signal(signal).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Waits for the process to exit (it was signalled).
    pub(crate) async fn exited(&mut self) -> std::process::ExitStatus {
        let name = self.proc.name.clone();
        eventually(&format!("{name} to exit"), || {
            let status = self.proc.exit_status();
            async move { status }
        })
        .await
    }

    /// Panics (naming the log) if the process has already exited.
    pub(crate) fn assert_running(&mut self) {
        if let Some(exit) = self.proc.exited() {
            panic!("{exit}; log: {}", self.log.display());
        }
    }
}

/// A real haproxy in TCP mode: `slots` backend servers, all in maintenance until
/// [`Lb::enable`] points one at a proxy through the runtime API.
pub(crate) struct Lb {
    _process: Process,
    addr: SocketAddr,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Lb {
    pub(crate) fn start(slots: usize, logs: &Path) -> Lb {
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
    pub(crate) fn command(&self, command: &str) -> String {
        let mut s = UnixStream::connect(&self.socket).expect("haproxy admin socket");
        writeln!(s, "{command}").expect("write command");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read answer");
        out
    }

    /// Points slot `slot` at `addr` and takes it out of maintenance.
    pub(crate) fn enable(&self, slot: usize, addr: SocketAddr) {
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
    pub(crate) fn disable(&self, slot: usize) {
        let out = self.command(&format!("set server proxies/s{slot} state maint"));
        assert!(out.trim().is_empty(), "haproxy: {out}");
    }
}

// ---------------------------------------------------------------------------------------------
// The root cluster: proxies, their Service and EndpointSlices, haproxy

/// A running `tether proxy`.
pub(crate) struct ProxyProcess {
    /// The process; its log tells why a wait failed.
    pub(crate) process: Process,
    /// Its admin listener: `/status` shows the tunnels it holds.
    admin: SocketAddr,
}

/// The root cluster of a test: proxies behind haproxy, described to the apiserver by a Service
/// and one EndpointSlice per proxy, as Kubernetes would.
pub(crate) struct Root {
    /// The test's namespace.
    ns: String,
    /// What the proxies use to reach the apiserver.
    kubeconfig: PathBuf,
    /// Where every process of the test writes its log.
    pub(crate) logs: PathBuf,
    /// The proxies' identities and trust, on disk.
    files: Files,
    /// The load balancer agents dial.
    lb: Lb,
    /// The EndpointSlices, one per live proxy.
    slices: Api<EndpointSlice>,
    /// The live proxies by ID.
    pub(crate) proxies: BTreeMap<String, ProxyProcess>,
}

impl Root {
    /// haproxy with a slot per [`IDS`], the proxies' Service, and the first `n` proxies.
    pub(crate) async fn start(
        cp: &ControlPlane,
        client: &Client,
        ns: &str,
        pki: &Pki,
        n: usize,
    ) -> Root {
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
    pub(crate) async fn add(&mut self, id: &str) {
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
            let peers: Option<Vec<String>> = support::procs::admin_get(admin, "/status")
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
            .create(
                &PostParams::default(),
                &proxy_slice(SERVICE, id, slot, listen.port(), true),
            )
            .await
            .expect("creating the EndpointSlice");
        self.proxies
            .insert(id.to_owned(), ProxyProcess { process, admin });
    }

    /// Scales proxy `id` away: its endpoint goes, haproxy stops sending to it, then it gets
    /// SIGTERM (drain) and exits 0, every task of its own stopped.
    pub(crate) async fn remove(&mut self, id: &str) {
        let slot = IDS.iter().position(|i| *i == id).expect("known id");
        self.slices
            .delete(&format!("{SERVICE}-{id}"), &DeleteParams::default())
            .await
            .expect("deleting the EndpointSlice");
        self.lb.disable(slot);
        let mut proxy = self.proxies.remove(id).expect("running proxy");
        proxy.process.signal(libc::SIGTERM);
        let status = proxy.process.exited().await;
        assert!(status.success(), "{id} exited with {status} after SIGTERM");
    }

    /// Tunnel IDs from the leaf on each live proxy, from its admin `/status`.
    pub(crate) fn tunnels(&mut self) -> BTreeMap<String, Vec<u64>> {
        let mut all = BTreeMap::new();
        for (id, proxy) in &mut self.proxies {
            proxy.process.assert_running();
            let status: serde_json::Value = support::procs::admin_get(proxy.admin, "/status")
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
    pub(crate) async fn wait_all_hold(&mut self) -> BTreeMap<String, Vec<u64>> {
        let n = self.proxies.len();
        eventually(&format!("a tunnel on each of the {n} proxies"), || {
            let tunnels = self.tunnels();
            async move { tunnels.values().all(|t| t.len() == 1).then_some(tunnels) }
        })
        .await
    }

    /// Waits until every live proxy holds exactly `n` tunnels from the leaf (one per operator
    /// replica).
    pub(crate) async fn wait_each_holds(&mut self, n: usize) -> BTreeMap<String, Vec<u64>> {
        let proxies = self.proxies.len();
        eventually(
            &format!("{n} tunnels on each of the {proxies} proxies"),
            || {
                let tunnels = self.tunnels();
                async move { tunnels.values().all(|t| t.len() == n).then_some(tunnels) }
            },
        )
        .await
    }

    /// What a dial needs, apart from the root: runs dials from other tasks.
    pub(crate) fn dialer(&self) -> Dialer {
        Dialer {
            lb: self.lb.addr,
            identity: self.files.path("alice"),
            root_ca: self.files.path("root-ca.pub"),
        }
    }

    /// `tether dial leaf-1 <target>` through haproxy (see [`Dialer::dial`]).
    pub(crate) async fn dial(&self, target: SocketAddr, message: &[u8]) -> Result<Vec<u8>, String> {
        self.dialer().dial(target, message).await
    }
}

/// A client of the root: `tether dial` through haproxy as alice.
#[derive(Clone)]
pub(crate) struct Dialer {
    /// haproxy's frontend.
    lb: SocketAddr,
    /// alice's identity file.
    identity: PathBuf,
    /// The root CA the proxies' host certificates are checked against.
    root_ca: PathBuf,
}

impl Dialer {
    /// `tether dial leaf-1 <target>` through haproxy, its standard streams piped.
    pub(crate) fn command(&self, target: SocketAddr) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"));
        // A machine's HTTPS_PROXY would carry the loopback dial.
        for var in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
            cmd.env_remove(var);
        }
        cmd.args(["dial", LEAF, &target.to_string(), "--root-cluster", "root"])
            .args(["--proxy", &self.lb.to_string()])
            .arg("--identity")
            .arg(&self.identity)
            .arg("--root-ca")
            .arg(&self.root_ca)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    }

    /// `tether dial leaf-1 <target>` through haproxy: sends `message`, closes its side, and
    /// returns what came back, or the exit status and stderr.
    pub(crate) async fn dial(&self, target: SocketAddr, message: &[u8]) -> Result<Vec<u8>, String> {
        let mut child = self.command(target).spawn().expect("tether dial starts");
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
pub(crate) fn spawn_operator(
    cp: &ControlPlane,
    ns: &str,
    logs: &Path,
    identity: &str,
    lease: Option<Option<(&str, &str)>>,
) -> Process {
    spawn_operator_with(cp, ns, logs, identity, lease, &[])
}

/// [`spawn_operator`] with `extra` arguments (`--status-refresh 3s`).
pub(crate) fn spawn_operator_with(
    cp: &ControlPlane,
    ns: &str,
    logs: &Path,
    identity: &str,
    lease: Option<Option<(&str, &str)>>,
    extra: &[&str],
) -> Process {
    let mut cmd = operator_command(cp.kubeconfig_path(), ns, identity);
    cmd.args(extra);
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
pub(crate) async fn kubectl(cp: &'static ControlPlane, args: Vec<String>) -> String {
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

pub(crate) fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// CRDs from `crds/` as users install them.
pub(crate) async fn install_crds(cp: &'static ControlPlane) {
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
pub(crate) async fn apply_example(cp: &'static ControlPlane, root: &Root) {
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

/// The example's row in `kubectl get rt`, by column (`STATUS`, `PROXIES`, `REPLICAS`, `SEEN`).
pub(crate) async fn kubectl_row(cp: &'static ControlPlane, ns: &str) -> BTreeMap<String, String> {
    let table = kubectl(cp, args(&["get", "rt", "-n", ns])).await;
    let mut lines = table.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .find(|l| l.split_whitespace().next() == Some(RT))
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    header
        .iter()
        .zip(row)
        .map(|(h, v)| ((*h).to_owned(), v.to_owned()))
        .collect()
}

/// Waits until the example's row shows `want` in every named column; returns the row.
pub(crate) async fn wait_row(
    cp: &'static ControlPlane,
    ns: &str,
    want: &[(&str, &str)],
) -> BTreeMap<String, String> {
    let start = Instant::now();
    loop {
        let row = kubectl_row(cp, ns).await;
        if want
            .iter()
            .all(|(k, v)| row.get(*k).map(String::as_str) == Some(*v))
        {
            return row;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "kubectl get rt never showed {want:?}; last {row:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Lets the example's agents reach `target` (the allow-list edit a user would make).
pub(crate) async fn allow(cp: &'static ControlPlane, ns: &str, target: SocketAddr) {
    let rule = format!("127.0.0.1/32:{}", target.port());
    let patch = json!([{"op": "add", "path": "/spec/allow/-", "value": rule}]).to_string();
    kubectl(
        cp,
        args(&["patch", "rt", RT, "-n", ns, "--type=json", "-p", &patch]),
    )
    .await;
}

/// STATUS and PROXIES of the example's row in `kubectl get reversetunnels`.
pub(crate) async fn kubectl_get_rt(
    cp: &'static ControlPlane,
    ns: &str,
) -> Option<(String, String)> {
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
pub(crate) async fn wait_kubectl_connected(cp: &'static ControlPlane, ns: &str, proxies: &str) {
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
pub(crate) async fn setup(prefix: &str, n: usize) -> (&'static ControlPlane, Client, String, Root) {
    let cp = support::kube::control_plane().await;
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
