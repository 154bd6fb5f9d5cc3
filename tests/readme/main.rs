//! The README's shell blocks, run as written.
//!
//! A README that does not work pasted is the first thing a new user meets (issue #14: a token
//! file never created, a fictitious peer re-dialled forever, processes in the foreground, a
//! namespace never created, a required chart value missing). So the blocks are not copied
//! into a test: they are read from `README.md` at test time, by section, and run with
//! `bash -euo pipefail` in an empty directory, with the freshly built `tether` first on
//! `PATH`. The only change made to them is the one the README itself announces: its fixed
//! ports become free ones.
//!
//! ```text
//!   README.md ── "## Quickstart" ──────────► `cargo run -- demo` as `tether demo`
//!             ── "## Running it by hand" ──► ```sh blocks ──► ports 3024… → free ports
//!             ── "## In Kubernetes" ───────►                          │
//!   temp dir ◄── bash -euo pipefail script.sh (own process group) ◄──┘
//!       │  transcript (stdout + stderr), *.log of the background processes
//!       ▼
//!   quickstart: exit 0, the demo's closing line
//!   by hand:    exit 0, every client printed the leaf's page, the refused dial was refused
//!   Kubernetes: exit 0, `kubectl get rt` Connected 3/3 (joined, and written by hand with
//!               the root's RemoteCluster), the root's RemoteCluster Online
//! ```
//!
//! The Kubernetes section runs against two real API servers (contexts `root` and `leaf`);
//! [`kubelet`] plays the nodes, the EndpointSlice controller and the load balancer.

mod kube;
mod kubelet;
mod script;
#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use script::{Run, Section};

/// How long the whole by-hand section may take: it starts three servers and a forward and
/// waits for each (`wait_for` gives each 10 s); on an idle machine it takes about a second.
const BY_HAND_DEADLINE: Duration = Duration::from_secs(120);

/// What the leaf's web server in the README serves, and every client should print.
const PAGE: &str = "hello from the leaf";

#[test]
fn running_it_by_hand_works_as_written() {
    for tool in ["bash", "curl", "openssl", "python3"] {
        script::require(tool);
    }
    let section = Section::read("## Running it by hand");
    let ports = section.announced_ports();
    assert_eq!(
        ports,
        [3024, 3080, 8000, 8080, 9090, 9091],
        "the ports the README says the test changes"
    );
    let (script, held) = section.script(&ports);
    drop(held);
    let run = Run::execute(&script, BY_HAND_DEADLINE);
    run.assert_succeeded();

    // `tether dial` hands back the raw bytes of the web server's answer (only it prints a
    // status line: curl prints bodies).
    run.assert_contains("HTTP/1.0 200 OK");
    // Each client line (the dial, CONNECT, SOCKS5, the forwarded port) printed the page once;
    // `wait_for` discards what it fetches, so nothing else prints it.
    let clients = section.lines_matching(|line| {
        line.contains("hello.txt") && (line.starts_with("curl ") || line.starts_with("printf "))
    });
    for path in [
        "tether dial",
        "--proxytunnel",
        "socks5h://",
        "127.0.0.1:8080",
    ] {
        assert!(
            section.code().contains(path),
            "the section shows no {path} client"
        );
    }
    assert_eq!(
        run.transcript().matches(PAGE).count(),
        clients,
        "one {PAGE:?} per client line of the README\n{}",
        run.report()
    );
    // The dial the allow-list refuses is refused by the agent, and said so.
    run.assert_contains("the dial to 127.0.0.1:22 in cluster leaf is forbidden");
    run.assert_contains("refused: not on the agent's --allow list");
}

/// How long `tether demo` may take (about 1.4 s on an idle machine).
const DEMO_DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn the_quickstart_demo_runs_as_written() {
    let section = Section::read("## Quickstart");
    let demo: Vec<String> = section
        .code()
        .lines()
        .filter(|l| l.starts_with("cargo run -- "))
        // The one change the README announces: the built binary for `cargo run --`.
        .map(|l| l.replacen("cargo run --", "tether", 1))
        .collect();
    assert_eq!(demo.len(), 1, "one `cargo run -- demo` line: {demo:?}");
    let run = Run::execute(&demo[0], DEMO_DEADLINE);
    run.assert_succeeded();
    run.assert_contains(
        "demo finished: three tunnels up, a dial through them, allow-list enforced",
    );
}

#[test]
fn the_port_substitution_changes_whole_numbers_only() {
    let free = [(3024, 41000), (80, 41001)];
    assert_eq!(
        script::substitute_ports("a 127.0.0.1:3024 b :30240 c 8080 d 80", &free),
        "a 127.0.0.1:41000 b :30240 c 8080 d 41001"
    );
    assert!(Path::new(script::README).is_file());
}
