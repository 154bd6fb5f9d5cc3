//! "In Kubernetes", run as written against two real API servers (a root and a leaf cluster,
//! as `kubectl` contexts `root` and `leaf`), with [`kubelet::Node`] playing what the test
//! control planes lack (nodes, the EndpointSlice controller, a cloud load balancer).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::kubelet::Node;
use crate::script::{self, Run, Section, Shell};
use crate::support::kube::{self, ControlPlane};

/// From nothing to Connected: two chart installs, a join, agents to three proxies from two
/// operator replicas. The README's own waits allow minutes; on an idle machine it takes
/// well under one.
const DEADLINE: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_kubernetes_works_as_written() {
    script::require("bash");
    let root = kube::control_plane().await;
    let leaf: &'static ControlPlane = tokio::task::spawn_blocking(|| {
        Box::leak(Box::new(
            ControlPlane::start().expect("a second control plane (the leaf cluster)"),
        ))
    })
    .await
    .expect("starting the leaf control plane");

    let section = Section::read("## In Kubernetes");
    let ports = section.announced_ports();
    assert_eq!(
        ports,
        [3024, 6443],
        "the ports the README says the test changes"
    );
    let (script, held) = section.script(&ports);
    // The root's load balancer: the tunnel port and the Kubernetes endpoint's.
    let balancers = ports.iter().copied().zip(held).collect();

    // The README runs from the checkout: the chart and the examples, in a directory of its own.
    let dir = tempfile::tempdir().expect("temp dir");
    for tree in ["charts", "examples"] {
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join(tree),
            &dir.path().join(tree),
        );
    }
    let shell = Shell {
        path: vec![root.bin_dir().to_path_buf()],
        env: vec![
            ("KUBECONFIG".into(), contexts(dir.path(), root, leaf)),
            ("HELM_CACHE_HOME".into(), dir.path().join(".helm/cache")),
            ("HELM_CONFIG_HOME".into(), dir.path().join(".helm/config")),
            ("HELM_DATA_HOME".into(), dir.path().join(".helm/data")),
        ],
    };
    let pods = tempfile::tempdir().expect("pods dir");
    let _root_node = Node::start(root, &pods.path().join("root"), balancers);
    let _leaf_node = Node::start(leaf, &pods.path().join("leaf"), Default::default());

    let started = std::time::Instant::now();
    let run = tokio::task::spawn_blocking(move || Run::execute_in(dir, &script, &shell, DEADLINE))
        .await
        .expect("running the script");
    eprintln!("the Kubernetes section ran in {:?}", started.elapsed());
    let pod_logs = pod_logs(pods.path());
    if !run.succeeded() {
        panic!("{}\n{pod_logs}", run.report());
    }
    // `kubectl get trustedclusters,reversetunnels`: the tunnel's row says Connected...
    let row = run
        .transcript()
        .lines()
        .find(|l| {
            l.starts_with("reversetunnel.tether.dev/to-root ") && !l.ends_with(" condition met")
        })
        .unwrap_or_else(|| panic!("no ReverseTunnel row\n{}", run.report()));
    assert!(row.contains(" Connected "), "{row}\n{}", run.report());
    assert!(row.contains(" 3/3 "), "to all three proxies: {row}");
    // ...and the root's `kubectl get remoteclusters` shows the leaf its join recorded, online.
    let leaf_row = run
        .transcript()
        .lines()
        .find(|l| l.starts_with("leaf-1 "))
        .unwrap_or_else(|| panic!("no RemoteCluster row\n{}", run.report()));
    assert!(leaf_row.contains("Online"), "{leaf_row}\n{}", run.report());
    // kubectl on the leaf through the root: the leaf's API server saw the mapped identity.
    assert!(
        run.transcript()
            .contains("tether:root:system:serviceaccount:tether-system:ci"),
        "kubectl auth whoami through the root\n{}",
        run.report()
    );
    // The leaf's CA rotated through every phase, and the tunnel still carries kubectl.
    for phase in ["Init", "UpdateClients", "Retire"] {
        assert!(
            run.transcript()
                .contains(&format!("TrustedCluster to-root reached {phase}")),
            "tether ca rotate --phase {phase}\n{}",
            run.report()
        );
    }
    let rotated = run
        .transcript()
        .lines()
        .find(|l| l.starts_with("to-root ") && l.contains(" Joined "))
        .unwrap_or_else(|| panic!("no TrustedCluster row\n{}", run.report()));
    assert!(rotated.contains(" Standby "), "{rotated}\n{}", run.report());
    // The hand-written tunnel of `leaf-2`, admitted by the RemoteCluster the README writes.
    let by_hand = run
        .transcript()
        .lines()
        .find(|l| l.starts_with("leaf-2 ") && l.contains(" root "))
        .unwrap_or_else(|| panic!("no ReverseTunnel row for leaf-2\n{}", run.report()));
    assert!(
        by_hand.contains(" Connected "),
        "{by_hand}\n{}",
        run.report()
    );
}

/// A kubeconfig with contexts `root` and `leaf`, one per control plane, as admin.
fn contexts(dir: &Path, root: &ControlPlane, leaf: &ControlPlane) -> PathBuf {
    let mut merged = serde_yaml::Mapping::new();
    let (mut clusters, mut users, mut contexts) = (vec![], vec![], vec![]);
    for (name, cp) in [("root", root), ("leaf", leaf)] {
        let text = std::fs::read_to_string(cp.kubeconfig_path()).expect("admin kubeconfig");
        let config: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
        let named = |list: &str, key: &str| {
            let mut entry = serde_yaml::Mapping::new();
            entry.insert("name".into(), name.into());
            entry.insert(key.into(), config[list][0][key].clone());
            serde_yaml::Value::Mapping(entry)
        };
        clusters.push(named("clusters", "cluster"));
        users.push(named("users", "user"));
        let mut context = serde_yaml::Mapping::new();
        context.insert("cluster".into(), name.into());
        context.insert("user".into(), name.into());
        let mut entry = serde_yaml::Mapping::new();
        entry.insert("name".into(), name.into());
        entry.insert("context".into(), serde_yaml::Value::Mapping(context));
        contexts.push(serde_yaml::Value::Mapping(entry));
    }
    merged.insert("apiVersion".into(), "v1".into());
    merged.insert("kind".into(), "Config".into());
    merged.insert("clusters".into(), clusters.into());
    merged.insert("users".into(), users.into());
    merged.insert("contexts".into(), contexts.into());
    merged.insert("current-context".into(), "root".into());
    let path = dir.join(".kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&merged).expect("YAML")).expect("kubeconfig");
    path
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a directory");
    for entry in std::fs::read_dir(from).expect("reading the checkout") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copying a file");
        }
    }
}

/// Every pod's log, for a failure message.
fn pod_logs(dir: &Path) -> String {
    let mut out = String::new();
    for cluster in ["root", "leaf"] {
        let Ok(entries) = std::fs::read_dir(dir.join(cluster)) else {
            continue;
        };
        let mut logs: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {cluster}: {}\n", log.display()));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}
