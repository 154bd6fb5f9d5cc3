//! Every dial a client asks of a proxy leaves one audit record (#16): who, through which entry
//! and from where, which leaf and target, the decision and its reason, the bytes each way and
//! the duration. `tether proxy --audit-log FILE` writes the records there as JSON lines, apart
//! from its log. Real processes: a proxy, an agent, `tether dial`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tether::identity::Identity;

use crate::support::procs::free_addr;
use crate::support::procs::{
    Files, admin_get, proxy_command, spawn, spawn_agent, tether_with_input,
};
use crate::support::*;

/// `tether dial leaf TARGET` through `proxy` as alice, sending `message`; what came back, or
/// its stderr.
fn dial(dir: &Path, proxy: SocketAddr, target: &str, message: &[u8]) -> Result<Vec<u8>, String> {
    let proxy = proxy.to_string();
    let args = [
        "dial",
        "leaf",
        target,
        "--proxy",
        &proxy,
        "--root-cluster",
        "root",
    ];
    let identity = ["--identity", "alice", "--root-ca", "root-ca.pub"];
    let out = tether_with_input(dir, &[&args[..], &identity[..]].concat(), message);
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The audit file's records: each line's `fields`, checked to be an audit record.
fn records(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            assert_eq!(record["target"], "tether::audit", "{line}");
            record["fields"].clone()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dial_leaves_one_audit_record_apart_from_the_log() {
    let pki = pki();
    let files = Files::write(&pki, &["p1"]);
    Identity::generate_client(&pki.root, "alice", Duration::from_secs(3600))
        .expect("client identity")
        .save(&files.path("alice"))
        .expect("save");
    let echo = echo_server().await.expect("echo");
    let (listen, admin) = (free_addr(), free_addr());
    let audit_log = files.path("audit.jsonl");
    let mut cmd = proxy_command(&files, "p1", listen, admin, &[]);
    cmd.arg("--audit-log").arg(&audit_log);
    let _proxy = spawn(cmd);
    let allow = format!("127.0.0.1/32:{}", echo.port());
    let _agent = spawn_agent(&files, listen, &["--allow".to_owned(), allow]);
    wait_for("the leaf's tunnel", Duration::from_secs(20), || {
        admin_get(admin, "/status").is_some_and(|s| s.contains("\"leaf\""))
    })
    .await;

    let dir = files.path("");
    let target = format!("127.0.0.1:{}", echo.port());
    let message = b"hello, audit\n";
    let echoed = tokio::task::spawn_blocking({
        let (dir, target) = (dir.clone(), target.clone());
        move || dial(&dir, listen, &target, message)
    })
    .await
    .expect("dial runs")
    .expect("an allowed dial");
    assert_eq!(echoed, message);
    let refused = format!("127.0.0.1:{}", echo.port() ^ 1);
    let failed = tokio::task::spawn_blocking({
        let (dir, refused) = (dir.clone(), refused.clone());
        move || dial(&dir, listen, &refused, b"")
    })
    .await
    .expect("dial runs");
    assert!(
        failed.is_err(),
        "a dial outside the allow-list went through"
    );

    // The record of a stream is written when it ends, just after the client saw its end.
    wait_for("two audit records", Duration::from_secs(10), || {
        records(&audit_log).len() >= 2
    })
    .await;
    let all = records(&audit_log);
    assert_eq!(all.len(), 2, "{all:#?}");
    let (ok, forbidden) = (&all[0], &all[1]);
    assert_eq!(ok["message"], "dial");
    assert_eq!(ok["who"], "alice");
    assert_eq!(ok["via"], "ssh");
    assert_eq!(ok["leaf"], "leaf");
    assert_eq!(ok["target"], target.as_str());
    assert_eq!(ok["decision"], "ok");
    assert_eq!(ok["bytes_up"], message.len());
    assert_eq!(ok["bytes_down"], message.len());
    assert!(
        ok["from"]
            .as_str()
            .is_some_and(|f| f.starts_with("127.0.0.1:"))
    );
    assert!(ok["duration_ms"].is_u64());
    assert_eq!(forbidden["decision"], "forbidden", "{forbidden}");
    assert_eq!(forbidden["target"], refused.as_str());
    assert_eq!(forbidden["bytes_up"], 0);
    // Nothing secret: no key or certificate material in any record.
    let text = std::fs::read_to_string(&audit_log).expect("audit log");
    assert!(!text.contains("ssh-ed25519") && !text.contains("PRIVATE KEY"));
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&audit_log)
            .expect("metadata")
            .permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the audit log is readable by others");
}

/// The client entry records its dials too, under the token's name and its protocol; a token
/// the entry refuses asks for no dial and leaves no record.
#[tokio::test]
async fn the_client_entry_records_who_dialled_through_it() {
    use base64::Engine as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const TOKEN: &str = "audit-token-0123456789abcdef";
    let logs = LogCapture::default();
    let _guard = logs.install();
    let echo = echo_server().await.expect("echo");
    let rig = Rig::start(&[format!("127.0.0.1/32:{}", echo.port())], |_| {}, |_| {}).await;
    rig.wait_online().await;
    let entry = start_client_entry(&rig.proxy, &format!("ops:{TOKEN}\n"), |_| {}).await;
    let connect = |credentials: &str| {
        let basic = base64::engine::general_purpose::STANDARD.encode(credentials);
        format!(
            "CONNECT 127.0.0.1.leaf.tether:{port} HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic {basic}\r\n\r\n",
            port = echo.port()
        )
    };

    let mut client = tokio::net::TcpStream::connect(entry)
        .await
        .expect("connect");
    client
        .write_all(connect(&format!("ops:{TOKEN}")).as_bytes())
        .await
        .expect("request");
    let mut reply = [0u8; 12];
    client.read_exact(&mut reply).await.expect("reply");
    assert_eq!(&reply, b"HTTP/1.1 200");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(client.read_u8().await.expect("reply head"));
    }
    echo_once(&mut client, b"ping").await;
    drop(client);
    logs.wait_for("decision=\"ok\"").await;

    let mut refused = tokio::net::TcpStream::connect(entry)
        .await
        .expect("connect");
    refused
        .write_all(connect("ops:not-the-token-not-the-token").as_bytes())
        .await
        .expect("request");
    let mut answer = Vec::new();
    let _ = refused.read_to_end(&mut answer).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 407"));

    let text = logs.text();
    let records: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("tether::audit"))
        .collect();
    assert_eq!(records.len(), 1, "{records:#?}");
    for field in [
        "who=ops",
        "via=\"http-connect\"",
        "leaf=leaf",
        "decision=\"ok\"",
        "bytes_up=4",
        "bytes_down=4",
    ] {
        assert!(records[0].contains(field), "no {field} in {}", records[0]);
    }
    assert!(!text.contains(TOKEN), "the token is in the log");
}
