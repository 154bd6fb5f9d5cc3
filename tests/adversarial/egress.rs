//! Egress: a host rule must not let DNS choose a target the rules never named.
//!
//! The review reached the leaf agent's loopback-only admin endpoint through
//! `*.svc.cluster.local:*` with a name resolving to 127.0.0.1 (and the cloud metadata
//! address the same way), and read the leaf's DNS answers in the 403 bodies. Here a real
//! proxy and agent carry the dials; the agent's resolver answers with chosen addresses so no
//! `/etc/hosts` is needed, and one test goes through the system resolver with `localhost`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tether::egress::allow_list::AllowList;
use tether::egress::connect::Resolver;
use tether::protocol::DialErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const TOKEN: &str = "egress-test-token-0123456789";

/// Names under the allowed suffix and what a hostile DNS answers for them.
const HOSTILE: [(&str, &[&str]); 4] = [
    ("loop.svc.cluster.local", &["127.0.0.1"]),
    ("loop6.svc.cluster.local", &["::1"]),
    ("meta.svc.cluster.local", &["169.254.169.254"]),
    (
        "all.svc.cluster.local",
        &["127.0.0.1", "::1", "169.254.169.254", "::ffff:127.0.0.1"],
    ),
];

/// Text a refusal must never carry: the resolved addresses.
const LEAKS: [&str; 3] = ["127.0.0.1", "::1", "169.254"];

/// A resolver answering [`HOSTILE`] and "not found" for anything else.
fn hostile_resolver() -> Resolver {
    Resolver::from_fn(|host, port| {
        let answers = HOSTILE
            .iter()
            .find(|(name, _)| *name == host)
            .map(|(_, addrs)| *addrs)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such name"))?;
        Ok(answers
            .iter()
            .map(|a| SocketAddr::new(a.parse::<IpAddr>().expect("address"), port))
            .collect())
    })
}

/// A proxy and an agent allowing `rules`, the agent resolving with [`hostile_resolver`].
async fn rig(rules: &[String]) -> Rig {
    Rig::start(
        rules,
        |_| {},
        |agent| {
            agent.resolver = hostile_resolver();
            // Should a fix regress and a dial leave loopback, fail fast rather than hang.
            agent.dial_timeout = Duration::from_secs(3);
        },
    )
    .await
}

