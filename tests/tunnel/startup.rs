//! The mistakes people make starting `tether` (issue #14): each is refused at start-up, and the
//! error names the flag, the file or address, and the cause, once.

use std::net::TcpListener;
use std::path::Path;

use crate::support::procs::{Files, fails, ok};

/// `tether proxy` with the files a test writes, plus `extra`.
fn proxy_args<'a>(identity: &'a str, proxy_id: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "proxy",
        "--cluster",
        "root",
        "--proxy-id",
        proxy_id,
        "--identity",
        identity,
        "--trust-dir",
        "trust",
    ];
    args.extend_from_slice(extra);
    args
}

/// Asserts `stderr` says each of `parts`, and no cause twice.
fn says(stderr: &str, parts: &[&str]) {
    for part in parts {
        assert!(stderr.contains(part), "missing {part:?} in:\n{stderr}");
    }
    let causes: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("caused by: "))
        .collect();
    for (i, cause) in causes.iter().enumerate() {
        assert!(
            !causes[..i].iter().any(|c| c.contains(cause))
                && !stderr.lines().next().is_some_and(|l| l.contains(cause)),
            "cause said twice in:\n{stderr}"
        );
    }
}

fn dir_of(files: &Files) -> &Path {
    files.dir.path()
}

#[test]
fn a_proxy_identity_that_is_not_this_proxy_s_host_certificate_is_refused() {
    let pki = tether_pki();
    let files = Files::write(&pki, &["p1"]);
    let dir = dir_of(&files);
    // An agent's (user) certificate where the host certificate belongs.
    let err = fails(
        dir,
        &proxy_args("agent", "p1", &["--listen", "127.0.0.1:0"]),
    );
    says(
        &err,
        &[
            "--identity agent",
            "not a host certificate for --proxy-id p1",
            "is a user certificate, expected a host certificate",
        ],
    );
    // Another replica's host certificate.
    let err = fails(dir, &proxy_args("p1", "p2", &["--listen", "127.0.0.1:0"]));
    says(
        &err,
        &["--identity p1", "--proxy-id p2", "not for \"p2.root\""],
    );
}

#[test]
fn identity_files_that_are_missing_or_public_name_the_flag_and_the_fix() {
    let pki = tether_pki();
    let files = Files::write(&pki, &["p1"]);
    let dir = dir_of(&files);
    let err = fails(dir, &proxy_args("nope", "p1", &["--listen", "127.0.0.1:0"]));
    says(
        &err,
        &["--identity nope", "cannot read nope", "No such file"],
    );
    let err = fails(
        dir,
        &proxy_args("p1.pub", "p1", &["--listen", "127.0.0.1:0"]),
    );
    says(
        &err,
        &[
            "--identity p1.pub",
            "give the private key file (p1) instead",
        ],
    );
    assert!(
        !err.contains("chmod"),
        "a public key's mode is not the problem: {err}"
    );
}

#[test]
fn an_address_in_use_is_named_with_its_flag() {
    let pki = tether_pki();
    let files = Files::write(&pki, &["p1"]);
    let dir = dir_of(&files);
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    for flag in ["--listen", "--admin-listen"] {
        let mut extra = vec![flag, addr.as_str()];
        if flag != "--listen" {
            extra.extend(["--listen", "127.0.0.1:0"]);
        }
        let err = fails(dir, &proxy_args("p1", "p1", &extra));
        says(&err, &[&format!("{flag} {addr}: cannot listen"), "in use"]);
    }
}

#[test]
fn an_agent_proxy_address_without_a_port_is_refused_at_start_up() {
    let pki = tether_pki();
    let files = Files::write(&pki, &[]);
    let err = fails(
        dir_of(&files),
        &[
            "agent",
            "--cluster",
            "leaf",
            "--root-cluster",
            "root",
            "--proxy",
            "proxy.example.com",
            "--identity",
            "agent",
            "--root-ca",
            "root-ca.pub",
        ],
    );
    says(&err, &["--proxy", "has no port: expected HOST:PORT"]);
}

#[test]
fn client_tokens_without_a_client_entry_are_refused() {
    let pki = tether_pki();
    let files = Files::write(&pki, &["p1"]);
    let err = fails(
        dir_of(&files),
        &proxy_args("p1", "p1", &["--client-tokens", "tokens.txt"]),
    );
    says(&err, &["--client-listen"]);
}

#[test]
fn a_certificate_for_another_cluster_than_its_ca_s_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    ok(
        dir,
        &["ca", "init", "--cluster", "leaf", "--out", "leaf-ca"],
    );
    let err = fails(
        dir,
        &[
            "cert",
            "agent",
            "--ca",
            "leaf-ca",
            "--cluster",
            "root",
            "--out",
            "agent",
        ],
    );
    says(
        &err,
        &[
            "leaf-ca: this is the CA of cluster \"leaf\"",
            "not of \"root\"",
        ],
    );
    assert!(!dir.join("agent").exists(), "no certificate was written");
    ok(
        dir,
        &[
            "cert",
            "agent",
            "--ca",
            "leaf-ca",
            "--cluster",
            "leaf",
            "--out",
            "agent",
        ],
    );
}

#[test]
fn a_bad_log_level_names_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = fails(
        dir.path(),
        &[
            "--log-level",
            "info,=[",
            "ca",
            "init",
            "--cluster",
            "x",
            "--out",
            "x",
        ],
    );
    says(&err, &["--log-level \"info,=[\""]);
}

fn tether_pki() -> tether::demo::Pki {
    crate::support::pki()
}
