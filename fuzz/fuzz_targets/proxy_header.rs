//! A load balancer's PROXY protocol header (`protocol/proxy_header.rs`), from its first byte.
//!
//! Invariants: reading never asks for bytes past the header's bound (12 + 4 + `MAX_V2_BODY`
//! for version 2, `MAX_V1` for version 1), nor past a header it accepts (the bytes after it
//! are TLS's or SSH's); an accepted version 1 line parses to the same address again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether::protocol::proxy_header::{MAX_V1, MAX_V2_BODY, V2_SIGNATURE, from_bytes, parse_v1};

fuzz_target!(|data: &[u8]| {
    let Ok((source, len)) = from_bytes(data) else {
        return;
    };
    if data.starts_with(&V2_SIGNATURE) {
        let announced = usize::from(u16::from_be_bytes([data[14], data[15]]));
        assert_eq!(len, 16 + announced, "not the announced length");
        assert!(len <= 16 + MAX_V2_BODY);
    } else {
        assert!(len <= MAX_V1 && data[..len].ends_with(b"\r\n"), "read past the line");
        assert_eq!(parse_v1(&data[..len]).ok(), Some(source));
    }
});
