//! The mistakes people make starting `tether` (issue #14): each is refused at start-up, and the
//! error names the flag, the file or address, and the cause, once. And the day-two edit: a
//! proxy's token file re-read on SIGHUP and when it changes.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;

use crate::support::procs::{Files, Proc, agent_args, fails, free_addr, ok, spawn};

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

/// The files of a proxy `p1` and of the leaf's agent, as an operator has them before the first
/// start: where most of the mistakes below are made.
fn p1_files() -> Files {
    Files::write(&tether_pki(), &["p1"])
}

/// Runs `tether proxy` on a free port with `identity` as `proxy_id`, which must refuse to
/// start; its stderr.
fn proxy_refusal(dir: &Path, identity: &str, proxy_id: &str) -> String {
    fails(
        dir,
        &proxy_args(identity, proxy_id, &["--listen", "127.0.0.1:0"]),
    )
}

/// `tether proxy` p1, run in `dir`, with a client entry on `entry` for the tokens of
/// `tokens.txt`: the tests of the token file and of `tether forward` talk to its entry.
/// `tether proxy` as p1 with `extra` flags, which it must refuse at start-up; its stderr.
fn proxy_refused_with(extra: &[&str]) -> String {
    let files = p1_files();
    fails(dir_of(&files), &proxy_args("p1", "p1", extra))
}

fn spawn_entry_proxy(dir: &Path, entry: SocketAddr) -> Proc {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tether"));
    cmd.current_dir(dir)
        .args(proxy_args("p1", "p1", &["--listen", "127.0.0.1:0"]))
        .args(["--client-listen", &entry.to_string()])
        .args(["--client-tokens", "tokens.txt"]);
    spawn(cmd)
}

#[test]
fn a_proxy_identity_that_is_not_this_proxy_s_host_certificate_is_refused() {
    let files = p1_files();
    let dir = dir_of(&files);
    // An agent's (user) certificate where the host certificate belongs.
    let err = proxy_refusal(dir, "agent", "p1");
    says(
        &err,
        &[
            "--identity agent",
            "not a host certificate for --proxy-id p1",
            "is a user certificate, expected a host certificate",
        ],
    );
    // Another replica's host certificate.
    let err = proxy_refusal(dir, "p1", "p2");
    says(
        &err,
        &["--identity p1", "--proxy-id p2", "not for \"p2.root\""],
    );
}

#[test]
fn identity_files_that_are_missing_or_public_name_the_flag_and_the_fix() {
    let files = p1_files();
    let dir = dir_of(&files);
    let err = proxy_refusal(dir, "nope", "p1");
    says(
        &err,
        &["--identity nope", "cannot read nope", "No such file"],
    );
    let err = proxy_refusal(dir, "p1.pub", "p1");
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
    let files = p1_files();
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
    let files = Files::write(&tether_pki(), &[]);
    let err = fails(dir_of(&files), &agent_args("proxy.example.com"));
    says(
        &err,
        &["--proxy", "has no port: expected [tls://]HOST:PORT"],
    );
}

#[test]
fn a_balancer_that_is_not_an_address_is_refused_naming_the_flag() {
    let err = proxy_refused_with(&["--proxy-protocol-from", "10.0.0.0/8,lb.example.com"]);
    says(
        &err,
        &[
            "--proxy-protocol-from",
            "\"lb.example.com\" is not an IP address or CIDR",
        ],
    );
}

#[test]
fn client_tokens_without_a_client_entry_are_refused() {
    let err = proxy_refused_with(&["--client-tokens", "tokens.txt"]);
    says(&err, &["--client-listen"]);
}

#[test]
fn a_client_certificate_cannot_claim_a_kubernetes_system_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    ok(
        dir.path(),
        &["ca", "init", "--cluster", "root", "--out", "root-ca"],
    );
    let err = fails(
        dir.path(),
        &[
            "cert",
            "client",
            "--ca",
            "root-ca",
            "--cluster",
            "root",
            "--name",
            "eve",
            "--out",
            "eve",
            "--group",
            "system:masters",
        ],
    );
    says(&err, &["--group", "system:masters", "Kubernetes' own"]);
    assert!(!dir.path().join("eve").exists(), "no key was written");
}

#[test]
fn a_client_entry_without_clients_is_refused() {
    let err = proxy_refused_with(&["--client-listen", "127.0.0.1:0"]);
    says(
        &err,
        &["--client-listen", "--client-tokens", "--kubernetes"],
    );
}

#[test]
fn a_kubernetes_endpoint_without_its_certificate_or_callers_is_refused() {
    let err = proxy_refused_with(&["--kube-listen", "127.0.0.1:0"]);
    says(&err, &["--kube-tls-cert", "--kube-tls-key"]);
    let files = p1_files();
    let dir = dir_of(&files);
    std::fs::write(dir.join("kube.crt"), "not a certificate").expect("write");
    let kube = [
        "--kube-listen",
        "127.0.0.1:0",
        "--kube-tls-cert",
        "kube.crt",
        "--kube-tls-key",
        "kube.key",
    ];
    // Nobody could authenticate: no client CA, and no --kubernetes for bearer tokens.
    let err = fails(dir, &proxy_args("p1", "p1", &kube));
    says(&err, &["--kube-listen", "--kube-client-ca", "--kubernetes"]);
    // A certificate file that holds none names the flag and the file.
    let mut with_ca = kube.to_vec();
    with_ca.extend(["--kube-client-ca", "kube.crt"]);
    let err = fails(dir, &proxy_args("p1", "p1", &with_ca));
    says(&err, &["--kube-tls-cert", "kube.crt"]);
}

