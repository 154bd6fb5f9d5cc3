//! The HTTP CONNECT handshake of the client entry, from the first byte a client sends.
//!
//! Invariants: a request is admitted only for a known client with its token; the admitted
//! target is a valid `HOST.CLUSTER.tether` name; the bytes handed on are exactly those that
//! followed the head; the head read never exceeds the configured limit.
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
    // The entry reads in chunks: the leftover is what it read past the head, and the bytes it
    // has not read yet stay in the stream for the tunnel. So the leftover sits between the
    // head and the unread rest.
    let (unread, _) = stream.into_inner();
    let read = data.len() - unread.len();
    let head_len = read
        .checked_sub(leftover.len())
        .expect("leftover longer than what was read");
    assert_eq!(
        &data[head_len..read],
        &leftover[..],
        "leftover is not what followed the head"
    );
    let head = &data[..head_len];
    assert!(head.len() <= CONFIG.max_header_bytes, "head over the limit");
    assert!(head.ends_with(b"\n"), "the head ends before its blank line");
    // RFC 9112 section 2.2: a server should ignore empty lines before the request line (httparse does).
    let request_line = head.trim_ascii_start();
    assert!(
        request_line.starts_with(b"CONNECT "),
        "admitted another method"
    );
    let (name, port) = target.to_name();
    let again = Target::from_name(&name, port.max(1)).expect("admitted target re-parses");
    assert_eq!(again.cluster, target.cluster);
});
