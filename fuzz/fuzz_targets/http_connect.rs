//! The HTTP CONNECT handshake of the client entry, from the first byte a client sends.
//!
//! Invariants: a request is admitted only for a known client with its token; the admitted
//! target is a valid `HOST.CLUSTER.tether` name; the bytes handed on after the head are exactly
//! the tail of what the client sent; the head read never exceeds the configured limit.
#![no_main]

mod common;

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tether::protocol::Target;
use tether::proxy::client_entry::ClientEntryConfig;
use tether::proxy::client_entry::fuzzing::http_handshake;

static CONFIG: LazyLock<ClientEntryConfig> = LazyLock::new(common::entry_config);

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut stream = common::duplex(rest);
    let Ok((target, user, leftover)) =
        common::block_on(http_handshake(&mut stream, first, &CONFIG))
    else {
        return;
    };
    assert_eq!(user, common::CLIENT);
    assert!(
        data.ends_with(&leftover),
        "leftover is not the tail of the input"
    );
    let head = &data[..data.len() - leftover.len()];
    assert!(head.len() <= CONFIG.max_header_bytes, "head over the limit");
    // RFC 9112 §2.2: a server should ignore empty lines before the request line (httparse does).
    let request_line = head.trim_ascii_start();
    assert!(
        request_line.starts_with(b"CONNECT "),
        "admitted another method"
    );
    let (name, port) = target.to_name();
    let again = Target::from_name(&name, port.max(1)).expect("admitted target re-parses");
    assert_eq!(again.cluster, target.cluster);
});
