//! A load balancer's PROXY protocol header (`protocol/proxy_header.rs`), from its first byte.
//!
//! Invariants: the reader never reads past the header's bound (12 + 4 + `MAX_V2_BODY` bytes
//! for version 2, `MAX_V1` for version 1), and never past a header it accepts (the bytes after
//! it are TLS's or SSH's); an accepted version 1 line parses to the same address again.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tether::protocol::proxy_header::{
    MAX_V1, MAX_V2_BODY, V2_SIGNATURE, parse_v1, read_proxy_header,
};

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    let header = common::block_on(read_proxy_header(&mut stream));
    let read = data.len() - stream.len();
    let v2 = data.starts_with(&V2_SIGNATURE);
    let bound = if v2 { 16 + MAX_V2_BODY } else { MAX_V1 };
    assert!(read <= bound, "read {read} bytes of a header");
    if let Ok(source) = header {
        if v2 {
            let announced = usize::from(u16::from_be_bytes([data[14], data[15]]));
            assert_eq!(read, 16 + announced, "read past the announced length");
        } else {
            assert!(data[..read].ends_with(b"\r\n"), "read past the line");
            assert_eq!(parse_v1(&data[..read]).ok(), Some(source));
        }
    }
});
