//! Starts the integration tests' control plane by hand, for experiments:
//!
//! ```sh
//! scripts/kube-up.sh                  # etcd + kube-apiserver
//! scripts/kube-up.sh --controller-manager
//! ```
//!
//! It is the very code the tests use (`tests/support/kube/`). Prints the admin
//! kubeconfig path and stays in the foreground until Ctrl-C (or SIGTERM), then
//! stops everything.

#[path = "../tests/support/mod.rs"]
mod support;

use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let with_kcm = std::env::args()
        .skip(1)
        .any(|a| a == "--controller-manager");
    let cp = match tokio::task::spawn_blocking(support::kube::ControlPlane::start).await {
        Ok(Ok(cp)) => cp,
        Ok(Err(e)) => {
            eprintln!("control plane failed to start: {e}");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("control plane start panicked: {e}");
            std::process::exit(1);
        }
    };
    if with_kcm {
        cp.start_controller_manager().await;
    }
    let v = cp.versions();
    println!("control plane is up: {}", cp.server_url());
    println!("  {}", v.kube_apiserver);
    println!("  {}", v.etcd);
    if with_kcm {
        println!("  kube-controller-manager ({})", support::kube::CONTROLLERS);
    }
    println!("logs:       {}", cp.log_dir().display());
    println!("binaries:   {}", cp.bin_dir().display());
    println!("kubeconfig: {}", cp.kubeconfig_path().display());
    println!();
    println!("  export KUBECONFIG={}", cp.kubeconfig_path().display());
    println!("  export PATH={}:$PATH", cp.bin_dir().display());
    println!("  kubectl get --raw /readyz; kubectl get ns");
    println!();
    println!("Ctrl-C stops it.");

    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("stopping");
    drop(cp);
}
