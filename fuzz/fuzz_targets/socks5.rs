//! The SOCKS5 handshake of the client entry, after the version byte the sniffer read.
//!
//! Invariants: a request is admitted only for the known client with its token (the fuzzer
//! must find username/password bytes that verify); the target is a valid
//! `HOST.CLUSTER.tether` name with a non-zero port; no bytes are handed on (SOCKS5 clients
//! wait for the reply before sending data).
#![no_main]

mod common;

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tether::protocol::{Endpoint, Target};
use tether::proxy::client_entry::ClientEntryConfig;
use tether::proxy::client_entry::fuzzing::socks_handshake;

static CONFIG: LazyLock<ClientEntryConfig> = LazyLock::new(common::entry_config);

fuzz_target!(|data: &[u8]| {
    let mut stream = common::duplex(data);
    let Ok((target, user, leftover)) = common::block_on(socks_handshake(&mut stream, &CONFIG))
    else {
        return;
    };
    assert_eq!(user, common::CLIENT);
    assert!(leftover.is_empty());
    let token = common::CLIENT_TOKEN.as_bytes();
    assert!(
        data.windows(token.len()).any(|w| w == token),
        "admitted without the token"
    );
    if let Endpoint::Host { port, .. } = &target.endpoint {
        assert_ne!(*port, 0);
    }
    let (name, port) = target.to_name();
    let again = Target::from_name(&name, port.max(1)).expect("admitted target re-parses");
    assert_eq!(again.cluster, target.cluster);
});
