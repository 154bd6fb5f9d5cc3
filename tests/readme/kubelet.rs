//! What a real cluster adds to an API server, played for the README's Kubernetes blocks: a
//! kubelet, the EndpointSlice controller and a cloud load balancer.
//!
//! The test control planes have no nodes, so the chart's pods would never run. This stand-in
//! watches the Deployments a `helm install` creates and runs each replica's container command
//! as a local `tether` process, as the kubelet would run it in the image:
//!
//! ```text
//!   Deployment (apiserver) ──► replica i: pod name DEPLOY-i, pod IP 127.0.0.1
//!     args   $(POD_NAME) $(POD_IP)… expanded; mount paths → files of the Secret volumes;
//!            IP:CONTAINER_PORT → 127.0.0.1:FREE_PORT (the pod's own network namespace)
//!     env    fieldRefs resolved; KUBECONFIG: the pod's ServiceAccount token (TokenRequest)
//!   Service ─► EndpointSlice per pod (ready; TEST-NET address, the apiserver refuses loopback)
//!   Service type LoadBalancer ─► a TCP balancer per Service port on the listener the test
//!            holds for that port number, random backend; status.loadBalancer.ingress = 127.0.0.1
//! ```
//!
//! It polls the API server (a reconcile loop, as kubelets and controllers resync): nothing in
//! the README waits on it except through the API server, as on a real cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::support::kube::ControlPlane;

/// How often the stand-in looks for new Deployments and Services.
const RESYNC: Duration = Duration::from_millis(300);

/// The pods' address: every pod shares the test's loopback, each on its own ports.
const POD_IP: &str = "127.0.0.1";

/// A running stand-in; its pods and balancers stop when it is dropped.
pub struct Node {
    /// Ends the loop (and with it every pod process and balancer).
    stop: CancellationToken,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One pod played as a local process.
struct PodProcess {
    /// The `tether` process, killed when the stand-in stops.
    _child: tokio::process::Child,
    /// Its name, as `$(POD_NAME)` and the EndpointSlice's targetRef say it.
    name: String,
    /// Container port (by name and by number) → the loopback port it really listens on.
    ports: BTreeMap<String, u16>,
    /// The pod template's labels, which Services select.
    labels: serde_json::Map<String, Value>,
}

impl Node {
    /// Starts playing the node for `cp`, writing pod files and logs under `dir`; a Service of
    /// type LoadBalancer is served on `balancers`: each of its ports on the listener held for
    /// that port number (at most one such Service; none: none expected).
    pub fn start(
        cp: &'static ControlPlane,
        dir: &Path,
        balancers: BTreeMap<u16, StdListener>,
    ) -> Node {
        let stop = CancellationToken::new();
        let state = State {
            cp,
            client: cp.kube_client(),
            dir: dir.to_path_buf(),
            balancers,
            started: BTreeSet::new(),
            pods: BTreeMap::new(),
            served: BTreeSet::new(),
            tasks: JoinSet::new(),
        };
        tokio::spawn(state.run(stop.clone()));
        Node { stop }
    }
}

/// The stand-in's view of what it runs.
struct State {
    /// The control plane played for (its admin kubeconfig is the template of the pods').
    cp: &'static ControlPlane,
    /// Admin client.
    client: Client,
    /// Where pods' files and logs go.
    dir: PathBuf,
    /// The listeners of the one load balancer by Service port, until a Service takes them.
    balancers: BTreeMap<u16, StdListener>,
    /// Deployments (`ns/name`) whose pods run.
    started: BTreeSet<String>,
    /// Running pods by namespace.
    pods: BTreeMap<String, Vec<PodProcess>>,
    /// Services (`ns/name`) given endpoints (and a balancer).
    served: BTreeSet<String>,
    /// The balancers.
    tasks: JoinSet<()>,
}

impl State {
    async fn run(mut self, stop: CancellationToken) {
        loop {
            if let Err(e) = self.sync().await {
                eprintln!("kubelet stand-in: {e}");
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(RESYNC) => {}
            }
        }
        // Dropping the pods kills their processes (kill_on_drop); the balancers are aborted.
    }

    async fn sync(&mut self) -> Result<(), String> {
        let deployments = Api::<Deployment>::all(self.client.clone())
            .list(&Default::default())
            .await
            .map_err(|e| format!("listing Deployments: {e}"))?;
        for d in deployments {
            let ns = d.metadata.namespace.clone().unwrap_or_default();
            let key = format!("{ns}/{}", d.metadata.name.clone().unwrap_or_default());
            if self.started.insert(key) {
                self.start_pods(&ns, &d).await?;
            }
        }
        let services = Api::<Service>::all(self.client.clone())
            .list(&Default::default())
            .await
            .map_err(|e| format!("listing Services: {e}"))?;
        for svc in services {
            if let Err(e) = self.serve(&svc).await {
                eprintln!("kubelet stand-in: {e}");
            }
        }
        Ok(())
    }

