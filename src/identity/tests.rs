//! Tests for issuing, storing and verifying certificates.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use super::*;
use crate::protocol::target::ClusterName;

const HOUR: Duration = Duration::from_secs(3600);

fn cluster(name: &str) -> ClusterName {
    ClusterName::new(name).expect("valid cluster name")
}

fn ca(name: &str) -> CertificateAuthority {
    CertificateAuthority::generate(cluster(name)).expect("generate CA")
}

fn store_with(cas: &[&CertificateAuthority]) -> TrustStore {
    let mut store = TrustStore::new();
    for ca in cas {
        store.insert(ca.cluster().clone(), ca.public_key().clone());
    }
    store
}

fn now() -> SystemTime {
    SystemTime::now()
}

#[test]
fn agent_round_trip() {
    let leaf = ca("leaf-1");
    let id = Identity::generate_agent(&leaf, HOUR).unwrap();
    let cert = &id.certificate;
    assert_eq!(cert.key_id(), "agent leaf-1");
    assert_eq!(cert.valid_principals(), ["leaf-1".to_owned()]);
    assert_eq!(
        cert.extensions().get(ROLE_EXTENSION).map(String::as_str),
        Some("agent")
    );
    assert_eq!(cert.public_key(), id.key.public_key().key_data());
    let store = store_with(&[&leaf]);
    assert_eq!(
        store.verify_agent("leaf-1", cert, now()).unwrap(),
        cluster("leaf-1")
    );
}

#[test]
fn client_round_trip() {
    let root = ca("root");
    let id = Identity::generate_client(&root, "alice", HOUR).unwrap();
    assert_eq!(id.certificate.key_id(), "client alice");
    let store = store_with(&[&root]);
    let name = store
        .verify_client(&cluster("root"), "alice", &id.certificate, now())
        .unwrap();
    assert_eq!(name, "alice");
}

#[test]
fn host_round_trip() {
    let root = ca("root");
    let id = Identity::generate_host(&root, "p1", HOUR).unwrap();
    assert_eq!(id.certificate.key_id(), "proxy p1.root");
    assert_eq!(id.certificate.cert_type(), CertType::Host);
    let proxy = verify_host_certificate(
        &id.certificate,
        &[root.public_key().clone()],
        root.cluster(),
        now(),
    )
    .unwrap();
    assert_eq!(proxy, "p1");
    // Proxy ids with dots (pod names may have them) come back whole.
    let id = Identity::generate_host(&root, "tether-proxy-0.a", HOUR).unwrap();
    let proxy = verify_host_certificate(
        &id.certificate,
        &[root.public_key().clone()],
        root.cluster(),
        now(),
    )
    .unwrap();
    assert_eq!(proxy, "tether-proxy-0.a");
}

#[test]
fn validity_window_starts_in_the_past() {
    let root = ca("root");
    let id = Identity::generate_client(&root, "alice", HOUR).unwrap();
    let t = super::verify::unix_seconds(now());
    let after = id.certificate.valid_after();
    assert!(after + CLOCK_SKEW_ALLOWANCE.as_secs() <= t + 1 && after + 60 < t);
    assert!(id.certificate.valid_before() >= t + HOUR.as_secs() - 1);
    // Serials and nonces are random.
    let other = Identity::generate_client(&root, "alice", HOUR).unwrap();
    assert_ne!(id.certificate.serial(), other.certificate.serial());
    assert_ne!(id.certificate.nonce(), other.certificate.nonce());
}

