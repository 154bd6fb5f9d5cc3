//! WebSocket frames: what the proxy's TLS port reads from a client before it has authenticated
//! (the tunnel's SSH runs inside them), and what an agent reads from a load balancer.
//!
//! Invariants: reading never panics; the bytes read are the payloads of the data frames, so
//! never more than the input; a server refuses an unmasked frame and a client a masked one;
//! and what a client writes, however it is cut into writes, a server reads back exactly.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tether::transport::websocket::{Role, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        for role in [Role::Server, Role::Client] {
            read_raw(rest, role);
        }
    } else {
        round_trip(rest, usize::from(mode >> 1).max(1));
    }
});

/// Reads `input` as frames from the peer of `role`.
fn read_raw(input: &[u8], role: Role) {
    let mut ws = WebSocket::new(common::duplex(input), role, Vec::new());
    let mut payload = Vec::new();
    let _ = common::block_on(ws.read_to_end(&mut payload));
    assert!(payload.len() <= input.len(), "read more than the input");
    // A first frame masked the wrong way round for `role` is refused before any byte.
    if let [first, second, ..] = input {
        let wrong_way = (second & 0x80 != 0) != (role == Role::Server);
        if first & 0x0F == 0x2 && wrong_way {
            assert!(payload.is_empty(), "{role:?} took a frame masked the wrong way");
        }
    }
}

/// A client writes `data` in pieces of `piece` bytes; a server reads it back.
fn round_trip(data: &[u8], piece: usize) {
    let (client, server) = tokio::io::duplex(1 << 20);
    let mut client = WebSocket::new(client, Role::Client, Vec::new());
    let mut server = WebSocket::new(server, Role::Server, Vec::new());
    let read = common::block_on(async {
        for chunk in data.chunks(piece) {
            client.write_all(chunk).await.expect("write");
        }
        client.shutdown().await.expect("shutdown");
        let mut read = Vec::new();
        server.read_to_end(&mut read).await.expect("read");
        read
    });
    assert_eq!(read, data);
}
