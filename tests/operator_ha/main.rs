//! Issue #5's end-to-end tests of the operator, against a real kube-apiserver, with every
//! component a real process: `tether proxy` processes behind a real haproxy, following the
//! EndpointSlices of their Service; `tether operator` processes reconciling the example
//! ReverseTunnel; `kubectl` and `tether dial` as users run them.
//!
//! - [`endpoints`]: `kubectl apply -f
//!   examples/reversetunnel.yaml` shows 3/3 Connected in `kubectl get rt`, a dial goes through
//!   once the allow-list admits it, and the tunnel follows the endpoints 3 -> 5 -> 2 while nobody
//!   touches the ReverseTunnel.
//! - [`failover`]: two operator replicas, each carrying every tunnel (each proxy holds two
//!   tunnels from the leaf), under a dial load: `kill -9` of either (the leader included) fails
//!   no dial started after it, and a rolling restart of both (SIGTERM, successor, ready, then
//!   the other) fails none at all.
//! - [`status`]: `kubectl get rt` shows each replica's holdings (`REPLICAS 3/3`, one
//!   `status.replicas` entry and one Lease each); a replica stopped by SIGTERM takes its entry
//!   and Lease with it; a killed replica's entry stops counting once its Lease expires (not
//!   before), and `SEEN` passes the stale age after the last replica dies.
//! - [`quiet`]: with two replicas, a Connected ReverseTunnel writes nothing to the API over a
//!   quiet minute but the Lease renewals (the leader's and each replica's own) and one
//!   `observedAt` stamp by the leader, counted by the API server's own
//!   `apiserver_request_total`; no replica rewrites its entry; once both are killed,
//!   `kubectl get rt`'s `SEEN` passes a minute.
//!
//! The proxies and the operators listen on port 0 and print what they got; haproxy adopts a
//! listener the test bound (`bind fd@3`), and proxies join it through its runtime API. The API
//! server refuses loopback endpoint addresses, so the slices name TEST-NET-1 addresses
//! (192.0.2.x) with the proxies' real ports; peering is off, agents learn proxy IDs from the
//! proxies' discovery messages and reach them through haproxy.
//!
//! The tests run one at a time ([`SERIAL`]): the quiet minute reads cluster-wide counters, and
//! the machine is small. Process logs are in the control plane's run directory, `ha-<ns>/`.

#[path = "../support/mod.rs"]
mod support;

mod endpoints;
mod failover;
mod fixture;
mod load;
mod quiet;
mod status;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

use support::kube::ControlPlane;
use support::procs::{Files, Proc, operator_command};
use support::tunnel_e2e::{DEADLINE, create_secrets, eventually, proxy_slice};
use tether::demo::{Pki, echo_server};
use tether::identity::Identity;
use tether::operator::crd::ReverseTunnel;
use tether::operator::crd::reverse_tunnel::Phase;
use tether::protocol::ClusterName;

use fixture::*;

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
