//! CA keys loaded into the trust store and the certificates peers present to it: agents'
//! and clients' user certificates (checked by the proxy) and proxies' host certificates
//! (checked by agents). The bytes are read as OpenSSH text or as the SSH wire encoding.
//!
//! Invariants: a certificate is accepted only if it is, byte for byte, one the fixed CAs
//! issued (`fuzz/keys/*-cert.pub`), in the role it was issued for: the fuzzer cannot forge an
//! Ed25519 signature, so any other acceptance is a verification bug. Parsed keys and
//! certificates re-encode to values that parse to themselves.
#![no_main]

use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use tether::identity::{Certificate, TrustStore, parse_ca_keys, verify_host_certificate};
use tether::protocol::ClusterName;

/// Inside the fixed certificates' validity (2026-01-01 to 2036-01-01): 2027-01-01.
const NOW_UNIX: u64 = 1_798_761_600;

struct Fixture {
    store: TrustStore,
    leaf: ClusterName,
    root: ClusterName,
    agent: Vec<u8>,
    client: Vec<u8>,
    host: Vec<u8>,
}

static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
    let leaf = ClusterName::new("leaf").expect("valid");
    let root = ClusterName::new("root").expect("valid");
    let mut store = TrustStore::new();
    for (cluster, text) in [
        (&leaf, include_str!("../keys/ca-leaf.pub")),
        (&root, include_str!("../keys/ca-root.pub")),
    ] {
        for key in parse_ca_keys(text, Path::new("fixture")).expect("fixture CA key") {
            store.insert(cluster.clone(), key);
        }
    }
    let bytes = |text: &str| {
        Certificate::from_openssh(text.trim())
            .expect("fixture certificate")
            .to_bytes()
            .expect("encodes")
    };
    let fixture = Fixture {
        store,
        leaf,
        root,
        agent: bytes(include_str!("../keys/agent-cert.pub")),
        client: bytes(include_str!("../keys/client-cert.pub")),
        host: bytes(include_str!("../keys/host-cert.pub")),
    };
    // Self-test: the accepting paths are reachable, or the invariants below prove nothing.
    for (what, cert) in [
        ("agent", &fixture.agent),
        ("client", &fixture.client),
        ("host", &fixture.host),
    ] {
        let cert = Certificate::from_bytes(cert).expect("decodes");
        assert!(
            verify(&fixture, &cert).contains(&what),
            "{what} fixture refused"
        );
    }
    fixture
});

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let fixture = &*FIXTURE;
    let cert = match selector % 3 {
        0 => return ca_keys(rest),
        1 => match std::str::from_utf8(rest).map(Certificate::from_openssh) {
            Ok(Ok(cert)) => cert,
            _ => return,
        },
        _ => match Certificate::from_bytes(rest) {
            Ok(cert) => cert,
            Err(_) => return,
        },
    };
    if let Ok(encoded) = cert.to_bytes() {
        let again = Certificate::from_bytes(&encoded).expect("a re-encoded certificate parses");
        // Compared encoded: the OpenSSH text's comment is not part of the certificate.
        assert_eq!(again.to_bytes().ok(), Some(encoded));
    }
    for role in verify(fixture, &cert) {
        let issued = match role {
            "agent" => &fixture.agent,
            "client" => &fixture.client,
            _ => &fixture.host,
        };
        let encoded = cert.to_bytes().expect("an accepted certificate encodes");
        assert_eq!(
            &encoded, issued,
            "accepted a certificate nobody issued as {role}"
        );
    }
});

/// The roles in which `cert` is accepted: agent of `leaf`, client or proxy of `root`.
fn verify(fixture: &Fixture, cert: &Certificate) -> Vec<&'static str> {
    let now = UNIX_EPOCH + Duration::from_secs(NOW_UNIX);
    let mut accepted = Vec::new();
    let first = cert.valid_principals().first().map(String::as_str);
    for user in [Some("leaf"), first].into_iter().flatten() {
        if let Ok(cluster) = fixture.store.verify_agent(user, cert, now) {
            assert_eq!(cluster, fixture.leaf);
            accepted.push("agent");
        }
    }
    for user in [Some("alice"), first].into_iter().flatten() {
        if let Ok(name) = fixture.store.verify_client(&fixture.root, user, cert, now) {
            assert_eq!(name, user);
            accepted.push("client");
        }
    }
    let cas = fixture.store.cas(&fixture.root);
    if let Ok(id) = verify_host_certificate(cert, cas, &fixture.root, now) {
        assert_eq!(id, "proxy-0");
        accepted.push("host");
    }
    accepted
}

/// CA key files as the trust store loads them.
fn ca_keys(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let Ok(keys) = parse_ca_keys(text, Path::new("fuzz.pub")) else {
        return;
    };
    let mut store = TrustStore::new();
    let cluster = ClusterName::new("leaf").expect("valid");
    for key in &keys {
        let again = key.to_openssh().expect("a parsed key re-encodes");
        let reparsed = tether::identity::PublicKey::from_openssh(&again).expect("re-parses");
        assert_eq!(reparsed.key_data(), key.key_data());
        store.insert(cluster.clone(), key.clone());
    }
    assert!(store.cas(&cluster).len() <= keys.len());
    assert_eq!(store.contains(&cluster), !keys.is_empty());
}
