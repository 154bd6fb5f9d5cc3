//! A client profile (issue #17): `tether login` checks and saves the root's address, its name
//! and the client's files once; `tether dial` then needs no flags, and `tether ssh-config`
//! prints the block with which a real `ssh db.leaf` reaches a real `sshd` (host `db` in leaf
//! `leaf`) through the tunnel. The `tether` binary as a user runs it, with `TETHER_CONFIG`
//! pointing into a temporary directory; the proxy and the agent run in-process, the agent
//! resolving `db` to loopback (a test resolver) where its address rule lets it dial sshd.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tether::egress::connect::Resolver;
use tether::identity::Identity;

use support::procs::{Proc, free_port, tether_bin};
use support::*;

/// A client's directory: its key, the root CA, and where its profiles go.
struct Client {
    dir: tempfile::TempDir,
}

impl Client {
    /// alice's client identity from `pki`'s root CA and the root CA's public key, in a new
    /// directory.
    fn new(pki: &tether::demo::Pki) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::generate_client(&pki.root, "alice", Duration::from_secs(600))
            .expect("client identity")
            .save(&dir.path().join("alice"))
            .expect("save");
        let ca = pki.root.public_key().to_openssh().expect("CA key");
        std::fs::write(dir.path().join("root-ca.pub"), ca).expect("write");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `tether ARGS` run here, its profiles in `config.yaml` here.
    fn tether(&self, args: &[&str]) -> Command {
        let mut command = Command::new(tether_bin());
        command
            .current_dir(self.dir.path())
            .args(args)
            .env("TETHER_CONFIG", self.path("config.yaml"))
            .env_remove("TETHER_PROFILE");
        support::procs::without_egress_proxy(&mut command);
        command
    }
}

/// Runs `command` off the runtime (the proxy and the agent run on it), bounded.
async fn run(mut command: Command) -> Output {
    within(
        "a client process",
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output().expect("the command runs")),
    )
    .await
    .expect("join")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn succeeded(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    text(&out.stdout)
}

fn failed(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what} succeeded: {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

/// `ssh-keygen` makes an ed25519 key at `path` (and `path.pub`).
fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tether-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen runs (scripts/test installs openssh-client)");
    succeeded(&out, "ssh-keygen");
}

/// A real OpenSSH server on loopback, unprivileged where it can be: its own host key, one
/// authorized key, its own configuration; killed when dropped.
struct Sshd {
    addr: SocketAddr,
    /// The running server.
    _proc: Proc,
}

impl Sshd {
    /// Starts `/usr/sbin/sshd` in `dir`, letting in `user_key.pub`. A port taken between
    /// choosing and binding it is retried with another.
    fn start(dir: &Path, user_key: &Path) -> Self {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "/usr/sbin/sshd is needed (scripts/test installs openssh-server)"
        );
        keygen(&dir.join("host_key"));
        let authorized = dir.join("authorized_keys");
        std::fs::copy(user_key.with_extension("pub"), &authorized).expect("authorized_keys");
        // Run as root, sshd wants its privilege-separation directory, as the package makes it.
        if unsafe { libc::geteuid() } == 0 {
            std::fs::create_dir_all("/run/sshd").expect("creating /run/sshd");
        }
        for attempt in 0..5 {
            let port = free_port().expect("a free port");
            let config = dir.join("sshd_config");
            std::fs::write(&config, sshd_config(dir, port)).expect("sshd_config");
            let log = dir.join(format!("sshd-{attempt}.log"));
            let mut cmd = Command::new(sshd);
            cmd.args(["-D", "-e", "-f"]).arg(&config);
            let mut proc = Proc::logged("sshd", &mut cmd, log.clone()).expect("sshd starts");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            if proc.accepts(&[addr], Duration::from_secs(10)) {
                return Self { addr, _proc: proc };
            }
            let said = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                said.contains("Address already in use"),
                "sshd failed: {said}"
            );
        }
        panic!("sshd found no free port in 5 attempts");
    }
}

fn sshd_config(dir: &Path, port: u16) -> String {
    format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n\
         AuthorizedKeysFile {authorized}\nPidFile none\nStrictModes no\nUsePAM no\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n",
        host_key = dir.join("host_key").display(),
        authorized = dir.join("authorized_keys").display(),
    )
}

/// A proxy, and an agent that lets the root reach `port` on loopback and resolves `db` there.
async fn rig_reaching(port: u16) -> Rig {
    Rig::start(
        &[format!("127.0.0.1/32:{port}")],
        |_| {},
        |agent| {
            agent.resolver = Resolver::from_fn(|host, port| match host {
                "db" => Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))]),
                _ => Err(std::io::Error::new(std::io::ErrorKind::NotFound, host)),
            })
        },
    )
    .await
}