/// Dials `what` through `rig` and asserts it is refused as reached by no host rule, without
/// the addresses DNS answered for it: the review read them in the refusals.
async fn assert_refused_without_leak(rig: &Rig, what: &str) {
    let err = rig
        .dial_name(what)
        .await
        .err()
        .unwrap_or_else(|| panic!("{what} was dialled"));
    assert_eq!(err.kind, DialErrorKind::Forbidden, "{what}: {err}");
    assert!(
        err.message.contains("no host rule may reach"),
        "{what}: {err}"
    );
    for leak in LEAKS {
        assert!(!err.message.contains(leak), "{what} leaks {leak}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_resolving_to_loopback_or_link_local_are_refused_through_the_tunnel() {
    let echo = echo_server().await.expect("echo");
    let rig = rig(&["*.svc.cluster.local:*".to_owned()]).await;
    for (name, _) in HOSTILE {
        let target = format!("{name}.leaf.tether:{}", echo.port());
        assert_refused_without_leak(&rig, &target).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_entry_answers_403_without_the_leafs_dns_answers() {
    let echo = echo_server().await.expect("echo");
    let rig = rig(&["*.svc.cluster.local:*".to_owned()]).await;
    let entry = start_client_entry(&rig.proxy, &format!("alice:{TOKEN}\n"), |_| {}).await;
    for (name, _) in HOSTILE {
        let target = format!("{name}.leaf.tether:{}", echo.port());
        let response = within("the CONNECT answer", Duration::from_secs(20), async {
            let mut stream = TcpStream::connect(entry).await.expect("connect entry");
            let request = format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\
                 Proxy-Authorization: Bearer {TOKEN}\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut response = String::new();
            stream
                .read_to_string(&mut response)
                .await
                .expect("read answer");
            response
        })
        .await;
        assert!(
            response.starts_with("HTTP/1.1 403 "),
            "{target}: {response}"
        );
        assert!(
            response.contains("no host rule may reach"),
            "{target}: {response}"
        );
        for leak in LEAKS {
            assert!(
                !response.contains(leak),
                "{target} leaks {leak}: {response}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_rule_naming_loopback_still_permits_it() {
    let echo = echo_server().await.expect("echo");
    let rig = rig(&[
        "*.svc.cluster.local:*".to_owned(),
        format!("127.0.0.1:{}", echo.port()),
    ])
    .await;
    for target in [
        format!("loop.svc.cluster.local.leaf.tether:{}", echo.port()),
        format!("127.0.0.1.leaf.tether:{}", echo.port()),
    ] {
        let conn = rig.dial_name(&target).await.expect(&target);
        let (mut stream, _task) = attach(conn, 4096);
        assert_eq!(echo_round_trip(&mut stream, b"named").await, b"named");
    }
    // The metadata address was not named, and the loopback rule does not widen to it.
    let meta = format!("meta.svc.cluster.local.leaf.tether:{}", echo.port());
    assert_refused_without_leak(&rig, &meta).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localhost_through_the_system_resolver_is_refused_by_a_host_rule() {
    let echo = echo_server().await.expect("echo");
    let rules = [
        format!("localhost:{}", echo.port()),
        "*.localhost:*".to_owned(),
    ];
    let rig = Rig::start(&rules, |_| {}, |_| {}).await;
    let target = format!("localhost.leaf.tether:{}", echo.port());
    assert_refused_without_leak(&rig, &target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_direct_dials_apply_the_same_rule() {
    let echo = echo_server().await.expect("echo");
    let port = echo.port();
    let rig = Rig::start(
        &[],
        |proxy| {
            proxy.direct = Some(Arc::new(
                AllowList::parse([format!("localhost:{port}")]).expect("rules"),
            ))
        },
        |_| {},
    )
    .await;
    let target = format!("localhost.root.tether:{port}");
    assert_refused_without_leak(&rig, &target).await;
}

// ---- keys and secrets through the real binary -------------------------------------------

mod secrets {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::{Command, Stdio};

    use crate::support::procs::{agent_args, fails, ok};

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Opens the private key `key` in `dir` to others (`mode`) and checks that `tether args`,
    /// which loads it, refuses it naming the mode and the fix: every loader of a key must.
    fn refuses_loose_key(dir: &Path, key: &str, mode: u32, args: &[&str]) {
        chmod(&dir.join(key), mode);
        let err = fails(dir, args);
        assert!(err.contains(&format!("mode {mode:04o}")), "{err}");
        assert!(err.contains(&format!("chmod 600 {key}")), "{err}");
    }

    const CA_INIT: [&str; 6] = ["ca", "init", "--cluster", "root", "--out", "root-ca"];
    const CERT_AGENT: [&str; 8] = [
        "cert",
        "agent",
        "--ca",
        "root-ca",
        "--cluster",
        "root",
        "--out",
        "agent",
    ];

    #[test]
    fn commands_that_write_keys_never_replace_one_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        ok(dir, &CA_INIT);
        let ca_key = std::fs::read(dir.join("root-ca")).expect("read");
        let err = fails(dir, &CA_INIT);
        assert!(err.contains("root-ca already exists"), "{err}");
        assert!(err.contains("--force"), "{err}");
        assert_eq!(std::fs::read(dir.join("root-ca")).expect("read"), ca_key);

        let cert_agent = &CERT_AGENT[..];
        ok(dir, cert_agent);
        let agent_key = std::fs::read(dir.join("agent")).expect("read");
        let err = fails(dir, cert_agent);
        assert!(err.contains("agent already exists"), "{err}");
        assert_eq!(std::fs::read(dir.join("agent")).expect("read"), agent_key);

        ok(dir, &[&CA_INIT[..], &["--force"]].concat());
        assert_ne!(std::fs::read(dir.join("root-ca")).expect("read"), ca_key);
        ok(dir, &[cert_agent, &["--force"]].concat());
        assert_ne!(std::fs::read(dir.join("agent")).expect("read"), agent_key);
        for key in ["root-ca", "agent"] {
            let mode = std::fs::metadata(dir.join(key))
                .expect("stat")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    #[test]
    fn keys_other_users_may_read_are_refused_by_the_loaders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        ok(dir, &CA_INIT);
        ok(dir, &CERT_AGENT);
        refuses_loose_key(
            dir,
            "root-ca",
            0o644,
            &[
                "cert",
                "client",
                "--ca",
                "root-ca",
                "--cluster",
                "root",
                "--name",
                "alice",
                "--out",
                "alice",
            ],
        );
        assert!(!dir.join("alice").exists());
        refuses_loose_key(dir, "agent", 0o640, &agent_args("127.0.0.1:1"));
    }

    const FORWARD: [&str; 9] = [
        "forward",
        "--entry",
        "127.0.0.1:1",
        "--user",
        "alice",
        "--to",
        "db.leaf.tether:5432",
        "--listen",
        "127.0.0.1:0",
    ];

    /// A client entry for one start-up check: it answers 400 (token taken, no such target) if
    /// the request carries `credentials`, else 407. Its address.
    fn entry_taking(credentials: &str) -> String {
        use base64::Engine as _;
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let expected = base64::engine::general_purpose::STANDARD.encode(credentials);
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read_exact(&mut byte).is_ok() {
                head.push(byte[0]);
            }
            let taken = String::from_utf8_lossy(&head).contains(&format!("Basic {expected}"));
            let answer: &[u8] = if taken {
                b"HTTP/1.1 400 Bad Request\r\n\r\n"
            } else {
                b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"
            };
            let _ = s.write_all(answer);
        });
        addr
    }

    #[test]
    fn the_forward_token_never_comes_from_argv() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        let secret = "argv-token-0123456789abcdef";
        let err = fails(dir, &[&FORWARD[..], &["--token", secret]].concat());
        assert!(err.contains("--token-file"), "{err}");
        assert!(err.contains("TETHER_TOKEN"), "{err}");
        assert!(!err.contains(secret), "{err}");

        let err = fails(dir, &FORWARD);
        assert!(err.contains("no client token"), "{err}");

        let file = dir.join("alice.token");
        std::fs::write(&file, format!("{secret}\n")).expect("write");
        chmod(&file, 0o644);
        let err = fails(
            dir,
            &[&FORWARD[..], &["--token-file", "alice.token"]].concat(),
        );
        assert!(err.contains("chmod 600 alice.token"), "{err}");

        chmod(&file, 0o600);
        for (args, env) in [
            (vec!["--token-file", "alice.token"], None),
            (vec![], Some(secret)),
        ] {
            let entry = entry_taking(&format!("alice:{secret}"));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tether"));
            cmd.current_dir(dir)
                // FORWARD's entry (port 1) replaced by the one that takes the token.
                .args(FORWARD.map(|a| {
                    if a == "127.0.0.1:1" {
                        entry.as_str()
                    } else {
                        a
                    }
                }))
                .args(&args)
                .env_remove("TETHER_TOKEN")
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            if let Some(token) = env {
                cmd.env("TETHER_TOKEN", token);
            }
            let mut child = cmd.spawn().expect("spawn forward");
            let mut line = String::new();
            let stdout = child.stdout.take().expect("stdout");
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read");
            let _ = child.kill();
            let _ = child.wait();
            assert!(
                line.starts_with("forwarding 127.0.0.1:"),
                "{args:?}: {line:?}"
            );
        }
    }
}
