//! The HTTP CONNECT / SOCKS5 client entry.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::Engine as _;
use tether::proxy::client_entry::{ClientEntryConfig, ClientTokens, TokenFileError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ATTACKER, HONEST, connect_from, until_closed};
use crate::support::*;

/// A strong token (`openssl rand -hex 32`).
const TOKEN: &str = "3f1c9a0e7b5d42c8a61e9f07d3b28c5e4a0f6d19b7e2c83a5d4f60e1b9c7a28d";

/// Starts a proxy with an agent allowing an echo server, and a client entry in front of it.
async fn entry(tune: impl FnOnce(&mut ClientEntryConfig)) -> (Rig, SocketAddr, SocketAddr) {
    let echo = echo_server().await.expect("echo");
    let rig = Rig::start(&[format!("127.0.0.1/32:{}", echo.port())], |_| {}, |_| {}).await;
    let addr = start_client_entry(&rig.proxy, &format!("alice:{TOKEN}\n"), tune).await;
    (rig, addr, echo)
}

/// Sends a CONNECT for `echo` from `from` with `token`, and returns the response head ("" when
/// the entry closed without answering).
async fn connect(from: IpAddr, entry: SocketAddr, echo: SocketAddr, token: &str) -> String {
    let Ok(mut s) = connect_from(from, entry).await else {
        return String::new();
    };
    let target = format!("127.0.0.1.leaf.tether:{}", echo.port());
    let credentials = base64::engine::general_purpose::STANDARD.encode(format!("alice:{token}"));
    let request = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic {credentials}\r\n\r\n"
    );
    if s.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => break,
            }
        }
    };
    within("the entry's answer", Duration::from_secs(5), read).await;
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_one_source_do_not_stop_another_and_are_closed_at_the_deadline() {
    let deadline = Duration::from_secs(3);
    let (_rig, entry, echo) = entry(|c| c.handshake_timeout = deadline).await;
    // More idle sockets than the entry's total of 1,024, from one address.
    let mut idle = Vec::new();
    for _ in 0..1100 {
        if let Ok(s) = connect_from(ATTACKER, entry).await {
            idle.push(s);
        }
    }
    let answer = connect(HONEST, entry, echo, TOKEN).await;
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "another source was refused: {answer:?}"
    );
    // Those the entry admitted are closed at the deadline; the others were refused at once.
    let close_all = async {
        for s in &mut idle {
            until_closed(s).await;
        }
    };
    within(
        "every idle socket to be closed",
        deadline + Duration::from_secs(1),
        close_all,
    )
    .await;
}

#[tokio::test]
async fn token_guesses_from_one_source_are_throttled_with_bounded_logs() {
    let logs = LogCapture::default();
    let _guard = logs.install();
    let (_rig, entry, echo) = entry(|c| {
        c.auth_failures_allowed = 3;
        c.auth_penalty = Duration::from_secs(60);
    })
    .await;
    let started = std::time::Instant::now();
    let guesses = 40;
    let mut answered = 0;
    for i in 0..guesses {
        let guess = format!("{:064x}", i);
        let answer = connect(ATTACKER, entry, echo, &guess).await;
        assert!(!answer.starts_with("HTTP/1.1 200"), "a wrong token got in");
        if answer.starts_with("HTTP/1.1 407") {
            answered += 1;
        }
    }
    assert_eq!(
        answered, 4,
        "guesses answered before the penalty (3 allowed, the 4th penalised)"
    );
    let during = connect(ATTACKER, entry, echo, TOKEN).await;
    assert_eq!(
        during, "",
        "the right token from the penalised source is refused"
    );
    let other = connect(HONEST, entry, echo, TOKEN).await;
    assert!(
        other.starts_with("HTTP/1.1 200"),
        "another source still gets in: {other:?}"
    );
    let text = logs.text();
    let lines = text.lines().filter(|l| l.contains("127.0.0.2")).count();
    eprintln!("{guesses} guesses → {lines} log lines about the guesser");
    // The penalty's line, and a summary of refusals at most once a second.
    let bound = 2 + started.elapsed().as_secs() as usize;
    assert!(
        lines <= bound,
        "more than {bound} lines for {guesses} guesses:\n{text}"
    );
}

#[test]
fn weak_tokens_are_refused_when_the_file_is_loaded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokens.txt");
    for weak in ["0123456789abcdef", "aaaaaaaaaaaaaaaa", "passwordpassword"] {
        write_private(&path, &format!("# clients\nbob:{TOKEN}\nalice:{weak}\n"));
        let err = ClientTokens::load(&path).expect_err("a weak token is refused");
        let text = err.to_string();
        assert!(
            matches!(err, TokenFileError::WeakToken { line: 3, .. }),
            "{weak}: {text}"
        );
        assert!(
            text.contains(&path.display().to_string())
                && text.contains("alice")
                && text.contains("guess"),
            "the error names the file, the user and the cause: {text}"
        );
        assert!(!text.contains(weak), "the token is not echoed: {text}");
    }
    write_private(&path, &format!("alice:{TOKEN}\n"));
    assert_eq!(
        ClientTokens::load(&path)
            .expect("a random token passes")
            .len(),
        1
    );
}

/// Writes a token file only its owner may read, as the proxy requires.
fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[test]
fn a_token_file_others_may_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokens.txt");
    write_private(&path, &format!("alice:{TOKEN}\n"));
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = ClientTokens::load(&path).expect_err("a world-readable token file is refused");
    let text = err.to_string();
    assert!(
        matches!(err, TokenFileError::Permissions(_)) && text.contains("chmod 600"),
        "{text}"
    );
}