#[tokio::test]
async fn ssh_with_the_printed_config_reaches_a_real_sshd_in_the_leaf() {
    let server_dir = tempfile::tempdir().expect("tempdir");
    let user_key = server_dir.path().join("user_key");
    keygen(&user_key);
    let sshd = Sshd::start(server_dir.path(), &user_key);
    let rig = rig_reaching(sshd.addr.port()).await;
    let client = Client::new(&rig.pki);
    let proxy = rig.proxy.local_addr().to_string();

    // Relative paths, as a user types them; the profile keeps them absolute.
    let login = [
        "login",
        "--proxy",
        &proxy,
        "--root-cluster",
        "root",
        "--identity",
        "alice",
        "--root-ca",
        "root-ca.pub",
    ];
    succeeded(&run(client.tether(&login)).await, "tether login");
    let saved = std::fs::read_to_string(client.path("config.yaml")).expect("profile");
    assert!(
        saved.contains(&format!("identity: {}", client.path("alice").display())),
        "{saved}"
    );
    assert!(
        !saved.contains("PRIVATE KEY"),
        "no key in the profile: {saved}"
    );

    let printed = succeeded(
        &run(client.tether(&["ssh-config", "leaf"])).await,
        "tether ssh-config",
    );
    assert!(printed.contains("Host *.leaf\n"), "{printed}");
    // ssh's own settings for this test: the sshd's port, its key, the sshd's host key as
    // known for db.leaf.
    let host_key = std::fs::read_to_string(server_dir.path().join("host_key.pub")).expect("key");
    std::fs::write(client.path("known_hosts"), format!("db.leaf {host_key}")).expect("write");
    let ssh_config = format!(
        "{printed}Host *\n    Port {port}\n    IdentityFile {key}\n    IdentitiesOnly yes\n    \
         BatchMode yes\n    UserKnownHostsFile {known}\n    StrictHostKeyChecking yes\n",
        port = sshd.addr.port(),
        key = user_key.display(),
        known = client.path("known_hosts").display(),
    );
    std::fs::write(client.path("ssh_config"), ssh_config).expect("write");

    // ssh runs the ProxyCommand without TETHER_CONFIG: the block names the file itself.
    let mut ssh = Command::new("ssh");
    ssh.arg("-F")
        .arg(client.path("ssh_config"))
        .args(["db.leaf", "echo reached-$((6*7))-over-tether"])
        .env_remove("TETHER_CONFIG");
    // ssh runs `tether dial`, which would follow a machine's HTTPS_PROXY.
    support::procs::without_egress_proxy(&mut ssh);
    let out = run(ssh).await;
    assert_eq!(
        succeeded(&out, "ssh db.leaf").trim(),
        "reached-42-over-tether"
    );

    // `tether dial` with the profile alone: sshd's banner comes back from host db.
    let target = format!("db:{}", sshd.addr.port());
    let mut dial = client.tether(&["dial", "leaf", &target]);
    dial.stdin(std::process::Stdio::null());
    let out = run(dial).await;
    assert!(
        succeeded(&out, "tether dial").starts_with("SSH-2.0-OpenSSH"),
        "{}",
        text(&out.stdout)
    );
}

#[tokio::test]
async fn login_checks_its_files_and_keeps_a_different_profile_without_force() {
    let client = Client::new(&pki());
    std::fs::write(client.path("not-a-key"), "hello\n").expect("write");
    let login = |proxy: &str, identity: &str, root_ca: &str, extra: &[&str]| {
        let mut args = vec![
            "login",
            "--root-cluster",
            "root",
            "--proxy",
            proxy,
            "--identity",
            identity,
            "--root-ca",
            root_ca,
        ];
        args.extend_from_slice(extra);
        client.tether(&args)
    };
    for (identity, root_ca, names) in [
        ("missing", "root-ca.pub", "--identity"),
        ("alice", "missing.pub", "--root-ca"),
        ("alice", "not-a-key", "--root-ca"),
    ] {
        let err = failed(&run(login("p:1", identity, root_ca, &[])).await, names);
        assert!(err.contains(names), "{identity} {root_ca}: {err}");
    }
    assert!(!client.path("config.yaml").exists(), "nothing saved");

    // With no profile and no flags, dial says which value is missing and how to give it.
    let err = failed(
        &run(client.tether(&["dial", "leaf", "db:22"])).await,
        "dial",
    );
    assert!(
        err.contains("--proxy") && err.contains("tether login"),
        "{err}"
    );

    succeeded(
        &run(login("p:1", "alice", "root-ca.pub", &[])).await,
        "login",
    );
    let again = run(login("p:1", "alice", "root-ca.pub", &[])).await;
    assert!(succeeded(&again, "same login").contains("already"));
    let err = failed(
        &run(login("q:2", "alice", "root-ca.pub", &[])).await,
        "other",
    );
    assert!(err.contains("--force") && err.contains("p:1"), "{err}");
    let before = std::fs::read_to_string(client.path("config.yaml")).expect("profile");
    assert!(before.contains("proxy: p:1"), "{before}");
    let forced = login("q:2", "alice", "root-ca.pub", &["--force"]);
    succeeded(&run(forced).await, "forced login");
    let after = std::fs::read_to_string(client.path("config.yaml")).expect("profile");
    assert!(after.contains("proxy: q:2"), "{after}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(client.path("config.yaml"))
        .expect("metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
