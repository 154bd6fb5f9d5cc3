//! Target and cluster names, as clients (HTTP CONNECT, SOCKS5, `ssh -W`, `tether dial`) and the
//! forwarded-tcpip channel open carry them.
//!
//! Invariants: every accepted name passes the validators (cluster name, host, port); the
//! client-facing name and the wire form round-trip to the same target; the serde path accepts
//! exactly the cluster names the constructor accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::protocol::{ClusterName, Endpoint, Target};

fuzz_target!(|data: &[u8]| {
    let [selector, p0, p1, rest @ ..] = data else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let port = u16::from_be_bytes([*p0, *p1]);
    match selector % 4 {
        0 => {
            if let Ok(target) = Target::parse(text) {
                check_target(&target);
            }
        }
        1 => {
            if let Ok(target) = Target::from_name(text, port) {
                check_target(&target);
            }
        }
        2 => {
            if let Ok(endpoint) = Endpoint::parse(text) {
                check_endpoint(&endpoint);
                if let Endpoint::Host { .. } = endpoint {
                    assert_eq!(Endpoint::parse(&endpoint.to_string()), Ok(endpoint));
                }
            }
            if let Ok(endpoint) = Endpoint::from_wire(text, u32::from(port)) {
                check_endpoint(&endpoint);
                let (address, wire_port) = endpoint.to_wire();
                assert_eq!(Endpoint::from_wire(address, wire_port), Ok(endpoint));
            }
        }
        _ => cluster_name(text),
    }
});

fn check_target(target: &Target) {
    assert_eq!(
        ClusterName::new(target.cluster.as_str()).as_ref(),
        Ok(&target.cluster)
    );
    check_endpoint(&target.endpoint);
    let (name, port) = target.to_name();
    let port = if port == 0 { 1 } else { port };
    let again = Target::from_name(&name, port).expect("to_name's output parses");
    assert_eq!(again.cluster, target.cluster);
    match (&again.endpoint, &target.endpoint) {
        (Endpoint::ApiServer, Endpoint::ApiServer) => {}
        (Endpoint::Host { host: a, .. }, Endpoint::Host { host: b, .. }) => assert_eq!(a, b),
        (a, b) => panic!("{name} parsed as {a:?}, not {b:?}"),
    }
}

fn check_endpoint(endpoint: &Endpoint) {
    if let Endpoint::Host { host, port } = endpoint {
        assert_ne!(*port, 0);
        assert_eq!(
            Endpoint::host(host.clone(), *port).as_ref(),
            Ok(endpoint),
            "accepted a host the validator refuses"
        );
    }
}

fn cluster_name(text: &str) {
    let direct = ClusterName::new(text);
    let json = serde_json::to_string(text).expect("a string serialises");
    let via_serde = serde_json::from_str::<ClusterName>(&json);
    assert_eq!(direct.is_ok(), via_serde.is_ok());
    if let Ok(name) = direct {
        assert_eq!(name.as_str(), text);
        assert_eq!(via_serde.ok(), Some(name.clone()));
        assert_eq!(text.parse::<ClusterName>().ok(), Some(name));
    }
}