    async fn start_pods(&mut self, ns: &str, d: &Deployment) -> Result<(), String> {
        let name = d.metadata.name.clone().unwrap_or_default();
        let spec = serde_json::to_value(&d.spec).map_err(|e| e.to_string())?;
        let replicas = spec["replicas"].as_u64().unwrap_or(1);
        for i in 0..replicas {
            let pod = format!("{name}-{i}");
            let process = self.start_pod(ns, &pod, &spec["template"]).await?;
            self.pods.entry(ns.to_owned()).or_default().push(process);
        }
        Ok(())
    }

    async fn start_pod(&self, ns: &str, pod: &str, template: &Value) -> Result<PodProcess, String> {
        let pod_dir = self.dir.join(pod);
        std::fs::create_dir_all(&pod_dir).map_err(|e| e.to_string())?;
        let spec = &template["spec"];
        let container = &spec["containers"][0];
        let mounts = self.mount_volumes(ns, spec, container, &pod_dir).await?;
        let (ports, held) = host_ports(container);
        let mut env = BTreeMap::from([
            ("POD_NAME".to_owned(), pod.to_owned()),
            ("POD_NAMESPACE".to_owned(), ns.to_owned()),
            ("POD_IP".to_owned(), POD_IP.to_owned()),
        ]);
        for var in container["env"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (var["name"].as_str(), var["value"].as_str()) {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        let args: Vec<String> = container["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
            .map(|a| localise(&expand(a, &env), &mounts, &ports))
            .collect();
        let account = spec["serviceAccountName"].as_str().unwrap_or("default");
        let kubeconfig = self.pod_kubeconfig(ns, account, &pod_dir).await?;
        let log = std::fs::File::create(self.dir.join(format!("{pod}.log")))
            .map_err(|e| e.to_string())?;
        drop(held);
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(&args)
            .envs(&env)
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting pod {pod}: {e}"))?;
        Ok(PodProcess {
            _child: child,
            name: pod.to_owned(),
            ports,
            labels: template["metadata"]["labels"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// Writes the Secret volumes the container mounts; mount path → local directory.
    async fn mount_volumes(
        &self,
        ns: &str,
        spec: &Value,
        container: &Value,
        pod_dir: &Path,
    ) -> Result<Vec<(String, PathBuf)>, String> {
        let mut mounts = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let (Some(name), Some(path)) = (mount["name"].as_str(), mount["mountPath"].as_str())
            else {
                continue;
            };
            let local = pod_dir.join(name);
            std::fs::create_dir_all(&local).map_err(|e| e.to_string())?;
            let volume = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == name)
                .ok_or(format!("no volume {name}"))?;
            if let Some(secret) = volume["secret"]["secretName"].as_str() {
                let data = Api::<Secret>::namespaced(self.client.clone(), ns)
                    .get(secret)
                    .await
                    .map_err(|e| format!("Secret {ns}/{secret} for volume {name}: {e}"))?
                    .data
                    .unwrap_or_default();
                for (key, value) in data {
                    write_private(&local.join(key), &value.0)?;
                }
            }
            mounts.push((path.to_owned(), local));
        }
        Ok(mounts)
    }

    /// A kubeconfig with a token of `ns/account`, as the pod's mounted token would be.
    async fn pod_kubeconfig(&self, ns: &str, account: &str, dir: &Path) -> Result<PathBuf, String> {
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let token = Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create_token_request(account, &PostParams::default(), &request)
            .await
            .map_err(|e| format!("a token for {ns}/{account}: {e}"))?
            .status
            .and_then(|s| s.token)
            .ok_or("TokenRequest without a token")?;
        let admin =
            std::fs::read_to_string(self.cp.kubeconfig_path()).map_err(|e| e.to_string())?;
        let mut config: serde_yaml::Value =
            serde_yaml::from_str(&admin).map_err(|e| e.to_string())?;
        config["users"][0]["user"] =
            serde_yaml::to_value(json!({ "token": token })).map_err(|e| e.to_string())?;
        config["contexts"][0]["context"]["namespace"] = ns.into();
        let path = dir.join("kubeconfig");
        let text = serde_yaml::to_string(&config).map_err(|e| e.to_string())?;
        write_private(&path, text.as_bytes())?;
        Ok(path)
    }

    /// Gives a Service whose selector picks running pods an EndpointSlice per pod and, if it
    /// is a LoadBalancer, the balancer.
    async fn serve(&mut self, svc: &Service) -> Result<(), String> {
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let key = format!("{ns}/{name}");
        let spec = serde_json::to_value(&svc.spec).map_err(|e| e.to_string())?;
        let Some(selector) = spec["selector"].as_object().filter(|s| !s.is_empty()) else {
            return Ok(());
        };
        let label = |k: &str| format!("{name}-{k}");
        let pods: Vec<&PodProcess> = self
            .pods
            .get(&ns)
            .into_iter()
            .flatten()
            .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .collect();
        if pods.is_empty() || self.served.contains(&key) {
            return Ok(());
        }
        let slices = Api::<EndpointSlice>::namespaced(self.client.clone(), &ns);
        // Service port → the pods' loopback ports behind it.
        let mut backends: BTreeMap<u16, Vec<SocketAddr>> = BTreeMap::new();
        for (i, pod) in pods.iter().enumerate() {
            let ports: Vec<Value> = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let target = p["targetPort"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| {
                            p["targetPort"]
                                .as_u64()
                                .or(p["port"].as_u64())
                                .unwrap_or(0)
                                .to_string()
                        });
                    let host = *pod.ports.get(&target)?;
                    let service_port = p["port"].as_u64().and_then(|p| u16::try_from(p).ok())?;
                    backends
                        .entry(service_port)
                        .or_default()
                        .push(SocketAddr::new([127, 0, 0, 1].into(), host));
                    Some(json!({"name": p["name"], "port": host, "protocol": "TCP"}))
                })
                .collect();
            let slice: EndpointSlice = serde_json::from_value(json!({
                "metadata": {"name": label(&pod.name), "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": [{
                    "addresses": [format!("192.0.2.{}", i + 1)],
                    "conditions": {"ready": true},
                    "targetRef": {"kind": "Pod", "name": pod.name, "namespace": ns}
                }],
                "ports": ports
            }))
            .map_err(|e| e.to_string())?;
            match slices.create(&PostParams::default(), &slice).await {
                // Written by an earlier pass that failed later on.
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(format!("EndpointSlice for {key}: {e}")),
            }
        }
        if spec["type"] == "LoadBalancer" {
            if self.balancers.is_empty() {
                return Err(format!("a second LoadBalancer Service: {key}"));
            }
            for (port, pods) in backends {
                let Some(listener) = self.balancers.remove(&port) else {
                    continue;
                };
                listener.set_nonblocking(true).map_err(|e| e.to_string())?;
                let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
                self.tasks.spawn(balance(listener, pods));
            }
            if !self.balancers.is_empty() {
                return Err(format!("{key}: no pod port for its load balancer's ports"));
            }
            Api::<Service>::namespaced(self.client.clone(), &ns)
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"status": {"loadBalancer": {"ingress": [{"ip": POD_IP}]}}}),
                    ),
                )
                .await
                .map_err(|e| format!("the load balancer's address on {key}: {e}"))?;
        }
        self.served.insert(key);
        Ok(())
    }
}

/// A free loopback port per container port, by name and number; the listeners are held until
/// the pod starts so that the ports differ.
fn host_ports(container: &Value) -> (BTreeMap<String, u16>, Vec<StdListener>) {
    let mut ports = BTreeMap::new();
    let mut held = Vec::new();
    for p in container["ports"].as_array().into_iter().flatten() {
        let Some(number) = p["containerPort"].as_u64() else {
            continue;
        };
        let l = StdListener::bind((POD_IP, 0)).expect("a free port");
        let host = l.local_addr().expect("address").port();
        held.push(l);
        ports.insert(number.to_string(), host);
        if let Some(name) = p["name"].as_str() {
            ports.insert(name.to_owned(), host);
        }
    }
    (ports, held)
}

/// `$(VAR)` expanded from `env`, as the kubelet expands container arguments.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// A mount path turned into its local directory, and `IP:CONTAINER_PORT` into the pod's
/// loopback port.
fn localise(arg: &str, mounts: &[(String, PathBuf)], ports: &BTreeMap<String, u16>) -> String {
    for (path, local) in mounts {
        if let Some(rest) = arg.strip_prefix(path.as_str()) {
            return format!("{}{rest}", local.display());
        }
    }
    if let Some((ip, port)) = arg.rsplit_once(':')
        && ip.parse::<std::net::IpAddr>().is_ok()
        && let Some(host) = ports.get(port)
    {
        return format!("{POD_IP}:{host}");
    }
    arg.to_owned()
}

/// Writes a file only its owner may read (Tether refuses keys others may read).
fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, data).map_err(|e| format!("{}: {e}", path.display()))
}

/// The cloud load balancer: each connection to a random backend.
async fn balance(listener: TcpListener, backends: Vec<SocketAddr>) {
    while let Ok((mut inbound, _)) = listener.accept().await {
        let backend = backends[rand::random_range(0..backends.len())];
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(backend).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}