#[test]
fn an_agent_access_mapping_that_matches_nobody_or_grants_system_groups_is_refused() {
    let files = Files::write(&tether_pki(), &[]);
    let dir = dir_of(&files);
    let mut args = agent_args("127.0.0.1:1").to_vec();
    args.extend([
        "--kube-access",
        "access.yaml",
        "--kube-api-server",
        "https://127.0.0.1:1",
    ]);
    args.extend([
        "--kube-ca",
        "root-ca.pub",
        "--kube-token-file",
        "root-ca.pub",
    ]);
    let err = fails(dir, &args);
    says(&err, &["--kube-access access.yaml", "cannot read it"]);
    std::fs::write(dir.join("access.yaml"), "- leafGroups: [viewers]\n").expect("write");
    let err = fails(dir, &args);
    says(&err, &["--kube-access access.yaml", "would match nobody"]);
    std::fs::write(
        dir.join("access.yaml"),
        "- groups: [ops]\n  leafGroups: [system:masters]\n",
    )
    .expect("write");
    let err = fails(dir, &args);
    says(&err, &["--kube-access access.yaml", "system:masters"]);
}

#[test]
fn rbac_dial_authorization_without_kubernetes_is_refused() {
    let err = proxy_refused_with(&["--dial-authorization", "rbac"]);
    says(&err, &["--dial-authorization", "--kubernetes"]);
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

/// The status code the client entry at `entry` answers a CONNECT with `user:token`.
fn connect_status(entry: std::net::SocketAddr, user: &str, token: &str) -> Option<u16> {
    use base64::Engine as _;
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(entry).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"));
    write!(
        s,
        "CONNECT 127.0.0.1.leaf.tether:1 HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Waits (up to 10 s) until `user:token` gets an answer other than 407, or 407 if `admitted`
/// is false.
fn wait_admission(entry: std::net::SocketAddr, user: &str, token: &str, admitted: bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let status = connect_status(entry, user, token);
        if status.is_some_and(|s| (s != 407) == admitted) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{user}: still {status:?}, expected admitted={admitted}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn the_token_file_is_re_read_on_sighup_and_when_it_changes() {
    use std::os::unix::fs::PermissionsExt;
    let files = p1_files();
    let tokens = files.path("tokens.txt");
    let write_tokens = |text: &str| {
        std::fs::write(&tokens, text).expect("write tokens");
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    };
    let (alice, bob) = ("a1ic3-70k3n-9f8e7d6c5b4a3921", "b0b-70k3n-1a2b3c4d5e6f7089");
    write_tokens(&format!("alice:{alice}\n"));
    let entry = free_addr();
    let mut proxy = spawn_entry_proxy(dir_of(&files), entry);
    wait_admission(entry, "alice", alice, true);
    assert_eq!(connect_status(entry, "bob", bob), Some(407));

    // Added, then SIGHUP: bob is in at once (the poll would take up to 2 s more).
    write_tokens(&format!("alice:{alice}\nbob:{bob}\n"));
    let pid = proxy.pid().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill");
    assert!(hup.success());
    wait_admission(entry, "bob", bob, true);
    assert!(proxy.running(), "SIGHUP must not stop the proxy");
    // Removed, no signal: the change is seen by itself.
    write_tokens(&format!("bob:{bob}\n"));
    wait_admission(entry, "alice", alice, false);
    wait_admission(entry, "bob", bob, true);
}

#[test]
fn tether_forward_checks_its_entry_and_token_before_it_listens() {
    use std::os::unix::fs::PermissionsExt;
    let files = p1_files();
    let dir = dir_of(&files);
    let secret = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).expect("write");
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    };
    secret("tokens.txt", "alice:a1ic3-70k3n-9f8e7d6c5b4a3921\n");
    secret("wrong.token", "not-alice-s-token-0f1e2d3c4b5a\n");
    let entry = free_addr();
    let _proxy = spawn_entry_proxy(dir, entry);
    let forward = |entry: &str| -> String {
        fails(
            dir,
            &[
                "forward",
                "--entry",
                entry,
                "--user",
                "alice",
                "--token-file",
                "wrong.token",
                "--to",
                "db.leaf.tether:5432",
            ],
        )
    };
    // The entry is up once it refuses the token (before, the connection is refused).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let err = loop {
        let err = forward(&entry.to_string());
        if err.contains("407") || std::time::Instant::now() > deadline {
            break err;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    says(
        &err,
        &[
            &format!("--entry {entry}: cannot forward through it"),
            "refused the token of \"alice\" (HTTP 407)",
        ],
    );
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
    let closed_addr = closed.local_addr().expect("addr").to_string();
    drop(closed);
    let err = forward(&closed_addr);
    says(
        &err,
        &[
            &format!("--entry {closed_addr}: cannot forward through it"),
            "refused",
        ],
    );
}
