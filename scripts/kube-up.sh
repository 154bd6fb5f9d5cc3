#!/usr/bin/env bash
# Starts the integration tests' Kubernetes control plane (etcd +
# kube-apiserver, and kube-controller-manager with --controller-manager) on
# free loopback ports, using the same Rust code as the tests (tests/support/kube/,
# via examples/control_plane.rs). Builds the pinned binaries first if they are
# not cached. Prints the kubeconfig path; Ctrl-C stops everything.
#
#   scripts/kube-up.sh [--controller-manager]
#   # in another shell:
#   KUBECONFIG=<printed path> <printed bin dir>/kubectl get ns
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
cargo build --quiet --example control_plane
exec "${CARGO_TARGET_DIR:-$root/target}/debug/examples/control_plane" "$@"