#[test]
fn wrong_ca_is_untrusted() {
    let leaf = ca("leaf-1");
    let impostor = ca("leaf-1");
    let id = Identity::generate_agent(&impostor, HOUR).unwrap();
    let store = store_with(&[&leaf]);
    let err = store
        .verify_agent("leaf-1", &id.certificate, now())
        .unwrap_err();
    match &err {
        AuthError::UntrustedCa {
            cluster: c,
            fingerprint: fp,
            key_id,
        } => {
            assert_eq!(c, &cluster("leaf-1"));
            assert_eq!(fp, &fingerprint(impostor.public_key()));
            assert_eq!(key_id, "agent leaf-1");
        }
        other => panic!("expected UntrustedCa, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("leaf-1") && msg.contains("SHA256:"), "{msg}");

    // Another cluster's CA signing an agent cert for leaf-1 is refused too.
    let other = ca("leaf-2");
    let forged = other
        .issue_user(Role::Agent, "leaf-1", id.key.public_key(), HOUR)
        .unwrap();
    let store = store_with(&[&leaf, &other]);
    assert!(matches!(
        store.verify_agent("leaf-1", &forged, now()),
        Err(AuthError::UntrustedCa { .. })
    ));
    // Host certificates from an untrusted CA as well.
    let host = Identity::generate_host(&impostor, "p1", HOUR).unwrap();
    assert!(matches!(
        verify_host_certificate(
            &host.certificate,
            &[leaf.public_key().clone()],
            leaf.cluster(),
            now()
        ),
        Err(AuthError::UntrustedCa { .. })
    ));
}

#[test]
fn rotation_keeps_old_ca() {
    let old = ca("leaf-1");
    let new = ca("leaf-1");
    let store = store_with(&[&old, &new]);
    assert_eq!(store.cas(&cluster("leaf-1")).len(), 2);
    for ca in [&old, &new] {
        let id = Identity::generate_agent(ca, HOUR).unwrap();
        store
            .verify_agent("leaf-1", &id.certificate, now())
            .unwrap();
    }
    // Inserting the same key again does not duplicate it.
    let mut store = store;
    store.insert(cluster("leaf-1"), old.public_key().clone());
    assert_eq!(store.cas(&cluster("leaf-1")).len(), 2);
    assert!(store.remove(&cluster("leaf-1")));
    assert!(!store.contains(&cluster("leaf-1")));
    assert!(store.cas(&cluster("leaf-1")).is_empty());
}

#[test]
fn tampered_certificate_has_bad_signature() {
    let leaf = ca("leaf-1");
    let id = Identity::generate_agent(&leaf, HOUR).unwrap();
    // Flip a byte of the key id inside the signed part.
    let mut bytes = id.certificate.to_bytes().unwrap();
    let pos = bytes
        .windows(b"agent leaf-1".len())
        .position(|w| w == b"agent leaf-1")
        .unwrap();
    bytes[pos] = b'A';
    let tampered = Certificate::from_bytes(&bytes).unwrap();
    let store = store_with(&[&leaf]);
    assert!(matches!(
        store.verify_agent("leaf-1", &tampered, now()),
        Err(AuthError::BadSignature { .. })
    ));
}

#[test]
fn expired_and_not_yet_valid() {
    let leaf = ca("leaf-1");
    let id = Identity::generate_agent(&leaf, HOUR).unwrap();
    let store = store_with(&[&leaf]);
    let later = now() + HOUR + Duration::from_secs(10);
    match store.verify_agent("leaf-1", &id.certificate, later) {
        Err(AuthError::Expired { valid_before, .. }) => {
            assert_eq!(valid_before.0, id.certificate.valid_before())
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    let earlier = now() - CLOCK_SKEW_ALLOWANCE - Duration::from_secs(10);
    assert!(matches!(
        store.verify_agent("leaf-1", &id.certificate, earlier),
        Err(AuthError::NotYetValid { .. })
    ));
    let host = Identity::generate_host(&leaf, "p1", Duration::ZERO).unwrap();
    assert!(matches!(
        verify_host_certificate(
            &host.certificate,
            &[leaf.public_key().clone()],
            leaf.cluster(),
            now() + Duration::from_secs(2)
        ),
        Err(AuthError::Expired { .. })
    ));
}

#[test]
fn host_cert_as_user_and_user_cert_as_host() {
    let leaf = ca("leaf-1");
    let host = Identity::generate_host(&leaf, "p1", HOUR).unwrap();
    let store = store_with(&[&leaf]);
    assert!(matches!(
        store.verify_agent("leaf-1", &host.certificate, now()),
        Err(AuthError::WrongCertType {
            expected: "user",
            found: "host",
            ..
        })
    ));
    let agent = Identity::generate_agent(&leaf, HOUR).unwrap();
    assert!(matches!(
        verify_host_certificate(
            &agent.certificate,
            &[leaf.public_key().clone()],
            leaf.cluster(),
            now()
        ),
        Err(AuthError::WrongCertType {
            expected: "host",
            found: "user",
            ..
        })
    ));
}

#[test]
fn roles_are_not_interchangeable() {
    let root = ca("root");
    let store = store_with(&[&root]);
    // A client named like the cluster still cannot act as its agent.
    let client = Identity::generate_client(&root, "root", HOUR).unwrap();
    match store.verify_agent("root", &client.certificate, now()) {
        Err(AuthError::WrongRole {
            expected: Role::Agent,
            found,
            ..
        }) => {
            assert_eq!(found.as_deref(), Some("client"))
        }
        other => panic!("expected WrongRole, got {other:?}"),
    }
    let agent = Identity::generate_agent(&root, HOUR).unwrap();
    assert!(matches!(
        store.verify_client(&cluster("root"), "root", &agent.certificate, now()),
        Err(AuthError::WrongRole {
            expected: Role::Client,
            ..
        })
    ));
}

#[test]
fn principal_mismatch() {
    let leaf = ca("leaf-1");
    let root = ca("root");
    let store = store_with(&[&leaf, &root]);
    let alice = Identity::generate_client(&root, "alice", HOUR).unwrap();
    assert!(matches!(
        store.verify_client(&cluster("root"), "bob", &alice.certificate, now()),
        Err(AuthError::PrincipalMismatch { .. })
    ));
    // A leaf's CA issuing a cert for another principal under the leaf's name.
    let bogus = leaf
        .issue_user(Role::Agent, "leaf-2", alice.key.public_key(), HOUR)
        .unwrap();
    assert!(matches!(
        store.verify_agent("leaf-1", &bogus, now()),
        Err(AuthError::PrincipalMismatch { .. })
    ));
    // A proxy of the leaf is not a proxy of the root, even if the root trusted the leaf's CA.
    let host = Identity::generate_host(&leaf, "p1", HOUR).unwrap();
    assert!(matches!(
        verify_host_certificate(
            &host.certificate,
            &[leaf.public_key().clone()],
            root.cluster(),
            now()
        ),
        Err(AuthError::PrincipalMismatch { .. })
    ));
}

#[test]
fn unknown_cluster_and_bad_user_names() {
    let leaf = ca("leaf-1");
    let id = Identity::generate_agent(&leaf, HOUR).unwrap();
    let store = TrustStore::new();
    assert!(matches!(
        store.verify_agent("leaf-1", &id.certificate, now()),
        Err(AuthError::UnknownCluster { .. })
    ));
    assert!(matches!(
        store.verify_agent("Leaf_1", &id.certificate, now()),
        Err(AuthError::InvalidUserName { .. })
    ));
    assert!(matches!(
        store.verify_client(&cluster("root"), "a b", &id.certificate, now()),
        Err(AuthError::InvalidUserName { .. })
    ));
    assert!(leaf.issue_host("P1", id.key.public_key(), HOUR).is_err());
    assert!(leaf.issue_host("", id.key.public_key(), HOUR).is_err());
    assert!(
        leaf.issue_user(Role::Client, "a,b", id.key.public_key(), HOUR)
            .is_err()
    );
}

#[test]
fn errors_do_not_leak_key_material() {
    let leaf = ca("leaf-1");
    let impostor = ca("leaf-1");
    let id = Identity::generate_agent(&impostor, HOUR).unwrap();
    let store = store_with(&[&leaf]);
    let err = store
        .verify_agent("leaf-1", &id.certificate, now())
        .unwrap_err();
    let text = format!("{err} {err:?}");
    for key in [
        leaf.public_key(),
        impostor.public_key(),
        id.key.public_key(),
    ] {
        let b64 = key.to_openssh().unwrap();
        let b64 = b64.split_whitespace().nth(1).unwrap();
        assert!(!text.contains(b64), "{text}");
    }
    let dbg = format!("{leaf:?} {id:?}");
    assert!(!dbg.contains("private"), "{dbg}");
}

#[test]
fn save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let root = ca("root");
    let ca_path = dir.path().join("ca");
    root.save(&ca_path).unwrap();
    let loaded = CertificateAuthority::load(&ca_path, cluster("root")).unwrap();
    assert_eq!(loaded.public_key().key_data(), root.public_key().key_data());
    let pub_text = std::fs::read_to_string(dir.path().join("ca.pub")).unwrap();
    let parsed = parse_ca_keys(&pub_text, Path::new("ca.pub")).unwrap();
    assert_eq!(parsed[0].key_data(), root.public_key().key_data());

    let id = Identity::generate_host(&root, "p1", HOUR).unwrap();
    let key_path = dir.path().join("host");
    id.save(&key_path).unwrap();
    let back = Identity::load(&key_path).unwrap();
    assert_eq!(back.certificate, id.certificate);
    assert_eq!(
        back.key.public_key().key_data(),
        id.key.public_key().key_data()
    );

    use std::os::unix::fs::PermissionsExt;
    for path in [&ca_path, &key_path] {
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", path.display());
    }

    // A certificate for another key is refused on load.
    let other = Identity::generate_host(&root, "p2", HOUR).unwrap();
    std::fs::copy(
        dir.path().join("host-cert.pub"),
        dir.path().join("x-cert.pub"),
    )
    .unwrap();
    other.save(&dir.path().join("y")).unwrap();
    std::fs::copy(dir.path().join("y"), dir.path().join("x")).unwrap();
    let err = Identity::load(&dir.path().join("x")).unwrap_err();
    assert!(
        matches!(err, IdentityError::CertificateKeyMismatch { .. }),
        "{err}"
    );
    // A missing file is named.
    let err = Identity::load(&dir.path().join("missing")).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn trust_dir_loading() {
    let dir = tempfile::tempdir().unwrap();
    let a = ca("leaf-1");
    let b = ca("leaf-1");
    let c = ca("leaf-2");
    let text = format!(
        "# leaf-1 CAs\n\n{}\n  {}  \n",
        a.public_key().to_openssh().unwrap(),
        b.public_key().to_openssh().unwrap()
    );
    std::fs::write(dir.path().join("leaf-1.pub"), text).unwrap();
    std::fs::write(
        dir.path().join("leaf-2.pub"),
        c.public_key().to_openssh().unwrap(),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("..data")).unwrap();
    let store = TrustStore::load_dir(dir.path()).unwrap();
    let clusters: Vec<_> = store.clusters().map(ClusterName::as_str).collect();
    assert_eq!(clusters, ["leaf-1", "leaf-2"]);
    assert_eq!(store.cas(&cluster("leaf-1")).len(), 2);
    let id = Identity::generate_agent(&b, HOUR).unwrap();
    store
        .verify_agent("leaf-1", &id.certificate, now())
        .unwrap();

    // A bad line is reported with file and line number.
    std::fs::write(dir.path().join("leaf-3.pub"), "# x\nssh-ed25519 garbage\n").unwrap();
    let err = TrustStore::load_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("leaf-3.pub line 2"), "{err}");
    std::fs::remove_file(dir.path().join("leaf-3.pub")).unwrap();

    // Bad file names are named in the error.
    for bad in ["Leaf_4.pub", "leaf-4.txt"] {
        let path = dir.path().join(bad);
        std::fs::write(&path, a.public_key().to_openssh().unwrap()).unwrap();
        let err = TrustStore::load_dir(dir.path()).unwrap_err();
        assert!(
            matches!(err, IdentityError::BadTrustFileName { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(bad), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
    // A file without keys is an error rather than a silently untrusted cluster.
    std::fs::write(dir.path().join("leaf-5.pub"), "# nothing yet\n").unwrap();
    let err = TrustStore::load_dir(dir.path()).unwrap_err();
    assert!(err.to_string().contains("leaf-5.pub"), "{err}");
}

#[test]
fn timestamps_display_as_utc() {
    assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00Z");
    assert_eq!(Timestamp(951_782_400).to_string(), "2000-02-29T00:00:00Z");
    assert_eq!(Timestamp(1_767_225_599).to_string(), "2025-12-31T23:59:59Z");
    assert_eq!(Timestamp(u64::MAX).to_string(), "forever");
}

/// Runs `ssh-keygen` if it is installed; `None` when it is not.
fn ssh_keygen(args: &[&std::ffi::OsStr]) -> Option<std::process::Output> {
    match Command::new("ssh-keygen").args(args).output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("ssh-keygen not found; skipping");
            None
        }
        Err(e) => panic!("running ssh-keygen: {e}"),
    }
}

#[test]
fn ssh_keygen_reads_what_we_write() {
    let dir = tempfile::tempdir().unwrap();
    let root = ca("root");
    let ca_path = dir.path().join("ca");
    root.save(&ca_path).unwrap();
    // The CA private key is a valid OpenSSH key: ssh-keygen derives the same public key.
    let Some(out) = ssh_keygen(&["-y".as_ref(), "-f".as_ref(), ca_path.as_os_str()]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let derived = PublicKey::from_openssh(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(derived.key_data(), root.public_key().key_data());

    let cases = [
        (
            Identity::generate_host(&root, "p1", HOUR).unwrap(),
            "host certificate",
            "p1.root",
        ),
        (
            Identity::generate_agent(&root, HOUR).unwrap(),
            "user certificate",
            "root",
        ),
        (
            Identity::generate_client(&root, "alice", HOUR).unwrap(),
            "user certificate",
            "alice",
        ),
    ];
    for (i, (id, kind, principal)) in cases.iter().enumerate() {
        let key_path = dir.path().join(format!("id{i}"));
        id.save(&key_path).unwrap();
        let cert_path = dir.path().join(format!("id{i}-cert.pub"));
        let out = ssh_keygen(&["-L".as_ref(), "-f".as_ref(), cert_path.as_os_str()]).unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(kind), "{stdout}");
        assert!(
            stdout.contains(&format!("\"{}\"", id.certificate.key_id())),
            "{stdout}"
        );
        assert!(
            stdout.contains(&format!("                {principal}\n")),
            "{stdout}"
        );
        assert!(stdout.contains(&fingerprint(root.public_key())), "{stdout}");
        if kind.starts_with("user") {
            assert!(stdout.contains(ROLE_EXTENSION), "{stdout}");
        }
        let out = ssh_keygen(&["-l".as_ref(), "-f".as_ref(), key_path.as_os_str()]).unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(&fingerprint(id.key.public_key())));
    }
}
